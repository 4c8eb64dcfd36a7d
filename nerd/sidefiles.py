"""The base's files other than its weights, which the output keeps: its layout, not part of the merge.

Copied: every top-level file except weights (WEIGHT_SUFFIXES, index files), config.json (the
writer rewrites it), README.md (replaced by the model card), dot-files, and the figures, report
and mergekit recipe of an earlier merge (a base that is itself a merge). What is copied: tokenizer
files, generation_config.json, chat templates, license, custom code.

A sentence-transformers model also names, in its modules.json, a folder for each module after the
transformer itself (`1_Pooling/`, `2_Normalize/`, `2_Dense/`: the module's "path"); without them
sentence-transformers cannot load the output. Each such folder of the base is copied whole: its
configuration, and the weights of a module that has some (a Dense layer's model.safetensors),
as they are, since they are not part of the merge (the plan's notes say so). A path that is
absolute or climbs out with '..' is refused; a folder the base lacks (a Normalize module needs
no files, and the hub stores no empty folder) is left out, as in the base.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .weightfiles import outside_directory
from .errors import ModelError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
NOT_COPIED = ("config.json", "README.md", "merge_report.json", "mergekit_config.yml")
OUR_FIGURES = re.compile(r"(heatmap_[\w.-]+|expansion_curve)\.png")
MODULES = "modules.json"


def copy_side_files(base: Path, tmp: Path) -> None:
    """Every top-level file of the base that is kept (see the module docstring), then the module
    folders its modules.json names."""
    for path in sorted(base.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.suffix not in WEIGHT_SUFFIXES
            and not path.name.endswith(".index.json")
            and path.name not in NOT_COPIED
            and not OUR_FIGURES.match(path.name)
        ):
            shutil.copyfile(path, tmp / path.name)
    for folder in module_folders(base):
        for source in module_files(base / folder):
            target = tmp / folder / source.relative_to(base / folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)  # follows symbolic links (the hub cache's blobs)


def module_folders(base: Path) -> list[str]:
    """The folders that the base's modules.json names (each module's "path"), other than the model
    directory itself, in its order; none without a modules.json. ModelError (one line) for a file
    that is not a list of modules, or a path that is absolute or climbs out with '..'."""
    path = base / MODULES
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(
            f"{path}: not valid JSON ({first_line(exc)}); expected sentence-transformers' list of modules"
        ) from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelError(
            f'{path}: expected a list of modules ({{"idx", "name", "path", "type"}}), found '
            f"{type(modules).__name__ if not isinstance(modules, list) else 'other items'}"
        )
    folders = []
    for i, module in enumerate(modules):
        folder = module.get("path", "")
        if not isinstance(folder, str):
            raise ModelError(f"{path}: module {i}: path is {folder!r}, expected a folder name")
        if outside_directory(folder):
            raise ModelError(
                f"{path}: module {i}: path '{folder}' points outside the model directory; refused "
                f"(expected a folder inside {base})"
            )
        if Path(folder).parts and folder not in folders:
            folders.append(folder)
    return folders


def module_files(folder: Path) -> list[Path]:
    """Every file under a module folder, dot-files and dot-folders left out; none if it is absent."""
    if not folder.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and (Path(root) / f).is_file()]
    return found


def module_notes(base: Path) -> list[str]:
    """One line for each module folder that holds weights of its own, which the output takes as is
    from the base; checks the base's modules.json (module_folders) on the way."""
    notes = []
    for folder in module_folders(base):
        weights = [p.relative_to(base).as_posix() for p in module_files(base / folder) if p.suffix in WEIGHT_SUFFIXES]
        if weights:
            notes.append(
                f"sentence-transformers module '{folder}' (modules.json) has weights of its own "
                f"({', '.join(weights)}): copied as is from the base, not merged"
            )
    return notes

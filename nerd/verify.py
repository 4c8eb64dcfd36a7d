"""`mastermerge verify DIR`: check a model directory the way a loader would read it, and a
mastermerge output also against its merge_report.json.

A merge records in merge_report.json the size and SHA-256 of every file that holds its weights
(`files`: the shards and the index json). verify reads the directory back and runs these checks,
one function each (check_files and check_plan here, the checks of the files against each other in
nerd.consistency, of config.json's sizes in nerd.loadchecks, of the tokenizer in
nerd.tokenizerfiles):

- check_files: every file the report records exists, with its size and SHA-256 (a truncated,
  extended or altered file is named), and every weight or index file in the directory is one
  the report records (an extra shard is named);
- check_headers: each shard's safetensors header is valid (the checks nerd.checkpoint makes of
  every input: JSON, dtypes, shapes, offsets inside the data, no overlaps), its tensors cover its
  data exactly, as the safetensors library requires, and no tensor is in two shards;
- check_index: the index json maps every tensor to a shard of this output, inside the directory,
  that holds it; every tensor of every shard is listed; metadata.total_size is the tensors' bytes;
- check_plan: the shards hold the tensors the report's plan lists, with their dtypes and shapes;
- check_config: config.json parses, its layer count (num_hidden_layers, n_layer, ...: the keys of
  the model's family, nerd.architecture) equals the number of blocks in the tensor names
  (nerd.layout);
- check_sizes: config.json's sizes are the tensors' shapes where transformers would compare them
  (vocab_size and the embedding's rows, hidden_size, intermediate_size, the attention heads and
  head_dim, the positions: the shapes of the model's family);
- check_tokenizer: the tokenizer files present parse, a tokenizer they describe can be built,
  and no token id is past the token embedding's rows;
- check_loads: when nothing else is wrong, nerd.checkpoint.Checkpoint.open reads the directory as
  a merge reads its inputs.

Any checkpoint directory can be verified: without merge_report.json there is nothing to compare
the files' sizes and hashes or the plan with, so check_files is reduced to the shards the index
names being there, and check_plan is left out; every other check runs, and the summary says the
hashes were not checked. verify_output runs them all and returns every Problem (a file and what
is wrong with it) with what was checked; the command line prints one line per problem and exits
with IntegrityError's code (5) when there is any. A directory that does not exist, or that holds
no safetensors weights, is a ModelError (3): there is nothing to verify.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import TensorInfo
from .architecture import architecture_of
from .consistency import Problem, check_config, check_headers, check_index, check_loads, is_plain_name, names
from .errors import ModelError, first_line
from .hashing import file_digests
from .loadchecks import check_sizes
from .sidefiles import WEIGHT_SUFFIXES
from .tokenizerfiles import TokenizerFiles, check_tokenizer
from .weightfiles import INDEX

REPORT = "merge_report.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Verification:
    """What verify_output found: every problem, and what was checked."""

    directory: Path
    problems: list[Problem] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    layers: int | None = None
    files_hashed: int = 0
    bytes_hashed: int = 0
    report: bool = True  # the directory has a merge_report.json to check the files against
    tokenizer: TokenizerFiles = field(default_factory=TokenizerFiles)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if not self.ok:
            return f"{self.directory}: verification failed: {len(self.problems)} problem(s)"
        layers = f", {self.layers} layers" if self.layers is not None else ""
        hashes = (
            f"{self.files_hashed} file(s), {self.bytes_hashed:,} bytes, match the sizes and SHA-256 of {REPORT}"
            if self.report
            else f"no {REPORT}, so the files' sizes and SHA-256 were not checked"
        )
        return (
            f"{self.directory}: ok: {len(self.shards)} shard(s), {self.tensors} tensors{layers}; "
            f"{self.tokenizer.summary()}; {hashes}"
        )

    def to_dict(self) -> dict:
        return {
            "directory": str(self.directory),
            "ok": self.ok,
            "problems": [{"file": str(p.file), "problem": p.message} for p in self.problems],
            "shards": self.shards,
            "tensors": self.tensors,
            "layers": self.layers,
            "files_hashed": self.files_hashed,
            "bytes_hashed": self.bytes_hashed,
            "report": self.report,
            "tokenizer": self.tokenizer.to_dict(),
        }


@dataclass
class Report:
    """What merge_report.json says the directory holds (as far as it could be read)."""

    shards: list[str] | None = None  # None: the report does not say
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"bytes", "sha256"}
    entries: list[dict] | None = None  # the plan's output tensors


def verify_output(directory: str | Path, quiet: bool = False) -> Verification:
    """Run every check on a model directory, a mastermerge output or any other (see the module docstring)."""
    directory = Path(directory)
    report_path = check_directory(directory)
    result = Verification(directory, report=report_path is not None)
    if report_path is not None:
        report, problems = read_report(report_path)
        result.problems += problems
        shards = report.shards if report.shards is not None else shards_on_disk(directory)
        problems, result.files_hashed, result.bytes_hashed = check_files(directory, report, shards, quiet)
    else:
        report, shards = Report(), checkpoint_shards(directory)
        problems = check_present(directory, shards)
    result.shards = shards
    result.problems += problems
    problems, headers = check_headers(directory, shards)
    result.problems += problems
    result.tensors = sum(len(infos) for infos in headers.values())
    complete = len(headers) == len(shards)  # every shard's header was read
    result.problems += check_index(directory, shards, headers, recorded=INDEX in report.files)
    if complete and report.entries is not None:
        result.problems += check_plan(report_path, report.entries, headers)
    problems, result.layers = check_config(directory, headers, complete)
    result.problems += problems + check_sizes(directory, headers, complete)
    problems, result.tokenizer = check_tokenizer(directory, headers, architecture_of(directory))
    result.problems += problems
    if not result.problems:
        result.problems += check_loads(directory)
    return result


def check_directory(directory: Path) -> Path | None:
    """The directory's merge_report.json (None without one); a ModelError (one line) if it is not a directory."""
    if not directory.exists():
        raise ModelError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a directory; expected a model directory")
    report = directory / REPORT
    return report if report.is_file() else None


def checkpoint_shards(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint without merge_report.json: the index's shards, else
    model.safetensors (as transformers picks them), else every *.safetensors file (as a merge
    reads its inputs); a ModelError if there are none."""
    if (directory / INDEX).is_file():
        return shards_on_disk(directory)
    if (directory / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    if found:
        return found
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix == ".bin" and p.is_file())
    if pickled:
        raise ModelError(
            f"{directory}: holds pickled weights only ({names(pickled)}); verify checks safetensors checkpoints"
        )
    raise ModelError(f"{directory}: no weights (model.safetensors, or an index json and its shards); nothing to verify")


def check_present(directory: Path, shards: list[str]) -> list[Problem]:
    """Without merge_report.json: every shard the index names is a file of the directory (a link
    to one, as in the hub's cache, too)."""
    problems = []
    for name in shards:
        path = directory / name
        if not path.exists():
            problems.append(Problem(path, f"missing ({INDEX} names it)"))
        elif not path.is_file():
            problems.append(Problem(path, "not a regular file"))
    return problems


def read_report(path: Path) -> tuple[Report, list[Problem]]:
    """The shards, the recorded sizes and hashes, and the plan's tensors that merge_report.json lists."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return Report(), [Problem(path, f"cannot be read ({exc.strerror or exc}); nothing to compare the files with")]
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Report(), [Problem(path, f"not valid JSON ({first_line(exc)}); nothing to compare the files with")]
    if not isinstance(data, dict):
        return Report(), [Problem(path, "not a JSON object; nothing to compare the files with")]
    report, problems = Report(), []
    shards = data.get("shards")
    if isinstance(shards, list) and shards and all(isinstance(s, str) for s in shards):
        report.shards = shards
    else:
        problems.append(Problem(path, f"'shards' is {shards!r}, expected a list of file names"))
    files = data.get("files")
    if files is None:
        problems.append(
            Problem(
                path,
                "records no sizes or SHA-256 hashes of the weight files (written by an "
                "earlier mastermerge); their content cannot be checked",
            )
        )
    elif not isinstance(files, dict):
        problems.append(
            Problem(path, f"'files' is {type(files).__name__}, expected an object of file name -> {{bytes, sha256}}")
        )
    else:
        for name, record in files.items():
            if (
                isinstance(record, dict)
                and type(record.get("bytes")) is int
                and record["bytes"] >= 0
                and isinstance(record.get("sha256"), str)
                and SHA256.fullmatch(record["sha256"])
            ):
                report.files[name] = record
            else:
                problems.append(
                    Problem(path, f'files: \'{name}\': {record!r} is not {{"bytes": size, "sha256": 64 hex digits}}')
                )
    plan = data.get("plan")
    entries = plan.get("entries") if isinstance(plan, dict) else None
    if isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        report.entries = entries
    else:
        problems.append(Problem(path, "plan.entries is missing or malformed; the tensors cannot be compared with it"))
    return report, problems


def shards_on_disk(directory: Path) -> list[str]:
    """The shards when the report does not list them: the index's, else the safetensors files."""
    try:
        weight_map = json.loads((directory / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return sorted({s for s in weight_map.values() if isinstance(s, str) and is_plain_name(s)})
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())


def check_files(directory: Path, report: Report, shards: list[str], quiet: bool) -> tuple[list[Problem], int, int]:
    """Every recorded file (and every listed shard) exists with its recorded size and SHA-256, and
    the directory holds no weight or index file beyond them. Returns the problems, and the files
    and bytes hashed."""
    problems, to_hash = [], []
    for name in [*report.files, *(s for s in shards if s not in report.files)]:
        record, path = report.files.get(name), directory / name
        if not is_plain_name(name):
            problems.append(Problem(directory / REPORT, f"records '{name}', which is not a file of this directory"))
        elif path.is_symlink():
            problems.append(Problem(path, f"a symbolic link to {os.readlink(path)}, not the file the merge wrote"))
        elif not path.exists():
            recorded = f" ({REPORT} records {record['bytes']:,} bytes)" if record else ""
            problems.append(Problem(path, f"missing{recorded}"))
        elif not path.is_file():
            problems.append(Problem(path, "not a regular file"))
        elif record is None:
            if report.files:  # the report records files, but not this one
                problems.append(Problem(path, f"has no size or SHA-256 in {REPORT}"))
        else:
            size = path.stat().st_size
            if size != record["bytes"]:
                how = "truncated or changed" if size < record["bytes"] else "appended to or changed"
                problems.append(Problem(path, f"{size:,} bytes, {REPORT} records {record['bytes']:,} ({how})"))
            else:
                to_hash.append((path, record))
    for (path, record), digest in zip(to_hash, file_digests([(p, r["bytes"]) for p, r in to_hash], quiet)):
        if isinstance(digest, OSError):
            problems.append(Problem(path, f"cannot be read ({digest.strerror or digest})"))
        elif digest != record["sha256"]:
            problems.append(
                Problem(
                    path,
                    f"SHA-256 {digest} differs from the {record['sha256']} that {REPORT} records (the content changed)",
                )
            )
    if report.files and len(shards) > 1 and INDEX not in report.files:
        problems.append(Problem(directory / INDEX, f"has no size or SHA-256 in {REPORT}"))
    known = set(report.files) | set(shards) | ({INDEX} if len(shards) > 1 else set())
    for path in sorted(directory.iterdir()):
        if (
            path.name not in known
            and (path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"))
            and (path.is_file() or path.is_symlink())
        ):
            problems.append(Problem(path, f"a weight file that {REPORT} does not record (not written by this merge)"))
    return problems, len(to_hash), sum(r["bytes"] for _, r in to_hash)


def check_plan(report_path: Path, entries: list[dict], headers: dict[str, list[TensorInfo]]) -> list[Problem]:
    """The shards hold exactly the plan's tensors, each with the plan's dtype and shape."""
    written = {info.name: info for infos in headers.values() for info in infos}
    planned = {entry["name"]: entry for entry in entries}
    problems = []
    missing = [name for name in planned if name not in written]
    if missing:
        problems.append(Problem(report_path, f"{len(missing)} tensor(s) of the plan are in no shard: {names(missing)}"))
    for name, info in written.items():
        entry = planned.get(name)
        if entry is None:
            problems.append(Problem(info.file, f"tensor '{name}' is not in the plan of {REPORT}"))
        elif (info.dtype, list(info.shape)) != (entry.get("dtype"), entry.get("shape")):
            problems.append(
                Problem(
                    info.file,
                    f"tensor '{name}' is {info.dtype} {list(info.shape)}, the plan has "
                    f"{entry.get('dtype')} {entry.get('shape')}",
                )
            )
    return problems

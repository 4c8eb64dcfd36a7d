"""Resolve each model the config names to a local directory: as is, or from the Hugging Face hub.

Hub models go through huggingface_hub, so HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and tokens
(HF_TOKEN or `hf auth login`) work the standard way. Only what a merge needs is downloaded:
the safetensors weights, the json files and the tokenizer files; pickled .bin weights only when
the repo has no safetensors; and the module folders a sentence-transformers modules.json names
(a Dense layer's weights among them), which the output keeps (sidefiles.py). A PEFT adapter's
repo downloads the same way (its adapter_model.safetensors, or .bin, and its json files).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from .adapters import AdapterSource, paired
from .config import ModelSpec
from .errors import ModelError
from .sidefiles import MODULES, module_folders

SIDE_FILES = [
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.jinja",
]
WEIGHT_CHOICES = (  # first match wins; the first pattern of each choice is what must be present
    ["model.safetensors.index.json", "model-*.safetensors"],
    ["model.safetensors"],
    ["*.safetensors"],
    ["pytorch_model.bin.index.json", "pytorch_model-*.bin"],
    ["pytorch_model.bin"],
    ["*.bin"],
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to read: its spec, its local directory and the exact revision used."""

    spec: ModelSpec
    path: Path | AdapterSource  # an adapter's: its directory, on the merge's base
    revision: str | None = None


def resolve_models(specs: tuple[ModelSpec, ...], base: ModelSpec) -> dict[str, ResolvedModel]:
    """Every model of a merge resolved, by its ref; a PEFT adapter among them is read on the merge's
    base (adapters.py: its path an AdapterSource)."""
    return paired({spec.ref: resolve_model(spec) for spec in specs}, base)


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Return the local directory of a model, downloading it from the hub if needed."""
    if spec.path is not None:
        return ResolvedModel(spec=spec, path=spec.path)
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = spec.revision or "main"
    try:
        patterns = None
        if not constants.HF_HUB_OFFLINE:
            try:
                info = HfApi().model_info(spec.repo_id, revision=revision)  # one request, no retries
                files = [sibling.rfilename for sibling in info.siblings or []]
                patterns = weight_patterns(files, spec.ref) + SIDE_FILES + module_patterns(spec, revision, files)
            except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, ModelError):
                raise
            except Exception:  # the hub is unreachable: use what the local cache holds
                patterns = None
        folder = Path(
            snapshot_download(
                spec.repo_id, revision=revision, allow_patterns=patterns, local_files_only=patterns is None
            )
        )
    except GatedRepoError:
        raise ModelError(
            f"model '{spec.ref}': the repo is gated; accept its terms on the hub and log in "
            f"(HF_TOKEN or `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model '{spec.ref}': no such repo on the hub (or it is private and no token with access was found)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"model '{spec.ref}': revision '{revision}' not found on the hub") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if constants.HF_HUB_OFFLINE
            else f"the hub cannot be reached and it is not in the local cache ({type(exc).__name__})"
        )
        raise ModelError(f"model '{spec.ref}': cannot download: {why}") from None
    return ResolvedModel(spec=spec, path=folder, revision=folder.name)


def module_patterns(spec: ModelSpec, revision: str, files: list[str]) -> list[str]:
    """Everything under the module folders of the repo's modules.json (downloaded first to read them)."""
    if MODULES not in files:
        return []
    from huggingface_hub import hf_hub_download

    folder = Path(hf_hub_download(spec.repo_id, MODULES, revision=revision)).parent
    return [f"{module}/*" for module in module_folders(folder)]


def weight_patterns(files: list[str], ref: str) -> list[str]:
    """The weight files to fetch: safetensors if the repo has any, otherwise pickled .bin files."""
    top_level = [f for f in files if "/" not in f]
    for patterns in WEIGHT_CHOICES:
        if any(fnmatch.fnmatch(f, patterns[0]) for f in top_level):
            return patterns
    raise ModelError(f"model '{ref}': the repo has no .safetensors or .bin weights (files: {', '.join(top_level)})")

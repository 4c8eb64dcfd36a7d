"""Helpers shared by the tests.

Reference computations, independent of mastermerge's code: read what was written with the
safetensors library, compute NER with numpy's float64 SVD and perplexity with transformers' own loss.

Running mastermerge, for tests of the command line (exit codes, --json, messages): `merge` writes
a config file (`write_config`) and runs the command line's merge on it in this process
(`run_merge`, which `run_cli` runs with stdout and stderr captured), and returns a `Merged`. For
tests that only need a plan or a written output: `config_of` builds the config in Python (the one
place the tests build a config object) and `api_merge` plans and writes it through the Python API.

The tiny models: `build_family` builds a base and fine-tunes of it; conftest.py's `llama_family`
fixture shares one such family across modules.
"""

import contextlib
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from safetensors import safe_open

from examples.tiny_models import build_model
from nerd import MetricCache, claim_output, plan_merge, write_merge
from nerd.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "models"  # the example models built by examples/build_examples.py
TRAINED = REPO / "tests" / "data" / "trained-llama"  # examples/train_tiny.py: 300 steps on stdlib sources

# The fine-tunes of a family, by name: the arguments of build_model besides base_dir. NOISE: full-rank
# noise on every block; RANK_ONE: ft-b has a rank-1 update on layer 1 instead, which lowers its NER there.
NOISE = {"ft-a": {"seed": 1, "noise": 0.05}, "ft-b": {"seed": 2, "noise": 0.3}}
RANK_ONE = {"ft-a": {"seed": 1, "noise": 0.05}, "ft-b": {"seed": 2, "noise": 0.5, "noise_rank": 1, "layers": [1]}}


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory, read with the safetensors library."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def reference_ner(w: torch.Tensor) -> float:
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(s)))


def transformers_perplexity(directory: Path, windows, kind: str) -> float:
    """exp of the mean loss per scored token, from the loss transformers itself computes for each
    window (labels -100 where nothing is scored; a causal LM shifts them itself)."""
    cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForMaskedLM
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in zip(windows.inputs, windows.labels):
            scored = sum(label != -100 for label in (labels[1:] if kind == "causal" else labels))
            if not scored:  # transformers' loss is a mean over the scored tokens: NaN over none
                continue
            loss = model(input_ids=torch.tensor([inputs]), labels=torch.tensor([labels])).loss
            total += float(loss) * scored
            count += scored
    return math.exp(total / count)


def assert_bytes_follow_plan(out: Path) -> dict:
    """Every tensor written is, byte for byte, the tensor its plan entry names in its source (found by
    its name through the report's inputs); the merge report."""
    report = json.loads((out / "merge_report.json").read_text())
    sources = {i["model"]: Path(i["local"]) for i in report["inputs"] if "local" in i}
    written = tensors_of(out)
    entries = report["plan"]["entries"]
    assert sorted(written) == sorted(e["name"] for e in entries)
    cache = {}
    for e in entries:
        src = cache.setdefault(e["source"], tensors_of(sources[e["source"]]))[e["tensor"]]
        assert written[e["name"]].dtype == src.dtype
        assert torch.equal(written[e["name"]].view(-1).view(torch.uint8), src.view(-1).view(torch.uint8)), e
    return report


def by_name(value, paths):
    """A JSON value as an output writes what a merge read: each of `paths` (the longest first) by its
    last part, the name an output gives a local model or file whose name no other shares."""
    text = json.dumps(value)
    for path in sorted(map(str, paths), key=len, reverse=True):
        text = text.replace(json.dumps(path)[1:-1], Path(path).name)
    return json.loads(text)


# -- the tiny models ----------------------------------------------------------------------------------


def build_family(
    root: Path, family: str = "llama", fine_tunes: int = 2, *, recipe: dict = NOISE, prefix: str = "", **architecture
) -> list[Path]:
    """A base (seed 0, built with the `architecture` arguments of build_model) and the first
    `fine_tunes` fine-tunes of `recipe`, each saved as root / (prefix + its name)."""
    base = build_model(family, root / f"{prefix}base", seed=0, **architecture)
    return [base] + [
        build_model(family, root / f"{prefix}{name}", base_dir=base, **arguments)
        for name, arguments in list(recipe.items())[:fine_tunes]
    ]


# -- configs ------------------------------------------------------------------------------------------


def raw_config(models, out: Path, **options) -> dict:
    """A config as its YAML file holds it: the models, base_model the first of them (unless
    `options` name it), output_dir, and any other keys."""
    return {"models": [str(m) for m in models], "base_model": str(models[0]), "output_dir": str(out), **options}


def write_config(path: Path, models, out: Path, **options) -> Path:
    """The config file of `raw_config`, written to `path`."""
    path.write_text(yaml.safe_dump(raw_config(models, out, **options)))
    return path


def config_of(models, out: Path, **options):
    """The validated config of `raw_config`, built in Python, as load_config would read it from a
    file beside the output directory."""
    from nerd.config import config_from_dict

    return config_from_dict(raw_config(models, out, **options), base_dir=Path(out).parent)


def api_merge(models, out: Path, *, cache: Path | None = None, **options):
    """Plan and write the merge of `config_of` through the Python API, as the command line does
    with --quiet, with the metric cache file `cache` (None: one in memory); the plan."""
    config = config_of(models, out, **options)
    claim_output(config)
    with contextlib.closing(MetricCache(cache)) as metrics:
        plan = plan_merge(config, cache=metrics, quiet=True)
    write_merge(plan, config, quiet=True)
    return plan


# -- the command line ---------------------------------------------------------------------------------


def run_cli(*args) -> tuple[int, str, str]:
    """mastermerge's command line, run in this process: the exit code, stdout and stderr. Both
    streams are captured here (not by capsys), so any scope may run it, module fixtures too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@dataclass
class Merged:
    """What one run of the command line's merge did."""

    code: int  # the exit code
    stdout: str
    stderr: str
    output: Path | None  # the config's output directory (absent after a refused or failed run), if known
    results: list[dict]  # the --json summary's results, one per config ([] if nothing was printed)

    @property
    def result(self) -> dict | None:
        """The --json summary of the (first) config, None if there is none."""
        return self.results[0] if self.results else None

    def ok(self) -> dict | None:
        """The --json summary of the config, once the run is seen to have succeeded (exit code 0;
        otherwise the assertion shows stderr)."""
        assert self.code == 0, self.stderr
        return self.result

    @property
    def messages(self) -> list[str]:
        """The lines of stderr that mastermerge wrote (warnings, notes, errors), without progress bars."""
        return [line for line in self.stderr.splitlines() if line.startswith("mastermerge:")]


def merge(
    models,
    where: Path,
    *flags,
    output: Path | None = None,
    config: str = "m.yaml",
    cache: str | Path | None = "c.sqlite",
    quiet: bool = True,
    as_json: bool = True,
    **options,
) -> Merged:
    """Write the config of `raw_config` (output_dir `output`, by default where / "out") to
    where / config and run the command line's merge on it (`run_merge`), with the metric cache
    where / cache (an absolute path is used as it is; None: --no-cache)."""
    output = Path(output or where / "out")
    path = write_config(where / config, models, output, **options)
    return run_merge(
        path, *flags, cache=None if cache is None else where / cache, quiet=quiet, as_json=as_json, output=output
    )


def run_merge(
    config: Path, *flags, cache: Path | None, quiet: bool = True, as_json: bool = True, output: Path | None = None
) -> Merged:
    """The command line's merge of a config file, in this process: `--cache cache` (`--no-cache`
    for None), --quiet and --json unless turned off, then the `flags`."""
    argv = [
        "--config",
        config,
        *(["--no-cache"] if cache is None else ["--cache", cache]),
        *(["--quiet"] if quiet else []),
        *(["--json"] if as_json else []),
        *flags,
    ]
    code, stdout, stderr = run_cli(*argv)
    return Merged(code, stdout, stderr, output, json.loads(stdout)["results"] if as_json and stdout.strip() else [])


def cli_command(*args, prefix=()) -> list[str]:
    """The command line that runs mastermerge.py with `args` in a new process of this interpreter
    (after `prefix`, a command that runs it)."""
    return [*map(str, prefix), sys.executable, str(REPO / "mastermerge.py"), *map(str, args)]


def run_process(command: list, **options) -> subprocess.CompletedProcess:
    """A command run to its end (at most 300 s), its output captured as text."""
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300, **options)

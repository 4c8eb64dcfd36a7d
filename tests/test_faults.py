"""Faults during a run: signals mid-write, a kill outright, a full disk. The destination stays as
it was (absent, or the earlier output byte for byte), no temporary directory is left, and a rerun
succeeds and reuses the metric cache.

Each fault is real: the run is a separate Python process that sends itself the signal at a chosen
point (after the n-th tensor written, the n-th spectrum, the first rename), or that writes on a
file system that is really full (a small tmpfs in a private mount namespace) or under a file size
limit the kernel enforces.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, write_config

# The run, with a fault injected at one point: python HARNESS POINT SIGNAL N -- mastermerge arguments.
HARNESS = r"""
import os, sys
point, signum, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1:]
calls = [0]

def fault(original):
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n and signum:
            os.kill(os.getpid(), signum)
        elif calls[0] == n:  # no signal: another program fills the output directory meanwhile
            os.makedirs(os.environ["FILL"], exist_ok=True)
            open(os.path.join(os.environ["FILL"], "theirs.txt"), "w").close()
        return result
    return wrapped

if point == "tensor":
    import nerd.write as module
    module.start_writeback = fault(module.start_writeback)
elif point == "spectrum":
    import nerd.engine as module
    module.spectra_of = fault(module.spectra_of)
elif point == "rename":
    os.rename = fault(os.rename)
from nerd.cli import main
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def models(llama_family):
    """A base of 4 layers and two fine-tunes of it."""
    return [llama_family(4)[m] for m in ("base", "ft-a", "ft-b")]


def sharded_config(tmp_path: Path, models, out: Path) -> Path:
    """The config file of a merge written in several shards."""
    return write_config(tmp_path / "merge.yaml", models, out, shard_size="100KB")


def run(tmp_path: Path, config: Path, *extra, point=None, signum=0, n=0, preexec=None, prefix=()):
    argv = ["--config", str(config), "--cache", str(tmp_path / "cache.sqlite"), "--quiet", "--json", *extra]
    if point is None:
        command = [sys.executable, str(REPO / "mastermerge.py"), *argv]
    else:
        harness = tmp_path / "harness.py"
        harness.write_text(HARNESS)
        command = [sys.executable, str(harness), point, str(int(signum)), str(n), "--", *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", FILL=str(tmp_path / "out"))
    return subprocess.run(
        [*prefix, *command], capture_output=True, text=True, env=env, cwd=tmp_path, preexec_fn=preexec, timeout=300
    )


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under a directory and the SHA-256 of its bytes (empty if it does not exist)."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def written_once(tmp_path: Path, models) -> tuple[Path, Path, dict[str, str]]:
    """An output written by a complete run: its directory, its config and its snapshot."""
    out = tmp_path / "out"
    config = sharded_config(tmp_path, models, out)
    summary(run(tmp_path, config))
    return out, config, snapshot(out)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if ".mastermerge-" in p.name)


def summary(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["results"][0]


def assert_one_clean_line(result, code: int, *phrases: str):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mastermerge:")]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("earlier_output", [False, True])
def test_signal_mid_write_leaves_the_destination_as_it_was(tmp_path, models, signum, code, earlier_output):
    out = tmp_path / "out"
    config = sharded_config(tmp_path, models, out)
    extra = ()
    if earlier_output:
        summary(run(tmp_path, config))
        extra = ("--force",)
    before = snapshot(out)
    result = run(tmp_path, config, *extra, point="tensor", signum=signum, n=5)
    what = "is as it was" if earlier_output else "was not created"
    assert_one_clean_line(
        result, code, f"interrupted ({signal.Signals(signum).name})", "the partial output was removed", what
    )
    assert snapshot(out) == before and out.exists() == earlier_output
    assert leftovers(out) == []

    again = summary(run(tmp_path, config, "--force"))
    assert again["written"] and again["spectra_computed"] == 0 and again["spectra_reused"] > 0
    assert (out / "merge_report.json").is_file()


def test_signal_while_scoring_keeps_what_was_computed(tmp_path, models):
    out = tmp_path / "out"
    config = sharded_config(tmp_path, models, out)
    result = run(tmp_path, config, point="spectrum", signum=signal.SIGTERM, n=10)
    assert_one_clean_line(result, 143, "interrupted (SIGTERM)", "no output was being written")
    assert not out.exists() and leftovers(out) == []

    again = summary(run(tmp_path, config))
    assert again["spectra_reused"] >= 9 and again["spectra_computed"] > 0


def test_kill_mid_write_is_cleaned_up_by_the_next_run(tmp_path, models):
    out, config, before = written_once(tmp_path, models)
    result = run(tmp_path, config, "--force", point="tensor", signum=signal.SIGKILL, n=5)
    assert result.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    assert len(leftovers(out)) == 1 and leftovers(out)[0].endswith(".tmp")  # a kill cannot clean up

    again = run(tmp_path, config, "--force")
    assert summary(again)["spectra_computed"] == 0
    assert "removed .out.mastermerge-" in again.stderr and "left by a run that was killed" in again.stderr
    assert leftovers(out) == []


def test_kill_between_the_two_renames_puts_the_earlier_output_back(tmp_path, models):
    """Replacing an output takes two renames (old aside, new in). A run killed between them has
    moved the user's output aside; the next run puts it back before deciding anything."""
    out, config, before = written_once(tmp_path, models)
    result = run(tmp_path, config, "--force", point="rename", signum=signal.SIGKILL, n=1)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists() and sorted(p[-4:] for p in leftovers(out)) == [".old", ".tmp"]

    refused = run(tmp_path, config)  # without --force: the earlier output is back, so it is refused
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    assert "put back the earlier output" in refused.stderr
    assert snapshot(out) == before and leftovers(out) == []


def test_an_output_filled_by_something_else_meanwhile_is_not_replaced(tmp_path, models):
    out = tmp_path / "out"
    config = sharded_config(tmp_path, models, out)
    result = run(tmp_path, config, point="tensor", signum=0, n=3)
    assert_one_clean_line(
        result, 4, "something else filled it while this run was writing", "not replaced without --force"
    )
    assert snapshot(out) == {"theirs.txt": hashlib.sha256(b"").hexdigest()} and leftovers(out) == []


def test_an_empty_directory_made_after_a_kill_does_not_lose_the_earlier_output(tmp_path, models):
    out, config, before = written_once(tmp_path, models)
    run(tmp_path, config, "--force", point="rename", signum=signal.SIGKILL, n=1)
    out.mkdir()  # a job script's `mkdir -p out`
    refused = run(tmp_path, config)
    assert refused.returncode == 2 and "put back the earlier output" in refused.stderr
    assert snapshot(out) == before and leftovers(out) == []


def test_full_disk_is_refused_before_writing(tmp_path, models):
    """A real full file system: a 1 MB tmpfs in a private mount namespace, so nothing is mounted
    for anyone else. The run refuses up front and leaves the file system as it was."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("mount namespaces are not available here; the size-limit test covers a failing write")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    config = sharded_config(tmp_path, models, out)
    mount = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{disk}" && exec "$@"', "sh"]
    result = run(tmp_path, config, prefix=mount)
    assert_one_clean_line(result, 4, "No space left on device", "the output needs", "was not created")
    assert not out.exists() and leftovers(out) == []


def test_a_write_that_fails_midway_removes_the_partial_output(tmp_path, models):
    """The kernel refuses a write past the file size limit (EFBIG) in the middle of a shard."""
    out = tmp_path / "out"
    config = sharded_config(tmp_path, models, out)
    summary(run(tmp_path, config, "--dry-run"))  # the cache is written here, without the limit

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    result = run(tmp_path, config, preexec=limited)
    assert_one_clean_line(result, 4, "model-00001-of-", "cannot write the output (File too large)", "was not created")
    assert not out.exists() and leftovers(out) == []
    assert summary(run(tmp_path, config))["spectra_computed"] == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_renames_is_raised_after_them(signum):
    """deferred() holds a signal over the two renames, also for the Python API (no handler set by
    the command line), and raises it as Interrupted once they are done."""
    from nerd.interrupts import Interrupted, deferred

    before = signal.getsignal(signum)
    steps = []
    with pytest.raises(Interrupted) as raised:
        with deferred():
            os.kill(os.getpid(), signum)
            steps.append("first rename")
            steps.append("second rename")
    assert steps == ["first rename", "second rename"] and raised.value.signum == signum
    assert signal.getsignal(signum) == before

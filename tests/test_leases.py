"""Leases: runs sharing one cache file compute each spectrum once, and a claim dies with its holder.

Everything is real: separate OS processes on one SQLite file, a holder killed with SIGKILL, claims
left in the table by processes that are gone. Each run counts what it computed (--json's
spectra_computed, the engine's own count) and each process started here also logs every matrix
it hands to the spectrum computation, so the totals are checked twice.
"""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import write_config
from test_cache_faults import environment, fingerprint, finished

from nerd.checkpoint import Checkpoint
from nerd.leases import Claims, boot_id, started_of, tensor_key
from nerd.store import MetricCache, file_identity

# Runs mastermerge once every process of the group has started and imported it, each matrix's
# spectrum slowed by DELAY seconds (so that the runs overlap) and logged to LOG; with STOP > 0 the
# STOP-th call of the spectrum computation writes LOG.blocked and never returns:
# python RUN LOG DELAY STOP BARRIER COUNT -- mastermerge arguments
RUN = r"""
import os, sys, time
log, delay, stop, barrier, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
argv = sys.argv[sys.argv.index("--") + 1:]
import nerd.engine
from nerd.cli import main
computed = nerd.engine.spectra_of
calls = []
def spectra_of(matrices, device):
    calls.append(len(matrices))
    if len(calls) == stop:
        open(log + ".blocked", "w").close()
        while True:
            time.sleep(1)
    time.sleep(delay * len(matrices))
    with open(log, "a") as f:
        f.write(f"{len(matrices)}\n")
    return computed(matrices, device)
nerd.engine.spectra_of = spectra_of
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.monotonic() + 120
while len(os.listdir(barrier)) < count and time.monotonic() < deadline:
    time.sleep(0.002)
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def models(llama_family) -> list[Path]:
    family = llama_family(3)
    return [family[name] for name in ("base", "ft-a", "ft-b")]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict:
    """One merge alone on a cold cache of its own: its output, and how many spectra it computed."""
    root = tmp_path_factory.mktemp("alone")
    [run] = started(root, [merge_arguments(root, models, "alone", root / "alone.sqlite")])
    code, out, err = finished(run.process)
    assert code == 0, err
    return {"output": fingerprint(root / "alone"), "computed": json.loads(out)["results"][0]["spectra_computed"]}


class Run:
    """A mastermerge process started by `started`, with the file where it logs its matrices."""

    def __init__(self, process: subprocess.Popen, log: Path):
        self.process = process
        self.log = log

    def logged(self) -> int:
        """How many matrices this process handed to the spectrum computation (and finished)."""
        return sum(int(line) for line in self.log.read_text().split()) if self.log.exists() else 0


def merge_arguments(root: Path, models, name: str, cache: Path, *flags) -> list[str]:
    config = write_config(root / f"{name}.yaml", models, root / name)
    return ["--config", str(config), "--cache", str(cache), "--json", *flags]


def started(root: Path, runs: list[list[str]], delay: float = 0.0, stop: int = 0, stderr=None) -> list[Run]:
    """One process per argument list (RUN), each starting mastermerge once all have imported it."""
    barrier = root / f"barrier-{time.monotonic_ns()}"
    barrier.mkdir()
    script = root / "run.py"
    script.write_text(RUN)
    processes = []
    for i, argv in enumerate(runs):
        log = barrier / f"log-{i}"
        command = [sys.executable, str(script), str(log), str(delay), str(stop), str(barrier), str(len(runs))]
        process = subprocess.Popen(
            [*command, "--", *argv],
            stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.PIPE,
            text=True,
            env=environment(),
            cwd=root,
        )
        processes.append(Run(process, log))
    return processes


def leases_left(cache: Path) -> list[tuple]:
    with closing(sqlite3.connect(cache)) as db:
        return db.execute("SELECT key, pid FROM leases").fetchall()


def spectra_stored(cache: Path) -> int:
    with closing(sqlite3.connect(cache)) as db:
        return db.execute("SELECT COUNT(*) FROM spectra").fetchone()[0]


def stored_digests(cache: Path) -> set[str]:
    with closing(sqlite3.connect(cache)) as db:
        return {digest for (digest,) in db.execute("SELECT digest FROM spectra")}


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    """Wait until `condition()` holds; the test fails if `process` ends first, or after 120 s."""
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.05)


def test_two_merges_on_a_cold_cache_compute_every_spectrum_once(tmp_path, models, reference):
    shared = tmp_path / "shared.sqlite"
    runs = started(
        tmp_path, [merge_arguments(tmp_path, models, f"out{i}", shared, "--quiet") for i in (1, 2)], delay=0.05
    )
    results = [finished(run.process) for run in runs]
    for code, _, err in results:
        assert code == 0 and err == "", err
    computed = [json.loads(out)["results"][0]["spectra_computed"] for _, out, _ in results]
    assert sum(computed) == reference["computed"], computed  # every spectrum once, by one run or the other
    assert sum(run.logged() for run in runs) == reference["computed"]
    assert all(computed), computed  # both did a share: neither merely waited for the other
    for i in (1, 2):
        assert fingerprint(tmp_path / f"out{i}") == reference["output"]
    assert spectra_stored(shared) == reference["computed"]
    assert leases_left(shared) == []


def test_a_holder_killed_mid_claim_is_taken_over_and_the_rest_computed(tmp_path, models, reference):
    shared = tmp_path / "shared.sqlite"
    [holder] = started(tmp_path, [merge_arguments(tmp_path, models, "killed", shared, "--quiet")], stop=5)
    blocked = Path(f"{holder.log}.blocked")
    wait_until(blocked.exists, holder.process, "claim held")  # it holds the claim of its 5th matrix
    claims = leases_left(shared)
    assert claims and {pid for _, pid in claims} == {holder.process.pid}
    claimed_digests = {key.removeprefix("spectrum:") for key, _ in claims if key.startswith("spectrum:")}
    assert len(claimed_digests) == 1
    done_by_holder = spectra_stored(shared)
    assert done_by_holder == holder.logged() == 4

    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        [other] = started(tmp_path, [merge_arguments(tmp_path, models, "other", shared)], stderr=err)
        waiting = f"mastermerge: waiting for 1 spectrum another run (pid {holder.process.pid}) is computing"
        wait_until(lambda: waiting in stderr.read_text(), other.process, "waiting line")
        assert claimed_digests & stored_digests(shared) == set()  # waited for, not computed again
        holder.process.send_signal(signal.SIGKILL)
        holder.process.wait()
        code, out, _ = finished(other.process)
    holder.process.communicate()
    assert code == 0, stderr.read_text()
    result = json.loads(out)["results"][0]
    assert result["spectra_computed"] == other.logged() == reference["computed"] - done_by_holder
    assert fingerprint(tmp_path / "other") == reference["output"]
    assert spectra_stored(shared) == reference["computed"]
    assert leases_left(shared) == []  # the dead holder's claim was taken over, then released


def stale_claim(case: str, sleeper: subprocess.Popen) -> tuple:
    """The holder columns (host, pid, started, expires) of a claim whose holder is gone."""
    host, later = socket.gethostname(), time.time() + 3600
    if case == "dead pid":  # a process of this host that has ended
        ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        return host, int(ended.stdout), f"{boot_id()}:1", later
    if case == "pid reused":  # the pid runs, but it is another process than the one that claimed
        return host, sleeper.pid, f"{boot_id()}:1", later
    return "another-host", 1, "x:1", time.time() - 1  # expired, and on a host whose processes are not seen


@pytest.mark.parametrize("case", ["dead pid", "pid reused", "expired on another host"])
def test_a_stale_claim_in_the_table_is_taken_over_at_once(tmp_path, models, reference, case):
    shared = tmp_path / "shared.sqlite"
    MetricCache(shared).close()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert started_of(sleeper.pid) not in (None, f"{boot_id()}:1")
        holder = stale_claim(case, sleeper)
        keys = []
        for model in models:
            with Checkpoint.open(model) as checkpoint:
                keys += [
                    tensor_key(*file_identity(checkpoint, t), t) for t, i in checkpoint.tensors.items() if i.is_matrix
                ]
        with closing(sqlite3.connect(shared)) as db, db:
            db.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?)", [(k, *holder) for k in keys])
        [run] = started(tmp_path, [merge_arguments(tmp_path, models, "out", shared)])
        code, out, err = finished(run.process)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0, err
    assert "waiting for" not in err
    assert json.loads(out)["results"][0]["spectra_computed"] == run.logged() == reference["computed"]
    assert fingerprint(tmp_path / "out") == reference["output"]
    assert leases_left(shared) == []


def test_a_live_claim_of_another_host_is_waited_for_until_it_expires(tmp_path, models, reference):
    """A holder on another host is seen only through its heartbeat: its claim holds until it expires."""
    shared = tmp_path / "shared.sqlite"
    MetricCache(shared).close()
    with Checkpoint.open(models[1]) as checkpoint:
        tensor = next(t for t, i in checkpoint.tensors.items() if i.is_matrix and ".layers.1." in t)  # its own
        key = tensor_key(*file_identity(checkpoint, tensor), tensor)
    with closing(sqlite3.connect(shared)) as db, db:
        db.execute(
            "INSERT INTO leases VALUES (?, ?, ?, ?, ?)", (key, "another-host", os.getpid(), "x:1", time.time() + 15)
        )
    [run] = started(tmp_path, [merge_arguments(tmp_path, models, "out", shared)])
    code, out, err = finished(run.process)
    assert code == 0, err
    assert f"mastermerge: waiting for 1 spectrum another run (pid {os.getpid()} on another-host) is computing" in err
    assert json.loads(out)["results"][0]["spectra_computed"] == reference["computed"]
    assert fingerprint(tmp_path / "out") == reference["output"]
    assert leases_left(shared) == []


def test_a_cache_in_memory_claims_nothing(tmp_path, models):
    cache = MetricCache()
    assert not cache.leases.active
    assert cache.leases.claim([["spectrum:x"], ["tensor:y"]]) == [None, None]
    cache.close()


def test_an_old_cache_opens_with_its_spectra_kept(tmp_path, models, reference):
    """A cache of schema 5 (before the leases table) is opened as it is: the table is added,
    nothing is dropped, and a warm run computes nothing."""
    cache = tmp_path / "old.sqlite"
    [run] = started(tmp_path, [merge_arguments(tmp_path, models, "first", cache, "--quiet")])
    assert finished(run.process)[0] == 0
    with closing(sqlite3.connect(cache)) as db, db:
        db.execute("DROP TABLE leases")
        db.execute("UPDATE meta SET value='5' WHERE key='schema'")
    [run] = started(tmp_path, [merge_arguments(tmp_path, models, "again", cache, "--quiet", "--dry-run")])
    code, out, err = finished(run.process)
    assert code == 0, err
    assert json.loads(out)["results"][0]["spectra_computed"] == 0
    assert spectra_stored(cache) == reference["computed"]
    assert leases_left(cache) == []


@pytest.mark.parametrize("stored", [True, False])
def test_a_claim_won_after_the_result_was_stored_is_released_not_computed(tmp_path, stored):
    """Another run stored the spectrum and released its claim just before this run claimed it: the
    claim is given back at once and nothing is computed; not yet stored, it is this run's to compute."""
    cache = MetricCache(tmp_path / "c.sqlite")
    try:
        claims = Claims(cache.leases, lambda item: [f"spectrum:{item}"], lambda item: stored, ("spectrum", "spectra"))
        assert claims.taken(["x"]) == ([] if stored else ["x"])
        assert len(leases_left(tmp_path / "c.sqlite")) == (0 if stored else 1)
        claims.release_all()
        assert leases_left(tmp_path / "c.sqlite") == []
    finally:
        cache.close()

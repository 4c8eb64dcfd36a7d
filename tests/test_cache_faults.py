"""The metric cache under faults: several processes sharing one file at once, a file damaged on disk
(before the run or found during it), a location that cannot be written, a lock held by another
process. Every run finishes with exit code 0 and the same output as a run with a private cache,
with at most one warning line; a damaged file is kept aside as it was found, never deleted.

Everything is real: separate OS processes on one SQLite file, bytes really overwritten in the
file, a read-only folder (entered as an unprivileged user when the tests run as root), the
kernel's file size limit.
"""

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import REPO, by_name, cli_command, run_merge, run_process, write_config

from nerd.checkpoint import Checkpoint
from nerd.cli import main
from nerd.database import Database
from nerd.engine import Engine, LocalExecutor, Work
from nerd.store import SCHEMA_VERSION, TABLES, MetricCache

# Runs mastermerge once every process of the group has started and imported it:
# python START BARRIER_DIR COUNT -- mastermerge arguments
START = r"""
import os, sys, time
barrier, count = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1:]
from nerd.cli import main
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.monotonic() + 120
while len(os.listdir(barrier)) < count and time.monotonic() < deadline:
    time.sleep(0.002)
sys.exit(main(argv))
"""

# For each round R: waits for the other workers, opens the cache file FOLDER/R.sqlite (which all of
# them open at the same moment) and writes rows another worker writes too, and rows of its own:
# python WORKER FOLDER COUNT NAME ROUNDS
WORKER = r"""
import os, sys, time
from nerd.store import MetricCache
folder, count, me, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
run = {"model_ref": me, "text_name": "t", "tokens": 4, "windows": 1, "dtype": "float32", "device": "cpu",
       "seconds": 0.1}
for r in range(rounds):
    barrier = os.path.join(folder, f"barrier-{r}")
    os.makedirs(barrier, exist_ok=True)
    open(os.path.join(barrier, me), "w").close()
    deadline = time.monotonic() + 60  # a worker that failed never comes
    while len(os.listdir(barrier)) < count and time.monotonic() < deadline:
        time.sleep(0.001)
    cache = MetricCache(os.path.join(folder, f"{r}.sqlite"))
    for i in range(10):
        for key, ner in ((f"shared-{i}", 0.5), (f"{me}-{i}", 0.25)):
            if cache.metrics(key) is None:
                cache.put_metrics(key, {"ner": ner, "problem": None})
    cache.put_calibration(f"model-{me}", "text", [(4, 3.5, 0, 128, 0.5)] * 3, run)
    cache.close()
"""


@pytest.fixture(scope="module")
def models(llama_family) -> list[Path]:
    family = llama_family(3)
    return [family[name] for name in ("base", "ft-a", "ft-b")]


config_of = write_config  # config_of(path, models, out): the config file of a merge of the models


def fingerprint(out: Path) -> dict:
    """What a merge wrote, without what names the run (time, output directory): the bytes of the
    weights, the plan and every metric."""
    report = json.loads((out / "merge_report.json").read_text())
    weights = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}
    return {"weights": weights, "plan": report["plan"], "metrics": report["metrics"]}


def choices(listed: list[dict]) -> list[dict]:
    """The choices as the --json summary and merge_report.json both give them."""
    return [{k: c[k] for k in ("group", "depth", "scores", "winner", "blend", "note")} for c in listed]


def counts(cache: Path) -> dict[str, int]:
    with closing(sqlite3.connect(cache)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {
            t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("tensors", "spectra", "metrics", "tether_sums")
        }


def merge(config: Path, cache: Path, *extra) -> tuple[int, dict | None, list[str]]:
    """Run the CLI in this process (helpers.run_merge, --quiet --json), with no traceback: exit code,
    the --json summary of the config, warning lines."""
    run = run_merge(config, *extra, cache=cache)
    assert "Traceback" not in run.stderr, run.stderr
    return run.code, run.result, run.messages


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict:
    """A merge with a private cache of its own: its output and its cache's row counts."""
    root = tmp_path_factory.mktemp("reference")
    cache = root / "private.sqlite"
    assert run_merge(config_of(root / "m.yaml", models, root / "out"), cache=cache, as_json=False).code == 0
    return {"output": fingerprint(root / "out"), "counts": counts(cache), "cache": cache}


def warm_copy(reference, tmp_path: Path) -> Path:
    cache = tmp_path / "cache" / "metrics.sqlite"
    cache.parent.mkdir()
    shutil.copy(reference["cache"], cache)
    return cache


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def start_together(tmp_path: Path, runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one process per argument list, each running mastermerge once all have imported it."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = tmp_path / "start.py"
    script.write_text(START)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(barrier), str(len(runs)), "--", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
            cwd=tmp_path,
        )
        for argv in runs
    ]
    return [subprocess.CompletedProcess(argv, *finished(proc)) for proc, argv in zip(procs, runs)]


def finished(proc: subprocess.Popen) -> tuple:
    """The exit code, stdout and stderr of a process, killed if it has not ended in 300 s."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


# -- several processes on one cache ---------------------------------------------------------------


def test_two_merges_sharing_a_cold_cache_both_finish_correctly(tmp_path, models, reference, capsys):
    shared = tmp_path / "shared.sqlite"
    configs = [config_of(tmp_path / f"m{i}.yaml", models, tmp_path / f"out{i}") for i in (1, 2)]
    results = start_together(
        tmp_path, [["--config", str(c), "--cache", str(shared), "--quiet", "--json"] for c in configs]
    )
    for result in results:
        assert result.returncode == 0 and result.stderr == "", result.stderr
    for i in (1, 2):
        assert fingerprint(tmp_path / f"out{i}") == reference["output"]
    assert counts(shared) == reference["counts"]  # every row once, and the file is sound

    code, warm, warnings = merge(configs[0], shared, "--dry-run")
    assert code == 0 and warnings == []
    assert warm["spectra_computed"] == 0 and warm["spectra_reused"] > 0


def test_two_analyses_sharing_a_cold_cache_both_finish_correctly(tmp_path, models, capsys):
    def analyze(out: Path, cache: Path) -> list[str]:
        return [
            "analyze",
            *map(str, models),
            "--out",
            str(out),
            "--cache",
            str(cache),
            "--no-plots",
            "--quiet",
            "--json",
        ]

    assert main(analyze(tmp_path / "private", tmp_path / "private.sqlite")) == 0
    capsys.readouterr()
    shared = tmp_path / "shared.sqlite"
    results = start_together(tmp_path, [analyze(tmp_path / f"out{i}", shared) for i in (1, 2)])
    for result in results:
        assert result.returncode == 0 and result.stderr == "", result.stderr
    expected = (tmp_path / "private" / "metrics.csv").read_bytes()
    for i in (1, 2):
        assert (tmp_path / f"out{i}" / "metrics.csv").read_bytes() == expected
    assert counts(shared) == counts(tmp_path / "private.sqlite")

    assert main(analyze(tmp_path / "out3", shared)) == 0
    assert json.loads(capsys.readouterr().out)["spectra_computed"] == 0


def old_schema_file(path: Path) -> None:
    """A cache of an earlier schema version, in rollback-journal mode (every process that opens it
    wants to migrate it and switch it to WAL)."""
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema', '3');"
            "CREATE TABLE spectra (digest TEXT PRIMARY KEY, values_json TEXT);"
            "INSERT INTO spectra VALUES ('old', '[1, 2]');"
        )


@pytest.mark.parametrize("start", ["no file", "old schema"])
def test_processes_opening_and_writing_one_file_at_once_lose_nothing(tmp_path, start):
    """Four processes open a cache file at the same moment, 20 times (a new file each time), and
    write rows of their own and rows the others write too: no error, no fallback to memory, every
    row there once."""
    workers, rounds = 4, 20
    if start == "old schema":
        for r in range(rounds):
            old_schema_file(tmp_path / f"{r}.sqlite")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(workers), f"w{i}", str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )
        for i in range(workers)
    ]
    results = [finished(proc) for proc in procs]
    for code, _, err in results:
        assert code == 0 and err == "", err
    for r in range(rounds):
        with closing(sqlite3.connect(tmp_path / f"{r}.sqlite")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (SCHEMA_VERSION,)
            keys = sorted(k for (k,) in db.execute("SELECT digest FROM metrics"))
            assert keys == sorted(
                [f"shared-{i}" for i in range(10)] + [f"w{w}-{i}" for w in range(workers) for i in range(10)]
            )
            assert db.execute("SELECT COUNT(*) FROM activation_runs").fetchone()[0] == workers
            assert db.execute("SELECT COUNT(*) FROM layer_stats").fetchone()[0] == workers * 3
            assert db.execute("SELECT COUNT(*) FROM spectra").fetchone()[0] == 0  # old rows went with the migration


def test_a_write_waits_for_a_lock_held_by_another_process(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.sqlite"
    cache = MetricCache(path)
    hold = (
        "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "db.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(float(sys.argv[2])); "
        "db.execute('COMMIT')"
    )

    def holding(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", hold, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline() == "held\n"
        return proc

    proc, started = holding(1.5), time.monotonic()
    cache.put_metrics("a", {"ner": 0.5})
    assert time.monotonic() - started > 0.5 and proc.wait() == 0
    assert not cache.in_memory and capsys.readouterr().err == ""

    import nerd.database

    monkeypatch.setattr(nerd.database, "BUSY_SECONDS", 0.3)  # a lock held for longer than we wait
    proc = holding(3)
    cache.put_metrics("b", {"ner": 0.25})
    proc.wait()
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"mastermerge: warning: metric cache {path} cannot be used (database is locked); "
        f"keeping spectra in memory for this run"
    ]
    assert cache.in_memory and cache.metrics("b") == {"ner": 0.25}  # kept in memory
    cache.close()
    with closing(sqlite3.connect(path)) as db:
        assert [k for (k,) in db.execute("SELECT digest FROM metrics")] == ["a"]


def test_no_write_lock_is_held_while_anything_is_computed(tmp_path, models, reference, capsys, monkeypatch):
    """Each result is committed on its own: whenever a spectrum is computed or two tensors are
    compared, another process could write to the cache without waiting."""
    import nerd.engine
    import nerd.tethersums

    cache, checked = tmp_path / "c.sqlite", []

    def lock_is_free(compute):
        def wrapped(*args, **kwargs):
            with closing(sqlite3.connect(cache, timeout=0, isolation_level=None)) as other:
                other.execute("BEGIN IMMEDIATE")  # "database is locked" if a write transaction is open
                other.execute("ROLLBACK")
            checked.append(compute.__name__)
            return compute(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(nerd.engine, "spectra_of", lock_is_free(nerd.engine.spectra_of))
    monkeypatch.setattr(nerd.tethersums, "sums_of", lock_is_free(nerd.tethersums.sums_of))
    code, summary, warnings = merge(config_of(tmp_path / "m.yaml", models, tmp_path / "out"), cache)
    assert code == 0 and warnings == []
    assert checked.count("spectra_of") == summary["spectra_computed"] > 0 and "sums_of" in checked
    assert fingerprint(tmp_path / "out") == reference["output"]


def test_only_the_thread_that_opened_the_cache_uses_it(tmp_path, models):
    """The engine reads ahead and derives metrics in threads of its own; every statement still
    runs in the calling thread, and another thread cannot use the connection at all."""
    cache = MetricCache(tmp_path / "c.sqlite")
    connection, threads = cache.database.connection, set()
    connection.set_trace_callback(lambda sql: threads.add(threading.current_thread().name))
    with Checkpoint.open(models[1]) as ckpt:
        works = [Work(ckpt, n) for n, i in ckpt.tensors.items() if i.is_matrix]
        found = Engine(cache, LocalExecutor("cpu")).metrics(works)
        assert len(found) == len(works) and cache.computed == len(works)
    assert threads == {threading.current_thread().name}
    errors = []
    thread = threading.Thread(
        target=lambda: errors.append(pytest.raises(sqlite3.ProgrammingError, connection.execute, "SELECT 1"))
    )
    thread.start()
    thread.join()
    assert errors
    cache.close()


# -- a damaged file --------------------------------------------------------------------------------


def overwrite(path: Path) -> None:
    """Random bytes over the whole file ("file is not a database")."""
    path.write_bytes(random.Random(1).randbytes(path.stat().st_size))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def scribble(path: Path) -> None:
    """64 random bytes at a random place in each page of the middle half of the file."""
    data, rng, size = bytearray(path.read_bytes()), random.Random(7), 4096
    pages = len(data) // size
    for page in range(pages // 4, 3 * pages // 4):
        at = page * size + rng.randrange(size - 64)
        data[at : at + 64] = rng.randbytes(64)
    path.write_bytes(bytes(data))


WARNING = re.compile(
    r"mastermerge: warning: metric cache (?P<path>\S+) is corrupt \((?P<reason>.+)\); "
    r"moved to (?P<aside>\S+); rebuilding"
)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (overwrite, "file is not a database"),
        (truncate, "database disk image is malformed"),
        (scribble, "quick_check: "),
    ],
)
def test_a_corrupt_cache_is_set_aside_and_rebuilt(tmp_path, models, reference, capsys, damage, reason):
    cache = warm_copy(reference, tmp_path)
    damage(cache)
    damaged = cache.read_bytes()
    code, summary, warnings = merge(config_of(tmp_path / "m.yaml", models, tmp_path / "out"), cache)
    assert code == 0 and len(warnings) == 1, warnings
    found = WARNING.fullmatch(warnings[0])
    assert found and found["path"] == str(cache) and found["reason"].startswith(reason), warnings[0]
    aside = Path(found["aside"])
    assert aside.parent == cache.parent and aside.name.startswith("metrics.sqlite.corrupt-")
    assert aside.read_bytes() == damaged  # kept as it was found
    assert fingerprint(tmp_path / "out") == reference["output"]
    assert summary["spectra_computed"] > 0
    assert counts(cache) == reference["counts"]  # the new file holds everything again

    code, again, warnings = merge(tmp_path / "m.yaml", cache, "--dry-run")
    assert code == 0 and warnings == [] and again["spectra_computed"] == 0


def test_two_runs_finding_one_corrupt_cache_set_it_aside_once(tmp_path, capsys):
    """Run B finds the file corrupt; before it moves the file aside, run A has already done so and
    built a fresh cache. B must leave A's healthy file where it is."""
    cache = tmp_path / "metrics.sqlite"
    cache.write_bytes(random.Random(2).randbytes(64 * 1024))  # not a database
    late = Database.__new__(Database)
    late.path, late.schema, late.inode, late.failed_inode = cache, TABLES, None, None
    with pytest.raises(sqlite3.DatabaseError) as found:
        late.open_file()
    with closing(MetricCache(cache)):  # run A: sets the corrupt file aside and builds a fresh one
        pass
    fresh = cache.read_bytes()
    late.set_aside(found.value)
    err = capsys.readouterr().err
    assert "another run already moved it aside" in err
    assert cache.read_bytes() == fresh and len(list(tmp_path.glob("metrics.sqlite.corrupt-*"))) == 1


@pytest.mark.parametrize("case", ["zero-length file", "garbage -wal"])
def test_files_sqlite_reads_as_sound_need_no_rebuild(tmp_path, models, reference, capsys, case):
    """An empty file is an empty database; a -wal whose header is not valid is ignored by SQLite
    (it never holds a commit), so the cache is used as it is, without a warning."""
    cache = warm_copy(reference, tmp_path)
    if case == "zero-length file":
        cache.write_bytes(b"")
    else:
        Path(f"{cache}-wal").write_bytes(random.Random(3).randbytes(50_000))
    code, summary, warnings = merge(config_of(tmp_path / "m.yaml", models, tmp_path / "out"), cache)
    assert code == 0 and warnings == []
    assert fingerprint(tmp_path / "out") == reference["output"]
    assert (summary["spectra_computed"] > 0) == (case == "zero-length file")
    assert not list(cache.parent.glob("*.corrupt-*"))


def damage_tables(path: Path) -> dict[int, bytes]:
    """Random bytes over the page header of each table's and index's root page, then a commit by
    another connection, so that the cache's connection reads its pages again: the damage is found
    by the next query. Returns the damaged bytes by offset."""
    with closing(sqlite3.connect(path)) as db:
        roots = [r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name != 'meta'")]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    rng, written = random.Random(5), {}
    with open(path, "r+b") as f:
        for root in roots:
            header = bytearray(rng.randbytes(12))
            header[0] = 0x77  # not a page type, whatever the random bytes were
            f.seek((root - 1) * size)
            f.write(header)
            written[(root - 1) * size] = bytes(header)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('touched', 'by another process')")
    return written


def test_corruption_found_mid_run_is_set_aside_and_the_run_goes_on(tmp_path, models, reference, capsys, monkeypatch):
    cache = warm_copy(reference, tmp_path)
    opened, damaged = Database.open, {}

    def open_then_damage(self):
        db = opened(self)
        if not damaged:  # the first file only, once it passed its check
            damaged.update(damage_tables(self.path))
        return db

    monkeypatch.setattr(Database, "open", open_then_damage)
    code, summary, warnings = merge(config_of(tmp_path / "m.yaml", models, tmp_path / "out"), cache)
    assert damaged and code == 0 and len(warnings) == 1, warnings
    found = WARNING.fullmatch(warnings[0])
    assert found and found["reason"] == "database disk image is malformed", warnings[0]
    kept = Path(found["aside"]).read_bytes()
    assert all(kept[at : at + len(b)] == b for at, b in damaged.items())
    assert fingerprint(tmp_path / "out") == reference["output"]
    assert counts(cache) == reference["counts"]


def test_a_cache_that_fails_mid_run_goes_on_in_memory(tmp_path, models, reference):
    """The kernel refuses to let the cache's -wal grow past 256 kB (EFBIG) part way through a cold
    run: one warning, the rest of the run in memory, the same choices."""
    cache = tmp_path / "c.sqlite"
    config = config_of(tmp_path / "m.yaml", models, tmp_path / "out")

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (256_000, 256_000))

    command = cli_command("--config", config, "--cache", cache, "--quiet", "--json", "--dry-run")
    result = run_process(command, env=environment(), preexec_fn=limited)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mastermerge:")]
    assert len(lines) == 1 and lines[0].startswith(f"mastermerge: warning: metric cache {cache} cannot be used (")
    assert lines[0].endswith("; keeping spectra in memory for this run")
    plan = json.loads(result.stdout)["results"][0]  # --json names the models as given, the report by their names
    assert by_name(choices(plan["choices"]), models) == choices(reference["output"]["plan"]["choices"])
    with closing(sqlite3.connect(cache)) as db:  # what was committed before the failure is there
        assert db.execute("SELECT COUNT(*) FROM spectra").fetchone()[0] > 0


# -- a location that cannot be written --------------------------------------------------------------


def test_a_cache_under_a_regular_file_goes_on_in_memory(tmp_path, models, reference, capsys):
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / "file" / "metrics.sqlite"
    code, summary, warnings = merge(config_of(tmp_path / "m.yaml", models, tmp_path / "out"), cache)
    assert code == 0 and warnings == [
        f"mastermerge: warning: metric cache {cache} cannot be used (Not a directory: "
        f"{cache.parent}); keeping spectra in memory for this run"
    ]
    assert fingerprint(tmp_path / "out") == reference["output"]


def unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"]).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="mount namespaces are not available here")
@pytest.mark.parametrize("earlier", ["no cache yet", "a warm cache"])
def test_a_read_only_cache_folder_goes_on_in_memory(tmp_path, models, reference, earlier):
    """The cache's folder is mounted read-only (in a private mount namespace, so for this run only;
    permission bits would not stop root), empty or holding the cache of an earlier run."""
    folder = tmp_path / "cache"
    folder.mkdir()
    if earlier == "a warm cache":
        shutil.copy(reference["cache"], folder / "metrics.sqlite")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cache = folder / "metrics.sqlite"
    config = config_of(tmp_path / "m.yaml", models, tmp_path / "out")
    read_only = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
        str(folder),
    ]
    command = cli_command("--config", config, "--cache", cache, "--quiet", prefix=read_only)
    result = run_process(command, env=environment())
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mastermerge:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mastermerge: warning: metric cache {cache} cannot be used (")
    assert lines[0].endswith(f"; {folder} is not writable); keeping spectra in memory for this run")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert fingerprint(tmp_path / "out") == reference["output"]

"""The Ray executor against a real local Ray cluster (one for the session, conftest.ray_session):
results bit-identical to this process's, cache hits resolved before anything is sent, the metric
cache written by the driver alone, a killed worker retried, Ctrl-C cancelling, one-line errors."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import TRAINED, cli_command, merge, run_cli, run_process, write_config

from examples.tiny_models import build_model
from nerd.checkpoint import Checkpoint
from nerd.engine import Work
from nerd.errors import ModelError
from nerd.nodes import Expected, matrix_results, node_name, origin_of, pair_sums

pytestmark = pytest.mark.usefixtures("ray_session")
THREADS = ("--threads", "2")  # the session cluster's CPUs: on any machine, here as on the workers
REPORTED = ("metrics", "spectrum_paths", "plan", "shards", "files")  # merge_report.json's results (not when, where)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model whose matrices take a visible fraction of a second each (1024 wide), so that a test
    can act while tasks run."""
    root = tmp_path_factory.mktemp("wide")
    return build_model("llama", root / "wide", num_layers=2, hidden_size=1024, intermediate_size=2816, tokenizer=False)


def analyzed(tmp_path: Path, name: str, models, *flags) -> tuple[dict, bytes, bytes]:
    """`mastermerge analyze` of the models into tmp_path/name (own cache): its --json summary, and
    the bytes of metrics.csv and metrics.json."""
    out = tmp_path / name
    code, stdout, stderr = run_cli(
        "analyze", *models, "--out", out, "--cache", tmp_path / f"{name}.sqlite", "--json", "--quiet", *THREADS, *flags
    )
    assert code == 0, stderr
    return json.loads(stdout), (out / "metrics.csv").read_bytes(), (out / "metrics.json").read_bytes()


def running_tasks(name: str = "matrix_results") -> list[int]:
    """The processes of Ray workers running a task of nodes.py's `name` (Ray titles them ray::name)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().split(b"\0")[0] == f"ray::{name}".encode():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_analyze_on_ray_writes_the_same_bytes(tmp_path, llama_family, ray_session):
    models = [TRAINED, llama_family(2)["ft-a"]]
    local, csv, table = analyzed(tmp_path, "local", models)
    remote, ray_csv, ray_table = analyzed(tmp_path, "ray", models, "--ray", ray_session.address)
    assert (ray_csv, ray_table) == (csv, table)
    assert remote["spectra_computed"] == local["spectra_computed"] > 0


def test_merge_on_ray_writes_the_same_bytes(tmp_path, llama_family):
    """A merge with tethers (blended), DLEC by weight scores, through --ray and through the config."""
    family = llama_family(2)
    models = [family["base"], family["ft-a"], family["ft-b"]]
    options = dict(tether={"mode": "blend"}, dlec={"add_layers": 1, "importance": "ner"})
    for name in ("local", "flag", "config"):
        (tmp_path / name).mkdir()
    local = merge(models, tmp_path / "local", *THREADS, **options)
    flagged = merge(models, tmp_path / "flag", "--ray", *THREADS, **options)
    configured = merge(models, tmp_path / "config", compute={"executor": "ray", "threads": 2}, **options)
    for run in (flagged, configured):
        assert run.ok() == local.ok() | {"output_dir": str(run.output), "config": run.result["config"]}
        files = sorted(p.name for p in local.output.iterdir())
        assert sorted(p.name for p in run.output.iterdir()) == files
        for name in files:
            if name == "merge_report.json":
                ours, theirs = (json.loads((d / name).read_text()) for d in (run.output, local.output))
                assert {k: ours[k] for k in REPORTED} == {k: theirs[k] for k in REPORTED}
            elif name != "README.md":  # the card names the config file
                assert (run.output / name).read_bytes() == (local.output / name).read_bytes(), name


@pytest.mark.parametrize("threads", [1, 2])
def test_a_worker_computes_what_the_driver_computes_bit_for_bit(threads):
    import ray

    with Checkpoint.open(TRAINED) as checkpoint:
        origin = origin_of("trained", checkpoint, None, None)
        tensors = [t for t, info in checkpoint.tensors.items() if info.is_matrix]
        items = [(t, Expected.of(checkpoint.tensors[t], checkpoint.directory)) for t in tensors]
    here = matrix_results(origin, items, "cpu", threads)
    there = ray.get(ray.remote(matrix_results).options(num_cpus=threads).remote(origin, items, "cpu", threads))
    assert len(here) == len(tensors) > 10
    for (key, spectrum, metrics), (key_w, spectrum_w, metrics_w) in zip(here, there):
        assert key_w == key and spectrum_w.path == spectrum.path
        assert spectrum_w.values.tobytes() == spectrum.values.tobytes()
        assert json.dumps(metrics_w) == json.dumps(metrics)
    sums = [pair_sums(origin, origin, t, (items[i][1],) * 2, threads) for i, t in enumerate(tensors[:4])]
    remote_sums = ray.get(
        [
            ray.remote(pair_sums).remote(origin, origin, t, (items[i][1],) * 2, threads)
            for i, t in enumerate(tensors[:4])
        ]
    )
    assert remote_sums == sums and all(s[0] == s[1] == s[2] > 0 for s in sums)


def test_a_warm_run_sends_nothing_to_the_cluster(tmp_path, llama_family, monkeypatch):
    import nerd.raycluster

    family = llama_family(2)
    models = [family["base"], family["ft-a"]]
    first = merge(models, tmp_path, "--ray", *THREADS, output=tmp_path / "first").ok()
    assert first["spectra_computed"] > 0
    sent = []
    real = nerd.raycluster.RayExecutor.completed
    monkeypatch.setattr(
        nerd.raycluster.RayExecutor,
        "completed",
        lambda self, units, submit: real(self, sent.extend(units) or units, submit),
    )
    second = merge(models, tmp_path, "--ray", *THREADS, output=tmp_path / "second").ok()
    assert sent == [] and second["spectra_computed"] == 0
    assert second["choices"] == first["choices"] and second["tethers"] == first["tethers"]


def test_only_the_driver_opens_the_metric_cache(tmp_path, llama_family, ray_session):
    import ray

    family = llama_family(2)
    before = ray_session.sqlite_log.read_text()
    merge([family["base"], family["ft-b"]], tmp_path, "--ray", *THREADS, tether={"mode": "blend"}).ok()
    assert ray_session.sqlite_log.read_text() == before
    with closing(sqlite3.connect(tmp_path / "c.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM spectra").fetchone()[0] > 0
        assert db.execute("SELECT COUNT(*) FROM tether_sums").fetchone()[0] > 0

    @ray.remote
    def connects():
        sqlite3.connect(":memory:").close()

    ray.get(connects.remote())  # the record works: a worker that does connect is seen
    assert ray_session.sqlite_log.read_text().count(":memory:") == before.count(":memory:") + 1


def test_a_worker_killed_mid_task_is_retried_and_changes_nothing(tmp_path, wide):
    _, csv, table = analyzed(tmp_path, "local", [wide], "--no-plots")
    killed = []

    def kill_one():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for pid in running_tasks():
                time.sleep(0.05)  # into the task
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # its task ended meanwhile: try the next one
                    continue
                killed.append(pid)
                break
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        _, ray_csv, ray_table = analyzed(tmp_path, "ray", [wide], "--no-plots", "--ray")
    finally:
        killer.join()
    assert killed, "no task was seen running"
    assert (ray_csv, ray_table) == (csv, table)


def test_ctrl_c_cancels_the_tasks_and_a_rerun_computes_only_the_rest(tmp_path, wide, ray_session):
    cache = tmp_path / "c.sqlite"
    command = cli_command(
        "analyze",
        wide,
        "--out",
        tmp_path / "out",
        "--cache",
        cache,
        "--no-plots",
        "--json",
        *THREADS,
        "--ray",
        ray_session.address,
    )
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731  (pytest may run with it ignored)
    driver = subprocess.Popen([str(c) for c in command], stdout=-1, stderr=-1, text=True, preexec_fn=reset)

    def stored() -> int:
        try:
            with closing(sqlite3.connect(f"file:{cache}?mode=ro", uri=True)) as db:
                return db.execute("SELECT COUNT(*) FROM spectra").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 120
    while stored() < 2 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stderr
    kept = stored()
    total = sum(info.is_matrix for info in Checkpoint.open(wide).tensors.values())
    assert 2 <= kept < total
    deadline = time.monotonic() + 30
    while running_tasks() and time.monotonic() < deadline:  # cancelled: the workers stop
        time.sleep(0.1)
    assert running_tasks() == []
    rerun = run_process(command)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["spectra_computed"] == total - kept and summary["spectra_reused"] == kept


def test_an_executor_stopped_early_cancels_its_outstanding_tasks():
    """What Ctrl-C (or an error) does to the executor's loop: the tasks still outstanding when the
    caller stops are cancelled, not left to run (here each would take a minute), and no more than
    `in_flight` were ever sent."""
    import ray

    from nerd.raycluster import RayExecutor

    @ray.remote(num_cpus=1)
    def sleeping(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    executor = RayExecutor({}, "cpu", 1, None)
    executor.in_flight = 3
    sent = []
    results = executor.completed([[0.0]] + [[60.0]] * 5, lambda unit: sent.append(sleeping.remote(*unit)) or sent[-1])
    assert next(results) == ([0.0], 0.0)
    started = time.monotonic()
    results.close()
    assert len(sent) == 3
    for ref in sent[1:]:
        with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
            ray.get(ref, timeout=30)
    assert time.monotonic() - started < 30


def test_a_node_whose_copy_differs_is_refused_naming_what_differs(llama_family):
    with Checkpoint.open(llama_family(2)["ft"]) as checkpoint:
        origin = origin_of("org/ft", checkpoint, None, None)
        tensor = next(t for t, info in checkpoint.tensors.items() if info.is_matrix)
        planned = Expected.of(checkpoint.tensors[tensor], checkpoint.directory)
        wider = Expected(planned.file, planned.dtype, (planned.shape[0], planned.shape[1] + 1), planned.nbytes)
        with pytest.raises(ModelError) as error:
            matrix_results(origin, [(tensor, wider)], "cpu", 1)
    assert str(error.value) == (
        f"model 'org/ft', tensor '{tensor}' on node {node_name()}: another copy in {checkpoint.directory}: "
        f"expected {planned.file}, {planned.dtype} {list(wider.shape)}, found {planned.file}, {planned.dtype} "
        f"{list(planned.shape)}"
    )


def test_a_task_error_names_the_model_the_tensor_the_node_and_the_path(tmp_path, llama_family):
    """A node that does not see a local model's directory (here: the path the nodes are given is
    one that no node has, as when it is not on shared storage)."""
    from nerd.nodes import Origin
    from nerd.raycluster import RayExecutor

    unseen = tmp_path / "not-shared"
    executor = RayExecutor({}, "cpu", 1, None)
    with Checkpoint.open(llama_family(2)["ft"]) as checkpoint:
        executor.origins[checkpoint.directory] = Origin("org/ft", str(unseen))
        tensor = next(t for t, info in checkpoint.tensors.items() if info.is_matrix)
        with pytest.raises(ModelError) as error:
            list(executor.spectra([Work(checkpoint, tensor)], lambda work, key: False))
    message = str(error.value)
    assert message.startswith(f"model 'org/ft', tensor '{tensor}' on node ")
    assert f"cannot see {unseen}: a local model must be on storage every node shares" in message
    assert "\n" not in message


def test_more_threads_than_any_node_has_is_one_line(tmp_path, llama_family):
    run = merge([llama_family(2)["base"], llama_family(2)["ft"]], tmp_path, "--ray", "--threads", "3")
    assert run.code == 6 and not run.output.exists()
    assert run.messages == [
        "mastermerge: error: ray: no node of the cluster can run a task on 3 threads (compute.threads); "
        "the largest node has 2 CPUs"
    ]


def test_an_unreachable_cluster_is_one_line_naming_its_address(tmp_path):
    """From --ray ADDRESS, and from RAY_ADDRESS alone."""
    out = tmp_path / "out"
    for flags, address in ((["--ray", "127.0.0.1:9"], None), ([], "127.0.0.1:9")):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (
            {"RAY_ADDRESS": address} if address else {}
        )
        run = run_process(cli_command("analyze", TRAINED, "--out", out, "--no-cache", *flags), env=env)
        assert run.returncode == 6 and not out.exists(), run.stderr
        assert run.stderr.splitlines() == [
            "mastermerge: error: ray: cannot reach a cluster at '127.0.0.1:9': Connection refused"
        ]


@pytest.mark.parametrize("compute, address", [(None, None), ({"executor": "local"}, "127.0.0.1:9")])
def test_ray_is_not_imported_unless_asked_for(tmp_path, llama_family, compute, address):
    """Without --ray, compute.executor ray or RAY_ADDRESS; a config's `executor: local` overrides RAY_ADDRESS."""
    family = llama_family(2)
    config = write_config(tmp_path / "m.yaml", [family["base"], family["ft"]], tmp_path / "out", compute=compute)
    script = (
        "import sys; from nerd.cli import main; code = main(sys.argv[1:]); "
        "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ({"RAY_ADDRESS": address} if address else {})
    run = run_process([sys.executable, "-c", script, "--config", config, "--quiet", "--no-cache"], env=env)
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == "no ray", run.stderr


def test_every_computation_runs_on_the_threads_asked_for(tmp_path, llama_family, monkeypatch):
    """In this process (the local executor): BLAS and OpenMP through threadpoolctl, torch's own. A
    worker runs the same nodes.py code under the same limit, and its results are compared bit for
    bit in test_a_worker_computes_what_the_driver_computes_bit_for_bit."""
    import torch
    from threadpoolctl import threadpool_info

    import nerd.engine
    import nerd.tethersums

    seen = []

    def recording(compute):
        def wrapped(*args, **kwargs):
            seen.append({lib["internal_api"] for lib in threadpool_info() if lib["num_threads"] != 1})
            seen.append(torch.get_num_threads())
            return compute(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(nerd.engine, "spectra_of", recording(nerd.engine.spectra_of))
    monkeypatch.setattr(nerd.tethersums, "sums_of", recording(nerd.tethersums.sums_of))
    family = llama_family(2)
    before = torch.get_num_threads()
    merge([family["base"], family["ft"]], tmp_path, "--threads", "1").ok()
    assert len(seen) > 10 and all(s == set() or s == 1 for s in seen)
    assert torch.get_num_threads() == before  # and torch's own count is back after the run


def test_a_batch_naming_two_clusters_is_refused_before_anything_runs(tmp_path, llama_family):
    family = llama_family(2)
    models = [family["base"], family["ft"]]
    configs = [
        write_config(
            tmp_path / f"{name}.yaml", models, tmp_path / name, compute={"executor": "ray", "address": address}
        )
        for name, address in (("first", "127.0.0.1:9"), ("second", "127.0.0.1:10"))
    ]
    code, _, stderr = run_cli("merge", "--config", *configs, "--no-cache", "--quiet")
    assert code == 2 and not (tmp_path / "first").exists()
    assert stderr.splitlines() == [
        f"mastermerge: error: {configs[1]}: compute.address: '127.0.0.1:10' is another cluster than "
        f"{configs[0]}'s '127.0.0.1:9': one run uses one cluster, run the configs of each separately"
    ]

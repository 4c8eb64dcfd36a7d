"""The Ray executor on a real two-node cluster (ray.cluster_utils.Cluster: a head that runs no task
and two worker nodes of one CPU, each with a hub cache of its own), driven by the command line in
a process of its own: hub models pinned to the driver's commit, a model a node cannot get, and a
node lost in the middle of a run."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import cli_command, run_process
from test_ray import running_tasks

from examples.tiny_models import build_hub_cache, build_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The driver's hub cache (testorg/base and testorg/ft at main, and testorg/only-here) and the
    nodes' caches: testorg/base and testorg/ft at the driver's commits, but with main moved on to
    other weights of testorg/ft, and no testorg/only-here."""
    root = tmp_path_factory.mktemp("cluster-hub")
    base = build_model("llama", root / "base", seed=0, num_layers=2, hidden_size=64)
    ft = build_model("llama", root / "ft", seed=1, base_dir=base, noise=0.1)
    later = build_model("llama", root / "ft-later", seed=5, base_dir=base, noise=0.4)
    driver = root / "driver-hf"
    commits = {
        repo: build_hub_cache(driver, repo, model) for repo, model in (("testorg/base", base), ("testorg/ft", ft))
    }
    nodes = []
    for i in range(2):
        node = root / f"node-{i}-hf"
        shutil.copytree(driver, node, symlinks=True)
        assert build_hub_cache(node, "testorg/ft", later) != commits["testorg/ft"]  # main moved on there
        nodes.append(node)
    build_hub_cache(driver, "testorg/only-here", build_model("llama", root / "only-here", seed=3, hidden_size=64))
    return {"driver": driver, "nodes": nodes, "commits": commits}


@pytest.fixture(scope="module")
def cluster(hub):
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [
        cluster.add_node(num_cpus=1, env_vars={"HF_HOME": str(node), "HF_HUB_OFFLINE": "1"}) for node in hub["nodes"]
    ]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def driver_env(hub, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
    return env | {"HF_HOME": str(hub["driver"]), "HF_HUB_OFFLINE": "1", "MASTERMERGE_CACHE": str(tmp_path / "c.sqlite")}


def analyze(tmp_path: Path, name: str, models, env, *flags) -> subprocess.CompletedProcess:
    out = tmp_path / name
    command = cli_command("analyze", *models, "--out", out, "--no-plots", "--json", "--quiet", "--threads", "1", *flags)
    return run_process(command, env=env | {"MASTERMERGE_CACHE": str(tmp_path / f"{name}.sqlite")})


def test_hub_models_are_read_by_every_node_at_the_driver_s_commit(tmp_path, hub, cluster):
    env = driver_env(hub, tmp_path)
    models = ["testorg/base", "testorg/ft"]
    local = analyze(tmp_path, "local", models, env)
    remote = analyze(tmp_path, "ray", models, env, "--ray", cluster[0].address)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert (tmp_path / "ray" / "metrics.csv").read_bytes() == (tmp_path / "local" / "metrics.csv").read_bytes()
    assert json.loads(remote.stdout)["spectra_computed"] == json.loads(local.stdout)["spectra_computed"] > 0


def test_a_merge_on_two_nodes_writes_the_same_shards(tmp_path, hub, cluster):
    env = driver_env(hub, tmp_path)
    outputs = {}
    for name, flags in (("local", []), ("ray", ["--ray", cluster[0].address])):
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            json.dumps(
                {
                    "models": ["testorg/base", "testorg/ft"],
                    "base_model": "testorg/base",
                    "output_dir": str(tmp_path / name),
                    "tether": {"mode": "blend"},
                    "compute": {"threads": 1},
                }
            )
        )
        run = run_process(cli_command("--config", config, "--json", "--quiet", *flags), env=env)
        assert run.returncode == 0, run.stderr
        outputs[name] = json.loads(run.stdout)["results"][0]
    assert outputs["ray"]["choices"] == outputs["local"]["choices"]
    for shard in (tmp_path / "local").glob("*.safetensors"):
        assert (tmp_path / "ray" / shard.name).read_bytes() == shard.read_bytes()


def test_a_model_a_node_cannot_get_is_one_line_naming_the_node(tmp_path, hub, cluster):
    run = analyze(tmp_path, "out", ["testorg/only-here"], driver_env(hub, tmp_path), "--ray", cluster[0].address)
    assert run.returncode == 3 and not (tmp_path / "out").exists()
    assert len(run.stderr.splitlines()) == 1, run.stderr
    line = run.stderr.strip()
    assert line.startswith("mastermerge: error: model 'testorg/only-here', tensor '")
    assert "node " in line and "cannot download testorg/only-here at " in line


def test_a_node_lost_mid_run_is_survived_with_the_same_results(tmp_path, hub, cluster):
    """Last in the module: it takes one of the two nodes away."""
    wide = build_model("llama", tmp_path / "wide", num_layers=2, hidden_size=1024, intermediate_size=2816)
    env = driver_env(hub, tmp_path)
    local = analyze(tmp_path, "local", [wide], env)
    assert local.returncode == 0, local.stderr
    command = cli_command(
        "analyze",
        wide,
        "--out",
        tmp_path / "ray",
        "--no-plots",
        "--json",
        "--threads",
        "1",
        "--ray",
        cluster[0].address,
    )
    driver = subprocess.Popen([str(c) for c in command], stdout=-1, stderr=-1, text=True, env=env)
    deadline = time.monotonic() + 120
    while len(running_tasks()) < 2 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.01)  # until both nodes are computing
    assert len(running_tasks()) == 2, "the two nodes were never busy at once"
    cluster[0].remove_node(cluster[1][1])
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    assert (tmp_path / "ray" / "metrics.csv").read_bytes() == (tmp_path / "local" / "metrics.csv").read_bytes()
    assert json.loads(stdout)["spectra_computed"] == json.loads(local.stdout)["spectra_computed"]

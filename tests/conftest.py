"""Fixtures shared by the test modules; the helpers they call are in helpers.py."""

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

# The tests import `examples` from the repository root and `helpers` from this folder: pyproject.toml's
# `pythonpath = [".", "tests"]` puts both on sys.path.
pytest.register_assert_rewrite("helpers")  # its assertions explained as the tests' own are


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """llama_family(num_layers): the small Llama family that many modules merge, built once per
    layer count for the whole session, by name:

    - base: seed 0, `num_layers` blocks;
    - ft-a, ft-b: fine-tunes of it, full-rank noise of 0.05 and 0.3 on every block (helpers.NOISE);
    - ft: a fine-tune with noise 0.1 (seed 1);
    - alien: a model of the same shapes initialised on its own (seed 7), so a fine-tune of nothing.

    Every module shares these directories: never change them (copy a model to spoil it)."""
    from examples.tiny_models import build_model
    from helpers import build_family

    families = {}

    def family(num_layers: int) -> dict[str, Path]:
        if num_layers not in families:
            root = tmp_path_factory.mktemp(f"llama-{num_layers}-layers")
            base, ft_a, ft_b = build_family(root, num_layers=num_layers)
            families[num_layers] = {
                "base": base,
                "ft-a": ft_a,
                "ft-b": ft_b,
                "ft": build_model("llama", root / "ft", seed=1, base_dir=base, noise=0.1),
                "alien": build_model("llama", root / "alien", seed=7, num_layers=num_layers),
            }
        return families[num_layers]

    return family


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray cluster of 2 CPUs for the whole session, this process its driver (started by the
    first test that asks for it): `address` for other drivers to connect to, and `sqlite_log`, where
    the workers record every SQLite connection they open (worker_hooks.py). Token authentication
    is off (RAY_AUTH_MODE=disabled, also for the drivers the tests start)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    sqlite_log = tmp_path_factory.mktemp("ray") / "sqlite-connections.log"
    sqlite_log.touch()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "worker_hooks.record_sqlite",
            "env_vars": {"PYTHONPATH": str(Path(__file__).parent), "MASTERMERGE_SQLITE_LOG": str(sqlite_log)},
        },
    )
    yield SimpleNamespace(address=ray.get_runtime_context().gcs_address, sqlite_log=sqlite_log)
    ray.shutdown()

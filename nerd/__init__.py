"""mastermerge: choose the best candidate at every depth by the spectra of its weights.

The Python API (the CLI uses the same calls):

    from nerd import claim_output, load_config, plan_merge, write_merge, MetricCache
    config = load_config("my.yaml")
    claim_output(config)                             # refuses a non-empty output_dir (force=True: ours)
    plan = plan_merge(config, cache=MetricCache())   # nothing written yet
    write_merge(plan, config)                         # the composite checkpoint
    verify_output("merged/composite").problems        # [] when the shards, index, config and tokenizer check out
"""

__version__ = "0.1.0"

from .config import MergeConfig, claim_output, load_config  # noqa: E402
from .errors import ConfigError, IntegrityError, MergeError, ModelError, OutputError  # noqa: E402
from .pipeline import plan_merge  # noqa: E402
from .plan import Plan  # noqa: E402
from .store import MetricCache, default_cache_path  # noqa: E402
from .verify import verify_output  # noqa: E402
from .write import write_merge  # noqa: E402

__all__ = [
    "ConfigError",
    "IntegrityError",
    "MergeConfig",
    "MergeError",
    "MetricCache",
    "ModelError",
    "OutputError",
    "Plan",
    "claim_output",
    "default_cache_path",
    "load_config",
    "plan_merge",
    "verify_output",
    "write_merge",
    "__version__",
]

"""Fuzzing of the config loader: whatever the YAML file holds, `load_config` returns a config or raises
one clear, one-line MergeError (a ConfigError naming the file); the CLI never prints a traceback.

Three generators: (a) arbitrary bytes and YAML-ish token soup (invalid UTF-8, tabs, anchors, tags,
huge numbers, deep nesting), (b) random Python structures written with yaml.safe_dump, and (c) the
most effective one, a valid config mutated at random key paths (values replaced, keys deleted or
added, types changed), which reaches the deep checks of every section. Nothing is ever written:
configs are loaded with writing=False and the CLI test stubs out the merge itself.
"""

import contextlib
import io
import math
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nerd.cli
from nerd.config import MergeConfig, load_config
from nerd.errors import ConfigError, MergeError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A directory with the config file, the tiny example models linked by relative names, a calibration
    text, and outputs of every kind (a file, a non-empty directory, an earlier mastermerge output)."""
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("tiny-base", "tiny-chat", "tiny-code"):
        (root / name).symlink_to(EXAMPLES / name, target_is_directory=True)
    (root / "models").mkdir()
    (root / "calib.txt").write_text("Some calibration text.\n")
    (root / "afile.txt").write_text("not a directory\n")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "precious.txt").write_text("keep me\n")
    (root / "ours").mkdir()
    (root / "ours" / "merge_report.json").write_text("{}")
    (root / "empty").mkdir()
    return root


def valid_configs(root: Path) -> list[dict]:
    """Valid configs using every section, local models (absolute and relative) and hub ids."""
    return [
        {"models": [str(EXAMPLES / "tiny-base"), str(EXAMPLES / "tiny-chat"), "tiny-code"],
         "base_model": str(EXAMPLES / "tiny-base"), "output_dir": str(root / "out"),
         "selection": {"granularity": "tensor", "non_layer": "compete", "metric": "ner", "goal": "max"},
         "dtype": "bfloat16", "shard_size": "1.5GiB", "device": "cpu",
         "tether": {"measure": "cosine", "min_compatibility": 0.5, "mode": "blend", "weights": "score"},
         "dlec": {"add_layers": 2, "importance": "block_influence", "calibration": "calib.txt",
                  "max_tokens": 4096, "init": "copy", "trust_remote_code": False}},
        {"models": ["org/base", "org/ft@v1.0", {"model": "org/other", "revision": "abc123"}],
         "base_model": "org/base", "output_dir": "ours",
         "selection": {"metric": "alpha", "goal": "target", "target": 2.0, "granularity": "block"},
         "shard_size": 500000000, "device": "auto",
         "tether": {"measure": "l2", "min_compatibility": -3.5, "mode": "select"},
         "dlec": {"layers": [0, 1, 1], "importance": "ner", "init": "identity"}},
        {"models": ["./tiny-base", "tiny-chat"], "base_model": "tiny-base", "output_dir": "empty",
         "dtype": "keep", "selection": None, "tether": None,
         "dlec": {"growth": 0.16, "max_tokens": 2, "trust_remote_code": True}},
    ]


def check_load(path: Path, force: bool = False) -> MergeConfig | None:
    """Load `path`: a config, or a one-line, printable error naming the file. Anything else fails the test."""
    try:
        config = load_config(path, force=force, writing=False)
    except MergeError as exc:
        message = str(exc)
        assert message, f"empty message from {type(exc).__name__}"
        assert "\n" not in message and len(message.splitlines()) == 1, message
        assert message.isprintable(), message
        if isinstance(exc, ConfigError):
            assert message.startswith(f"{path}: "), message
        return None
    assert isinstance(config, MergeConfig)
    return config


# ---- (a) arbitrary text --------------------------------------------------------------------------------------

def nested_block(depth: int) -> bytes:
    return b"".join(b"  " * i + b"k%d:\n" % i for i in range(depth)) + b"  " * depth + b"x\n"


TOKENS = [
    b"models:", b"base_model:", b"output_dir:", b"selection:", b"tether:", b"dlec:", b"dtype:", b"shard_size:",
    b"device:", b"metric:", b"goal:", b"target:", b"min_compatibility:", b"layers:", b"revision:", b"model:",
    b"\n", b"\n  ", b"\n    ", b" ", b"\t", b"- ", b"? ", b": ", b",", b"[", b"]", b"{", b"}", b"'", b'"', b"#",
    b"&a ", b"*a", b"&b ", b"*b", b"<<: *a\n", b"&r [*r]", b"|\n  ", b">-\n  ", b"---\n", b"...\n", b"%YAML 1.1\n",
    b"%TAG ! tag:x,2000:\n", b"!x ", b"!!int ", b"!!float ", b"!!bool ", b"!!str ", b"!!null ", b"!!timestamp ",
    b"!!binary ", b"!!set ", b"!!omap ", b"!!pairs ", b"!!map ", b"!!seq ", b"!!python/object:os.system ",
    b".nan", b".inf", b"-.inf", b"1e400", b"-0", b"0x1F", b"0o17", b"017", b"0b101", b"1_000", b"1:20:30",
    b"1" + b":59" * 400, b"0x" + b"f" * 400, b"0x" + b"f" * 4000, b"9" * 400, b"9" * 5000, b"-" + b"9" * 320,
    b"2001-02-30", b"2001-12-14t21:59:43.10-05:00", b"2001-13-01", b"yes", b"no", b"on", b"~", b"null",
    b"true", b"maybe", b"abc", b"org/a", b"org/b@main", b"tiny-base", b"tiny-chat", b"./tiny-base", b"calib.txt",
    b"out", b"ours", b"nonempty", b"afile.txt", b"~nosuchuser9/x", b"/" + b"a" * 300, b"a" * 300,
    b'"\\ud800"', b'"\\n"', b'"a\\x00b"', b'"\\u2028"', b'"\\x85"', b"\x00", b"\x1b", b"\x7f", b"\xff", b"\xc3\x28",
    b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\xff\xfe", b"\xc2\x85", b"\xe2\x80\xa8", "é".encode(), "数".encode(),
    b"[" * 400 + b"]" * 400, b"[" * 3000, b"{a: " * 300, b"- " * 300 + b"x", nested_block(150), nested_block(600),
]

VALID_HEAD = (f"models: [{EXAMPLES / 'tiny-base'}, {EXAMPLES / 'tiny-chat'}]\n"
              f"base_model: {EXAMPLES / 'tiny-base'}\n").encode()

yaml_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
    # a valid start, so the token soup lands in a key's value and reaches the validation
    st.tuples(st.sampled_from([b"", VALID_HEAD, VALID_HEAD + b"output_dir: out\n"]),
              st.sampled_from([b"models", b"base_model", b"output_dir", b"selection", b"tether", b"dlec",
                               b"dtype", b"shard_size", b"device", b"zz"]),
              st.lists(st.sampled_from(TOKENS), max_size=25).map(b"".join))
    .map(lambda t: t[0] + t[1] + b": " + t[2] + b"\n"),
)


@FUZZ
@given(text=yaml_bytes, force=st.booleans())
def test_arbitrary_yaml_text(root, text, force):
    path = root / "merge.yaml"
    path.write_bytes(text)
    check_load(path, force)


# ---- (b) random structures through yaml.safe_dump ------------------------------------------------------------

KNOWN_KEYS = ["models", "base_model", "output_dir", "selection", "dtype", "shard_size", "device", "tether", "dlec",
              "granularity", "non_layer", "metric", "goal", "target", "model", "revision", "measure",
              "min_compatibility", "mode", "weights", "add_layers", "growth", "layers", "importance", "calibration",
              "max_tokens", "init", "trust_remote_code"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-10**400, max_value=10**400), st.sampled_from([2**63, -2**63 - 1, 10**308]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=30), st.sampled_from(KNOWN_KEYS),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False))
structures = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                          max_leaves=20)
model_refs = st.one_of(structures, st.sampled_from([str(EXAMPLES / "tiny-base"), "tiny-chat", "org/a", "org/b@v1"]))
top_level = st.one_of(
    structures,
    st.fixed_dictionaries({"models": st.one_of(structures, st.lists(model_refs, max_size=4)),
                           "base_model": model_refs, "output_dir": st.one_of(structures, st.just("out"))},
                          optional={k: structures for k in KNOWN_KEYS[3:]}),
)


@FUZZ
@given(data=top_level, force=st.booleans())
def test_random_structures(root, data, force):
    path = root / "merge.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    check_load(path, force)


# ---- (c) mutations of valid configs --------------------------------------------------------------------------

INTERESTING = [
    None, True, False, 0, 1, -1, 2, 3, 0.5, -1.0, 1.0, 1.5, 1e308, 10**400, 2**64, math.nan, math.inf, -math.inf,
    "", " ", "\t", "keep", "float32", "float16", "bfloat16", "auto", "cpu", "cuda", "block", "tensor", "base",
    "compete", "ner", "alpha", "erank", "max", "min", "target", "cosine", "min_cosine", "l2", "select", "blend",
    "equal", "score", "compatibility", "copy", "identity", "block_influence", "heavy_tail",
    "2GB", "1.5GiB", "0B", "-1MB", "9" * 400 + "GB", "1e9", "500 mb",
    str(EXAMPLES / "tiny-base"), "tiny-base", "tiny-chat", "./tiny-code", "tiny-base/", "models/x", "org/x",
    "org/x@main", "org/x@", "org/x-", "gpt2", "@main", "org/a/b", "x" * 100 + "/y", ".", "..", "/", "~", "~/",
    "~nosuchuser9/x", "/" + "a" * 300, "a" * 300, "out\nx", "out\r", "a\x00b", "a\tb", "\u2028", "\x85x", "\x1b[31m",
    "calib.txt", "afile.txt", "nonempty", "ours", "empty", "out", "tiny-base/out",
    [], [0], [3, 7, 7], [-1], [True], [1.5], ["a"], [[1]], {}, {"model": "org/x"}, {"model": "org/x", "revision": 1},
    {"model": "org/x", "revision": "v1"}, {"model": None}, {"revision": "v1"}, {"model": str(EXAMPLES / "tiny-base")},
]
values = st.one_of(st.sampled_from(INTERESTING), structures, st.text(max_size=20),
                   st.integers(min_value=-10**6, max_value=10**6), st.floats())


def paths_of(node, prefix=()):
    """Every key path into the nested dicts and lists of `node`, shortest first."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(paths_of(child, prefix + (key,)))
    return out


def containers_of(node, prefix=()):
    """Every key path to a dict (the root included), where a key can be added."""
    out = [prefix] if isinstance(node, dict) else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.extend(containers_of(child, prefix + (key,)))
    return out


def at(node, path):
    for key in path:
        node = node[key]
    return node


def mutate(config: dict, data) -> dict:
    """Apply 1 to 4 random edits to `config` (a deep copy of it): replace, delete, add, retype, duplicate."""
    config = yaml.safe_load(yaml.safe_dump(config))  # a deep copy
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        paths = paths_of(config)
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "retype", "duplicate"]),
                       label="op")
        if op == "add" or not paths:
            where = at(config, data.draw(st.sampled_from(containers_of(config)), label="mapping"))
            key = data.draw(st.one_of(st.sampled_from(KNOWN_KEYS), keys,
                                      st.sampled_from(KNOWN_KEYS).map(lambda k: k[:-1]), st.text(max_size=8)),
                            label="new key")
            where[key] = data.draw(values, label="value")
            continue
        path = data.draw(st.sampled_from(paths), label="path")
        parent, key = at(config, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = data.draw(values, label="value")
        elif op == "delete":
            del parent[key]
        elif op == "retype":
            value = parent[key]
            parent[key] = data.draw(st.sampled_from([[value], {"model": value}, {"x": value}, str(value),
                                                     None, 1, ""]), label="retyped")
        elif isinstance(parent, list):
            parent.insert(key, parent[key])
        else:
            parent[key] = [parent[key], parent[key]]
    return config


def test_the_seeds_are_valid(root):
    for i, config in enumerate(valid_configs(root)):
        path = root / f"seed{i}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        assert check_load(path) is not None, config


@settings(FUZZ, max_examples=400)
@given(data=st.data(), force=st.booleans())
def test_mutated_valid_configs(root, data, force):
    seeds = valid_configs(root)
    config = mutate(seeds[data.draw(st.integers(0, len(seeds) - 1), label="seed")], data)
    path = root / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    check_load(path, force)


# ---- the command line -----------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_cli_never_shows_a_traceback(root, data):
    """`mastermerge --config X --dry-run`: exit 0 (the merge itself stubbed out) or one error line, exit 2 or 3;
    never 1 (internal error) and never a traceback."""
    if data.draw(st.booleans(), label="mutated"):
        seeds = valid_configs(root)
        config = mutate(seeds[data.draw(st.integers(0, len(seeds) - 1), label="seed")], data)
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode("utf-8")
    else:
        text = data.draw(yaml_bytes, label="text")
    path = root / "cli.yaml"
    path.write_bytes(text)
    stderr, stdout = io.StringIO(), io.StringIO()
    with mock.patch.object(nerd.cli, "run_configs", return_value=0) as run, \
            contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = nerd.cli.main(["--config", str(path), "--dry-run", "--no-cache"])
    err = stderr.getvalue()
    assert "Traceback" not in err and code != 1, err
    if code == 0:
        assert run.called and err == ""
    else:
        assert code in (2, 3), (code, err)
        assert err.count("\n") == 1 and err.startswith("mastermerge: error: "), err

"""Fuzzing of the config loader: whatever the YAML file holds, `load_config` returns a config or raises
one clear, one-line MergeError (a ConfigError naming the file); the CLI never prints a traceback.

Three generators: (a) arbitrary bytes and YAML-ish token soup (invalid UTF-8, tabs, anchors, tags,
huge numbers, deep nesting), (b) random Python structures written with yaml.safe_dump, and (c) the
most effective one, a valid config mutated at random key paths (values replaced, keys deleted or
added, types changed), which reaches the deep checks of every section. Nothing is ever written:
configs are loaded and their output claimed (with no leftovers of a killed run there to clean up),
and the CLI test stubs out the merge itself. Each crash the fuzzing found is also kept as a plain
regression case (test_found_crashes_stay_fixed).
"""

import contextlib
import copy
import io
import math
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nerd.cli
from nerd.config import MergeConfig, claim_output, load_config
from nerd.errors import ConfigError, MergeError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A directory with the config file, the tiny example models linked by relative names, a calibration
    text, and outputs of every kind (a file, a non-empty directory, an earlier mastermerge output, a symlink
    loop)."""
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("tiny-base", "tiny-docs", "tiny-code"):
        (root / name).symlink_to(EXAMPLES / name, target_is_directory=True)
    (root / "models").mkdir()
    (root / "calib.txt").write_text("Some calibration text.\n")
    (root / "afile.txt").write_text("not a directory\n")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "precious.txt").write_text("keep me\n")
    (root / "ours").mkdir()
    (root / "ours" / "merge_report.json").write_text("{}")
    (root / "empty").mkdir()
    (root / "loop").symlink_to(root / "loop")  # a symlink loop
    return root


def valid_configs(root: Path) -> list[dict]:
    """Valid configs using every section, local models (absolute and relative) and hub ids."""
    return [
        {
            "models": [str(EXAMPLES / "tiny-base"), str(EXAMPLES / "tiny-docs"), "tiny-code"],
            "base_model": str(EXAMPLES / "tiny-base"),
            "output_dir": str(root / "out"),
            "selection": {"granularity": "tensor", "non_layer": "compete", "metric": "ner", "goal": "max"},
            "dtype": "bfloat16",
            "shard_size": "1.5GiB",
            "device": "cpu",
            "tether": {"measure": "cosine", "min_compatibility": 0.5, "mode": "blend", "weights": "score"},
            "dlec": {
                "add_layers": 2,
                "importance": "block_influence",
                "calibration": "calib.txt",
                "max_tokens": 4096,
                "init": "copy",
                "trust_remote_code": False,
            },
        },
        {
            "models": ["org/base", "org/ft@v1.0", {"model": "org/other", "revision": "abc123"}],
            "base_model": "org/base",
            "output_dir": "ours",
            "selection": {"metric": "alpha", "goal": "target", "target": 2.0, "granularity": "block"},
            "shard_size": 500000000,
            "device": "auto",
            "tether": {"measure": "l2", "min_compatibility": -3.5, "mode": "select"},
            "dlec": {"layers": [0, 1, 1], "importance": "ner", "init": "identity"},
        },
        {
            "models": ["./tiny-base", "tiny-docs"],
            "base_model": "tiny-base",
            "output_dir": "empty",
            "dtype": "keep",
            "selection": None,
            "tether": None,
            "dlec": {"growth": 0.16, "max_tokens": 2, "trust_remote_code": True},
        },
    ]


def check_load(path: Path, force: bool = False) -> MergeConfig | None:
    """Load `path` and claim its output: a config, or a one-line, printable error naming the file. Anything
    else fails the test."""
    try:
        config = load_config(path)
        claim_output(config, force=force)
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


# ---- what the fuzzing found, kept as plain regression cases -------------------------------------------------

HEAD = f"models: [{EXAMPLES / 'tiny-base'}, {EXAMPLES / 'tiny-docs'}]\nbase_model: {EXAMPLES / 'tiny-base'}\n"
HUGE = 2**1024 - 1  # an int YAML keeps (309 digits) that no float can hold
BIG = str(HUGE)
FOUND = [
    ("dtype: 2001-02-30", "line 4, column 8: cannot read '2001-02-30' as !!timestamp (day is out of range for month)"),
    ("dtype: !!int abc", "cannot read 'abc' as !!int (invalid literal for int() with base 10: 'abc')"),
    ("dtype: !!int", "cannot read '' as !!int"),
    ("dtype: !!bool maybe", "cannot read 'maybe' as !!bool"),
    ("dtype: !!timestamp foo", "cannot read 'foo' as !!timestamp"),
    ("dtype: !!float abc", "cannot read 'abc' as !!float"),
    ("dtype: !!map x", "line 4, column 8: expected a mapping node, but found scalar"),
    ("dtype: !!set [x]", "expected a mapping node, but found sequence"),
    ("dtype: 0x" + "f" * 4000, "as !!int (too large for any setting)"),
    ("dtype: " + "9" * 5000, "as !!int (too large for any setting)"),
    ("dtype: 1" + ":59" * 3000, "as !!int (too large for any setting)"),
    (
        "selection: {metric: alpha, goal: target, target: " + BIG + "}",
        "selection.target: goal: target needs a finite number, found " + BIG,
    ),
    ("tether: {min_compatibility: -" + BIG + "}", "tether.min_compatibility: expected a number between -1 and 1"),
    ("shard_size: '" + "9" * 400 + "GB'", "shard_size: '" + "9" * 400 + "GB' is too large for a size in bytes"),
    ('"a\\nb": 1', "yaml: 'a\\nb': unknown key"),
    ('"": 1', "yaml: '': unknown key"),
    ('selection: {"\\t": 1}', "selection.'\\t': unknown key"),
    ('dlec: {layers: [1], calibration: "a\\tb"}', "dlec.calibration: expected the path of a text file, found 'a\\tb'"),
    ("dlec: {layers: [1], calibration: " + "a" * 300 + "}", "dlec.calibration: cannot use 'aaa"),
    ("dlec: {layers: [1], calibration: ~nosuchuser9/c.txt}", "dlec.calibration: cannot use '~nosuchuser9/c.txt'"),
]
OUTPUT = [
    ('"o\\ud800"', "output_dir: expected a directory path, found 'o\\ud800'"),
    ('"out\\n"', "output_dir: expected a directory path, found 'out\\n'"),
    ("a" * 300, "output_dir: cannot use 'aaa"),
    ("~nosuchuser9/out", "output_dir: cannot use '~nosuchuser9/out' as a path: "),
    ("loop/out", "output_dir: cannot use 'loop/out' as a path: "),
]
MODELS = [
    ('"org/a\\nb"', "models[1]: expected a local directory or a hub id (org/name[@revision]), found 'org/a\\nb'"),
    ('"org/a\\ud800"', "found 'org/a\\ud800'"),
    ('{model: org/a, revision: "v\\u2028"}', "models[1].revision: expected a branch, tag or commit, found 'v\\u2028'"),
    ("a" * 300, "models[1]: cannot use 'aaa"),
    ("/" + "a" * 300, "models[1]: cannot use '/aaa"),
    ("~nosuchuser9/m", "models[1]: cannot use '~nosuchuser9/m' as a path: "),
]
CASES = (
    [(HEAD + "output_dir: out\n" + text + "\n", message) for text, message in FOUND]
    + [(HEAD + f"output_dir: {text}\n", message) for text, message in OUTPUT]
    + [
        (
            f"models: [{EXAMPLES / 'tiny-base'}, {text}]\nbase_model: {EXAMPLES / 'tiny-base'}\noutput_dir: out\n",
            message,
        )
        for text, message in MODELS
    ]
    + [
        ("a: " + "[" * 1000 + "\n", "not valid YAML: nested too deeply"),
        (b"models: [\xff]\n", "not valid YAML: 'utf-8' codec can't decode byte 0xff in position 9"),
    ]
)


@pytest.mark.parametrize("text, message", CASES, ids=[f"{i}-{c[1][:30]}" for i, c in enumerate(CASES)])
def test_found_crashes_stay_fixed(root, text, message):
    path = root / "found.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert check_load(path) is None  # one printable line naming the file


def test_yaml_merge_keys_are_read(root):
    """'<<' merges a mapping into another (keys written beside it win); it is not a key given twice."""
    path = root / "merge-keys.yaml"
    path.write_text(
        HEAD + "output_dir: out\nselection: {<<: {granularity: tensor, goal: min}, goal: max}\n"
        "tether: {<<: &t {mode: blend, weights: equal}, mode: blend}\n"
    )
    config = load_config(path)
    assert (config.selection.granularity, config.selection.goal, config.tether.mode) == ("tensor", "max", "blend")


# ---- (a) arbitrary text --------------------------------------------------------------------------------------


def nested_block(depth: int) -> bytes:
    return b"".join(b"  " * i + b"k%d:\n" % i for i in range(depth)) + b"  " * depth + b"x\n"


TOKENS = [
    b"models:",
    b"base_model:",
    b"output_dir:",
    b"selection:",
    b"tether:",
    b"dlec:",
    b"dtype:",
    b"shard_size:",
    b"device:",
    b"metric:",
    b"goal:",
    b"target:",
    b"min_compatibility:",
    b"layers:",
    b"revision:",
    b"model:",
    b"\n",
    b"\n  ",
    b"\n    ",
    b" ",
    b"\t",
    b"- ",
    b"? ",
    b": ",
    b",",
    b"[",
    b"]",
    b"{",
    b"}",
    b"'",
    b'"',
    b"#",
    b"&a ",
    b"*a",
    b"&b ",
    b"*b",
    b"<<: *a\n",
    b"&r [*r]",
    b"|\n  ",
    b">-\n  ",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b"%TAG ! tag:x,2000:\n",
    b"!x ",
    b"!!int ",
    b"!!float ",
    b"!!bool ",
    b"!!str ",
    b"!!null ",
    b"!!timestamp ",
    b"!!binary ",
    b"!!set ",
    b"!!omap ",
    b"!!pairs ",
    b"!!map ",
    b"!!seq ",
    b"!!python/object:os.system ",
    b".nan",
    b".inf",
    b"-.inf",
    b"1e400",
    b"-0",
    b"0x1F",
    b"0o17",
    b"017",
    b"0b101",
    b"1_000",
    b"1:20:30",
    b"1" + b":59" * 400,
    b"0x" + b"f" * 400,
    b"0x" + b"f" * 4000,
    b"9" * 400,
    b"9" * 5000,
    b"-" + b"9" * 320,
    b"2001-02-30",
    b"2001-12-14t21:59:43.10-05:00",
    b"2001-13-01",
    b"yes",
    b"no",
    b"on",
    b"~",
    b"null",
    b"true",
    b"maybe",
    b"abc",
    b"org/a",
    b"org/b@main",
    b"tiny-base",
    b"tiny-docs",
    b"./tiny-base",
    b"calib.txt",
    b"out",
    b"ours",
    b"nonempty",
    b"afile.txt",
    b"~nosuchuser9/x",
    b"/" + b"a" * 300,
    b"a" * 300,
    b'"\\ud800"',
    b'"\\n"',
    b'"a\\x00b"',
    b'"\\u2028"',
    b'"\\x85"',
    b"\x00",
    b"\x1b",
    b"\x7f",
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\xc2\x85",
    b"\xe2\x80\xa8",
    "é".encode(),
    "数".encode(),
    b"[" * 400 + b"]" * 400,
    b"[" * 1000,
    b"{a: " * 300,
    b"- " * 300 + b"x",
    nested_block(150),
    nested_block(600),
]

VALID_HEAD = HEAD.encode()

yaml_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
    # a valid start, so the token soup lands in a key's value and reaches the validation
    st.tuples(
        st.sampled_from([b"", VALID_HEAD, VALID_HEAD + b"output_dir: out\n"]),
        st.sampled_from(
            [
                b"models",
                b"base_model",
                b"output_dir",
                b"selection",
                b"tether",
                b"dlec",
                b"dtype",
                b"shard_size",
                b"device",
                b"zz",
            ]
        ),
        st.lists(st.sampled_from(TOKENS), max_size=25).map(b"".join),
    ).map(lambda t: t[0] + t[1] + b": " + t[2] + b"\n"),
)


@FUZZ
@given(text=yaml_bytes, force=st.booleans())
def test_arbitrary_yaml_text(root, text, force):
    path = root / "merge.yaml"
    path.write_bytes(text)
    check_load(path, force)


# ---- (b) random structures through yaml.safe_dump ------------------------------------------------------------

KNOWN_KEYS = [
    "models",
    "base_model",
    "output_dir",
    "selection",
    "dtype",
    "shard_size",
    "device",
    "tether",
    "dlec",
    "granularity",
    "non_layer",
    "metric",
    "goal",
    "target",
    "model",
    "revision",
    "measure",
    "min_compatibility",
    "mode",
    "weights",
    "add_layers",
    "growth",
    "layers",
    "importance",
    "calibration",
    "max_tokens",
    "init",
    "trust_remote_code",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**63, -(2**63) - 1, 10**308]),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=30),
    st.sampled_from(KNOWN_KEYS),
)
keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.text(max_size=12),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
structures = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=20
)
model_refs = st.one_of(structures, st.sampled_from([str(EXAMPLES / "tiny-base"), "tiny-docs", "org/a", "org/b@v1"]))
top_level = st.one_of(
    structures,
    st.fixed_dictionaries(
        {
            "models": st.one_of(structures, st.lists(model_refs, max_size=4)),
            "base_model": model_refs,
            "output_dir": st.one_of(structures, st.just("out")),
        },
        optional={k: structures for k in KNOWN_KEYS[3:]},
    ),
)


@FUZZ
@given(data=top_level, force=st.booleans())
def test_random_structures(root, data, force):
    path = root / "merge.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    check_load(path, force)


# ---- (c) mutations of valid configs --------------------------------------------------------------------------

PATHS = [
    str(EXAMPLES / "tiny-base"),
    "tiny-base",
    "./tiny-docs",
    "tiny-code",
    "tiny-base/",
    "models/x",
    "no/such",
    "org/x",
    "org/x@main",
    "org/x@",
    "org/x-",
    "org/a/b",
    "@main",
    "gpt2",
    "tiny-base@main",
    "x" * 100 + "/y",
    "calib.txt",
    "empty",
    "loop",
    "./loop",
    ".",
    "..",
    "/",
    "~",
    "~/",
    "~nosuchuser9/x",
    "/" + "a" * 300,
    "a" * 300,
    "a\x00b",
    "out\nx",
    "a\tb",
    "\u2028",
    "\x85x",
    "\x1b[31m",
    "org/\u00e9t\u00e9",
    {"model": "org/y", "revision": "v2"},
    {"model": "tiny-docs", "revision": "v1"},
    {"model": "org/y@v1", "revision": "v2"},
    {"model": "org/y", "revision": 1.0},
    {"model": None},
    {"revision": "v1"},
    {"model": "org/y", "revison": "v"},
]
OUTPUTS = [
    "out",
    "ours",
    "nonempty",
    "empty",
    "afile.txt",
    "afile.txt/sub",
    "tiny-base",
    "tiny-base/sub",
    ".",
    "..",
    "/",
    "~",
    "~/",
    "sub/dir",
    "loop",
    "loop/x",
    str(Path.home() / ".cache" / "huggingface" / "hub"),
    "~nosuchuser9/o",
    "a" * 300,
    "/" + "a" * 300,
    "out\n",
    "o\x00",
    " ",
    "",
]
NUMBERS = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    0.5,
    -0.5,
    0.16,
    1.0,
    1.0001,
    -1.0,
    -1.0001,
    -5,
    1e308,
    -1e308,
    5e-324,
    2**63,
    2**64,
    HUGE,
    -HUGE,
    math.nan,
    math.inf,
    -math.inf,
    "1",
    "0.5",
    "",
    [],
    [0],
    [1, 1],
    [-1],
    [True],
    [1.5],
    ["a"],
    [[1]],
    {},
]
SIZES = [
    "2GB",
    "1.5GiB",
    "500 mb",
    "1KB",
    "0B",
    "0",
    "-1MB",
    "1e9",
    "1.5",
    "9" * 400 + "GB",
    "9" * 400,
    "GB",
    5000,
    0,
    -1,
    1.5,
    HUGE,
    True,
]
CHOICES = [
    "keep",
    "float32",
    "float16",
    "bfloat16",
    "fp16",
    "auto",
    "cpu",
    "cuda",
    "gpu",
    "block",
    "tensor",
    "layer",
    "base",
    "compete",
    "ner",
    "alpha",
    "erank",
    "stable_rank",
    "alfa",
    "max",
    "min",
    "target",
    "cosine",
    "min_cosine",
    "l2",
    "select",
    "blend",
    "equal",
    "score",
    "compatibility",
    "copy",
    "identity",
    "block_influence",
    "heavy_tail",
    "exclude",
    "allow",
    "MAX",
    " max",
    "max\n",
]
RELEVANT = {
    "models": [PATHS[:4], PATHS[1:3], [PATHS[0]], PATHS[5:9]] + PATHS,
    "base_model": PATHS,
    "model": PATHS,
    "revision": ["v1", "main", "", " ", 1, 1.0, True, None, "a\nb", "x" * 300],
    "output_dir": OUTPUTS,
    "calibration": OUTPUTS + ["calib.txt", "nope.txt", "tiny-base/config.json"],
    "shard_size": SIZES,
    "layers": [[0], [0, 0, 3], [], [-1], [1.0], [True], [HUGE], "1,2", 3, None],
}
INTERESTING = NUMBERS + SIZES + CHOICES + PATHS + OUTPUTS
values = st.one_of(
    st.sampled_from(INTERESTING),
    structures,
    st.text(max_size=20),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(),
)


def value_for(path: tuple) -> st.SearchStrategy:
    """Mostly values that make sense for the key at the end of `path` (its section's names), else anything."""
    names = [k for k in path if isinstance(k, str)]
    relevant = RELEVANT.get(names[-1] if names else "", NUMBERS + CHOICES)
    return st.one_of(
        st.sampled_from(relevant),
        st.sampled_from(relevant),
        st.sampled_from(relevant),
        st.sampled_from(INTERESTING),
        values,
    ).map(copy.deepcopy)  # the edits must not change the pools


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


SECTION_KEYS = {
    "selection": ["granularity", "non_layer", "metric", "goal", "target", "zero_matrices"],
    "tether": ["measure", "min_compatibility", "mode", "weights"],
    "dlec": ["add_layers", "growth", "layers", "importance", "calibration", "max_tokens", "init", "trust_remote_code"],
}


def mutate(config: dict, data) -> dict:
    """Apply 1 (mostly) to 3 random edits to a copy of `config`: replace a value, delete a key, add a key (one of the
    section's, a misspelt one, one of another section's, or any), change a value's type, repeat it."""
    config = copy.deepcopy(config)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="edits")):
        # one top-level key at a time, so that every section is edited about as often as the others
        top = data.draw(st.sampled_from(KNOWN_KEYS[:9]), label="section")
        paths = [p for p in paths_of(config) if p[0] == top]
        op = data.draw(
            st.sampled_from(["replace", "replace", "replace", "add", "add", "delete", "retype", "duplicate"]),
            label="op",
        )
        if op == "add" or not paths:
            places = [p for p in containers_of(config) if p[:1] == (top,)] or [()]
            place = data.draw(st.sampled_from(places), label="mapping")
            section = SECTION_KEYS.get(place[-1] if place else "", [k for k in KNOWN_KEYS[:9]])
            key = data.draw(
                st.one_of(
                    st.sampled_from(section),
                    st.sampled_from(section),
                    st.sampled_from(section).map(lambda k: k[:-1] or "x"),
                    st.sampled_from(KNOWN_KEYS),
                    st.sampled_from(KNOWN_KEYS),
                    keys,
                ),
                label="new key",
            )
            at(config, place)[key] = data.draw(value_for(place + (key,)), label="value")
            continue
        path = data.draw(st.sampled_from(paths), label="path")
        parent, key = at(config, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = data.draw(value_for(path), label="value")
        elif op == "delete":
            del parent[key]
        elif op == "retype":
            value = parent[key]
            parent[key] = data.draw(
                st.sampled_from([[value], {"model": value}, {"x": value}, str(value), None, 1, ""]), label="retyped"
            )
        elif isinstance(parent, list):
            parent.insert(key, parent[key])
        else:
            parent[key] = [parent[key], parent[key]]
    return config


def test_the_seeds_are_valid(root):
    for i, config in enumerate(valid_configs(root)):
        path = root / f"seed{i}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        assert check_load(path, force=True) is not None, config  # force: seed 1 replaces an earlier output


@settings(FUZZ, max_examples=300)
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
    with (
        mock.patch("nerd.commands.run_configs", return_value=0) as run,
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(stdout),
    ):
        code = nerd.cli.main(["--config", str(path), "--dry-run", "--no-cache"])
    err = stderr.getvalue()
    assert "Traceback" not in err and code != 1, err
    if code == 0:
        assert run.called and err == ""
    else:
        assert code in (2, 3), (code, err)
        assert err.count("\n") == 1 and err.startswith("mastermerge: error: "), err

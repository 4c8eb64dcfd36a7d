"""The architecture table: what mastermerge knows of each model family, and the answers to the
questions the rest of the code asks about a model's tensor names and its config.json.

Each family is a data file in nerd/architectures/ (llama.yaml, gpt2.yaml, bert.yaml, ...). A model's
family is the one whose `model_types` lists config.json's model_type, else the one whose `classes`
lists a class of its `architectures`; a model no family claims (no config.json, a model type no
file lists, a multimodal wrapper) is read by name alone, with _inferred.yaml: the patterns of every
family at once (every name and key of a family is in it too, but the residual writers of a
post-norm family, which DLEC never zeroes, so a family's models read the same either way).
_quantization.yaml holds the tensor names only quantized checkpoints have.

The keys of a family file (all of them required; patterns are regular expressions searched in
the full tensor name):

- name (the file's stem), model_types, classes: how config.json names the family;
- blocks: the module lists that hold the transformer blocks (`layers` for model.layers.N.*): a
  tensor's depth is the N after one of them, and of several such stacks (a vision tower beside
  the language model) the one with the most tensors is the model's;
- layer_count, width, context: the config.json keys of the number of blocks, of the input
  embedding's width and of the context length, in the order they are looked for;
- input_embeddings: the tensors written first (and whose width is `width`);
- word_embedding: the token embedding an output head may be tied to;
- tied_head: an output head that may be tied to it (and so be missing from a checkpoint);
- residual_writers: module names of the projections that write a block's output into the
  residual stream (weight and bias, and a fused experts tensor's `_bias`), which a DLEC copy
  initialised as an identity holds at zero; `attention` tells the attention's from the MLP's;
- norm (pre or post) and post_norm_when: where the blocks normalise, and the config.json
  settings (true/false) that make a pre-norm family post-norm;
- buffers: tensors that carry nothing learned (transformers computes them), which one version
  saves and another does not;
- shapes: the shapes config.json gives the tensors, as a transformers model built from it has
  them (what verify compares, nerd.loadchecks): by model type ('*': every type of the family), a
  tensor pattern and its shape, each dimension an expression of config.json keys (integers,
  + - * //, parentheses; ~ where the config does not set it); a tensor no pattern matches is
  not compared;
- sizes: the expression of a key that config.json may leave out or set to null (head_dim:
  hidden_size // num_attention_heads), as transformers computes it.

A 1-D tensor (a bias, a norm's weight) belongs to the one 2-D matrix of its module, if there is
one (paired_matrix): every family names a parameter <module>.<parameter>. This module imports
nothing else from the package.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DATA = Path(__file__).with_name("architectures")
INFERRED = "inferred"  # the name of the fallback table, as the plan records it
LISTS = ("blocks", "layer_count", "width", "context", "residual_writers", "buffers")
PATTERNS = ("input_embeddings", "word_embedding", "tied_head", "attention")
EVERY_TYPE = "*"  # the shapes of every model type of a family
ARITHMETIC = (ast.Expression, ast.BinOp, ast.Name, ast.Load, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)


@dataclass(frozen=True)
class Shape:
    """The shape config.json gives the tensors a pattern matches: each dimension an expression of
    config.json keys (None: not set by the config)."""

    tensors: re.Pattern
    dims: tuple[ast.Expression | None, ...]


@dataclass(frozen=True)
class Architecture:
    """One family's entry of the table (or the inferred fallback's), with the answers it gives."""

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    blocks: re.Pattern
    layer_count_keys: tuple[str, ...]
    width_keys: tuple[str, ...]
    context_keys: tuple[str, ...]
    input_embeddings: re.Pattern
    word_embedding: re.Pattern
    tied_head: re.Pattern
    residual_writers: re.Pattern
    attention: re.Pattern
    norm: str
    post_norm_when: tuple[tuple[str, bool], ...]
    buffers: tuple[re.Pattern, ...]
    shapes: tuple[tuple[str, tuple[Shape, ...]], ...]  # (model type or EVERY_TYPE, its shapes)
    sizes: tuple[tuple[str, ast.Expression], ...]  # a key config.json may lack -> its expression

    def block_of(self, name: str) -> tuple[str, int] | None:
        """The stack (model.layers) and depth of a tensor inside a numbered block, or None."""
        found = self.blocks.match(name)
        return (found.group("stack"), int(found.group("depth"))) if found else None

    def layer_section(self, config: dict) -> tuple[dict, str]:
        """The mapping of config.json that holds the layer settings, and its key prefix: the top
        level, or `text_config` for a multimodal config without a layer count of its own."""
        if not any(k in config for k in self.layer_count_keys) and isinstance(config.get("text_config"), dict):
            return config["text_config"], "text_config."
        return config, ""

    def is_input_embedding(self, name: str) -> bool:
        return bool(self.input_embeddings.search(name))

    def is_word_embedding(self, name: str) -> bool:
        return bool(self.word_embedding.search(name))

    def is_tied_head(self, name: str) -> bool:
        return bool(self.tied_head.search(name))

    def is_buffer(self, name: str) -> bool:
        """A tensor transformers computes (nothing learned), by name."""
        return any(pattern.search(name) for pattern in self.buffers)

    def residual_writer(self, name: str) -> str | None:
        """'attention' or 'mlp' for a tensor that writes into the residual stream, else None."""
        if not self.residual_writers.search(name):
            return None
        return "attention" if self.attention.search(name) else "mlp"

    def shapes_of(self, model_type: object) -> list[Shape]:
        """The shapes config.json gives the tensors of a model of this type (the family's own, then the type's)."""
        return [shape for kind, shapes in self.shapes if kind in (EVERY_TYPE, model_type) for shape in shapes]

    def post_norm(self, config: dict) -> bool:
        """Whether the blocks normalise after adding their output to the residual stream."""
        return self.norm == "post" or any(config.get(key) is value for key, value in self.post_norm_when)


def family_of(config: object) -> Architecture:
    """The family of a parsed config.json: by its model_type, else by a class of its
    `architectures`; the inferred table when no family claims it (or there is no config)."""
    by_type, by_class = claims()
    if isinstance(config, dict):
        model_type, classes = config.get("model_type"), config.get("architectures")
        if isinstance(model_type, str) and model_type in by_type:
            return by_type[model_type]
        for cls in classes if isinstance(classes, list) else ():
            if isinstance(cls, str) and cls in by_class:
                return by_class[cls]
    return inferred()


def architecture_of(directory: Path) -> Architecture:
    """The family of the model in a directory, from its config.json (missing or unreadable: inferred)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    return family_of(config)


def paired_matrix(tensor: str, matrices: list[str]) -> str | None:
    """The 2-D matrix of the same module as a 1-D tensor (x.bias -> x.weight), if there is one."""
    module = tensor.rsplit(".", 1)[0]
    same = [m for m in matrices if m.rsplit(".", 1)[0] == module]
    return same[0] if len(same) == 1 else None


def quantization_of(name: str) -> str | None:
    """The quantization whose checkpoints have a tensor of this name (bitsandbytes, GPTQ/AWQ, fp8), or None."""
    any_part, last_part = quantization_markers()
    parts = name.split(".")
    return next((method for part, method in any_part.items() if part in parts), None) or last_part.get(parts[-1])


@functools.cache
def families() -> dict[str, Architecture]:
    """Every family of the table, by name."""
    found = {}
    for path in sorted(DATA.glob("*.yaml")):
        if not path.name.startswith("_"):
            found[path.stem] = architecture(path, family=True)
    return found


@functools.cache
def inferred() -> Architecture:
    """The fallback table: every family's patterns at once, for a model no family claims."""
    return architecture(DATA / "_inferred.yaml", family=False)


@functools.cache
def claims() -> tuple[dict[str, Architecture], dict[str, Architecture]]:
    """The family of each model type and of each class name; one that two families claim is refused."""
    by_type, by_class = {}, {}
    for family in families().values():
        for table, names in ((by_type, family.model_types), (by_class, family.classes)):
            for name in names:
                if name in table:
                    raise ValueError(f"{DATA}: '{name}' is claimed by {table[name].name} and {family.name}")
                table[name] = family
    return by_type, by_class


@functools.cache
def quantization_markers() -> tuple[dict[str, str], dict[str, str]]:
    """_quantization.yaml: the name parts anywhere and the last parts that mark a quantized checkpoint."""
    data = read_data(DATA / "_quantization.yaml")
    return data["any_part"], data["last_part"]


def read_data(path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def architecture(path: Path, family: bool) -> Architecture:
    """One data file, checked: every key present with the right type, every pattern compiling."""
    data = read_data(path)
    expected = (
        set(LISTS)
        | set(PATTERNS)
        | {"name", "norm", "post_norm_when", "shapes", "sizes"}
        | ({"model_types", "classes"} if family else set())
    )
    if set(data) != expected:
        raise ValueError(f"{path}: keys {sorted(set(data) ^ expected)} missing or unknown")
    name = path.stem if family else INFERRED
    for key in LISTS + (("model_types", "classes") if family else ()):
        if not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            raise ValueError(f"{path}: {key}: expected a list of strings")
    when = data["post_norm_when"]
    if (
        data["name"] != name
        or data["norm"] not in ("pre", "post")
        or not isinstance(when, dict)
        or not all(isinstance(v, bool) for v in when.values())
    ):
        raise ValueError(f"{path}: expected name: {name}, norm: pre or post, post_norm_when: {{key: true/false}}")
    try:
        patterns = {key: re.compile(data[key]) for key in PATTERNS}
        buffers = tuple(re.compile(p) for p in data["buffers"])
    except (re.error, TypeError) as exc:
        raise ValueError(f"{path}: a pattern does not compile ({exc})") from None
    stacks = "|".join(map(re.escape, data["blocks"])) or "(?!)"
    writers = "|".join(map(re.escape, data["residual_writers"])) or "(?!)"
    return Architecture(
        name=name,
        model_types=tuple(data.get("model_types", ())),
        classes=tuple(data.get("classes", ())),
        blocks=re.compile(rf"^(?P<stack>(?:.*?\.)?(?:{stacks}))\.(?P<depth>\d+)\."),
        layer_count_keys=tuple(data["layer_count"]),
        width_keys=tuple(data["width"]),
        context_keys=tuple(data["context"]),
        residual_writers=re.compile(rf"(?:^|\.)(?:{writers})(?:_bias)?(?:\.(?:weight|bias))?$"),
        norm=data["norm"],
        post_norm_when=tuple(when.items()),
        buffers=buffers,
        shapes=shapes_in(path, data["shapes"]),
        sizes=sizes_in(path, data["sizes"]),
        **patterns,
    )


def shapes_in(path: Path, data: object) -> tuple[tuple[str, tuple[Shape, ...]], ...]:
    """A data file's shapes: model type -> tensor pattern -> a list of dimensions, each checked."""
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: shapes: expected a mapping of model type -> {{tensor pattern: [dimensions]}}")
    found = []
    for kind, shapes in data.items():
        rules = []
        for pattern, dims in shapes.items():
            if not isinstance(dims, list) or not dims:
                raise ValueError(f"{path}: shapes: {kind}: '{pattern}': expected a list of dimensions")
            try:
                tensors = re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(f"{path}: shapes: {kind}: a pattern does not compile ({exc})") from None
            where = f"{path}: shapes: {kind}: '{pattern}'"
            rules.append(Shape(tensors, tuple(None if d is None else expression(where, d) for d in dims)))
        found.append((str(kind), tuple(rules)))
    return tuple(found)


def sizes_in(path: Path, data: object) -> tuple[tuple[str, ast.Expression], ...]:
    """A data file's sizes: config.json key -> the expression of its value when the config lacks it."""
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{path}: sizes: expected a mapping of config.json key -> expression")
    return tuple((key, expression(f"{path}: sizes: {key}", value)) for key, value in data.items())


def expression(where: str, text: object) -> ast.Expression:
    """An arithmetic expression of config.json keys (names, integers, + - * //), parsed."""
    if type(text) is int:
        text = str(text)
    try:
        tree = ast.parse(text, mode="eval") if isinstance(text, str) else None
    except SyntaxError:
        tree = None
    if tree is None or not all(
        isinstance(node, ARITHMETIC) or (isinstance(node, ast.Constant) and type(node.value) is int)
        for node in ast.walk(tree)
    ):
        raise ValueError(f"{where}: {text!r} is not an expression of config.json keys, integers and + - * //")
    return tree

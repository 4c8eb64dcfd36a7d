"""config.json's sizes against the tensors, as transformers compares them when it loads a model:
it builds the model from config.json, then refuses every tensor of the checkpoint whose shape is
not the shape of the model's (a vocab_size of 999 against an embedding of 1024 rows, an
intermediate_size the MLP weights do not have). `mastermerge verify` makes the same comparison
without building anything (check_sizes):

- the width of the input embeddings is the config's hidden size (the family's `width` keys), for
  every family and for a model no family claims;
- each tensor that a pattern of the family's `shapes` matches (architecture.py) has the shape
  its expression of config.json keys gives: vocab_size rows of the embedding and of an untied
  head, hidden_size, intermediate_size, the heads and head_dim of the attention projections,
  the positions of a learned position embedding, type_vocab_size. A key config.json leaves out
  (or sets to null) takes its value from the family's `sizes` (head_dim: hidden_size //
  num_attention_heads) or, without one, its dimension is not compared; so is every tensor no
  pattern matches, every tensor that is not floating point (a quantized tensor has the shape of
  its packing), and every tensor of a model no family claims: no alarm where the family does
  not say. A key a compared tensor needs that config.json sets to something other than an
  integer (a string, a float) is named.

Each mismatch is one line naming config.json, the key (or expression), its value, the tensor and
what it has; the tensors a mismatch shares (every layer's gate_proj) are named in one line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .architecture import Architecture, Shape, family_of
from .checkpoint import FLOAT_DTYPES, TensorInfo
from .consistency import Problem, names, read_config
from .layout import layout_of

AXES = {1: ("elements",), 2: ("rows", "columns")}  # what a dimension of a 1-D or 2-D tensor is called


def check_sizes(directory: Path, headers: dict[str, list[TensorInfo]], complete: bool = True) -> list[Problem]:
    """config.json's hidden size against the input embeddings' width, then its sizes against the
    shapes of the tensors its family describes (compared only when every shard's header could be
    read: `complete`; a config.json that cannot be read is check_config's problem)."""
    path = directory / "config.json"
    config, problem = read_config(path)
    if problem is not None or not complete:
        return []
    architecture = family_of(config)
    section, prefix = architecture.layer_section(config)
    infos = [info for shard in headers.values() for info in shard]
    problems, compared = width_problems(path, section, prefix, architecture, infos)
    shapes = architecture.shapes_of(config.get("model_type"))
    return problems + shape_problems(path, section, prefix, architecture, shapes, infos, compared)


def width_problems(
    path: Path, section: dict, prefix: str, architecture: Architecture, infos: list[TensorInfo]
) -> tuple[list[Problem], set[tuple[str, int]]]:
    """The input embeddings (outside the blocks) are as wide as the config's width key says, when
    they agree on one width. Returns the problems and the (tensor, dimension) pairs compared."""
    width_key = next((k for k in architecture.width_keys if k in section), None)
    layout = layout_of([info.name for info in infos], architecture)
    embeddings = [
        info
        for info in infos
        if layout.depths.get(info.name) is None and architecture.is_input_embedding(info.name) and info.is_matrix
    ]
    if width_key is None or len({info.shape[1] for info in embeddings}) != 1:
        return [], set()
    value, embedding = section[width_key], embeddings[0]
    compared = {(info.name, 1) for info in embeddings}
    if value == embedding.shape[1]:
        return [], compared
    return [
        Problem(
            path,
            f"{prefix}{width_key} is {value!r}, the embedding matrix '{embedding.name}' "
            f"is {list(embedding.shape)} (width {embedding.shape[1]})",
        )
    ], compared


def shape_problems(
    path: Path,
    section: dict,
    prefix: str,
    architecture: Architecture,
    shapes: list[Shape],
    infos: list[TensorInfo],
    compared: set[tuple[str, int]],
) -> list[Problem]:
    """Each floating-point tensor a shape matches has its dimensions (a quantized tensor's shape is
    its packing's); the tensors one mismatch shares in one line; a key they need that is set to
    something other than an integer is named."""
    sizes = dict(architecture.sizes)
    problems, wrong, keys = [], {}, {}  # wrong: (what the config says, the size found, the axis) -> tensors
    for info in infos:
        for shape in shapes:
            if info.dtype not in FLOAT_DTYPES or not shape.tensors.search(info.name):
                continue
            for tree in filter(None, shape.dims):
                for key in (node.id for node in ast.walk(tree) if isinstance(node, ast.Name)):
                    keys.setdefault(key, info)  # the first tensor that needs the key
            if len(info.shape) != len(shape.dims):
                problems.append(
                    Problem(
                        info.file,
                        f"tensor '{info.name}' is {list(info.shape)}, a {architecture.name} model's is "
                        f"[{', '.join('?' if d is None else ast.unparse(d) for d in shape.dims)}]",
                    )
                )
                continue
            for axis, (tree, found) in enumerate(zip(shape.dims, info.shape)):
                said = None if tree is None or (info.name, axis) in compared else saying(tree, section, sizes, prefix)
                if said is not None and said[0] != found:
                    wrong.setdefault((said[1], found, axis_name(len(info.shape), axis)), []).append(info)
    for (said, found, axis), tensors in wrong.items():
        tensors.sort(key=lambda info: info.name)  # the same line whatever order the shards hold them in
        if len(tensors) == 1:
            what = f"'{tensors[0].name}' has {found} {axis} ({list(tensors[0].shape)})"
        else:
            what = f"{len(tensors)} tensors have {found} {axis}: {names([t.name for t in tensors])}"
        problems.append(Problem(path, f"{said}, but {what}"))
    for key, info in keys.items():
        value = section.get(key)
        if value is not None and not is_size(value):
            problems.append(
                Problem(path, f"{prefix}{key} is {value!r}, expected an integer (a size of tensor '{info.name}')")
            )
    return problems


def saying(tree: ast.Expression, section: dict, sizes: dict, prefix: str) -> tuple[int, str] | None:
    """The size an expression gives and how the config gives it ('vocab_size is 999',
    'num_key_value_heads * head_dim = 4 * 8 = 32 (head_dim not set: hidden_size //
    num_attention_heads)'); None where a key it needs is not an integer of the config."""
    value = size_of(tree.body, section, sizes, ())
    if value is None:
        return None
    keys = [node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
    derived = [key for key in dict.fromkeys(keys) if not is_size(section.get(key))]
    text = ast.unparse(tree)
    if isinstance(tree.body, ast.Name):
        said = f"{prefix}{text} is {value}"
    else:
        values = {key: size_of(ast.Name(key), section, sizes, ()) for key in keys}
        filled = ast.unparse(Filled(values).visit(ast.parse(text, mode="eval")))
        said = f"{prefix}{text} = {filled} = {value}" if filled != str(value) else f"{prefix}{text} = {value}"
    if derived:
        said += " (" + "; ".join(f"{prefix}{key} not set: {ast.unparse(sizes[key])}" for key in derived) + ")"
    return value, said


def size_of(node: ast.AST, section: dict, sizes: dict, seen: tuple[str, ...]) -> int | None:
    """The value of an expression of config.json keys: a key's integer, else its `sizes`
    expression when the config leaves it out or sets null; None when neither gives one."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        value = section.get(node.id)
        if is_size(value):
            return value
        if value is None and node.id in sizes and node.id not in seen:
            return size_of(sizes[node.id].body, section, sizes, (*seen, node.id))
        return None
    left, right = (size_of(side, section, sizes, seen) for side in (node.left, node.right))
    if left is None or right is None or (isinstance(node.op, ast.FloorDiv) and right == 0):
        return None
    operations = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.FloorDiv: int.__floordiv__}
    return operations[type(node.op)](left, right)


class Filled(ast.NodeTransformer):
    """An expression with each key replaced by its value."""

    def __init__(self, values: dict[str, int | None]):
        self.values = values

    def visit_Name(self, node: ast.Name) -> ast.AST:
        value = self.values.get(node.id)
        return node if value is None else ast.Constant(value)


def is_size(value: object) -> bool:
    return type(value) is int


def axis_name(ndim: int, axis: int) -> str:
    """What a dimension is called in a line: rows, columns, elements, or its number."""
    return AXES[ndim][axis] if ndim in AXES else f"entries in dimension {axis}"

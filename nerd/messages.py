"""How config.py words a config that pydantic refuses: `validated(schema, value, reading)` validates
a value against a class of schema.py (or an annotated type of values.py) and turns pydantic's first
error, in the order of the schema's keys, into one ConfigError line: the key as the user wrote it
(selection.goal, models[1].revision, or a command's --flag), what was expected (the field's choices
or its description) and what was found, with the closest key or choice where one was misspelt.
"""

from __future__ import annotations

import difflib
from functools import cache
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .errors import ConfigError, type_name
from .schema import MergeConfig
from .sections import Schema, keys_of
from .values import Reading, flag

UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden", "unknown_key")  # and "invalid_key": not a string
NOT_A_CONTAINER = ("not_a_list", "list_type", "tuple_type", "dict_type", "dataclass_type", "dataclass_args_type")
SECTIONS = (
    "selection",
    "tether",
    "compute",
    "dlec",
    "evaluate",
)  # top-level keys whose keys a misspelt top-level key may be


@cache
def adapter(schema: Any) -> TypeAdapter:
    return TypeAdapter(schema)


def validated(schema: Any, value: Any, reading: Reading, key: str = "") -> Any:
    """`value` validated as `schema` (a class of schema.py, or an annotated type such as ShardSize);
    ConfigError with one line if it is not. `key` names the value itself ('dlec', or '--out')."""
    try:
        return adapter(schema).validate_python(value, context=reading)
    except ValidationError as exc:
        raise ConfigError(f"{reading.where}: {error_line(exc, schema, value, reading, key)}") from None


def first_error(errors: list[dict], schema: Any) -> dict:
    """The error to report: the first in the order of the schema's keys, where in each mapping an
    unknown key comes first, then a missing one, then the values."""

    def rank(error: dict) -> tuple:
        loc = tuple(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))
        if error["type"] in UNKNOWN_KEY or error["type"] in ("invalid_key", "missing"):
            return positions(schema, loc[:-1]) + (-1 if error["type"] == "missing" else -2,)
        return positions(schema, loc)

    return min(errors, key=rank)


def positions(schema: Any, loc: tuple) -> tuple[int, ...]:
    """Where `loc` is in the order of the schema: each key's place in its section, each list index."""
    order = []
    for end, part in enumerate(loc):
        if isinstance(part, int):
            order.append(part)
            continue
        section = schema_at(schema, loc[:end])
        keys = keys_of(section) if isinstance(section, type) and issubclass(section, Schema) else ()
        order.append(keys.index(part) if part in keys else len(keys))
    return tuple(order)


def error_line(exc: ValidationError, schema: Any, value: Any, reading: Reading, key: str) -> str:
    """The first error (its loc, type, input and ctx) as 'key: expected ..., found ...'."""
    error = first_error(exc.errors(include_url=False), schema)
    kind, ctx = error["type"], error.get("ctx") or {}
    loc = tuple(error["loc"]) + tuple(ctx.get("at", ()))
    name = lambda place: key_name(place, reading, key)  # noqa: E731
    if kind in UNKNOWN_KEY:
        allowed = keys_of(schema_at(schema, loc[:-1]))
        nested = (
            {f"{k}": f"{s}.{k}" for s in SECTIONS for k in keys_of(schema_at(schema, (s,)))}
            if schema is MergeConfig and len(loc) == 1
            else {}
        )
        close = difflib.get_close_matches(str(loc[-1]), list(allowed) + list(nested), n=1)
        hint = f"; did you mean '{nested.get(close[0], close[0])}'?" if close else f"; known keys: {', '.join(allowed)}"
        return f"{name(loc)}: unknown key{hint}"
    if kind == "invalid_key":  # the key itself is the input (the loc has it as a string)
        return (
            f"{name(loc[:-1]) + '.' if name(loc[:-1]) else ''}{error['input']!r}: keys must be strings, "
            f"found {type_name(error['input'])}"
        )
    if kind == "missing":
        return f"{name(loc[:-1]) + ': ' if name(loc[:-1]) else ''}missing required key '{loc[-1]}'"
    at = f"{name(loc)}: " if name(loc) else ""
    if kind == "config":
        return at + ctx["message"]
    if kind in ("dataclass_type", "dataclass_args_type"):
        return f"{at}expected {schema_at(schema, loc).shape}, found {type_name(error['input'])}"
    if kind == "literal_error":
        choices = get_args(core(field_type(schema, loc)))
        close = difflib.get_close_matches(str(error["input"]), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{at}expected one of {', '.join(choices)}, found {error['input']!r}{hint}"
    for end in range(len(loc), -1, -1):  # the value of the innermost key that says what it must be
        description = description_of(field_type(schema, loc[:end]))
        if description:
            found = value_at(value, loc[:end], error["input"])
            shown = type_name(found) if kind in NOT_A_CONTAINER else repr(found)
            return f"{name(loc[:end]) + ': ' if name(loc[:end]) else ''}expected {description}, found {shown}"
    return f"{at}{error['msg'][0].lower()}{error['msg'][1:]}, found {error['input']!r}"


def key_name(loc: tuple, reading: Reading, key: str) -> str:
    """A place in the config as the user wrote it: selection.goal, models[1].revision, or on the
    command line its option (--add-layers)."""
    if reading.cli:
        first = next((part for part in loc if isinstance(part, str)), None)
        return key if first is None else flag(first)
    text = key
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if isinstance(part, str) and part.isprintable() and part else repr(part)
            text += ("." if text else "") + shown
    return text


def value_at(value: Any, loc: tuple, default: Any) -> Any:
    """The value at `loc` in what was validated (`default` where it is not there as written)."""
    for part in loc:
        if (
            isinstance(value, dict)
            and part in value
            or isinstance(value, list)
            and isinstance(part, int)
            and part < len(value)
        ):
            value = value[part]
        else:
            return default
    return value


def core(annotation: Any) -> Any:
    """The type inside Annotated and Optional."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def field_type(schema: Any, loc: tuple) -> Any:
    """The annotation at `loc` in the schema (None where the schema has no such place)."""
    annotation = schema
    for part in loc:
        inner = core(annotation)
        if isinstance(part, int) and get_origin(inner) is tuple:
            annotation = get_args(inner)[0]
        elif isinstance(inner, type) and issubclass(inner, Schema) and isinstance(part, str):
            field = next((f for n, f in inner.__pydantic_fields__.items() if (f.alias or n) == part), None)
            if field is None:
                return None
            annotation = (
                Annotated[(field.annotation, *field.metadata, field)]
                if field.metadata or field.description
                else field.annotation
            )
        else:
            return None
    return annotation


def schema_at(schema: Any, loc: tuple) -> type:
    """The section (a class of schema.py) at `loc`."""
    return core(field_type(schema, loc))


def description_of(annotation: Any) -> str | None:
    """What a value must be, from the Field(description=...) of an annotation (inside Optional too)."""
    while annotation is not None:
        if get_origin(annotation) is Annotated:
            found = [m.description for m in get_args(annotation)[1:] if isinstance(m, FieldInfo) and m.description]
            if found:
                return found[-1]
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return None
    return None

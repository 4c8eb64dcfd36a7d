"""The building blocks of the config's schema (schema.py): the kinds of values a config holds (paths,
sizes, flags, token counts) with their validators, the markers its fields carry (internal,
DependsOn, NullIsDefault), the validation context (Reading), and the errors validators raise:
`rule`, a complete message about a key, or `bad_value`, a value that is not what its field's
description says (config.py words both as one line).
"""

import dataclasses
import math
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from pydantic_core import PydanticCustomError

CONFIG = ConfigDict(extra="forbid", validate_by_name=True)  # by name: code builds MergeConfig(base=...)
MODEL_REF = "a local directory or a hub id (org/name[@revision])"
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclasses.dataclass(frozen=True)
class Reading:
    """The validation context: what is being read (`where`: the file, or the command), whether it is a
    command line (keys are --flags), and the config's own selection and tether sections, which the
    strategies of `evaluate:` vary. Code that builds these objects directly passes none."""

    where: str = "config"
    cli: bool = False
    sections: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DependsOn:
    """Field metadata: the key this one is chosen together with; a strategy that sets that key does
    not inherit this one from the config (a new metric brings its own goal, a new mode its weights)."""

    key: str


class NullIsDefault:
    """Field metadata: the key written with nothing (null) takes its default (`selection:` alone)."""


def internal(default: Any = dataclasses.MISSING, *, compare: bool = True, **kwargs) -> Any:
    """A field that is not a key of the config file (set by validation or by config.py)."""
    return dataclasses.field(default=default, compare=compare, metadata={"internal": True}, **kwargs)


def rule(message: str, at: tuple = ()) -> PydanticCustomError:
    """A broken rule, its message complete ('only used with goal: target (goal is min)'); `at`: the key
    it is about, below the place of the section that raised it."""
    return PydanticCustomError("config", "{message}", {"message": message, "at": at})


def bad_value() -> PydanticCustomError:
    """A value that is not what the field's description says."""
    return PydanticCustomError("value", "not a valid value")


def printable(value: Any) -> bool:
    """A non-blank string that prints as one line."""
    return isinstance(value, str) and bool(value.strip()) and value.isprintable()


def finite_number(value: Any) -> bool:
    """A finite int or float, not true/false (an int too large for a float is not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def listed(value: Any) -> Any:
    """A YAML list (a tuple from code); a set or a mapping is not one."""
    if not isinstance(value, (list, tuple)):
        raise PydanticCustomError("not_a_list", "expected a list")
    return value


def path_text(value: Any) -> Any:
    """A path as a config writes it (a printable string), or a Path from code."""
    if not (isinstance(value, Path) or printable(value)):
        raise bad_value()
    return value


def printable_text(value: str) -> str:
    """A name or revision: printable, not blank."""
    if not printable(value):
        raise bad_value()
    return value


def model_ref(value: str) -> str:
    """A model reference, stripped; what it is (a directory or a hub id) is filesystem.py's to find out."""
    if not printable(value.strip()):
        raise bad_value()
    return value.strip()


def quoted_revision(value: Any) -> Any:
    """A revision YAML read as a number (1.0, 2) lost how it was written."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise rule(f"found the number {value!r}; quote it (revision: '{value}') so YAML keeps it as written")
    return value


def size_in_bytes(value: Any) -> int:
    """Parse 5000000, '500MB', '2GB' or '1.5GiB' into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = SIZE.match(value) if isinstance(value, str) else None
        size = float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()] if match else 0
        if size == math.inf:
            raise rule(f"{value!r} is too large for a size in bytes")
        size = int(size)
    if size <= 0:
        raise rule(f"expected a positive size such as 2GB or 500MB, found {value!r}")
    return size


DirectoryPath = Annotated[Path, BeforeValidator(path_text), Field(description="a directory path")]
TextPath = Annotated[Path, BeforeValidator(path_text), Field(description="the path of a text file")]
ShardSize = Annotated[int, BeforeValidator(size_in_bytes), Field(description="a positive size such as 2GB or 500MB")]
Flag = Annotated[StrictBool, Field(description="true or false")]
Tokens = Annotated[StrictInt, Field(ge=2, description="a whole number of tokens >= 2")]


def flag(name: str) -> str:
    """The command-line option of a key: --add-layers for add_layers (--text for evaluate's texts)."""
    return "--text" if name == "texts" else "--" + name.replace("_", "-")

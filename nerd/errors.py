"""The error types mastermerge raises on bad input, each with the exit code the CLI returns.

Every error message is one line a user can act on: which file, which key, which tensor,
what was expected and what was found.
"""


class MergeError(Exception):
    """Base class: an expected failure, reported as one line without a traceback."""

    exit_code = 1


class ConfigError(MergeError):
    """The YAML config or the command line is wrong (exit code 2)."""

    exit_code = 2


class ModelError(MergeError):
    """A candidate model cannot be resolved, read, or does not match the others (exit code 3)."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def type_name(value: object, *, plain: bool = False) -> str:
    """How a message names a value's type: in words for a config ('a mapping', 'a list', 'a string',
    'true/false'), or with `plain` as JSON and pickles do ('dict', 'list', 'str'; None is 'null')."""
    if plain:
        return "null" if value is None else type(value).__name__
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        type(None): "nothing (null)",
    }
    return names.get(type(value), type(value).__name__)


class OutputError(MergeError):
    """The output cannot be written (exit code 4)."""

    exit_code = 4


class IntegrityError(MergeError):
    """A written output does not match its merge_report.json, or is not a valid checkpoint
    (`mastermerge verify`; exit code 5)."""

    exit_code = 5


class ClusterError(MergeError):
    """The Ray cluster cannot be reached, is not installed, cannot run the work, or lost it past its
    retries (exit code 6)."""

    exit_code = 6

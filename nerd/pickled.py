"""Pickled .bin weights: a state dict loaded with torch's weights_only=True, so a pickle that
tries to run code is refused, memory-mapped where the file allows it (torch.save's zip format),
and every failure (a refused global, a damaged or truncated file, something other than a dict of
tensors) a ModelError of one line naming the file. The tensors' names, dtypes and shapes are
checked where every checkpoint's are (checkpoint.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path

from .errors import ModelError, first_line, type_name


def load_pickle(file: Path) -> dict:
    """A pickled state dict, loaded with weights_only=True (no code runs) and memory-mapped."""
    import torch

    try:
        state = torch_load(file)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{file}: refused to load pickled weights with weights_only=True: {unpickling_reason(exc)}"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... for files that are not checkpoints
        raise ModelError(
            f"{file}: not a readable PyTorch checkpoint, damaged or truncated? ({error_summary(exc)})"
        ) from None
    if not isinstance(state, dict):
        raise ModelError(
            f"{file}: expected a state dict of tensor name -> tensor, found {type_name(state, plain=True)}"
        )
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise ModelError(
                f"{file}: key {name!r}: expected a tensor name (a string), found {type_name(name, plain=True)}"
            )
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(f"{file}: entry '{name}': expected a tensor, found {type_name(tensor, plain=True)}")
    return state


def torch_load(file: Path) -> object:
    """torch.load with weights_only=True, memory-mapped where the file allows it (torch.save's zip format)."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise
    except Exception:  # a legacy pickle, a damaged zip, no mmap here: read it whole (and say why that fails)
        return torch.load(file, map_location="cpu", weights_only=True)


def error_summary(exc: Exception) -> str:
    """An exception as 'Type: first sentence of its message' (torch's messages go on with advice)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc).split('. ')[0]}" if text else type(exc).__name__


def unpickling_reason(exc: Exception) -> str:
    """What torch's weights_only unpickler refused (a global, an opcode), without its boilerplate."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return (reasons or [first_line(exc)])[0]

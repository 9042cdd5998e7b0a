"""Short ``repr`` for result objects that hold arrays (a trajectory's repr printed every weight)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

_SMALL = 6  # arrays up to this many numbers are shown in full


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= _SMALL:
            return np.array2string(value, precision=4, separator=", ")
        return f"array(shape={value.shape}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
        return f"[{len(value)} arrays]"
    if hasattr(value, "trainable_variables") and hasattr(value, "name"):  # a Keras model
        return f"<{type(value).__name__} {value.name!r}>"
    if type(value).__name__ == "Loss":  # influence.losses.Loss: its name says it all
        return repr(value.name)
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compact_repr(obj: Any) -> str:
    """``Name(field=value, …)`` over the dataclass fields shown in repr, arrays as shape and dtype."""
    shown = [f for f in dataclasses.fields(obj) if f.repr]
    return f"{type(obj).__name__}({', '.join(f'{f.name}={_short(getattr(obj, f.name))}' for f in shown)})"

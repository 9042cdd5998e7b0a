"""Argument checks with one message shape for every rejected input.

Every message reads like scikit-learn's:
"The 'batch_size' parameter of fit must be a positive int. Got -3 instead."
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Whole-array passes over the data (finiteness, fingerprints) read it in blocks of rows this large:
# a memory-mapped input larger than memory is then read once, page by page, and each pass's
# temporaries are one block's, not n·d values.
ROW_BLOCK_BYTES = 1 << 24


def param_error(param: str, func: str, expected: str, got: Any) -> str:
    """The one message shape used for every rejected argument."""
    return f"The '{param}' parameter of {func} must be {expected}. Got {got} instead."


def describe(value: Any) -> str:
    """Short description of a value for error messages (shape and dtype for arrays)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) < 60 else f"a {type(value).__name__}"


def as_array(
    value: Any,
    *,
    param: str,
    func: str,
    numeric: bool = True,
    allow_int: bool = True,
    min_ndim: int = 1,
) -> np.ndarray:
    """Convert to a numpy array, rejecting empty, non-numeric and non-finite data."""
    if value is None:
        raise TypeError(param_error(param, func, "an array", "None"))
    try:
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    except Exception as exc:  # pragma: no cover - defensive: exotic array likes
        raise TypeError(param_error(param, func, "an array", describe(value))) from exc
    if numeric and not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        # A dict or a tf.data.Dataset becomes a 0-d object array: name what was passed, not that.
        got = describe(array) if array.ndim else f"a {type(value).__name__}"
        hint = " (collect a tf.data.Dataset into arrays first)" if "Dataset" in type(value).__name__ else ""
        raise TypeError(param_error(param, func, "a numeric array", got + hint))
    if numeric and np.iscomplexobj(array):  # its imaginary part would be dropped without a word
        raise TypeError(param_error(param, func, "a real-valued array", describe(array)))
    if not allow_int and not np.issubdtype(array.dtype, np.floating):
        raise TypeError(param_error(param, func, "a floating-point array", describe(array)))
    if array.ndim < min_ndim:
        raise ValueError(param_error(param, func, f"an array with at least {min_ndim} dimension(s)", describe(array)))
    if array.size == 0:
        raise ValueError(param_error(param, func, "a non-empty array", describe(array)))
    if bad := non_finite_count(array):
        raise ValueError(param_error(param, func, "finite (no NaN or Inf)", f"{bad} non-finite value(s)"))
    return array


def row_blocks(array: np.ndarray, value_bytes: int | None = None) -> Iterator[np.ndarray]:
    """``array`` in blocks of whole rows (along axis 0), each at most :data:`ROW_BLOCK_BYTES`
    (counting ``value_bytes`` per value, default the array's own) and at least one row; a 0-d
    array is its own one block."""
    if array.ndim == 0:
        yield np.asarray(array)
        return
    row_values = max(1, int(np.prod(array.shape[1:])))
    step = max(1, ROW_BLOCK_BYTES // (row_values * (value_bytes or array.dtype.itemsize)))
    for start in range(0, len(array), step):
        yield np.asarray(array[start : start + step])


def non_finite_count(array: np.ndarray) -> int:
    """How many NaN/Inf values a floating-point array holds (0 for other dtypes), block by block."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return sum(int(block.size - np.count_nonzero(np.isfinite(block))) for block in row_blocks(array))


def index_group(indices: Any) -> np.ndarray | None:
    """One index or a list of indices as a non-empty 1-D int64 array; None for anything else.

    Ragged nesting (``[0, [1, 2]]``), nested lists, floats, bools and empty lists give None,
    so callers can refuse them with their own message.
    """
    try:
        group = np.atleast_1d(np.asarray(indices))
    except ValueError:  # ragged nesting
        return None
    valid = group.size > 0 and group.ndim == 1 and np.issubdtype(group.dtype, np.integer)
    return group.astype(np.int64) if valid else None


def check_sample_indices(
    indices: Any, n: int, *, func: str, distinct: str = "distinct sample indices", param: str = "indices"
) -> np.ndarray:
    """One index or a list of distinct indices into n samples, as a non-empty 1-D int64 array.

    ``distinct``: what the message says the indices must be when one repeats.
    """
    group = index_group(indices)
    if group is None or group.min() < 0 or group.max() >= n:
        raise ValueError(param_error(param, func, f"integer sample indices in [0, {n - 1}]", describe(indices)))
    check_distinct(group, param=param, func=func, expected=distinct, given=indices)
    return group


def check_distinct(indices: np.ndarray, *, param: str, func: str, expected: str, given: Any) -> None:
    """Refuse repeated sample indices: removing (or changing) a sample twice is doing it once,
    while a sum of per-sample predictions would count it twice."""
    if len(np.unique(indices)) != np.size(indices):
        raise ValueError(param_error(param, func, expected, describe(given)))


def check_same_length(func: str, **arrays: np.ndarray) -> None:
    """All arrays must have the same number of samples (first axis)."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        names = list(lengths)
        raise ValueError(
            param_error(
                names[1],
                func,
                f"as long as '{names[0]}' ({lengths[names[0]]} samples)",
                f"{lengths[names[1]]} samples" if len(names) == 2 else lengths,
            )
        )


def check_feature_shape(func: str, param: str, array: np.ndarray, expected: Sequence[int | None], what: str) -> None:
    """Per-sample shape must match ``expected`` (None = any size on that axis)."""
    got = tuple(array.shape[1:])
    ok = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not ok:
        shown = tuple("any" if e is None else e for e in expected)
        raise ValueError(param_error(param, func, f"samples of shape {shown} ({what})", f"samples of shape {got}"))


def is_real(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_positive(value: Any, *, param: str, func: str, kind: type = float) -> None:
    """A positive int or float."""
    valid_type = isinstance(value, (int, np.integer)) if kind is int else is_real(value)
    if isinstance(value, bool) or not valid_type or not value > 0 or not np.isfinite(value):
        name = "int" if kind is int else "number"
        raise ValueError(param_error(param, func, f"a positive {name}", describe(value)))


def check_non_negative(value: Any, *, param: str, func: str) -> None:
    """A finite real number ≥ 0 (not a bool)."""
    if not is_real(value) or not np.isfinite(value) or value < 0:
        raise ValueError(param_error(param, func, "a finite number ≥ 0", describe(value)))


def check_choice(value: Any, choices: Sequence[str], *, param: str, func: str) -> None:
    """One of a fixed set of strings."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(param_error(param, func, f"one of {options}", describe(value)))

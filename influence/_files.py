"""Reading the user's files for the ``influence`` command: npz/CSV data and Keras models.

Every problem becomes a :class:`UsageError` (exit code 2) with a one-line message
naming the flag, what was expected and what was given.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import param_error


class UsageError(ValueError):
    """A bad command line or input file (exit code 2)."""


def _usage(param: str, command: str, expected: str, got: Any) -> UsageError:
    return UsageError(param_error(param, f"influence {command}", expected, got))


def _existing(path: str, param: str, command: str, suffixes: Sequence[str]) -> Path:
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise _usage(param, command, f"a {' or '.join(suffixes)} file", repr(path))
    if not p.is_file():
        raise _usage(param, command, "an existing file", f"{path!r} (no such file)")
    return p


def read_table_file(
    path: str, param: str, command: str, label_column: str | None, *, label_of: str | None = None
) -> dict[str, Any]:
    """A CSV file as ``{"x": (n, d) float32, "y": (n,)}``: numeric columns, label last or ``label_column``.

    ``label_of``: the training file whose label column ``label_column`` is (a validation CSV), so
    that a missing column is blamed on this file, not on the --label-column flag.
    """
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError) as exc:
        raise _usage(param, command, "a readable CSV file with a header row", f"{path!r} ({exc})") from exc
    if frame.shape[1] < 2 or len(frame) == 0:
        raise _usage(param, command, "a CSV with a header, rows and at least 2 columns", f"shape {frame.shape}")
    label = label_column if label_column is not None else str(frame.columns[-1])
    columns = ", ".join(map(str, frame.columns))
    if label not in frame.columns and label_of is not None:
        raise _usage(param, command, f"a CSV with the label column of {label_of} ({label!r})", f"{path!r} ({columns})")
    if label not in frame.columns:
        raise _usage("label-column", command, f"a column of {path} ({columns})", repr(label))
    features = frame.drop(columns=[label])
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise _usage(param, command, "a CSV with numeric columns only", f"non-numeric column(s) {', '.join(bad)}")
    missing = ~np.isfinite(frame.to_numpy(np.float64))
    if missing.any():  # named by line and column here: the array checks later know neither
        lines = [str(i + 2) for i in np.flatnonzero(missing.any(axis=1))[:5]]  # line 1 is the header
        named = ", ".join(str(c) for c, bad_column in zip(frame.columns, missing.any(axis=0)) if bad_column)
        raise _usage(
            param,
            command,
            "a CSV without missing or infinite values (fill or drop them first)",
            f"{path!r} with {int(missing.sum())} in column(s) {named}, line(s) {', '.join(lines)}"
            + (" …" if missing.any(axis=1).sum() > 5 else ""),
        )
    return {
        "x": features.to_numpy(np.float32),
        "y": frame[label].to_numpy(),
        "columns": np.array(features.columns),
        "label": label,
    }


def _require_zip(path: Path, param: str, command: str, expected: str) -> None:
    """Refuse a file that is not a zip archive by saying so: numpy would read it as a pickle and blame
    pickling, Keras would call it "not found"."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":
            raise _usage(param, command, expected, f"{str(path)!r} (not a zip archive)")


def read_npz(path: Path, param: str, command: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (no pickles)."""
    _require_zip(path, param, command, "a .npz file (numpy.savez writes a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError) as exc:
        raise _usage(param, command, "a readable .npz file (numpy.savez)", f"{str(path)!r} ({exc})") from exc


def _clean(arrays: dict[str, np.ndarray], class_labels: bool) -> dict[str, np.ndarray]:
    """Integer inputs as float32; integral float labels as ints where the loss takes class indices.

    A CSV reads every column as float. Regression targets that happen to be integral (counts,
    scores) stay floats for the other losses, so dE/dy (``label_grad``) exists for them.
    """
    out = dict(arrays)
    for key in ("x_train", "x_val"):
        if key in out and np.issubdtype(out[key].dtype, np.integer):
            out[key] = out[key].astype(np.float32)
    for key in ("y_train", "y_val"):
        y = out.get(key)
        if y is None or not class_labels:
            continue
        if np.issubdtype(y.dtype, np.floating) and y.ndim == 1 and np.all(y == np.round(y)):
            out[key] = y.astype(np.int64)
    return out


def _in_order(table: dict[str, Any], columns: np.ndarray, command: str) -> np.ndarray:
    """The validation table's features in the training table's column order (matched by name).

    Matched by position, a validation CSV with its columns in another order was read as other
    features, silently (validation loss 0.2951 instead of 0.2128 in the report that found it).
    """
    wanted, have = [str(c) for c in columns], [str(c) for c in table["columns"]]
    if sorted(wanted) != sorted(have):
        missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
        differences = []
        if missing:
            differences.append(f"without {', '.join(missing)}")
        if extra:
            differences.append(f"with other column(s) {', '.join(extra)}")
        raise _usage("val", command, "a CSV with the training file's columns", "one " + " and ".join(differences))
    return table["x"][:, [have.index(c) for c in wanted]]


def load_data(args: argparse.Namespace, command: str, *, need_val: bool) -> dict[str, np.ndarray]:
    """``x_train``, ``y_train`` (and ``x_val``, ``y_val``, optional ``noisy``, ``columns``) from --data / --val.

    Integral float labels become ints for ``--loss sparse_categorical_crossentropy`` only.
    """
    data_path = _existing(args.data, "data", command, (".npz", ".csv"))
    tables = [p for p in (args.data, getattr(args, "val", None)) if p and Path(p).suffix.lower() == ".csv"]
    if args.label_column is not None and not tables:  # it was ignored without a word
        raise _usage(
            "label-column", command, "given only with CSV data (.npz files name their arrays)", repr(args.label_column)
        )
    train_label: str | None = None  # the training table's label column (CSV only)
    if data_path.suffix.lower() == ".csv":
        table = read_table_file(str(data_path), "data", command, args.label_column)
        arrays = {"x_train": table["x"], "y_train": table["y"], "columns": table["columns"]}
        train_label = table["label"]
        class_indices = getattr(args, "loss", None) == "sparse_categorical_crossentropy"
        if class_indices and args.label_column is None and not np.all(table["y"] == np.round(table["y"])):
            raise _usage(  # the default, the last column, is a feature: say which column was read
                "data",
                command,
                "a CSV whose last column holds the class labels (or --label-column NAME)",
                f"{args.data!r}, whose last column {train_label!r} holds non-integer values",
            )
    else:
        arrays = read_npz(data_path, "data", command)
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise _usage("data", command, "a file with arrays x_train and y_train", f"{args.data!r} without {key}")
    if getattr(args, "val", None):
        val_path = _existing(args.val, "val", command, (".npz", ".csv"))
        if val_path.suffix.lower() == ".csv":
            if train_label is not None:  # both tables: the training file's label column and feature order
                table = read_table_file(str(val_path), "val", command, train_label, label_of=args.data)
                arrays.update(x_val=_in_order(table, arrays["columns"], command), y_val=table["y"])
            else:
                table = read_table_file(str(val_path), "val", command, args.label_column)
                arrays.update(x_val=table["x"], y_val=table["y"])
        else:
            val = read_npz(val_path, "val", command)
            if "x_val" not in val or "y_val" not in val:
                raise _usage("val", command, "a file with arrays x_val and y_val", f"{args.val!r} with {sorted(val)}")
            arrays.update(x_val=val["x_val"], y_val=val["y_val"])
    if need_val and ("x_val" not in arrays or "y_val" not in arrays):
        raise _usage("val", command, "a file with x_val and y_val (or those arrays in --data)", "no validation data")
    return _clean(arrays, class_labels=getattr(args, "loss", None) == "sparse_categorical_crossentropy")


def load_model(path: str, command: str, *, safe_mode: bool = True) -> Any:
    """A Keras model from a ``.keras`` (or ``.h5``) file, uncompiled.

    ``safe_mode=False`` (``--no-safe-mode``) lets Keras run the Python code a file holds (``Lambda``
    layers): only for files one trusts.
    """
    model_path = _existing(path, "model", command, (".keras", ".h5"))
    if model_path.suffix.lower() == ".keras":
        _require_zip(model_path, "model", command, "a .keras file (Keras saves a zip archive)")
    import keras

    try:
        return keras.saving.load_model(model_path, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many types for unreadable files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _usage(
            "model", command, "a Keras model file that keras.saving.load_model reads", f"{path!r} ({reason})"
        ) from exc


def describe_model(model: Any) -> str:
    """One line: model name, layer types, parameter count and the weights' dtype.

    The dtype is the trainable weights' (``model.dtype`` is the Keras default policy's: float32 for
    a model built with ``dtype='float64'`` layers).
    """
    layers = [type(layer).__name__ for layer in model.layers]
    dtypes = sorted({str(getattr(v.dtype, "name", v.dtype)) for v in model.trainable_weights}) or [str(model.dtype)]
    return f"{model.name}: {' → '.join(layers)}; {model.count_params():,} parameters, {' and '.join(dtypes)}"


def _image_shape(text: str | None, command: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise _usage("image-shape", command, "HxW or HxWxC, e.g. 28x28 or 32x32x3", repr(text))
    return shape


# --- commands ----------------------------------------------------------------------------------------------

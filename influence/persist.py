"""Saving and loading recorded trajectories, so a run can be unrolled, ranked or
sharded in another process, or resumed after an interruption.

Layout of a saved trajectory (a folder):
    model.keras     the Keras model (its weights are the final weights)
    arrays.npz      initial/final weights, batches (flat + offsets), learning rates,
                    seeds, sample weights, optional weight/state history
    meta.json       loss, optimizer, training flag, input-gradient penalty and shapes
Files are written to a temporary folder and moved into place, so an
interrupted save never leaves a half-written trajectory behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._inputs import model_input_shape
from ._validation import describe, param_error
from .losses import BUILT_IN, get_loss
from .model_function import ModelFunction, seed_state_slots, warn_gradient_overrides
from .optimizers import SGD, Adam, Optimizer, RecordedRates, RMSprop
from .trajectory import Trajectory, require_recorded_variables

_OPTIMIZERS: dict[str, type[Optimizer]] = {"SGD": SGD, "RMSprop": RMSprop, "Adam": Adam}
# 2: random layers draw from influence._exact_ops' portable generator (format 1: TensorFlow's).
FORMAT_VERSION = 2


def save_trajectory(trajectory: Trajectory, path: str | os.PathLike, *, history: bool = True) -> None:
    """Write ``trajectory`` to the folder ``path`` (replaced atomically if it exists).

    ``history=False`` leaves out the per-step weights and optimizer states that ``fit`` kept
    under its ``record_budget_bytes`` (up to 256 MiB by default; T·|w| numbers): the loaded run
    recomputes them from the initial weights when the reverse pass needs them (same numbers).
    """
    func = "save_trajectory"
    if not isinstance(trajectory, Trajectory):
        raise TypeError(param_error("trajectory", func, "an influence.Trajectory", describe(trajectory)))
    if not isinstance(history, (bool, np.bool_)):
        raise TypeError(param_error("history", func, "True or False", describe(history)))
    if not history:
        trajectory = dataclasses.replace(trajectory, weights_history=None, state_history=None)
    require_recorded_variables(trajectory, func)  # before Trajectory.final_model, which would name itself
    if trajectory.loss.name not in BUILT_IN:
        raise ValueError(
            param_error(
                "trajectory",
                func,
                "a run with a built-in loss (custom callables cannot be saved)",
                f"loss {trajectory.loss.name!r}",
            )
        )
    target = _check_target(path, func)
    optimizer = trajectory.optimizer
    # numpy scalars (SGD(np.float32(0.1))) as Python numbers: json cannot write them.
    config = {f.name: _plain(getattr(optimizer, f.name)) for f in dataclasses.fields(optimizer)}
    scheduled = callable(config["learning_rate"])
    if scheduled:  # the record keeps every step's rate; load_trajectory replays them as RecordedRates
        config["learning_rate"] = float(trajectory.learning_rates[0])
    meta = {
        "format": FORMAT_VERSION,
        "loss": trajectory.loss.name,
        "from_logits": trajectory.loss.from_logits,
        "loss_options": dict(trajectory.loss.options),  # e.g. Huber's delta
        "optimizer": type(optimizer).__name__,
        "optimizer_config": config,
        "learning_rate_schedule": scheduled,
        "training": trajectory.training,
        "jit_compile": trajectory.jit_compile,
        "streamed": trajectory.streamed,
        "input_gradient_penalty": trajectory.input_gradient_penalty,
        "mask_shards": trajectory.mask_shards,  # a distributed run's dropout masks, one per replica slice
        "data_fingerprint": trajectory.data_fingerprint,
        "n_train": trajectory.n_train,
        "input_shape": list(trajectory.input_shape),
        "seconds": trajectory.seconds,
        "weights": len(trajectory.initial_weights),
        "history": trajectory.weights_history is not None,
        "state": len(trajectory.state_history or []),
    }
    arrays: dict[str, np.ndarray] = {
        "batches": np.concatenate(trajectory.batches),
        "offsets": np.cumsum([0] + [len(b) for b in trajectory.batches]),
        "learning_rates": trajectory.learning_rates,
        "seeds": trajectory.seeds,
        "sample_weight": trajectory.sample_weight,
    }
    for i, (w0, w1) in enumerate(zip(trajectory.initial_weights, trajectory.final_weights)):
        arrays[f"initial_{i}"], arrays[f"final_{i}"] = w0, w1
    for i, h in enumerate(trajectory.weights_history or []):
        arrays[f"history_{i}"] = h
    for i, h in enumerate(trajectory.state_history or []):
        arrays[f"state_{i}"] = h
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".trajectory-", dir=parent)
    try:
        _save_model_at_final_weights(trajectory, os.path.join(staging, "model.keras"))
        np.savez(os.path.join(staging, "arrays.npz"), **arrays)  # type: ignore[arg-type]
        with open(os.path.join(staging, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=2)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_target(path: Any, func: str) -> str:
    """The folder to write, as a string; refused before any work (an empty path failed on the staging folder)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(param_error("path", func, "a folder path (a str or os.PathLike)", describe(path)))
    target = os.fspath(path)
    if not isinstance(target, str) or not target:
        raise ValueError(param_error("path", func, "a folder to write (created or replaced)", repr(target)))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(
            param_error("path", func, "a folder to write (created or replaced)", f"{target!r}, an existing file")
        )
    if os.path.isdir(target) and os.listdir(target) and not os.path.exists(os.path.join(target, "meta.json")):
        # Saving replaces the folder: never delete one that holds something other than a saved run.
        raise ValueError(
            param_error(
                "path",
                func,
                "a new folder, or one written by save_trajectory (it is replaced)",
                f"{target!r}, a non-empty folder that is not a saved trajectory",
            )
        )
    return target


def _save_model_at_final_weights(trajectory: Trajectory, path: str) -> None:
    """Save the model with the run's final weights, then give it back the weights it had.

    A replayed or reweighted run shares its model object with the fit it came from, whose
    weights the object holds; the file must hold this run's.
    """
    before = [np.asarray(v) for v in trajectory.model.trainable_variables]
    try:
        trajectory.final_model().save(path)
    finally:
        for variable, value in zip(trajectory.model.trainable_variables, before):
            variable.assign(value)


def load_trajectory(
    path: str | os.PathLike, *, custom_objects: dict[str, Any] | None = None, safe_mode: bool = True
) -> Trajectory:
    """Read a trajectory written by :func:`save_trajectory`.

    ``custom_objects`` and ``safe_mode`` go to ``keras.saving.load_model``: a model with a
    ``Lambda`` layer loads only with ``safe_mode=False`` (it runs the saved code; load only
    folders you trust).
    """
    func = "load_trajectory"
    folder = os.fspath(path)
    needed = [os.path.join(folder, name) for name in ("model.keras", "arrays.npz", "meta.json")]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            param_error(
                "path",
                func,
                "a folder written by save_trajectory",
                f"{folder!r} without {os.path.basename(missing[0])}",
            )
        )
    meta = _read_meta(needed[2], folder)
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise ValueError(param_error("path", func, f"a trajectory of format {FORMAT_VERSION}", meta.get("format")))
    if meta["optimizer"] not in _OPTIMIZERS:
        raise _damaged(folder, f"meta.json names an unknown optimizer {meta['optimizer']!r}")
    if meta["loss"] not in BUILT_IN:
        raise _damaged(folder, f"meta.json names an unknown loss {meta['loss']!r}")
    if not zipfile.is_zipfile(needed[0]):  # Keras would call it "File not found"
        raise _damaged(folder, "model.keras is not a Keras archive (not a zip file)")
    try:
        model = keras.saving.load_model(needed[0], custom_objects=custom_objects, compile=False, safe_mode=safe_mode)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, json.JSONDecodeError) as error:
        # A damaged archive (bytes flipped: "Bad CRC-32"). Keras's own errors for a Lambda layer or a
        # missing custom class pass through: they say what to pass (safe_mode, custom_objects).
        raise _damaged(folder, f"model.keras cannot be read ({type(error).__name__}: {error})") from error
    if meta["format"] == 1 and meta["training"] and seed_state_slots(model):
        # Format 1 drew dropout/noise with TensorFlow's generator, whose numbers this version no longer uses.
        raise ValueError(
            param_error(
                "path",
                func,
                f"a trajectory of format {FORMAT_VERSION} (or format 1 without random layers)",
                "a format-1 run with dropout or noise layers, whose random numbers this version cannot replay; "
                "fit it again",
            )
        )
    arrays = _read_arrays(needed[1], folder, meta)
    _check_model_matches(model, arrays, meta, folder)
    _check_record(model, arrays, meta, folder)
    offsets = arrays["offsets"]
    batches = [arrays["batches"][offsets[t] : offsets[t + 1]] for t in range(len(offsets) - 1)]
    count = meta["weights"]
    rates = arrays["learning_rates"]
    optimizer = _read_optimizer(meta, rates, folder)
    if meta["history"]:
        _check_state_history(optimizer, arrays, meta, folder)
    _warn_gradient_overrides(model, tuple(meta["input_shape"]), training=meta["training"])
    return Trajectory(
        model=model,
        loss=get_loss(meta["loss"], from_logits=meta["from_logits"], **meta.get("loss_options", {})),
        optimizer=optimizer,
        initial_weights=[arrays[f"initial_{i}"] for i in range(count)],
        final_weights=[arrays[f"final_{i}"] for i in range(count)],
        batches=batches,
        learning_rates=rates,
        seeds=arrays["seeds"],
        training=meta["training"],
        sample_weight=arrays["sample_weight"].astype(np.float64),  # older saves kept int weights
        n_train=meta["n_train"],
        input_shape=tuple(meta["input_shape"]),
        weights_history=[arrays[f"history_{i}"] for i in range(count)] if meta["history"] else None,
        state_history=[arrays[f"state_{i}"] for i in range(meta["state"])] if meta["history"] else None,
        seconds=meta["seconds"],
        jit_compile=meta.get("jit_compile", True),
        streamed=bool(meta.get("streamed", False)),
        data_fingerprint=meta.get("data_fingerprint"),
        input_gradient_penalty=float(meta.get("input_gradient_penalty", 0.0)),
        mask_shards=meta.get("mask_shards", 1),
    )


def _damaged(folder: str, what: str) -> ValueError:
    return ValueError(
        param_error("path", "load_trajectory", "a folder written by save_trajectory", f"{folder!r}, whose {what}")
    )


def _read_meta(path: str, folder: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _damaged(folder, f"meta.json is not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise _damaged(folder, "meta.json is not a JSON object")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing and meta.get("format") in (1, FORMAT_VERSION):
        raise _damaged(folder, f"meta.json lacks {', '.join(repr(k) for k in missing)}")
    return meta


def _read_arrays(path: str, folder: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise _damaged(folder, f"arrays.npz cannot be read ({type(error).__name__}: {error})") from error
    count = meta["weights"]
    expected = ["batches", "offsets", "learning_rates", "seeds", "sample_weight"]
    expected += [f"{kind}_{i}" for kind in ("initial", "final") for i in range(count)]
    if meta["history"]:
        expected += [f"history_{i}" for i in range(count)] + [f"state_{i}" for i in range(meta["state"])]
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise _damaged(folder, f"arrays.npz lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
    return arrays


def _check_model_matches(model: keras.Model, arrays: dict[str, np.ndarray], meta: dict[str, Any], folder: str) -> None:
    """model.keras must be the recorded model: a folder mixed from two runs would fail deep in Keras.

    The run records the trainable weights only (BatchNorm statistics, frozen layers and
    adapted preprocessing layers are state of model.keras, not of the run).
    """
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    recorded = [tuple(arrays[f"initial_{i}"].shape) for i in range(meta["weights"])]
    if shapes != recorded:
        raise _damaged(
            folder,
            f"model.keras has trainable weights of shapes {shapes[:4]}{' …' if len(shapes) > 4 else ''} but arrays.npz "
            f"recorded {recorded[:4]}{' …' if len(recorded) > 4 else ''} (files from different runs)",
        )
    # Same shapes, another run's weights: a model file of another architecture (a Dropout more) fits too.
    differ = [v.path for i, v in enumerate(model.trainable_variables) if not np.array_equal(v, arrays[f"final_{i}"])]
    if differ:
        raise _damaged(
            folder,
            f"model.keras holds weights other than the run's final weights ({', '.join(differ[:3])}"
            f"{' …' if len(differ) > 3 else ''}; files from different runs)",
        )


def _check_record(model: keras.Model, arrays: dict[str, np.ndarray], meta: dict[str, Any], folder: str) -> None:
    """The recorded schedule must describe a run of ``n_train`` samples: batch indices past the data were
    clamped by gather (removal effects off by 2.3), too few rates or seeds read past the schedule."""
    n_train, input_shape = meta["n_train"], meta["input_shape"]
    if not _is_count(n_train) or n_train < 1:
        raise _damaged(folder, f"meta.json gives n_train {n_train!r} (not a positive int)")
    if not isinstance(input_shape, list) or not all(_is_count(d) for d in input_shape):
        raise _damaged(folder, f"meta.json gives input_shape {input_shape!r} (not a list of sizes)")
    declared = model_input_shape(model)
    if declared is not None and not (
        len(declared) == len(input_shape) and all(e is None or e == d for e, d in zip(declared, input_shape))
    ):
        shown = tuple("any" if e is None else e for e in declared)
        raise _damaged(folder, f"meta.json gives input_shape {tuple(input_shape)}, not model.keras's input {shown}")
    shards = meta.get("mask_shards", 1)
    if not _is_count(shards) or shards < 1:
        raise _damaged(folder, f"meta.json gives mask_shards {shards!r} (not a positive int)")
    batches, offsets = arrays["batches"], arrays["offsets"]
    if batches.ndim != 1 or not np.issubdtype(batches.dtype, np.integer):
        raise _damaged(folder, f"arrays.npz holds batches of shape {batches.shape} and dtype {batches.dtype}")
    if batches.size and (batches.min() < 0 or batches.max() >= n_train):
        raise _damaged(
            folder, f"arrays.npz's batches hold indices outside [0, {n_train - 1}] (n_train {n_train} in meta.json)"
        )
    valid_offsets = offsets.ndim == 1 and offsets.size >= 1 and np.issubdtype(offsets.dtype, np.integer)
    if not valid_offsets or offsets[0] != 0 or offsets[-1] != len(batches) or np.any(np.diff(offsets) < 0):
        raise _damaged(folder, f"arrays.npz's offsets do not split its {len(batches)} batch indices into steps")
    steps = len(offsets) - 1
    for name in ("learning_rates", "seeds"):
        if arrays[name].shape != (steps,):
            raise _damaged(folder, f"arrays.npz holds {name} of shape {arrays[name].shape} for {steps} steps")
    if arrays["sample_weight"].shape != (n_train,):
        raise _damaged(
            folder, f"arrays.npz holds sample_weight of shape {arrays['sample_weight'].shape} for {n_train} samples"
        )
    if meta["history"]:
        for i in range(meta["weights"]):
            expected = (steps, *arrays[f"initial_{i}"].shape)
            if arrays[f"history_{i}"].shape != expected:
                raise _damaged(
                    folder, f"arrays.npz holds history_{i} of shape {arrays[f'history_{i}'].shape}, not {expected}"
                )


def _read_optimizer(meta: dict[str, Any], rates: np.ndarray, folder: str) -> Optimizer:
    name, config = meta["optimizer"], meta["optimizer_config"]
    if not isinstance(config, dict):
        raise _damaged(folder, f"meta.json gives optimizer_config {config!r} (not a JSON object)")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(_OPTIMIZERS[name])})
    if unknown:
        raise _damaged(folder, f"meta.json gives {name} the unknown setting(s) {', '.join(map(repr, unknown))}")
    config = dict(config)
    # Older saves carry no flag: a schedule shows as rates that are not all the config's one rate.
    # The recorded rates replace the placeholder before the optimizer checks it (a schedule may start at 0).
    if meta.get("learning_rate_schedule", bool(np.any(rates != config.get("learning_rate")))):
        config["learning_rate"] = RecordedRates(tuple(float(r) for r in rates))
    try:
        return _OPTIMIZERS[name](**config)
    except (TypeError, ValueError) as error:
        raise _damaged(folder, f"meta.json's optimizer settings are refused ({error})") from error


def _check_state_history(
    optimizer: Optimizer, arrays: dict[str, np.ndarray], meta: dict[str, Any], folder: str
) -> None:
    """The recorded optimizer states must be the ones this optimizer keeps (an Adam run's moments,
    read as an SGD run's, disagreed with its state only deep in the reverse pass)."""
    steps = len(arrays["offsets"]) - 1
    initial = [tf.zeros(arrays[f"initial_{i}"].shape) for i in range(meta["weights"])]
    expected = [(steps, *s.shape) for s in optimizer.init(initial)]
    recorded = [arrays[f"state_{i}"].shape for i in range(meta["state"])]
    if recorded != expected:
        raise _damaged(
            folder,
            f"arrays.npz records {len(recorded)} optimizer state array(s) per step but meta.json's {meta['optimizer']} "
            f"keeps {len(expected)}{'' if len(recorded) != len(expected) else ' of other shapes'} "
            "(optimizer or files from another run)",
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_META_KEYS = (
    *("loss", "from_logits", "optimizer", "optimizer_config", "training", "n_train", "input_shape"),
    *("seconds", "weights", "history", "state"),
)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _warn_gradient_overrides(model: keras.Model, input_shape: tuple[int, ...], *, training: bool) -> None:
    """The warning fit gave when the run was recorded, for a run loaded in another process."""
    fn = ModelFunction(model, func="load_trajectory")
    try:
        dtype = tf.as_dtype(model.inputs[0].dtype)
    except (AttributeError, IndexError, ValueError):  # subclassed models declare no inputs
        dtype = fn.dtype
    warn_gradient_overrides(
        fn, tf.zeros((1, *input_shape), dtype), training=training, func="load_trajectory", stacklevel=4
    )

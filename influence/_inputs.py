"""Shared validation of (model, loss, data) arguments for the public functions."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._validation import as_array, check_feature_shape, check_same_length, param_error
from .losses import MARGIN_LOSSES, Loss, get_loss
from .model_function import ModelFunction

# Samples the output check evaluates, and how far outside [0, 1] rounding may take a probability.
_PROBE_SAMPLES = 32
_PROBABILITY_SLACK = 1e-6


@dataclass(frozen=True)
class Dataset:
    """Validated arrays: train and validation inputs/labels as numpy arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def model_input_shape(model: keras.Model) -> tuple[int | None, ...] | None:
    """Per-sample input shape the model declares, or None when unknown."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, list):  # multi-input models: not validated here
        return None
    return tuple(shape[1:])


def validate_data(
    func: str, model: keras.Model, loss: Loss, x_train: Any, y_train: Any, x_val: Any, y_val: Any
) -> Dataset:
    """Check types, finiteness, lengths, feature shapes and label ranges."""
    xt = as_model_inputs(model, as_array(x_train, param="x_train", func=func))
    yt = as_array(y_train, param="y_train", func=func)
    check_same_length(func, x_train=xt, y_train=yt)
    check_model_input(func, model, xt)
    check_labels_for_loss(func, "y_train", yt, loss, model)
    xv, yv = validate_validation_data(func, model, loss, xt, yt, x_val, y_val)
    return Dataset(xt, yt, xv, yv)


def validate_validation_data(
    func: str,
    model: keras.Model,
    loss: Loss,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: Any,
    y_val: Any,
    names: tuple[str, str] = ("x_val", "y_val"),
) -> tuple[np.ndarray, np.ndarray]:
    """x_val / y_val as arrays: same length, samples shaped like the (validated) training data, valid labels.

    ``names`` are what errors call the two arrays (another evaluation set, e.g. a held-out one).
    """
    return check_validation_arrays(
        func,
        model,
        loss,
        x_val,
        y_val,
        sample_shape=(tuple(x_train.shape[1:]), "the shape of x_train's samples"),
        label_shape=(tuple(y_train.shape[1:]), "the shape of y_train's samples"),
        names=names,
    )


def check_validation_arrays(
    func: str,
    model: keras.Model,
    loss: Loss,
    x_val: Any,
    y_val: Any,
    *,
    sample_shape: tuple[tuple[int, ...], str],
    label_shape: tuple[tuple[int, ...], str] | None = None,
    names: tuple[str, str] = ("x_val", "y_val"),
) -> tuple[np.ndarray, np.ndarray]:
    """x_val / y_val as arrays, checked against (shape, what it is) for samples and, if given, labels.

    :func:`validate_validation_data` compares with the training arrays; callers that hold
    only a recorded run (no labels) compare samples with its input shape.
    """
    x_name, y_name = names
    xv = as_model_inputs(model, as_array(x_val, param=x_name, func=func))
    yv = as_array(y_val, param=y_name, func=func)
    check_same_length(func, **{x_name: xv, y_name: yv})
    check_feature_shape(func, x_name, xv, *sample_shape)
    if label_shape is not None:
        check_feature_shape(func, y_name, yv, *label_shape)
    check_labels_for_loss(func, y_name, yv, loss, model)
    return xv, yv


def as_model_inputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Integer data for a model whose ``keras.Input`` is floating point, in that dtype (pixels stored as ints).

    So every function sees the same floating-point inputs and ``unrolled`` can give dE/dx for them.
    Integer inputs of an integer Input (token ids into an Embedding) and host-streamed arrays stay as they are.
    """
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_) or isinstance(x, np.memmap):
        return x
    declared = declared_input_dtypes(model)
    if len(declared) != 1:
        return x
    return x.astype(declared[0]) if np.issubdtype(declared[0], np.floating) else x


def declared_input_dtypes(model: keras.Model) -> list[np.dtype]:
    """The dtypes of the model's ``keras.Input``s (none for subclassed models, which declare no inputs)."""
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        return []
    return [np.dtype(keras.backend.standardize_dtype(t.dtype)) for t in inputs]


def check_model_input(func: str, model: keras.Model, x: np.ndarray, param: str = "x_train") -> None:
    """Samples of x must have the model's declared input shape."""
    expected = model_input_shape(model)
    if expected is not None:
        check_feature_shape(func, param, x, expected, "the model's input shape")


def check_labels_for_loss(func: str, name: str, labels: np.ndarray, loss: Loss, model: keras.Model) -> None:
    """Integer losses need class labels within the model's outputs; built-in target losses
    (MSE, categorical/binary cross-entropy) need one target per model output."""
    if loss.integer_labels:
        _check_class_labels(func, name, labels, model)
        return
    from .losses import BUILT_IN

    if loss.name not in BUILT_IN:
        return  # a custom per-sample callable decides what its labels look like
    try:
        outputs = tuple(model.output_shape[1:])
    except (AttributeError, TypeError, ValueError):
        return
    got = tuple(labels.shape[1:])
    if outputs == ():  # Reshape(()) after Dense(1): the built-in losses reduce over the last axis, the batch's
        raise ValueError(
            param_error(
                "model",
                func,
                f"a model whose outputs have a feature axis, (B, k), for loss {loss.name!r}",
                "a model with one number per sample, output shape (B,); end it with Dense(1) (no Reshape(()))",
            )
        )
    squeezed = (1,) if got == () else got  # (n,) targets for a single output
    if None not in outputs and squeezed != outputs:
        hint = " (class indices need loss='sparse_categorical_crossentropy')" if got == () and outputs[-1] > 1 else ""
        raise ValueError(
            param_error(
                name,
                func,
                f"targets of shape {outputs} per sample for loss {loss.name!r}{hint}",
                f"targets of shape {got}",
            )
        )


def _check_class_labels(func: str, name: str, labels: np.ndarray, model: keras.Model) -> None:
    if labels.ndim > 1 and labels.shape[1:] != (1,):
        raise ValueError(
            param_error(
                name,
                func,
                "class indices, one per sample, for a sparse (integer-label) loss",
                f"labels of shape {labels.shape[1:]} per sample; one-hot or soft targets need "
                "loss='categorical_crossentropy' (or take labels.argmax(axis=1))",
            )
        )
    if not (np.issubdtype(labels.dtype, np.integer) or np.all(labels == np.round(labels))):
        raise TypeError(param_error(name, func, "integer class labels for this loss", "non-integer values"))
    try:
        classes = int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(
            param_error(
                name,
                func,
                f"class labels in [0, {classes - 1}] (the model has {classes} outputs)",
                f"labels in [{low}, {high}]",
            )
        )


def prepare(func: str, model: Any, loss: Any, from_logits: bool = False) -> tuple[ModelFunction, Loss]:
    """Wrap the model and resolve the loss, with the public function's name in errors."""
    fn = ModelFunction(model, func=func)
    per_sample = get_loss(loss, func=func, from_logits=from_logits)
    _warn_logits_after_probabilities(model, per_sample, func)
    return fn, per_sample


def check_samples(func: str, fn: ModelFunction, loss: Loss, x: np.ndarray, y: np.ndarray) -> None:
    """Samples ``x`` and labels ``y`` (parameters named so) as :func:`influence.fit` checks its data: equal
    lengths, the model's input shape, labels the loss and model accept, probabilities where the loss wants them."""
    check_same_length(func, x=x, y=y)
    check_model_input(func, fn.model, x, param="x")
    check_labels_for_loss(func, "y", y, loss, fn.model)
    check_probability_outputs(func, fn, loss, x)


def check_probability_outputs(func: str, fn: ModelFunction, loss: Loss, x: np.ndarray) -> None:
    """A cross-entropy on probabilities (``from_logits=False``) needs a model whose outputs are probabilities.

    A linear output layer with the default ``from_logits=False`` makes the loss the log of a
    ratio of logits (it can turn negative) and every score built on it meaningless, silently.
    The outputs on the first samples of ``x`` settle it: any outside [0, 1] are not probabilities.
    """
    if loss.from_logits or loss.name not in MARGIN_LOSSES or len(x) == 0:
        return
    probe = x[:_PROBE_SAMPLES]
    inputs = tf.constant(probe, dtype=fn.dtype if np.issubdtype(probe.dtype, np.floating) else None)
    outputs = np.asarray(fn(fn.weights, inputs))
    low, high = float(outputs.min()), float(outputs.max())
    if low < -_PROBABILITY_SLACK or high > 1 + _PROBABILITY_SLACK or not np.isfinite([low, high]).all():
        raise ValueError(
            param_error(
                "loss",
                func,
                "a loss with from_logits=True for a model whose outputs are not probabilities "
                "(pass from_logits=True or --from-logits, or end the model with softmax/sigmoid)",
                f"{loss.name} on probabilities, but the model's outputs on the first {len(probe)} samples "
                f"lie in [{low:.4g}, {high:.4g}]",
            )
        )


def _warn_logits_after_probabilities(model: keras.Model, loss: Loss, func: str) -> None:
    """from_logits=True on a softmax/sigmoid output trains on probabilities as if they were logits (Keras warns too)."""
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if loss.from_logits and activation in ("softmax", "sigmoid"):
        warnings.warn(
            f"{func}: the loss has from_logits=True but the model's output layer applies {activation}; "
            "the loss then treats probabilities as logits. Use from_logits=False or a linear output layer.",
            UserWarning,
            stacklevel=3,
        )

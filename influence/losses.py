"""Per-sample losses that keep the dtype of their inputs.

Keras 3 loss objects return ``floatx`` (float32) even on float64 inputs
unless built with ``dtype="float64"``; a float64 finite-difference check that
goes through them silently quantizes to float32 (DESIGN §4). Every loss here
is written with TensorFlow ops on the prediction's dtype, so float64 stays
float64 end to end. Keras loss objects and names are translated to these.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ._tensors import exact_tensor
from ._validation import describe, param_error

# Same floor Keras uses when taking the log of probabilities.
_PROBABILITY_FLOOR = 1e-7

PerSampleLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _per_sample_mean(per_output: tf.Tensor) -> tf.Tensor:
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return tf.reduce_mean(tf.reshape(per_output, [tf.shape(per_output)[0], -1]), axis=1)


def _as_predictions(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Targets in the predictions' shape and dtype: (B,) targets for (B, 1) predictions are reshaped.

    Any other layout is refused where the shapes are known: a reshape by element count alone
    scrambled (3, 4) targets into (4, 3) predictions without a word.
    """
    y_true, y_pred = tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred)  # numpy labels too
    got, want = y_true.shape, y_pred.shape
    if got.rank is not None and want.rank is not None:
        a, b = _without_trailing_one(got.as_list()), _without_trailing_one(want.as_list())
        if len(a) != len(b) or any(m is not None and n is not None and m != n for m, n in zip(a, b)):
            raise ValueError(
                f"influence.losses: targets of shape {tuple(got.as_list())} do not match predictions of shape "
                f"{tuple(want.as_list())} (one target per output; a trailing axis of 1 may be left out)."
            )
    return tf.cast(tf.reshape(y_true, tf.shape(y_pred)), y_pred.dtype)


def _without_trailing_one(dims: list[int | None]) -> list[int | None]:
    """The shape without a last axis of 1, unless that axis is the batch's: (1,) targets of one
    sample match (1, 1) predictions as (B,) targets match (B, 1)."""
    return dims[:-1] if len(dims) > 1 and dims[-1] == 1 else dims


def _residual(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return y_pred - _as_predictions(y_true, y_pred)


def _mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    diff = _residual(y_true, y_pred)
    return _per_sample_mean(diff * diff)


def _mae(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    # Not differentiable where a residual is exactly 0 (TensorFlow takes sign(0) = 0 there);
    # its second derivative is 0 elsewhere, so H·v comes from the model alone.
    return _per_sample_mean(tf.abs(_residual(y_true, y_pred)))


def _log_cosh(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    # log cosh d = d + softplus(−2d) − log 2: no overflow of cosh for large |d| (Keras's form).
    diff = _residual(y_true, y_pred)
    return _per_sample_mean(diff + tf.nn.softplus(-2.0 * diff) - tf.constant(math.log(2.0), diff.dtype))


@functools.cache  # one function per delta: equal Loss objects share compiled programs
def _huber(delta: float) -> PerSampleLoss:
    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        # ½d² inside |d| ≤ δ, δ(|d| − ½δ) outside: once differentiable at |d| = δ, where the
        # second derivative jumps from 1 to 0 (finite differences straddling it disagree).
        size = tf.abs(_residual(y_true, y_pred))
        d = tf.constant(delta, size.dtype)  # tf.cast of a Python float would round it to float32
        return _per_sample_mean(tf.where(size <= d, 0.5 * size * size, d * size - 0.5 * d * d))

    return loss


@functools.cache  # one function per setting: equal Loss objects share compiled programs
def _sparse_ce(from_logits: bool) -> PerSampleLoss:
    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        # one_hot * sum instead of tf.gather: same value, much faster to trace
        # inside second derivatives (DESIGN §5).
        one_hot = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        if from_logits:
            return tf.reduce_logsumexp(y_pred, axis=-1) - tf.reduce_sum(y_pred * one_hot, axis=-1)
        p = tf.reduce_sum(y_pred * one_hot, axis=-1) / tf.reduce_sum(y_pred, axis=-1)
        return -tf.math.log(tf.maximum(p, exact_tensor(_PROBABILITY_FLOOR, y_pred.dtype)))

    return loss


@functools.cache  # one function per setting: equal Loss objects share compiled programs
def _categorical_ce(from_logits: bool) -> PerSampleLoss:
    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        target = tf.cast(y_true, y_pred.dtype)
        if from_logits:
            log_p = tf.nn.log_softmax(y_pred, axis=-1)
        else:
            p = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
            log_p = tf.math.log(tf.maximum(p, exact_tensor(_PROBABILITY_FLOOR, y_pred.dtype)))
        return -tf.reduce_sum(target * log_p, axis=-1)

    return loss


@functools.cache  # one function per setting: equal Loss objects share compiled programs
def _binary_ce(from_logits: bool) -> PerSampleLoss:
    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        target = _as_predictions(y_true, y_pred)
        if from_logits:
            per_output = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=y_pred)
        else:
            floor = exact_tensor(_PROBABILITY_FLOOR, y_pred.dtype)
            p = tf.clip_by_value(y_pred, floor, 1 - floor)
            per_output = -(target * tf.math.log(p) + (1 - target) * tf.math.log(1 - p))
        return _per_sample_mean(per_output)

    return loss


@dataclass(frozen=True)
class Loss:
    """A per-sample loss ``ℓ(y_true, y_pred) -> (B,)`` in the prediction's dtype.

    Attributes:
        name: canonical name, e.g. ``"sparse_categorical_crossentropy"``.
        per_sample: the function; returns one loss per sample, shape (B,).
        continuous_labels: True when ``y`` is real-valued (MSE targets, soft
            labels), so dE/dy exists (``label_grad``); False for integer labels.
        integer_labels: True when ``y`` holds class indices.
        from_logits: whether the model's outputs are logits (built-in losses).
        options: the loss's other settings as (name, value) pairs, e.g.
            ``(("delta", 0.3),)`` for Huber: what :func:`get_loss` needs to rebuild it.
    """

    name: str
    per_sample: PerSampleLoss
    continuous_labels: bool
    integer_labels: bool = False
    from_logits: bool = False
    options: tuple[tuple[str, float], ...] = ()

    def __call__(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return self.per_sample(y_true, y_pred)

    def has_label_grad(self, y: np.ndarray) -> bool:
        """Whether dE/dy exists for labels ``y``.

        A built-in loss of continuous labels reads them as numbers whatever their dtype (one-hot
        labels stored as ints, integer regression targets). A callable may read integer labels
        as class indices, so it gets label gradients for floating-point labels only.
        """
        return self.continuous_labels and (self.name in BUILT_IN or bool(np.issubdtype(y.dtype, np.floating)))

    def mean(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Mean loss over the batch (scalar)."""
        return tf.reduce_mean(self.per_sample(y_true, y_pred))


BUILT_IN = (
    "mse",
    "mean_squared_error",
    "mae",
    "mean_absolute_error",
    "huber",
    "log_cosh",
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
)


def _by_name(name: str, from_logits: bool, delta: float = 1.0) -> Loss:
    if name in ("mse", "mean_squared_error"):
        return Loss("mse", _mse, continuous_labels=True)
    if name in ("mae", "mean_absolute_error"):
        return Loss("mae", _mae, continuous_labels=True)
    if name == "huber":
        return Loss("huber", _huber(float(delta)), continuous_labels=True, options=(("delta", float(delta)),))
    if name == "log_cosh":
        return Loss(name, _log_cosh, continuous_labels=True)
    if name == "sparse_categorical_crossentropy":
        return Loss(
            name, _sparse_ce(from_logits), continuous_labels=False, integer_labels=True, from_logits=from_logits
        )
    if name == "categorical_crossentropy":
        return Loss(name, _categorical_ce(from_logits), continuous_labels=True, from_logits=from_logits)
    if name == "binary_crossentropy":
        return Loss(name, _binary_ce(from_logits), continuous_labels=True, from_logits=from_logits)
    raise AssertionError(name)  # guarded by get_loss


_KERAS_CLASSES = {
    "MeanSquaredError": "mse",
    "MeanAbsoluteError": "mae",
    "Huber": "huber",
    "LogCosh": "log_cosh",
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "CategoricalCrossentropy": "categorical_crossentropy",
    "BinaryCrossentropy": "binary_crossentropy",
}


# Settings of Keras loss objects that the translated losses do not implement: refused, not dropped.
_UNSUPPORTED_KERAS_OPTIONS = {
    "label_smoothing": (0, 0.0, None),
    "ignore_class": (None,),
    "axis": (-1, None),
    "reduction": ("sum_over_batch_size", "mean", None),  # 'sum' would scale the learning rate by the batch size
}


def get_loss(loss: object, *, func: str = "get_loss", from_logits: bool = False, delta: float = 1.0) -> Loss:
    """Translate a loss given by the user into a dtype-preserving :class:`Loss`.

    Accepts a :class:`Loss`, a name (``"mse"``, ``"mae"``, ``"huber"`` (δ = 1),
    ``"log_cosh"``, ``"sparse_categorical_crossentropy"``, ``"categorical_crossentropy"``,
    ``"binary_crossentropy"``), a Keras 3 loss object of those classes (its
    ``from_logits`` and Huber's ``delta`` are honoured; ``label_smoothing``, ``ignore_class``,
    another ``axis`` or ``reduction="sum"`` are refused), a Keras loss function
    (``keras.losses.categorical_crossentropy``, …: taken as its name), or a callable
    ``(y_true, y_pred) -> per-sample losses (B,)``, refused when traced unless it returns
    shape (B,) in the predictions' dtype. As in Keras, a callable's labels and predictions are
    brought to the same rank first when they differ by a trailing axis of 1 (labels (B,) against a
    ``Dense(1)``'s (B, 1) predictions), so ``y_true - y_pred`` does not broadcast to (B, B).
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in BUILT_IN:
            raise ValueError(param_error("loss", func, "one of " + ", ".join(repr(n) for n in BUILT_IN), repr(loss)))
        return _by_name(loss, from_logits, delta=delta)
    if isinstance(loss, keras.losses.Loss):
        cls = type(loss).__name__
        if cls not in _KERAS_CLASSES:
            # Another Keras loss, or the user's subclass: its call(y_true, y_pred) gives the per-sample
            # losses before Keras reduces them, so it is a per-sample callable (checked when traced).
            return Loss(cls, _checked(loss.call), continuous_labels=True)
        # Keras 3 keeps a LossFunctionWrapper's options (Huber's delta) in _fn_kwargs, not in its config.
        options = {**getattr(loss, "_fn_kwargs", {}), **loss.get_config()}
        for option, supported in _UNSUPPORTED_KERAS_OPTIONS.items():
            if option in options and options[option] not in supported:
                raise ValueError(
                    param_error(
                        "loss",
                        func,
                        f"a Keras loss without {option} (influence's losses do not implement it)",
                        f"keras.losses.{cls}({option}={options[option]!r})",
                    )
                )
        logits = bool(getattr(loss, "from_logits", False) or options.get("from_logits"))
        if from_logits and not logits and "from_logits" in options:  # the object's own setting would win silently
            raise ValueError(
                param_error(
                    "from_logits",
                    func,
                    "the loss object's own setting (pass from_logits=True to the Keras loss itself)",
                    f"True with keras.losses.{cls}(from_logits=False)",
                )
            )
        return _by_name(_KERAS_CLASSES[cls], logits, delta=options.get("delta", 1.0))
    keras_function = _keras_function_name(loss)
    if keras_function is not None:  # keras.losses.categorical_crossentropy & co.: their names, exactly
        return _by_name(keras_function, from_logits, delta=delta)
    if callable(loss):
        name = getattr(loss, "__name__", "custom")
        # Never a built-in's name: a saved run would come back with the built-in loss, and label
        # checks would apply the built-in's rules to a function that decides its own labels.
        return Loss(f"{name} (callable)" if name in BUILT_IN else name, _checked(loss), continuous_labels=True)
    raise TypeError(param_error("loss", func, "a loss name, Keras loss or callable", describe(loss)))


def _keras_function_name(loss: object) -> str | None:
    """The built-in name of a Keras 3 loss *function* (``keras.losses.mean_squared_error``, …), else None.

    Translating them is more than tidiness: Keras's categorical cross-entropy runs TensorFlow's
    fused op, whose second derivative with respect to the labels is missing, so label gradients
    through the function itself come out as zeros.
    """
    for name in BUILT_IN:
        function = getattr(keras.losses, name, None)
        if function is not None and loss is function:
            return name
    return None


# TensorFlow registers no second derivative of these ops with respect to their labels: the
# gradient of ∂ℓ/∂logits with respect to soft labels comes out as 0 instead of −1.
_FUSED_CROSS_ENTROPY = ("SoftmaxCrossEntropyWithLogits",)


def _warn_fused_cross_entropy(per_sample: Callable[..., object], ops: list[tf.Operation]) -> bool:
    """Warn when ``ops`` (what the callable traced) hold a fused cross-entropy; whether it did."""
    found = [op.type for op in ops if op.type in _FUSED_CROSS_ENTROPY]
    if found:
        warnings.warn(
            f"the loss {getattr(per_sample, '__name__', per_sample)!r} uses TensorFlow's fused "
            f"{found[0]!r}, whose second derivative with respect to the labels is missing: label "
            "gradients (label_grad, soft-label optimisation) through it are zeros. Inputs and sample "
            "weights are unaffected. Write it as -tf.reduce_sum(y * tf.nn.log_softmax(logits), -1), "
            "or pass loss='categorical_crossentropy'.",
            UserWarning,
            stacklevel=2,
        )
    return bool(found)


def _same_rank(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Labels and predictions whose ranks differ by a trailing axis of 1, brought level as Keras does.

    Keras wraps every loss function it compiles this way; without it the loss from Keras's own docs,
    ``mean(square(y_true - y_pred), axis=-1)``, broadcasts labels (B,) against predictions (B, 1)
    to (B, B) and still returns B values, so a wrong run would pass every shape check.
    """
    true_rank, pred_rank = y_true.shape.rank, y_pred.shape.rank
    if true_rank is None or pred_rank is None:
        return y_true, y_pred
    if true_rank == pred_rank - 1 and y_pred.shape[-1] == 1:
        return (tf.expand_dims(y_true, -1), y_pred) if true_rank == 1 else (y_true, tf.squeeze(y_pred, -1))
    if pred_rank == true_rank - 1 and y_true.shape[-1] == 1:
        return (y_true, tf.expand_dims(y_pred, -1)) if pred_rank == 1 else (tf.squeeze(y_true, -1), y_pred)
    return y_true, y_pred


@functools.cache  # one wrapper per callable: equal Loss objects share compiled programs
def _checked(per_sample: Callable[..., object]) -> PerSampleLoss:
    """A user's per-sample loss, refused (when traced) unless it returns (B,) values in the prediction's dtype.

    Labels and predictions reach it at the same rank (:func:`_same_rank`).

    A Keras loss object called inside returns float32 on float64 predictions: a float64 check through
    it would be quantized (DESIGN §4), and the training step would fail on mixed dtypes.
    """

    warned = False  # once per callable (this wrapper is cached per callable)

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        nonlocal warned
        graph = None if warned or tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        before = len(graph.get_operations()) if graph is not None else 0
        values = tf.convert_to_tensor(per_sample(*_same_rank(y_true, y_pred)))
        if graph is not None:  # traced: the ops the callable just added are the loss's own
            warned = _warn_fused_cross_entropy(per_sample, graph.get_operations()[before:])
        if values.dtype != y_pred.dtype:
            raise TypeError(
                param_error(
                    "loss",
                    "get_loss",
                    f"a per-sample loss returning the predictions' dtype ({y_pred.dtype.name})",
                    f"one returning {values.dtype.name} (e.g. a Keras loss object called inside it: pass the "
                    "object itself, which is translated, or build it with dtype=...)",
                )
            )
        if values.shape.rank is not None and values.shape.rank != 1:
            raise ValueError(
                param_error(
                    "loss", "get_loss", "a per-sample loss returning shape (B,)", f"shape {values.shape} (reduction?)"
                )
            )
        return values

    return loss


#: The built-in losses of real-valued targets (their names as :class:`Loss` keeps them).
REGRESSION_LOSSES = ("mse", "mae", "huber", "log_cosh")
# Losses whose outputs are class scores, so that a sample has a margin (:func:`label_margin`).
MARGIN_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")


def label_margin(loss: Loss, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Margin of the assigned label, shape (B,): its logit minus the largest other class's logit.

    Negative when the model prefers another class. For probability outputs the logits are
    log-probabilities floored like the loss (for a softmax, log p_y − log p_j is exactly the logit
    difference z_y − z_j). The assigned label is the class index (sparse categorical
    cross-entropy), the argmax of one-hot or soft labels (categorical cross-entropy), or
    ``y ≥ 0.5`` for one sigmoid output of shape (B,) or (B, 1) (binary cross-entropy, where the
    other class's logit is 0). ``loss.name`` must be one of :data:`MARGIN_LOSSES`.
    """
    floor = exact_tensor(_PROBABILITY_FLOOR, y_pred.dtype)
    if loss.name == "binary_crossentropy":
        score = tf.reshape(y_pred, [-1])
        if not loss.from_logits:
            p = tf.clip_by_value(score, floor, 1 - floor)
            score = tf.math.log(p) - tf.math.log(1 - p)
        positive = tf.reshape(tf.cast(y_true, y_pred.dtype), [-1]) >= 0.5
        return tf.where(positive, score, -score)
    if loss.name == "sparse_categorical_crossentropy":
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    elif loss.name == "categorical_crossentropy":
        labels = tf.cast(tf.argmax(y_true, axis=-1), tf.int32)
    else:
        raise AssertionError(loss.name)  # guarded by the caller (rank)
    logits = y_pred
    if not loss.from_logits:
        logits = tf.math.log(tf.maximum(y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True), floor))
    assigned = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    lowest = tf.fill(tf.shape(logits), tf.constant(-float("inf"), logits.dtype))
    other = tf.reduce_max(tf.where(assigned, lowest, logits), axis=-1)
    return tf.reduce_sum(tf.where(assigned, logits, tf.zeros_like(logits)), axis=-1) - other

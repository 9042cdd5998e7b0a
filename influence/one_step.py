"""The one-step hypergradient (scenario S2, DESIGN §1).

After one SGD step w' = w − η ∇_w L(X, w) with L = (1/B) Σ_j c_j ℓ(f(x_j; w), y_j),
the validation loss E(w') changes with the training inputs as

    dE/dX = −η ∇_X [ ∇_w L(X, w) · ∇E(w') ]

a mixed second derivative contracted with a vector: one nested tape,
O(|w| + |X|) memory (``method="hvp"``). ``method="jacobian"`` builds the
|w|×|X| Jacobian ∂(∇_w L)/∂X and contracts it: for an MLP 784-64-64-10 and a
batch of 64 that is a 10 GiB tensor, and TensorFlow's vectorised Jacobian
already fails there (its segment count P² overflows int32; see
reports/benchmarks/one_step.md). It is kept as the reference for tests and
benchmarks at small sizes.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import _tree
from ._inputs import check_probability_outputs, prepare, validate_data
from ._validation import check_choice, check_positive, param_error
from .autodiff import gradient, mixed_product
from .model_function import require_independent_samples, warn_gradient_overrides
from .objective import Objective, check_input_gradient_penalty
from .trajectory import per_sample_weights

METHODS = ("hvp", "jacobian")
TARGETS = ("inputs", "sample_weights", "labels")


def one_step(
    model: keras.Model,
    loss: Any,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    *,
    learning_rate: float = 0.1,
    method: str = "hvp",
    wrt: str = "inputs",
    sample_weight: Any = None,
    training: bool = False,
    seed: int = 0,
    from_logits: bool = False,
    input_gradient_penalty: float = 0.0,
) -> np.ndarray:
    """Gradient of the validation loss after one SGD step on (x_train, y_train).

    Args:
        model: built Keras 3 model; its current weights are w. Computation runs
            in the model's dtype (use :func:`influence.as_float64` for float64).
        loss: loss name, Keras loss object or :class:`influence.losses.Loss`.
        x_train: (B, ...) the batch of the step.
        y_train: (B,) integer labels or (B, ...) targets.
        x_val, y_val: validation data (N, ...); E = mean validation loss at w'.
        learning_rate: η of the step.
        method: ``"hvp"`` (nested tape, O(|w|+|X|) memory) or ``"jacobian"``
            (dense reference, O(|w|·|X|) memory).
        wrt: ``"inputs"`` → dE/dX (B, ...); ``"sample_weights"`` → dE/dc (B,);
            ``"labels"`` → dE/dy, shaped like y_train (continuous labels only).
        sample_weight: c, shape (B,); ones by default.
        training: forward pass in training mode (dropout on with masks fixed by
            ``seed``; BatchNorm on batch statistics — exact here, since the batch
            loss is differentiated as a whole). BatchNorm's moving statistics are held
            at their values: ``model.fit`` on the batch also moves them towards the
            batch's (momentum 0.99), which the validation loss in inference mode reads;
            that path is left out (0.3–1.5 % of dE/dX on a small BatchNorm MLP).
        seed: dropout seed for ``training=True``.
        from_logits: for loss names, whether the model outputs logits.
        input_gradient_penalty: ρ ≥ 0; the step then descends the mean of
            c_j·(ℓ_j + ρ‖∂ℓ_j/∂x_j‖²) (double backprop, as in :func:`influence.fit`),
            and E stays the plain validation loss. Needs samples that do not
            interact (no BatchNorm with ``training=True``).

    Returns:
        numpy array in the model's dtype, shaped as described under ``wrt``.
    """
    func = "one_step"
    fn, per_sample = prepare(func, model, loss, from_logits)
    data = validate_data(func, model, per_sample, x_train, y_train, x_val, y_val)
    check_probability_outputs(func, fn, per_sample, data.x_train)
    check_positive(learning_rate, param="learning_rate", func=func)
    check_choice(method, METHODS, param="method", func=func)
    check_choice(wrt, TARGETS, param="wrt", func=func)
    if wrt == "labels" and not per_sample.continuous_labels:
        raise ValueError(param_error("wrt", func, "'inputs' or 'sample_weights' for integer class labels", "'labels'"))
    if wrt == "inputs" and not np.issubdtype(data.x_train.dtype, np.floating):
        raise TypeError(param_error("x_train", func, "floating-point inputs to differentiate", str(data.x_train.dtype)))
    weights_c = (
        np.ones(len(data.x_train)) if sample_weight is None else per_sample_weights(sample_weight, data.x_train, func)
    )
    rho = check_input_gradient_penalty(input_gradient_penalty, data.x_train, func)

    dtype = fn.dtype
    x = tf.constant(data.x_train, dtype=dtype)
    warn_gradient_overrides(fn, x, training=training, func=func)
    if rho:
        require_independent_samples(fn, x, training=training, func=func, why="the per-sample input-gradient penalty")
    objective = Objective(fn, per_sample, rho)
    c = tf.constant(weights_c, dtype=dtype)
    y = tf.constant(data.y_train, dtype=dtype if per_sample.continuous_labels else None)
    xv = tf.constant(data.x_val, dtype=dtype)
    yv = tf.constant(data.y_val, dtype=dtype if per_sample.continuous_labels else None)
    eta = tf.constant(learning_rate, dtype=dtype)
    w = fn.weights
    targets = {"inputs": x, "sample_weights": c, "labels": y}

    def train_loss(weights: list[tf.Tensor], x_: tf.Tensor, c_: tf.Tensor, y_: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(c_ * objective(weights, x_, y_, training=training, seed=seed))

    step = gradient(lambda w_: train_loss(w_, x, c, y), w)
    w_next = _tree.axpy(-eta, step, w)
    v = gradient(lambda w_: per_sample.mean(yv, fn(w_, xv)), w_next)

    def as_function_of_target(weights: list[tf.Tensor], target: tf.Tensor) -> tf.Tensor:
        args = {**targets, wrt: target}
        return train_loss(weights, args["inputs"], args["sample_weights"], args["labels"])

    target = targets[wrt]
    if method == "hvp":
        result = mixed_product(as_function_of_target, w, target, v)
    else:
        result = _jacobian_reference(as_function_of_target, w, target, v)
    return (-eta * result).numpy()


def _jacobian_reference(loss_fn: Any, weights: list[tf.Tensor], target: tf.Tensor, v: list[tf.Tensor]) -> tf.Tensor:
    """Reference: J = ∂(∇_w L)/∂target as a dense (P, *target.shape) tensor, then vᵀJ."""
    with tf.GradientTape() as outer:
        outer.watch(target)
        with tf.GradientTape() as inner:
            inner.watch(weights)
            value = loss_fn(weights, target)
        flat_grad = _tree.flatten(inner.gradient(value, weights))
    jacobian = outer.jacobian(flat_grad, target)  # (P, *target.shape)
    if jacobian is None:
        return tf.zeros_like(target)
    return tf.tensordot(_tree.flatten(v), jacobian, axes=1)

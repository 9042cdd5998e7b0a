"""Per-sample quantities of a Keras model, vectorized over the batch.

These use the per-sample trick (one forward-mode pass gives ∇ℓ_j·v for every
j), which is only valid when samples do not interact; models that mix samples
in training mode (BatchNorm) are refused with a clear message.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._inputs import as_model_inputs, check_samples, prepare
from ._validation import as_array
from .autodiff import check_vector, per_sample_dots
from .model_function import require_independent_samples


def per_sample_gradient_dots(
    model: keras.Model,
    loss: Any,
    x: Any,
    y: Any,
    vector: Any,
    *,
    training: bool = False,
    seed: int | None = None,
    from_logits: bool = False,
) -> np.ndarray:
    """∇_w ℓ(f(x_j; w), y_j) · v for every sample j, shape (B,).

    Args:
        model: built Keras model; w are its current trainable weights.
        loss: loss name, Keras loss object or :class:`influence.losses.Loss`.
        x, y: a batch, (B, ...) and (B, ...).
        vector: v, a list shaped like ``model.trainable_variables``.
        training: training-mode forward pass (dropout masks fixed by ``seed``).
        seed: the dropout seed when ``training`` is True.
        from_logits: for loss names, whether the model outputs logits rather than probabilities.
    """
    func = "per_sample_gradient_dots"
    fn, per_sample = prepare(func, model, loss, from_logits)
    xs = as_model_inputs(model, as_array(x, param="x", func=func))
    ys = as_array(y, param="y", func=func)
    check_samples(func, fn, per_sample, xs, ys)
    weights = fn.weights
    v = check_vector(vector, weights, func)
    xt = tf.constant(xs, dtype=fn.dtype if np.issubdtype(xs.dtype, np.floating) else None)
    require_independent_samples(fn, xt, training=training, func=func, why="per-sample gradients")
    yt = tf.constant(ys)
    return per_sample_dots(lambda w: per_sample(yt, fn(w, xt, training=training, seed=seed)), weights, v).numpy()

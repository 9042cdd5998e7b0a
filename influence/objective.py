"""The per-sample training objective: the loss, plus an optional input-gradient penalty (scenario S4).

    ℓ̃_j(w) = ℓ(f(x_j; w), y_j) + ρ ‖∂ℓ_j/∂x_j‖²

The penalty ("double backpropagation", Drucker & LeCun 1992; Ross & Doshi-Velez 2018)
makes the model flat around its training inputs. Training on it puts a gradient inside
the loss, so the training step needs second derivatives and the reverse pass (which
differentiates the step's gradient once more) third derivatives: nested tapes give all
of them, and every check (float64 finite differences through retraining) applies as for
the plain loss.

Samples must not interact in the forward pass (``fit`` checks this), so the gradient of
the batch's summed loss with respect to the batch's inputs holds each sample's own
∂ℓ_j/∂x_j: one tape per batch, not one per sample.

What uses which: the training steps, their reverse pass, retraining and the rankers'
gradients and Hessians (influence functions, TracIn, self-influence) use ℓ̃; the
validation loss E, the ``train_loss`` column and the ``loss`` and ``margin`` rankings use
the plain loss ℓ (the penalty shapes training; it is not what the model is judged on).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ._tensors import exact_tensor
from ._validation import check_non_negative, param_error
from .losses import Loss
from .model_function import ModelFunction


class Objective:
    """Per-sample training objective of one model function and loss.

    Args:
        fn: the model as a pure function of (weights, inputs).
        loss: per-sample loss ℓ.
        input_gradient_penalty: ρ ≥ 0; 0 trains on ℓ alone.
    """

    def __init__(self, fn: ModelFunction, loss: Loss, input_gradient_penalty: float = 0.0) -> None:
        self.fn, self.loss, self.input_gradient_penalty = fn, loss, float(input_gradient_penalty)

    def __call__(self, w: Any, x: tf.Tensor, y: tf.Tensor, *, training: bool, seed: Any = None) -> tf.Tensor:
        """ℓ̃_j for every sample of the batch, shape (B,)."""
        if not self.input_gradient_penalty:
            return self.loss(y, self.fn(w, x, training=training, seed=seed))
        with tf.GradientTape() as tape:
            tape.watch(x)
            losses = self.loss(y, self.fn(w, x, training=training, seed=seed))
        input_grads = tape.gradient(losses, x)  # row j: ∂ℓ_j/∂x_j (samples do not interact)
        squared = tf.reduce_sum(tf.reshape(tf.square(input_grads), [tf.shape(x)[0], -1]), axis=1)
        return losses + exact_tensor(self.input_gradient_penalty, losses.dtype) * squared


def check_input_gradient_penalty(value: Any, x: np.ndarray, func: str) -> float:
    """ρ as a float: a finite number ≥ 0, and inputs that can be differentiated when ρ > 0."""
    check_non_negative(value, param="input_gradient_penalty", func=func)
    if value > 0 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            param_error(
                "input_gradient_penalty",
                func,
                "0 for integer inputs (the penalty ‖∂ℓ/∂x‖² needs floating-point inputs)",
                f"{value} with {x.dtype} inputs",
            )
        )
    return float(value)

"""Second-order building blocks: Hessian-vector products, mixed products,
per-sample gradient·vector, small dense Hessians, Newton steps, VJP chains.

Conventions:
    ``weights`` is a list of tensors (``model.trainable_variables`` order); the
    variables themselves may be passed, and are read as their current values.
    ``loss_fn(weights) -> scalar`` or ``loss_fn(weights, inputs) -> scalar``.
    The loss is evaluated inside :func:`influence._exact_ops.exact_ops`, so a ``loss_fn``
    written with ``model.stateless_call`` gets exact second derivatives through
    LayerNormalization (TensorFlow's ``tf.nn.moments`` stops the gradient of its mean).
    Vectors over weights are lists shaped like ``weights``.

A ``loss_fn`` for a Keras model, with a loss that keeps float64 (Keras's loss objects
compute in float32)::

    fn = inf.ModelFunction(model)                 # fn(weights, x) -> outputs, stateless
    loss = inf.losses.get_loss("sparse_categorical_crossentropy")
    loss_fn = lambda w: loss.mean(y, fn(w, x))     # mean per-sample loss over (x, y)
    inf.hvp(loss_fn, fn.weights, v)                # v: list shaped like fn.weights

Nothing here builds a Jacobian of the weight gradient with respect to the
inputs (|w|×|X| numbers); that route lives only in the ``jacobian`` reference
of :func:`influence.one_step` and in the explicit ``jacobian_*`` helpers below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from . import _tree
from ._exact_ops import exact_ops
from ._tensors import exact_tensor
from ._validation import check_non_negative, describe, param_error

ScalarFn = Callable[[list[tf.Tensor]], tf.Tensor]
MixedFn = Callable[[list[tf.Tensor], tf.Tensor], tf.Tensor]


def gradient(loss_fn: ScalarFn, weights: Sequence[tf.Tensor], *, func: str = "gradient") -> list[tf.Tensor]:
    """∇_w loss, shaped like ``weights``."""
    weights = _as_tensors(weights)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        with exact_ops():
            value = _scalar(loss_fn(weights), func)
    return dense_gradients(tape.gradient(value, weights), weights)


def _scalar(value: Any, func: str) -> tf.Tensor:
    """A loss must be one number: a tape silently sums a per-sample vector (B times the mean's H·v)."""
    value = tf.convert_to_tensor(value)
    if value.shape.num_elements() not in (1, None):
        raise ValueError(
            param_error(
                "loss_fn",
                func,
                "a function returning a scalar loss (e.g. loss.mean(y, fn(w, x)), not per-sample losses)",
                f"shape {tuple(value.shape)}",
            )
        )
    return value


def check_vector(vector: Any, weights: list[tf.Tensor], func: str) -> list[tf.Tensor]:
    """``vector`` as one tensor per weight, shaped like it, in its dtype.

    A list that is too short is refused, not zipped away (``mixed_product`` was 0.76 off with
    2 of 4 tensors); a misshaped entry is named.
    """
    if not isinstance(vector, (list, tuple)) or len(vector) != len(weights):
        got = f"a {type(vector).__name__} of {len(vector)}" if isinstance(vector, (list, tuple)) else describe(vector)
        raise ValueError(param_error("vector", func, f"a list of {len(weights)} tensors shaped like the weights", got))
    checked = []
    for i, (v, w) in enumerate(zip(vector, weights)):
        v = exact_tensor(v, w.dtype)  # a list of floats, too, keeps its float64 value
        if v.shape != w.shape:
            raise ValueError(
                param_error("vector", func, f"entry {i} of shape {tuple(w.shape)}", f"shape {tuple(v.shape)}")
            )
        checked.append(v)
    return checked


def hvp(loss_fn: ScalarFn, weights: Sequence[tf.Tensor], vector: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Hessian-vector product H·v by forward-over-reverse (one JVP of the gradient).

    Memory O(|w|); the Hessian is never formed.
    """
    weights = _as_tensors(weights)
    with tf.autodiff.ForwardAccumulator(weights, check_vector(vector, weights, "hvp")) as acc:
        grads = gradient(loss_fn, weights, func="hvp")
    return dense_gradients(acc.jvp(grads), weights)


def hvp_reverse(loss_fn: ScalarFn, weights: Sequence[tf.Tensor], vector: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """H·v by reverse-over-reverse (nested tapes); a cross-check for :func:`hvp`."""
    weights = _as_tensors(weights)
    vector = check_vector(vector, weights, "hvp_reverse")
    with tf.GradientTape() as outer:
        outer.watch(weights)
        inner_dot = _tree.dot(gradient(loss_fn, weights, func="hvp_reverse"), vector)
    return dense_gradients(outer.gradient(inner_dot, weights), weights)


def mixed_product(
    loss_fn: MixedFn,
    weights: Sequence[tf.Tensor],
    inputs: tf.Tensor,
    vector: Sequence[tf.Tensor],
) -> tf.Tensor:
    """∇_x [∇_w L(w, x) · v], shaped like ``inputs``.

    One nested tape: the inner tape gives ∇_w L, the dot with ``v`` is taken
    inside the outer tape, which differentiates it w.r.t. ``x``. Memory
    O(|w| + |x|), unlike contracting the |w|×|x| Jacobian ∂(∇_w L)/∂x.
    """
    weights = _as_tensors(weights)
    vector = check_vector(vector, weights, "mixed_product")
    inputs = tf.convert_to_tensor(inputs)
    if not inputs.dtype.is_floating:  # a tape gives integer tensors no gradient: zeros came back
        raise TypeError(param_error("inputs", "mixed_product", "floating-point inputs", f"{inputs.dtype.name} inputs"))
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(weights)
            with exact_ops():
                value = _scalar(loss_fn(weights, inputs), "mixed_product")
        grads = dense_gradients(inner.gradient(value, weights), weights)
        inner_dot = _tree.dot(grads, vector)
    result = outer.gradient(inner_dot, inputs)
    return tf.zeros_like(inputs) if result is None else result


def per_sample_dots(
    per_sample_loss_fn: ScalarFn, weights: Sequence[tf.Tensor], vector: Sequence[tf.Tensor]
) -> tf.Tensor:
    """∇_w ℓ_j · v for every sample j of a batch, shape (B,), in ONE forward-mode pass.

    ``per_sample_loss_fn(weights) -> (B,)``. The directional derivative of each
    per-sample loss along ``v`` is exactly ∇ℓ_j·v, so no per-sample gradients
    are materialised. Valid only when samples do not interact (see
    :func:`influence.model_function.require_independent_samples`).
    """
    weights = _as_tensors(weights)
    with tf.autodiff.ForwardAccumulator(weights, check_vector(vector, weights, "per_sample_dots")) as acc:
        with exact_ops():
            losses = tf.convert_to_tensor(per_sample_loss_fn(weights))
    if losses.shape.rank != 1:
        raise ValueError(
            param_error(
                "per_sample_loss_fn",
                "per_sample_dots",
                "a function returning per-sample losses (B,)",
                f"shape {tuple(losses.shape)}",
            )
        )
    dots = acc.jvp(losses)
    return tf.zeros_like(losses) if dots is None else dots


def hessian(loss_fn: ScalarFn, weights: Sequence[tf.Tensor], *, vectorized: bool = True) -> tf.Tensor:
    """Dense Hessian over the flattened weights, shape (P, P). Small models only.

    The flat order: each tensor of ``weights`` raveled in C order, concatenated in list order.
    ``vectorized=False`` takes the P rows in a loop instead of pfor, which cannot vectorize
    everything (the loops of recurrent layers): slower, same numbers.
    """
    weights = _as_tensors(weights)
    count = _tree.size(weights)
    if count > 20_000:
        raise ValueError(param_error("weights", "hessian", "at most 20000 parameters for a dense Hessian", f"{count}"))
    flat = _tree.flatten(weights)
    with tf.GradientTape(persistent=not vectorized) as outer:  # a loop of rows re-reads the tape
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            with exact_ops():
                value = _scalar(loss_fn(_tree.unflatten(flat, weights)), "hessian")
        grad = inner.gradient(value, flat, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return outer.jacobian(
        grad, flat, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=vectorized
    )


def newton_step(loss_fn: ScalarFn, weights: Sequence[tf.Tensor], *, damping: float = 0.0) -> list[tf.Tensor]:
    """One Newton step ``w − (H + damping·I)⁻¹ ∇L``, for small models.

    Raises ValueError when the (damped) Hessian is singular, or numerically so: a condition
    number above 1/(1000·machine ε) (≈ 4.5e12 in float64, 8.4e3 in float32), where the solve
    would return an arbitrary null-space component (e.g. a softmax regression's Hessian, which
    is singular along the direction that shifts every logit together).
    """
    check_non_negative(damping, param="damping", func="newton_step")  # NaN gave all-NaN weights
    weights = _as_tensors(weights)
    h = hessian(loss_fn, weights).numpy()
    g = _tree.flatten(gradient(loss_fn, weights, func="newton_step")).numpy()
    # One symmetric eigendecomposition both tells a numerically singular H and solves with it.
    values, vectors = np.linalg.eigh((h + h.T) / 2 + damping * np.eye(len(h)))
    size = np.abs(values)
    if size.min() <= size.max() * 1000.0 * np.finfo(h.dtype).eps:
        raise ValueError(param_error("damping", "newton_step", "large enough to make the Hessian invertible", damping))
    step = tf.constant(vectors @ ((vectors.T @ g) / values), dtype=weights[0].dtype)
    return _tree.axpy(-1.0, _tree.unflatten(step, weights), weights)


# --------------------------------------------------------------------------- chains (S3)


@dataclass(frozen=True)
class ChainGradients:
    """Result of :func:`vjp_chain`.

    Attributes:
        input_grad: ∂loss/∂x, shaped like the chain's input.
        stage_grads: for each stage, the gradients of its trainable weights
            (empty list for plain callables).
        output: the chain's output (forward pass result).
    """

    input_grad: tf.Tensor
    stage_grads: list[list[tf.Tensor]]
    output: tf.Tensor


def vjp_chain(
    stages: Sequence[Callable[[tf.Tensor], tf.Tensor]],
    x: tf.Tensor,
    upstream: tf.Tensor | Callable[[tf.Tensor], tf.Tensor],
) -> ChainGradients:
    """Backpropagate through models split in stages, one tape per stage (S3).

    ``stages[0]`` maps x → h1, ``stages[1]`` maps h1 → h2, … Each stage is a
    Keras model/layer (its ``trainable_variables`` get gradients) or any
    differentiable callable. ``upstream`` is ∂loss/∂output (same shape as the
    last output) or a function ``output -> scalar loss``.

    Each stage's backward step is a VJP, ``tape.gradient(h, [h_in, θ],
    output_gradients=∂loss/∂h)``: no Jacobian, no hand-written transposes.
    The result equals the gradient of the joined model.
    """
    if not stages:
        raise ValueError(param_error("stages", "vjp_chain", "a non-empty list of models or callables", "[]"))
    tapes, stage_inputs, stage_outputs = [], [], []
    h = tf.convert_to_tensor(x)
    for position, stage in enumerate(stages):
        if not callable(stage):
            raise TypeError(param_error("stages", "vjp_chain", "models or callables", describe(stage)))
        tape = tf.GradientTape()
        with tape:
            tape.watch(h)
            out = stage(h)
        outputs = tf.nest.flatten(out)
        if len(outputs) != 1:  # tf.identity below would stack a list of outputs into one tensor
            raise ValueError(
                param_error(
                    "stages",
                    "vjp_chain",
                    "stages that each return one tensor (chain a multi-output model's outputs in a callable "
                    "stage that combines them, or put the loss in upstream)",
                    f"stage {position} returning {len(outputs)} outputs",
                )
            )
        out = outputs[0]
        tapes.append(tape)
        stage_inputs.append(h)
        stage_outputs.append(out)
        # A fresh tensor of the same values: Keras attaches the logits to a softmax output
        # (``_keras_logits``) and its cross-entropy reads them instead of the output, which would
        # leave the next stage's (or the loss's) value unconnected to the tensor watched here.
        h = tf.identity(out)
    if callable(upstream):
        with tf.GradientTape() as loss_tape:
            loss_tape.watch(h)
            loss = tf.convert_to_tensor(upstream(h))
        if loss.shape.num_elements() != 1:  # tape.gradient would sum a vector without a word
            raise ValueError(
                param_error("upstream", "vjp_chain", "a function returning a scalar loss", f"shape {tuple(loss.shape)}")
            )
        cotangent = loss_tape.gradient(loss, h)
        if cotangent is None:  # the loss ignores the output; None as output_gradients would mean ones
            cotangent = tf.zeros_like(h)
    else:
        # A float32 gradient for a float64 chain (or the reverse) is cast, as numpy arrays and lists are.
        cotangent = exact_tensor(upstream, h.dtype)
        if cotangent.shape != h.shape:
            raise ValueError(
                param_error("upstream", "vjp_chain", f"a gradient of shape {tuple(h.shape)}", describe(cotangent))
            )
    stage_grads: list[list[tf.Tensor]] = [[] for _ in stages]
    for i in reversed(range(len(stages))):
        params = list(getattr(stages[i], "trainable_variables", []))
        grads = tapes[i].gradient(stage_outputs[i], [stage_inputs[i], *params], output_gradients=cotangent)
        stage_grads[i] = dense_gradients(grads[1:], params)
        cotangent = grads[0] if grads[0] is not None else tf.zeros_like(stage_inputs[i])
    return ChainGradients(input_grad=cotangent, stage_grads=stage_grads, output=h)


# ----------------------------------------------------------- Jacobian contractions (reference)


def jacobian_vjp(jacobian: tf.Tensor, cotangent: tf.Tensor, *, out_ndim: int) -> tf.Tensor:
    """uᵀJ for a full Jacobian laid out as ``tape.jacobian`` returns it.

    ``jacobian`` has shape ``out_shape + in_shape`` (output axes first), where
    ``out_shape`` has ``out_ndim`` axes. ``cotangent`` has shape ``out_shape``.
    Returns shape ``in_shape``: Σ_o u[o] J[o, i].
    """
    jacobian = tf.convert_to_tensor(jacobian)
    cotangent = exact_tensor(cotangent, jacobian.dtype)  # a float32 cotangent of a float64 Jacobian, too
    _check_leading(jacobian, cotangent, out_ndim, "cotangent", "jacobian_vjp")
    return tf.tensordot(cotangent, jacobian, axes=out_ndim)


def jacobian_jvp(jacobian: tf.Tensor, tangent: tf.Tensor, *, in_ndim: int) -> tf.Tensor:
    """J·v for ``jacobian`` of shape ``out_shape + in_shape``; ``tangent`` has shape ``in_shape``.

    Returns shape ``out_shape``: Σ_i J[o, i] v[i].
    """
    jacobian = tf.convert_to_tensor(jacobian)
    tangent = exact_tensor(tangent, jacobian.dtype)
    trailing = tuple(jacobian.shape[len(jacobian.shape) - in_ndim :])
    if tuple(tangent.shape) != trailing:
        raise ValueError(
            param_error("tangent", "jacobian_jvp", f"shape {trailing} (the Jacobian's input axes)", describe(tangent))
        )
    return tf.tensordot(jacobian, tangent, axes=in_ndim)


def batch_jacobian_vjp(jacobian: tf.Tensor, cotangent: tf.Tensor, *, out_ndim: int) -> tf.Tensor:
    """Per-sample uᵀJ for ``tape.batch_jacobian`` output of shape (B, *out, *in).

    ``cotangent`` has shape (B, *out). Returns (B, *in). Only meaningful when
    samples do not interact (otherwise the batch Jacobian drops cross terms).
    """
    jacobian = tf.convert_to_tensor(jacobian)
    cotangent = exact_tensor(cotangent, jacobian.dtype)
    _check_leading(jacobian, cotangent, out_ndim + 1, "cotangent", "batch_jacobian_vjp")
    b = tf.shape(jacobian)[0]
    in_shape = jacobian.shape[1 + out_ndim :]
    j = tf.reshape(jacobian, [b, -1, int(np.prod(in_shape))])
    u = tf.reshape(cotangent, [b, 1, -1])
    return tf.reshape(tf.matmul(u, j)[:, 0, :], [b, *in_shape])


def _check_leading(jacobian: tf.Tensor, vector: tf.Tensor, ndim: int, name: str, func: str) -> None:
    leading = tuple(jacobian.shape[:ndim])
    if tuple(vector.shape) != leading:
        raise ValueError(param_error(name, func, f"shape {leading} (the Jacobian's output axes)", describe(vector)))


def _as_tensors(weights: Sequence[Any]) -> list[tf.Tensor]:
    # Keras 3 variables (model.trainable_variables) as their current values: tapes, forward
    # accumulators and the helpers here take tensors, and the loss function receives these.
    return [tf.convert_to_tensor(w) for w in weights]


def dense_gradients(grads: Sequence[Any], like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """A tape's gradients as dense tensors shaped like ``like``.

    Weights that do not affect the loss get None from tapes; zeros keep lists aligned. An
    Embedding's gradient comes as IndexedSlices, which dot products, JVPs and the optimizers'
    updates cannot take: dense.
    """
    return [tf.zeros_like(w) if g is None else tf.convert_to_tensor(g) for g, w in zip(grads, like)]

"""Optimising training data through training (scenario S5).

:func:`optimize_training_inputs` changes chosen training inputs and/or soft
labels so that the model *trained on them* does worse (``goal="poison"``) or
better (``goal="repair"``) on validation data. Every outer step retrains with
the recorded schedule (same batches, learning rates, dropout seeds) and takes
dE/dx_i, dE/dy_i from the unrolled reverse pass. The outer optimizer is one of
:mod:`influence.optimizers` (SGD, momentum, RMSprop, Adam), applied to the
data instead of the weights.

:func:`adversarial_examples` is the test-time counterpart: the model is frozen
and its loss on given inputs is raised directly, for comparison.

Labels are kept where the loss defines them: soft labels of categorical
cross-entropy on the probability simplex by Euclidean projection after each step
(a softmax parameterisation would start saturated at one-hot labels, where its
gradient vanishes), binary cross-entropy targets in [0, 1], regression targets
(MSE, MAE, Huber, log-cosh, callables) unconstrained; inputs are projected onto a box (pixel range)
and, optionally, an L∞ ball of radius ``budget`` around the original inputs.
Starting inputs outside the box are refused rather than clipped into it: that
clip would silently damage data that is not pixels (e.g. standardized features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._inputs import check_samples, prepare, validate_validation_data
from ._progress import progress_bar
from ._summary import compact_repr
from ._validation import as_array, check_choice, check_positive, check_sample_indices, describe, is_real, param_error
from .optimizers import Adam, Optimizer, get_optimizer
from .trajectory import Trajectory, check_trajectory_data
from .unroll import unrolled

GOALS = ("poison", "repair")
TARGETS = ("inputs", "labels", "both")
# The outer step size of the default (Adam) and of every optimizer given by name.
OUTER_LEARNING_RATE = 0.1


@dataclass(frozen=True)
class InputOptimization:
    """Result of :func:`optimize_training_inputs` / :func:`adversarial_examples`.

    Attributes:
        x: (n, ...) the inputs after optimisation (only ``indices`` rows changed).
        y: labels after optimisation (soft labels when they were optimised).
        val_loss: (steps+1,) validation loss of the retrained model before each
            outer step and after the last (for adversarial examples: the loss on
            the attacked inputs).
        val_error: (steps+1,) matching classification error (NaN for regression).
        seconds: (steps+1,) wall time elapsed at each entry of ``val_loss``.
        predicted_change: (steps,) first-order prediction of each step's change
            of validation loss, ⟨∇, Δ⟩, to compare with ``np.diff(val_loss)``.
        optimizer: the outer optimizer's name.
    """

    x: np.ndarray
    y: np.ndarray
    val_loss: np.ndarray
    val_error: np.ndarray
    seconds: np.ndarray
    predicted_change: np.ndarray
    optimizer: str

    def __repr__(self) -> str:  # arrays as shape and dtype, not every number
        return compact_repr(self)


def _project(x: tf.Tensor, original: tf.Tensor, bounds: tuple[float, float] | None, budget: float | None) -> tf.Tensor:
    if budget is not None:
        x = tf.clip_by_value(x, original - budget, original + budget)
    if bounds is not None:
        x = tf.clip_by_value(x, bounds[0], bounds[1])
    return x


def project_to_simplex(y: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008)."""
    flat = y.reshape(-1, y.shape[-1])
    ordered = -np.sort(-flat, axis=1)
    cumulative = np.cumsum(ordered, axis=1) - 1
    ks = np.arange(1, flat.shape[1] + 1)
    rho = np.max(np.where(ordered - cumulative / ks > 0, ks, 0), axis=1)
    theta = cumulative[np.arange(len(flat)), rho - 1] / rho
    # Keep the input's dtype: a float64 result would break float32 runs at the next step.
    return np.maximum(flat - theta[:, None], 0).reshape(y.shape).astype(y.dtype, copy=False)


def project_labels(loss: Any, y: np.ndarray) -> np.ndarray:
    """Labels back where ``loss`` defines them: the simplex (categorical), [0, 1] (binary), as they are otherwise."""
    if loss.name == "categorical_crossentropy":
        return project_to_simplex(y)
    if loss.name == "binary_crossentropy":
        return np.clip(y, 0, 1)
    return y


def evaluate_run(trajectory: Trajectory, weights: list[np.ndarray], x_val: np.ndarray, y_val: np.ndarray, func: str):
    """(validation loss, classification error) of ``trajectory``'s model with ``weights``; ``func`` names the caller."""
    from .model_function import ModelFunction

    fn = ModelFunction(trajectory.model, func=func)
    w = [tf.constant(v, dtype=fn.dtype) for v in weights]
    out = fn(w, tf.constant(x_val, dtype=fn.dtype))
    yv = tf.constant(y_val, dtype=fn.dtype if trajectory.loss.continuous_labels else tf.int32)
    return float(trajectory.loss.mean(yv, out)), classification_error(trajectory.loss, out, y_val)


def label_classes(loss: Any, labels: np.ndarray) -> np.ndarray | None:
    """The class each label names, shape (n,); None where a label names no single class.

    Class indices as given (shape (n,) or (n, 1)), the argmax of one-hot/soft labels, and
    for one binary target 1 above 0.5, else 0; None for regression targets and for several
    binary outputs per sample.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if loss.integer_labels:
        return labels.reshape(n)
    if loss.name == "categorical_crossentropy":
        return np.argmax(labels.reshape(n, -1), axis=-1)
    if loss.name == "binary_crossentropy" and labels.size == n:
        return (labels.reshape(n) > 0.5).astype(np.int64)
    return None


def classification_error(loss: Any, outputs: tf.Tensor, labels: np.ndarray) -> float:
    """Fraction of predictions that miss the class; NaN for regression.

    Class indices and one-hot/soft labels compare argmaxes (:func:`label_classes`); binary
    targets compare each output with its decision threshold (0.5 for probabilities, 0 for
    logits) and count per output.
    """
    if loss.name == "binary_crossentropy":
        threshold = 0.0 if loss.from_logits else 0.5
        predicted = np.asarray(outputs) > threshold
        return float(np.mean(predicted != (np.asarray(labels).reshape(predicted.shape) > 0.5)))
    classes = label_classes(loss, labels)
    if classes is None:
        return float("nan")
    return float(np.mean(np.argmax(np.asarray(outputs), -1) != classes))


def optimizer_label(opt: Optimizer) -> str:
    """The outer optimizer's name for curves: ``"SGD"``, ``"SGD (momentum)"``, ``"SGD (Nesterov)"``, ``"Adam"``, …"""
    if not getattr(opt, "momentum", 0):
        return type(opt).__name__
    return f"{type(opt).__name__} ({'Nesterov' if getattr(opt, 'nesterov', False) else 'momentum'})"


def outer_optimizer_named(outer_optimizer: Any, func: str) -> Optimizer:
    """The outer optimizer: an instance as given; None → Adam; a name → that rule; all at ``OUTER_LEARNING_RATE``.

    The outer step sizes suit inputs in [0, 1] (Adam and RMSprop move each coordinate by
    about the rate); plain SGD scales with the hypergradient and usually needs an instance
    with a larger rate.
    """
    if outer_optimizer is None:
        return Adam(OUTER_LEARNING_RATE)
    return get_optimizer(
        outer_optimizer, func=func, param="outer_optimizer", learning_rate=OUTER_LEARNING_RATE, also="None, "
    )


def check_inside_bounds(
    x: np.ndarray,
    bounds: tuple[float, float] | None,
    func: str,
    *,
    what: str = "the starting inputs",
    remedy: str = "pass bounds=None for no box, or a wider range",
) -> None:
    """Refuse starting values outside ``bounds``: the first projection would clip them silently.

    ``x``: the values that will be optimised (and projected onto the box): inputs (k, ...)
    here, sample weights in :func:`influence.learn_sample_weights`; ``what`` names them.
    """
    if bounds is None:
        return
    low, high = float(np.min(x)), float(np.max(x))
    if low < bounds[0] or high > bounds[1]:
        raise ValueError(
            param_error(
                "bounds",
                func,
                f"a (low, high) box that holds {what}, which lie in [{low:.4g}, {high:.4g}] (the "
                f"first step would clip them into the box); {remedy}",
                describe(bounds),
            )
        )


def _check_common(func: str, outer_optimizer: Any, steps: Any, bounds: Any, budget: Any) -> Optimizer:
    opt = outer_optimizer_named(outer_optimizer, func)
    check_positive(steps, param="steps", func=func, kind=int)
    if bounds is not None:
        pair = list(bounds) if isinstance(bounds, (tuple, list, np.ndarray)) else []
        if len(pair) != 2 or not all(is_real(b) for b in pair) or not pair[0] < pair[1]:
            raise ValueError(
                param_error("bounds", func, "None or a (low, high) pair of numbers with low < high", describe(bounds))
            )
    if budget is not None:
        check_positive(budget, param="budget", func=func)
    return opt


def optimize_training_inputs(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    indices: Any,
    *,
    goal: str = "poison",
    target: str = "inputs",
    outer_optimizer: Any = None,
    steps: int = 10,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    budget: float | None = None,
    progress: bool | None = None,
) -> InputOptimization:
    """Optimise training inputs (and/or soft labels) through the recorded training run.

    Args:
        trajectory: from :func:`influence.fit`; its schedule is replayed at every outer step.
        x_train, y_train: the training data it was recorded on. For ``target``
            ``"labels"``/``"both"`` the run must use continuous labels: one-hot or
            soft labels of ``categorical_crossentropy`` (kept on the simplex),
            ``binary_crossentropy`` targets (kept in [0, 1]) or regression targets
            (unconstrained).
        x_val, y_val: validation data defining E.
        indices: training samples to change (int array).
        goal: ``"poison"`` raises E, ``"repair"`` lowers it.
        target: ``"inputs"``, ``"labels"`` or ``"both"``.
        outer_optimizer: :mod:`influence.optimizers` instance, or a name as for
            :func:`influence.fit` (``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"rmsprop"``,
            ``"adam"``); its learning rate is the outer
            step size. Default ``Adam(0.1)``; a name gets the same rate, 0.1
            (``OUTER_LEARNING_RATE``). Adam and RMSprop move each coordinate by about
            their rate, which suits pixels in [0, 1]; hypergradients are tiny and
            unevenly scaled, so plain SGD needs an instance with a step size of
            10–1000 (see reports/benchmarks/poisoning.md).
        steps: outer steps (each: one retraining + one unrolled pass).
        bounds: (low, high) box the inputs are projected onto after each step, e.g.
            the pixel range (default (0, 1), for images scaled to [0, 1]); None for
            no box. The starting inputs of ``indices`` must lie inside it (a
            ValueError otherwise): pass None, or a wider box, for data such as
            standardized features.
        budget: optional L∞ radius around the original inputs.
        progress: a bar over the outer steps: ``None`` (default) once they have run 2 s,
            ``True`` at once, ``False`` never.

    ``predicted_change`` is ⟨∇, Δ⟩ with the step Δ taken after the projection.
    """
    func = "optimize_training_inputs"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    # Checked now: the first evaluation (before any unrolled call) would fail inside Keras.
    xv, yv = validate_validation_data(func, trajectory.model, trajectory.loss, x, y, x_val, y_val)
    check_choice(goal, GOALS, param="goal", func=func)
    check_choice(target, TARGETS, param="target", func=func)
    opt = _check_common(func, outer_optimizer, steps, bounds, budget)
    idx = check_sample_indices(indices, len(x), func=func)
    wants_labels = target in ("labels", "both")
    if wants_labels and not trajectory.loss.has_label_grad(y):
        raise ValueError(
            param_error(
                "target",
                func,
                "'inputs' for a run on class-index labels (train on one-hot labels with "
                "categorical_crossentropy to optimise soft labels)",
                repr(target),
            )
        )
    wants_inputs = target in ("inputs", "both")
    if wants_inputs and not np.issubdtype(x.dtype, np.floating):  # token ids: cast to floats, nothing moved
        raise ValueError(
            param_error("target", func, "'labels' for integer inputs (token ids have no gradient)", repr(target))
        )
    if wants_inputs:
        check_inside_bounds(x[idx], bounds, func)
    unused = idx[trajectory.sample_weight[idx] == 0]
    if len(unused):  # their inputs and labels never reach training: every step would change nothing
        raise ValueError(
            param_error(
                "indices",
                func,
                "samples trained on (sample weight ≠ 0)",
                f"samples {unused.tolist()[:10]} of sample weight 0 in this run",
            )
        )
    sign = 1.0 if goal == "repair" else -1.0  # the outer optimizer minimises sign·E

    dtype = trajectory.dtype
    x_cur, y_cur = x.astype(dtype.as_numpy_dtype), y.astype(dtype.as_numpy_dtype) if wants_labels else y
    original = tf.constant(x_cur[idx])
    params: list[tf.Tensor] = []
    if wants_inputs:
        params.append(original)
    if wants_labels:
        params.append(tf.constant(y_cur[idx]))
    state = opt.init(params)
    rates = opt.learning_rates(int(steps))

    losses, errors, times, predicted = [], [], [], []
    start = time.perf_counter()
    for step in progress_bar(range(int(steps) + 1), progress=progress, desc=f"{goal} ({type(opt).__name__})"):
        run = trajectory.replayed_on(x_cur, y_cur)
        loss, error = evaluate_run(run, run.final_weights, xv, yv, func)
        losses.append(loss)
        errors.append(error)
        times.append(time.perf_counter() - start)
        if step == int(steps):
            break
        res = unrolled(run, x_cur, y_cur, xv, yv, progress=False, input_grad=wants_inputs)
        input_grad = res.input_grad if res.input_grad is not None else np.zeros_like(x_cur)
        grads = []
        if wants_inputs:
            grads.append(tf.constant(sign * input_grad[idx]))
        if wants_labels:
            grads.append(tf.constant(sign * res.label_grad[idx]))  # type: ignore[index]
        new_params, state = opt.update(params, grads, state, tf.constant(rates[step], dtype), tf.constant(step))
        if wants_inputs:
            new_params[0] = _project(new_params[0], original, bounds, budget)
        if wants_labels:
            new_params[-1] = tf.constant(project_labels(trajectory.loss, new_params[-1].numpy()))
        change = 0.0
        k = 0
        if wants_inputs:
            x_new = x_cur.copy()
            x_new[idx] = new_params[0].numpy()
            change += float(np.sum(input_grad[idx] * (x_new[idx] - x_cur[idx])))
            x_cur = x_new
            k = 1
        if wants_labels:
            y_new = y_cur.copy()
            y_new[idx] = new_params[k].numpy()
            change += float(np.sum(res.label_grad[idx] * (y_new[idx] - y_cur[idx])))  # type: ignore[index]
            y_cur = y_new
        params = new_params
        predicted.append(change)
    return InputOptimization(
        x=x_cur,
        y=y_cur,
        val_loss=np.asarray(losses),
        val_error=np.asarray(errors),
        seconds=np.asarray(times),
        predicted_change=np.asarray(predicted),
        optimizer=optimizer_label(opt),
    )


def adversarial_examples(
    model: keras.Model,
    loss: Any,
    x: Any,
    y: Any,
    *,
    outer_optimizer: Any = None,
    steps: int = 10,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    budget: float | None = None,
    from_logits: bool = False,
    progress: bool | None = None,
) -> InputOptimization:
    """Raise a frozen model's loss on inputs ``x`` by optimising the inputs (test-time attack).

    The objective is the *mean* loss over the m samples of ``x``, so each input's gradient
    carries a factor 1/m. Adam and RMSprop move each coordinate by about their rate whatever
    m is; plain SGD (with or without momentum) needs a step size that grows with m (e.g.
    ``SGD(30.0)`` for 50 digits scaled to [0, 1]).

    Same outer optimizers (default ``Adam(0.1)``, names at the same rate), box and L∞
    budget as :func:`optimize_training_inputs`; ``x`` must lie inside ``bounds``.
    ``val_loss`` holds the mean loss on the attacked inputs per step; ``progress`` as there.
    ``from_logits``: for loss names, whether the model outputs logits rather than probabilities.
    """
    func = "adversarial_examples"
    fn, per_sample = prepare(func, model, loss, from_logits)
    opt = _check_common(func, outer_optimizer, steps, bounds, budget)
    x0 = as_array(x, param="x", func=func).astype(fn.dtype.as_numpy_dtype)
    check_inside_bounds(x0, bounds, func)
    labels = as_array(y, param="y", func=func)
    check_samples(func, fn, per_sample, x0, labels)
    yt = tf.constant(labels, dtype=fn.dtype if per_sample.continuous_labels else tf.int32)
    w = fn.weights
    original = tf.constant(x0)
    params = [original]
    state = opt.init(params)
    rates = opt.learning_rates(int(steps))
    losses, errors, times, predicted = [], [], [], []
    start = time.perf_counter()
    for step in progress_bar(range(int(steps) + 1), progress=progress, desc=f"attack ({type(opt).__name__})"):
        with tf.GradientTape() as tape:
            tape.watch(params[0])
            out = fn(w, params[0])
            value = per_sample.mean(yt, out)
        losses.append(float(value))
        errors.append(classification_error(per_sample, out, labels))
        times.append(time.perf_counter() - start)
        if step == int(steps):
            break
        grad = tape.gradient(value, params[0])
        new, state = opt.update(params, [-grad], state, tf.constant(rates[step], fn.dtype), tf.constant(step))
        new[0] = _project(new[0], original, bounds, budget)
        predicted.append(float(tf.reduce_sum(grad * (new[0] - params[0]))))
        params = new
    return InputOptimization(
        x=params[0].numpy(),
        y=labels,
        val_loss=np.asarray(losses),
        val_error=np.asarray(errors),
        seconds=np.asarray(times),
        predicted_change=np.asarray(predicted),
        optimizer=optimizer_label(opt),
    )

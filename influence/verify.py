"""Verification by retraining: the checks users run to trust a number.

- :func:`validation_loss`: E for given final weights.
- :func:`actual_removal_effect`: retrain without a sample (or a group) and
  measure the real change of validation loss — the ground truth that
  ``removal_effect`` predicts to first order.
- :func:`check_unrolled`: the end-to-end float64 check (DESIGN §2): perturb
  one training input (or its sample weight) along random directions,
  retrain the recorded trajectory, and compare with the unrolled gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from ._validation import as_array, check_choice, describe, param_error
from .checks import GradientCheck, as_float64, check_gradient
from .model_function import ModelFunction
from .trajectory import Trajectory, check_trajectory_data, retrain


def validation_loss(trajectory: Trajectory, weights: Sequence[Any], x_val: Any, y_val: Any) -> float:
    """Mean validation loss of the trajectory's model with the given trainable weights."""
    fn = ModelFunction(trajectory.model, func="validation_loss")
    xv = tf.constant(as_array(x_val, param="x_val", func="validation_loss"), dtype=fn.dtype)
    yv = as_array(y_val, param="y_val", func="validation_loss")
    yv_t = tf.constant(yv, dtype=fn.dtype if trajectory.loss.continuous_labels else tf.int32)
    w = [tf.constant(wi, dtype=fn.dtype) for wi in weights]
    return float(trajectory.loss.mean(yv_t, fn(w, xv, training=False)))


def actual_removal_effect(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    indices: Sequence[int] | Sequence[Sequence[int]],
    *,
    progress: bool = True,
) -> np.ndarray:
    """Real change of validation loss when each sample (or each group) is removed.

    ``indices`` is a list of ints (one retraining per sample) or a list of
    index lists (one retraining per group). Removal sets c_i = 0 in the
    replayed run; the baseline is the replayed run with the recorded weights,
    so replay round-off cancels. Returns shape (len(indices),).
    """
    func = "actual_removal_effect"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    groups = [np.atleast_1d(np.asarray(g, dtype=np.int64)) for g in indices]
    for g in groups:
        if g.size == 0 or g.min() < 0 or g.max() >= trajectory.n_train:
            raise ValueError(
                param_error("indices", func, f"sample indices in [0, {trajectory.n_train - 1}]", describe(g))
            )
    baseline = validation_loss(trajectory, retrain(trajectory, x, y), x_val, y_val)
    effects = []
    for g in tqdm(groups, desc="retraining", unit="run", disable=not progress):
        c = trajectory.sample_weight.copy()
        c[g] = 0.0
        effects.append(validation_loss(trajectory, retrain(trajectory, x, y, sample_weight=c), x_val, y_val) - baseline)
    return np.asarray(effects)


def as_float64_trajectory(trajectory: Trajectory, x_train: np.ndarray, y_train: np.ndarray) -> Trajectory:
    """The same recorded run (batches, rates, seeds, initial weights) replayed on a float64 copy of the model.

    Returns ``trajectory`` itself when it already runs in float64.
    """
    if trajectory.model.trainable_variables[0].dtype == "float64":
        return trajectory
    initial = [np.asarray(w, np.float64) for w in trajectory.initial_weights]
    traj64 = replace(
        trajectory,
        model=as_float64(trajectory.model),
        initial_weights=initial,
        final_weights=initial,
        weights_history=None,
        state_history=None,
        _program_cache={},
    )
    traj64.final_weights = retrain(traj64, x_train, y_train)
    return traj64


def check_unrolled(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    index: int,
    *,
    wrt: str = "inputs",
    directions: int = 2,
    h: float = 1e-3,
    rtol: float = 1e-5,
    seed: int = 0,
) -> GradientCheck:
    """End-to-end float64 check of an unrolled hypergradient for training sample ``index``.

    Perturbs x_i (``wrt="inputs"``), c_i (``"sample_weights"``) or y_i
    (``"labels"``, continuous targets) along random directions, retrains the
    recorded trajectory in float64 for each evaluation, and compares the
    central differences with the unrolled gradient. A float32 trajectory is
    replayed on a float64 copy of its model (same batches, rates and seeds).
    Costs 4·directions + 2 retrainings.
    """
    from .unroll import unrolled

    func = "check_unrolled"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    check_choice(wrt, ("inputs", "sample_weights", "labels"), param="wrt", func=func)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < trajectory.n_train:
        raise ValueError(
            param_error("index", func, f"a sample index in [0, {trajectory.n_train - 1}]", describe(index))
        )
    traj64 = as_float64_trajectory(trajectory, x, y)
    x64 = x.astype(np.float64)
    y64 = y.astype(np.float64) if trajectory.loss.continuous_labels and np.issubdtype(y.dtype, np.floating) else y
    result = unrolled(traj64, x64, y64, x_val, y_val, progress=False)
    if wrt == "labels" and result.label_grad is None:
        raise ValueError(param_error("wrt", func, "'inputs' or 'sample_weights' for class labels", "'labels'"))

    def val_after(x_: np.ndarray, y_: np.ndarray, c_: np.ndarray) -> float:
        return validation_loss(traj64, retrain(traj64, x_, y_, sample_weight=c_), x_val, y_val)

    c = traj64.sample_weight.astype(np.float64)
    if wrt == "inputs":

        def f(z: np.ndarray) -> float:
            xx = x64.copy()
            xx[index] = z
            return val_after(xx, y64, c)

        assert result.input_grad is not None  # requested by default
        point, grad = x64[index], result.input_grad[index]
    elif wrt == "sample_weights":

        def f(z: np.ndarray) -> float:
            cc = c.copy()
            cc[index] = z[0]
            return val_after(x64, y64, cc)

        point, grad = c[index : index + 1], result.sample_weight_grad[index : index + 1]
    else:

        def f(z: np.ndarray) -> float:
            yy = y64.copy()
            yy[index] = z
            return val_after(x64, yy, c)

        point, grad = y64[index], result.label_grad[index]  # type: ignore[index]
    return check_gradient(f, point, grad, directions=directions, h=h, rtol=rtol, seed=seed)

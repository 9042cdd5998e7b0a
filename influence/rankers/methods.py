"""The ranking methods. Each returns (score, removal_effect or None), score higher = more harmful.

- unrolled: exact first-order removal effect through the recorded run (DESIGN §1).
- influence_function (Koh & Liang 2017): removal_effect_i = (c_i/n) ∇ℓ_i·(H+λI)⁻¹∇E at
  the final weights, H the Hessian of the training objective: the mean training loss plus,
  for a run with weight decay, the L2 penalty ½ Σ D w² that the decay amounts to where the
  run settles (:meth:`influence.optimizers.Optimizer.decay_curvature`: D = λ(1−μ) for SGD
  with momentum μ, exact at a minimum; per weight from the final second moments for
  RMSprop and Adam, an approximation). Without D, a converged weight-decayed SGD run's
  effects were off by 90 % and changed sign; with it they equal ``unrolled``'s to 1e-15.
- tracin (Pruthi et al. 2020, TracInCP): checkpoints taken from the recorded run; each
  sample's visits between checkpoints are weighted by η_t c_i/|B_t|, the weight plain SGD
  gives the sample's gradient in the step, so removal_effect_i ≈ Σ_k ∇E(w_k)·∇ℓ_i(w_k)
  Σ_{visits} η_t c_i/|B_t|. For momentum, RMSprop and Adam runs this is still SGD's
  weighting (as in the paper): their steps are not η_t times the gradient, so the scale of
  the effect differs more from the run's (on one digits MLP the median |TracIn|/|unrolled|
  was 24 for SGD, 2.4 for momentum, 0.48 for Adam).
  This is the effect each visit has *at the time of the step*; it is not propagated
  through the later steps (no H_t terms), so as a prediction of the final change it is
  uncalibrated: on digits it overstates removal effects ~100× and correlates near 0
  with retraining (reports/benchmarks/data_debugging.md). Use it as a score.
- self_influence: Σ_k η̄_k ‖∇ℓ_i(w_k)‖² (TracIn self-influence), for mislabel detection
  without validation data.
- margin (area under the margin, Pleiss et al. 2020, "Identifying mislabeled data using the
  area under the margin ranking", NeurIPS): the mean over checkpoints of the assigned label's
  logit minus the largest other logit, taken after each checkpoint interval (one per epoch by
  default, the last at the final weights); score = −mean margin. Mislabeled samples keep a low
  or negative margin through training while the network learns their true class. No validation
  data; classification losses only.
- loss: per-sample training loss at the final weights (baseline).

Each method's work is in two parts: what every sample's score shares (the damping estimate and
the solve s = (H + λI)⁻¹∇E; the weights at the checkpoints, which a run without stored history
replays, and TracIn's ∇E(w_k) there) and the per-sample part (one forward-mode pass or one
per-sample gradient per sample and checkpoint). :func:`influence.rank.shared_part` computes the
shared part once as a :class:`Shared` of NumPy arrays, which pickles; the ``by_*`` functions take
it as ``shared=`` and then do only the per-sample part. :func:`influence.rank_in_processes` computes it in the
calling process and ships it to the processes that score the shards. Without it (``rank``),
each ``by_*`` function computes its shared part itself, one checkpoint at a time.
``unrolled`` has no per-sample part: one reverse pass yields every sample's effect.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from .. import _tree
from .._progress import progress_bar
from ..trajectory import Trajectory, _data_tensors
from ..unroll import unrolled
from ._samples import SampleOps
from .inverse_hvp import InverseHVP, relative_residual

# (score: higher = more harmful, removal_effect or None, extra facts for the table's attrs)
Scores = tuple[np.ndarray, np.ndarray | None, dict]


@dataclass(frozen=True)
class Shared:
    """The part of a method's scores that every sample shares, computed once (:func:`influence.rank.shared_part`).

    NumPy arrays and plain values only, so it pickles to the worker processes of
    :func:`influence.rank_in_processes`, which then score their shards without repeating it.

    Attributes:
        directions: the vectors each sample's gradient is dotted with, shaped like the weights:
            influence_function's s = (H + λI)⁻¹∇E (one), TracIn's ∇E(w_k) (one per checkpoint).
        weights: the weights at each checkpoint (TracIn, self-influence, margin) where the run
            has no stored history (a worker would replay the run to find them); None where the
            history holds them or the method reads only the final weights.
        extra: facts for the table's attrs (damping, solver, relative_residual, decay, checkpoints).
    """

    directions: list[list[np.ndarray]] = field(default_factory=list)
    weights: list[list[np.ndarray]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _numpy(tensors: list[tf.Tensor]) -> list[np.ndarray]:
    return [t.numpy() for t in tensors]


def val_gradient(ops: SampleOps, trajectory: Trajectory, w: list[tf.Tensor], x_val: np.ndarray, y_val: np.ndarray):
    """∇E(w) for the mean validation loss (the run's compiled :meth:`Program.validation`)."""
    xv = tf.constant(x_val, dtype=ops.dtype)
    yv = tf.constant(y_val, dtype=ops.dtype if trajectory.loss.continuous_labels else tf.int32)
    return trajectory.program().validation(w, xv, yv)[1]


def by_unrolled(trajectory, x, y, x_val, y_val, *, ops: SampleOps, progress: bool | None, **_) -> Scores:
    # One reverse pass yields every sample's effect; a shard just keeps its part. The ranking
    # needs no dE/dx_i, so the pass skips it (same removal effects, less time and memory).
    effect = unrolled(trajectory, x, y, x_val, y_val, progress=progress, input_grad=False)
    chosen = effect.removal_effect[ops.samples]
    return -chosen, chosen, {"strategy": effect.strategy}


def by_influence_function(
    trajectory,
    x,
    y,
    x_val,
    y_val,
    *,
    ops: SampleOps,
    solver: InverseHVP,
    damping: float | str,
    shared: Shared | None = None,
    **_,
) -> Scores:
    if shared is None:
        shared = share_influence_function(trajectory, x, y, x_val, y_val, ops=ops, solver=solver, damping=damping)
    w = ops.weights(trajectory.final_weights)
    (s,) = shared.directions
    effect = trajectory.sample_weight[ops.samples] * ops.gradient_dots(w, ops.weights(s)) / ops.n
    return -effect, effect, dict(shared.extra)


def share_influence_function(
    trajectory, x, y, x_val, y_val, *, ops: SampleOps, solver: InverseHVP, damping: float | str, **_
) -> Shared:
    """The damping, s = (H + λI)⁻¹∇E at the final weights and the facts about the solve."""
    w = ops.weights(trajectory.final_weights)
    lam = solver.auto_damping(ops, w) if damping == "auto" else float(damping)
    gradient = val_gradient(ops, trajectory, w, x_val, y_val)
    s = solver.solve(ops, w, gradient, lam)
    residual = relative_residual(ops, w, gradient, s, lam)
    if not residual <= 1:  # worse than s = 0, or not finite: the solve diverged
        raise FloatingPointError(
            f"rank: the {solver.name} solve of (H + {lam:.3g}·I) s = ∇E diverged (relative residual "
            f"‖(H + λI)s − ∇E‖/‖∇E‖ = {residual:.3g}, above that of s = 0): no influence score can be built "
            f"on it. {_RESIDUAL_HINTS.get(solver.name, _RESIDUAL_HINTS['exact'])}"
        )
    if residual > RESIDUAL_WARNING:
        warnings.warn(
            f"rank: the {solver.name} solve of (H + {lam:.3g}·I) s = ∇E is off by {residual:.1%} (relative "
            f"residual ‖(H + λI)s − ∇E‖/‖∇E‖): s is not converged, so the influence scores built on it are "
            f"off by an amount the residual does not bound (smaller or larger than it, depending on where the "
            f"error lies). "
            f"{_RESIDUAL_HINTS.get(solver.name, _RESIDUAL_HINTS['exact'])}",
            RuntimeWarning,
            stacklevel=4,  # the caller of rank (rank, by_influence_function, here) or of rank_in_processes
        )
    decay = ops.decay_curvature()
    mean_decay = 0.0 if decay is None else float(tf.reduce_mean(_tree.flatten(decay)))
    extra = {"damping": lam, "solver": solver.name, "relative_residual": residual, "decay": mean_decay}
    return Shared(directions=[_numpy(s)], extra=extra)


# A solve whose residual is above this gets a warning (CG's own tolerance is 1e-6, an exact solve's ~1e-12).
RESIDUAL_WARNING = 1e-2
_RESIDUAL_HINTS = {
    "cg": "CG stopped before its tolerance: raise ConjugateGradient(max_iterations=...) or the damping.",
    "lissa": "LiSSA's series is truncated or noisy: raise LiSSA(depth=..., repeats=..., batch_size=...) or the "
    "damping, or use solver='cg'.",
    "exact": "H + λI is close to singular: raise the damping.",
}


def checkpoint_steps(trajectory: Trajectory, every: int | None) -> list[int]:
    """Steps at which TracIn takes checkpoints; default one per epoch (epoch starts)."""
    if every is None:
        batch = max(len(b) for b in trajectory.batches)
        every = max(1, int(np.ceil(trajectory.n_train / batch)))
    return list(range(0, trajectory.steps, every))


def margin_steps(trajectory: Trajectory, every: int | None) -> list[int]:
    """Steps before which margins are taken: the end of each checkpoint interval, the last = T (final weights).

    The same intervals as TracIn's (:func:`checkpoint_steps`), read at their ends: the first
    margin comes after one interval of training (the initial weights say nothing about the
    labels) and the last at the final weights, so with one interval it is the final margin.
    """
    return [*checkpoint_steps(trajectory, every)[1:], trajectory.steps]


def weights_at(trajectory: Trajectory, x: np.ndarray, y: np.ndarray, steps: list[int]) -> Iterator[list[tf.Tensor]]:
    """Trainable weights before each of ``steps`` (increasing; T = ``trajectory.steps`` gives the final weights).

    From the stored history, or one forward replay as far as the last step below T. One
    checkpoint at a time: memory for one set of weights, however many checkpoints.
    """
    program = trajectory.program()
    dtype = program.fn.dtype
    inner = [t for t in steps if t < trajectory.steps]
    if trajectory.weights_history is not None:
        for t in inner:
            yield [tf.constant(h[t], dtype=dtype) for h in trajectory.weights_history]
    elif inner:
        x_t, y_t, c_t = _data_tensors(program, x, y, trajectory.sample_weight)
        for w, _ in program.iter_states_at(*trajectory.initial_tensors(), inner, x_t, y_t, c_t):
            yield w
    for _ in range(len(steps) - len(inner)):
        yield [tf.constant(v, dtype=dtype) for v in trajectory.final_weights]


def visit_weights(trajectory: Trajectory, steps: list[int]) -> Iterator[np.ndarray]:
    """For each checkpoint interval, (n,): Σ η_t/|B_t| over the visits of each sample in it."""
    bounds = [*steps, trajectory.steps]
    for k in range(len(steps)):
        weights = np.zeros(trajectory.n_train)
        for t in range(bounds[k], bounds[k + 1]):
            batch = trajectory.batches[t]
            np.add.at(weights, batch, trajectory.learning_rates[t] / len(batch))
        yield weights


def _checkpoint_weights(trajectory, x, y, steps: list[int], ops: SampleOps, shared: Shared | None):
    """:func:`weights_at`, or the shared part's weights where it carries them."""
    if shared is None or shared.weights is None:
        return weights_at(trajectory, x, y, steps)
    return (ops.weights(w) for w in shared.weights)


def share_checkpoints(
    trajectory, x, y, x_val=None, y_val=None, *, ops: SampleOps, steps: list[int], gradients: bool = False
) -> Shared:
    """The weights at ``steps`` where the run has no stored history (else None), with ∇E there if ``gradients``.

    Held all at once: (checkpoints × |w|) numbers, twice that for TracIn without history.
    """
    replayed = trajectory.weights_history is None and any(t < trajectory.steps for t in steps)
    weights, directions = [], []
    for w in progress_bar(
        weights_at(trajectory, x, y, steps),
        progress=ops.progress,
        desc="checkpoints",
        unit="checkpoint",
        total=len(steps),
        leave=False,
    ):
        if replayed:
            weights.append(_numpy(w))
        if gradients:
            directions.append(_numpy(val_gradient(ops, trajectory, w, x_val, y_val)))
    return Shared(directions=directions, weights=weights if replayed else None, extra={"checkpoints": len(steps)})


def by_tracin(
    trajectory,
    x,
    y,
    x_val,
    y_val,
    *,
    ops: SampleOps,
    checkpoint_every: int | None,
    shared: Shared | None = None,
    **_,
) -> Scores:
    steps = checkpoint_steps(trajectory, checkpoint_every)
    weights = _checkpoint_weights(trajectory, x, y, steps, ops, shared)
    if shared is None:
        checkpoints: Any = ((w, val_gradient(ops, trajectory, w, x_val, y_val)) for w in weights)
    else:
        checkpoints = ((w, ops.weights(g)) for w, g in zip(weights, shared.directions))
    effect = np.zeros(len(ops.samples))
    with ops.counting(len(steps), "TracIn"):
        for visits, (w, gradient) in zip(visit_weights(trajectory, steps), checkpoints):
            effect += visits[ops.samples] * ops.gradient_dots(w, gradient)
    weighted = effect * trajectory.sample_weight[ops.samples]
    return -weighted, weighted, {"checkpoints": len(steps)}


def by_self_influence(
    trajectory, x, y, *, ops: SampleOps, checkpoint_every: int | None, shared: Shared | None = None, **_
) -> Scores:
    steps = checkpoint_steps(trajectory, checkpoint_every)
    bounds = [*steps, trajectory.steps]
    score = np.zeros(len(ops.samples))
    with ops.counting(len(steps), "self-influence"):
        for k, w in enumerate(_checkpoint_weights(trajectory, x, y, steps, ops, shared)):
            rate = float(np.mean(trajectory.learning_rates[bounds[k] : bounds[k + 1]]))
            score += rate * ops.squared_gradient_norms(w)
    return score, None, {"checkpoints": len(steps)}


def by_margin(
    trajectory, x, y, *, ops: SampleOps, checkpoint_every: int | None, shared: Shared | None = None, **_
) -> Scores:
    steps = margin_steps(trajectory, checkpoint_every)
    total = np.zeros(len(ops.samples))
    with ops.counting(len(steps), "margin"):
        for w in _checkpoint_weights(trajectory, x, y, steps, ops, shared):
            total += ops.margins(w)
    return -total / len(steps), None, {"checkpoints": len(steps)}


def by_loss(trajectory, x, y, *, ops: SampleOps, **_) -> Scores:
    losses, _outputs = ops.losses_and_outputs(ops.weights(trajectory.final_weights))
    return losses, None, {}

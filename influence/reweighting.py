"""Learning training-sample weights through training (meta-learning of data).

:func:`learn_sample_weights` looks for per-sample weights c (the c_j of DESIGN §1)
that make the model *trained with them* better (``goal="repair"``) or worse
(``goal="poison"``) on validation data. Every outer step replays the recorded
schedule (same batches, learning rates, dropout seeds) with the current c, takes
dE/dc from the unrolled reverse pass — the derivative ``removal_effect`` is made
of — and lets an outer optimizer of :mod:`influence.optimizers` move c, which is
then projected onto a box (default [0, 1]: samples can be down-weighted or
dropped, not repeated).

Where ``removal_effect`` predicts single removals to first order at c = 1, the
learned weights follow the validation loss along a path: after each step the run
is retrained and the derivative taken again, so samples whose effects interact
(duplicates, clusters of mislabels) are handled as the run actually responds.
The weights fit the validation set they were learned on: judge them on data the
outer loop did not see. Two guards against fitting it: ``penalty=`` (default 0.1) pulls
every weight back towards its recorded value, so a weight moves only while its
hypergradient is worth the distance; ``holdout=`` keeps a split (given, or a fraction of
the validation data) out of the gradients, scores it after every outer step and returns
the weights of the best held-out step (``patience=`` stops the loop once it has not
improved for that many steps). In reports/benchmarks/reweighting.md (digits and breast
cancer, 10 % and 20 % flipped, data_debugging's split and four splits of their own) the
penalty lowered the mean test loss against none in all 8 cells (32 of 36 runs); a 30 %
holdout on top of it raised it in 6 of the 8, lowering it only on breast cancer's
data_debugging split: the samples it takes from E cost more than its early stop saves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from ._inputs import validate_validation_data
from ._progress import progress_bar
from ._summary import compact_repr
from ._validation import (
    check_choice,
    check_non_negative,
    check_positive,
    check_sample_indices,
    describe,
    is_real,
    param_error,
)
from .input_optimization import (
    GOALS,
    check_inside_bounds,
    evaluate_run,
    label_classes,
    optimizer_label,
    outer_optimizer_named,
)
from .trajectory import Trajectory, check_trajectory_data
from .unroll import unrolled

DEFAULT_PENALTY = 0.1  # λ of the pull towards the recorded weights (see learn_sample_weights)


@dataclass(frozen=True)
class SampleWeightLearning:
    """Result of :func:`learn_sample_weights`.

    Attributes:
        sample_weight: (n,) the learned weights (rows outside ``indices`` keep the recorded ones).
        history: (steps+1, n) the weights before each outer step and after the last.
        val_loss: (steps+1,) validation loss of the run retrained with ``history[k]``.
        val_error: (steps+1,) matching classification error (NaN for regression).
        seconds: (steps+1,) wall time elapsed at each entry of ``val_loss``.
        predicted_change: (steps,) first-order prediction of each step's change of
            validation loss, ⟨dE/dc, Δc⟩, to compare with ``np.diff(val_loss)``.
        optimizer: the outer optimizer's name.
        trajectory: the recorded run replayed with ``sample_weight`` (for
            :func:`influence.unrolled`, :func:`influence.rank`, or held-out evaluation
            with ``influence.validation_loss(res.trajectory, res.trajectory.final_weights, x_test, y_test)``).
        holdout_loss: (steps_run+1,) loss on the held-out data at each entry of ``history``;
            None without ``holdout``.
        holdout_error: (steps_run+1,) matching classification error; None without ``holdout``.
        best_step: the entry of ``history`` that ``sample_weight`` is: the lowest held-out loss
            (highest for ``"poison"``), or the last entry without ``holdout``.
        stopped_early: True when ``patience`` ended the loop before ``steps`` (then ``history``
            and the arrays have fewer than steps+1 entries).
    """

    sample_weight: np.ndarray
    history: np.ndarray
    val_loss: np.ndarray
    val_error: np.ndarray
    seconds: np.ndarray
    predicted_change: np.ndarray
    optimizer: str
    trajectory: Trajectory
    holdout_loss: np.ndarray | None = None
    holdout_error: np.ndarray | None = None
    best_step: int = -1
    stopped_early: bool = False

    def __repr__(self) -> str:  # arrays as shape and dtype, not every number
        return compact_repr(self)


def learn_sample_weights(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    *,
    indices: Any = None,
    goal: str = "repair",
    outer_optimizer: Any = None,
    steps: int = 30,
    bounds: tuple[float, float] = (0.0, 1.0),
    holdout: Any = None,
    patience: int | None = None,
    penalty: float = DEFAULT_PENALTY,
    progress: bool | None = None,
) -> SampleWeightLearning:
    """Learn per-sample training weights by descending the validation loss through the recorded run.

    Args:
        trajectory: from :func:`influence.fit`; its schedule is replayed at every outer step.
        x_train, y_train: the training data it was recorded on.
        x_val, y_val: validation data defining E.
        indices: the samples whose weights are learned (int array); None (default) for all,
            samples of recorded weight 0 included (they start at 0 and may be brought back).
        goal: ``"repair"`` lowers E, ``"poison"`` raises it.
        outer_optimizer: :mod:`influence.optimizers` instance, or a name as for
            :func:`influence.fit`; default ``Adam(0.1)``. Adam and RMSprop move every
            weight by about their rate per step, whatever the size of its
            hypergradient: a sample with a tiny, steady dE/dc_i travels as far as a
            mislabelled one. Plain SGD moves weights in proportion to dE/dc_i (whose
            size is that of ``removal_effect``, ~1e-3 on digits), so it needs a step
            size of ~10–100.
        steps: outer steps (each: one retraining + one unrolled pass). Default 30: with
            ``Adam(0.1)`` the test loss in reports/benchmarks/reweighting.md has levelled
            off by then (10 steps stop short of it).
        bounds: (low, high) box the weights are projected onto after each step, 0 ≤ low < high;
            the recorded weights of ``indices`` must lie inside it. Default (0, 1): samples
            can be down-weighted or dropped, not up-weighted.
        holdout: data the weights are *selected* on but not learned from: an ``(x, y)`` pair
            shaped like the validation data, or a fraction in (0, 1) of the validation samples
            (a fixed random split, stratified by class for classification losses; the rest
            defines E). Scored after every outer step (one forward pass); the weights of the
            best step are returned. None (default): the last step's weights, every
            validation sample in E.
        patience: with ``holdout``, stop once the held-out loss has not improved for this many
            outer steps (each costs a retraining and an unrolled pass). None: run all ``steps``.
        penalty: λ ≥ 0 of a pull towards the recorded weights c⁰: the outer optimizer
            descends ``sign·E + λ/2 · mean_i (c_i − c⁰_i)²`` over the learned samples, so a
            weight moves only while its hypergradient outweighs λ times its distance from
            c⁰ over the number of learned samples. λ is in units of E: at 0.1, dropping
            every learned sample (c⁰ = 1 → 0) would cost 0.05, dropping 10 % of them 0.005,
            so rescale it with losses far from ~0.1–1. Unlike ``holdout`` it keeps every
            validation sample in E. ``val_loss`` and ``predicted_change`` stay
            about E alone. Default 0.1: in reports/benchmarks/reweighting.md it lowered the
            mean test loss against λ = 0 in all 8 (data set, noise, split) cells; 0 turns it off.
        progress: a bar over the outer steps: ``None`` (default) once they have run 2 s,
            ``True`` at once, ``False`` never.

    Returns:
        :class:`SampleWeightLearning`; the lowest learned weights are the samples the
        validation loss is best without (for ``"repair"``), a ranking that accounts for
        the other weights' changes. Low weights are not only mislabels: on digits with
        10 % flipped labels about 60 clean samples also fall below 0.5 (hard ones, 14–17 %
        misclassified against 3 %). Whether removing them helps on unseen data depends on
        the split: on top of the flipped samples it lowered the test loss in 5 of 5 runs on
        one digits split and 2 of 4 on others, and fitted only the validation split on one
        breast-cancer split (113 validation samples) (reports/benchmarks/reweighting.md).

    Raises:
        ValueError: bad ``goal``, ``steps``, ``bounds``, ``indices``, ``holdout``, ``penalty``
            or ``patience`` (which needs ``holdout``), or recorded weights outside ``bounds``.
    """
    func = "learn_sample_weights"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    xv, yv = validate_validation_data(func, trajectory.model, trajectory.loss, x, y, x_val, y_val)
    check_choice(goal, GOALS, param="goal", func=func)
    opt = outer_optimizer_named(outer_optimizer, func)
    check_positive(steps, param="steps", func=func, kind=int)
    low, high = _check_bounds(bounds, func)
    idx = (
        np.arange(trajectory.n_train)
        if indices is None
        else check_sample_indices(indices, trajectory.n_train, func=func)
    )
    xv, yv, held_out = _split_holdout(holdout, xv, yv, trajectory, x, y, func)
    if patience is not None:
        if held_out is None:
            raise ValueError(param_error("patience", func, "None unless holdout is given", describe(patience)))
        check_positive(patience, param="patience", func=func, kind=int)
    check_non_negative(penalty, param="penalty", func=func)
    c = np.array(trajectory.sample_weight, dtype=np.float64)
    recorded = c[idx].copy()  # c⁰, where the penalty pulls back to
    check_inside_bounds(
        c[idx], (low, high), func, what="the recorded weights of the learned samples", remedy="pass a wider range"
    )
    sign = 1.0 if goal == "repair" else -1.0  # the outer optimizer minimises sign·E

    state = opt.init([tf.constant(c[idx])])
    rates = opt.learning_rates(int(steps))
    history, losses, errors, times, predicted = [], [], [], [], []
    held_losses, held_errors = [], []
    best_step, best_run, stopped_early = 0, trajectory, False
    start = time.perf_counter()
    for step in progress_bar(
        range(int(steps) + 1), progress=progress, desc=f"learning sample weights ({goal})", unit="step"
    ):
        run = trajectory.replayed_on(x, y, sample_weight=c)
        loss, error = evaluate_run(run, run.final_weights, xv, yv, func)
        history.append(c)
        losses.append(loss)
        errors.append(error)
        times.append(time.perf_counter() - start)
        if held_out is None:
            best_step, best_run = step, run
        else:
            held_loss, held_error = evaluate_run(run, run.final_weights, *held_out, func)
            held_losses.append(held_loss)
            held_errors.append(held_error)
            if step == 0 or sign * held_loss < sign * held_losses[best_step]:
                best_step, best_run = step, run
            if patience is not None and step - best_step >= patience:
                stopped_early = step < int(steps)
                break
        if step == int(steps):
            break
        grad = unrolled(run, x, y, xv, yv, progress=False, input_grad=False).sample_weight_grad[idx].astype(np.float64)
        # Gradient of sign·E + λ/2·mean((c − c⁰)²) over the learned samples.
        objective_grad = sign * grad + float(penalty) * (c[idx] - recorded) / len(idx)
        stepped, state = opt.update(
            [tf.constant(c[idx])],
            [tf.constant(objective_grad)],
            state,
            tf.constant(rates[step], tf.float64),
            tf.constant(step),
        )
        c_new = c.copy()  # a new array: history keeps the old one
        c_new[idx] = np.clip(stepped[0].numpy(), low, high)
        predicted.append(float(np.dot(grad, c_new[idx] - c[idx])))
        c = c_new
    return SampleWeightLearning(
        sample_weight=history[best_step],
        history=np.asarray(history),
        val_loss=np.asarray(losses),
        val_error=np.asarray(errors),
        seconds=np.asarray(times),
        predicted_change=np.asarray(predicted),
        optimizer=optimizer_label(opt),
        trajectory=best_run,
        holdout_loss=None if held_out is None else np.asarray(held_losses),
        holdout_error=None if held_out is None else np.asarray(held_errors),
        best_step=best_step,
        stopped_early=stopped_early,
    )


def _split_holdout(
    holdout: Any, xv: np.ndarray, yv: np.ndarray, trajectory: Trajectory, x: np.ndarray, y: np.ndarray, func: str
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(x_val, y_val) that define E, and the held-out (x, y) or None.

    A fraction takes a fixed random subset of the validation samples (seed 0, so a rerun
    selects on the same split), stratified by class for classification losses so that a
    small validation set does not lose a class to one side; both parts must keep at least
    one sample.
    """
    if holdout is None:
        return xv, yv, None
    if is_real(holdout) and not isinstance(holdout, bool):
        if not 0 < holdout < 1:
            raise ValueError(param_error("holdout", func, "a fraction in (0, 1) or an (x, y) pair", describe(holdout)))
        n_held = int(round(float(holdout) * len(xv)))
        if not 1 <= n_held < len(xv):
            raise ValueError(
                f"{func}: holdout={holdout} of {len(xv)} validation samples leaves "
                f"{n_held} held out and {len(xv) - n_held} to learn from; both need at least one — "
                "pass another fraction or an (x, y) pair"
            )
        classes = label_classes(trajectory.loss, yv)  # None: regression, one stratum
        held = _stratified_choice(np.zeros(len(yv), np.int64) if classes is None else classes, n_held)
        kept = np.setdiff1d(np.arange(len(xv)), held)
        return xv[kept], yv[kept], (xv[held], yv[held])
    if not (isinstance(holdout, (tuple, list)) and len(holdout) == 2):
        raise ValueError(param_error("holdout", func, "a fraction in (0, 1) or an (x, y) pair", describe(holdout)))
    given = validate_validation_data(
        func, trajectory.model, trajectory.loss, x, y, holdout[0], holdout[1], names=("holdout[0]", "holdout[1]")
    )
    return xv, yv, given


def _stratified_choice(classes: np.ndarray, count: int) -> np.ndarray:
    """``count`` sorted indices drawn at random (seed 0) with each class in proportion.

    Class k gets floor(count·n_k/n) indices, and the samples left over go to the classes
    with the largest remainders (Hamilton's method), so the total is exactly ``count``.
    """
    rng = np.random.default_rng(0)
    _, inverse, sizes = np.unique(classes, return_inverse=True, return_counts=True)
    quotas = count * sizes / len(classes)
    taken = np.floor(quotas).astype(int)
    by_remainder = np.argsort(-(quotas - taken), kind="stable")
    taken[by_remainder[: count - taken.sum()]] += 1
    chosen = [rng.permutation(np.flatnonzero(inverse == k))[: taken[k]] for k in range(len(sizes))]
    return np.sort(np.concatenate(chosen))


def _check_bounds(bounds: Any, func: str) -> tuple[float, float]:
    """(low, high) with 0 ≤ low < high: a negative weight would ascend its sample's loss."""
    pair = isinstance(bounds, (tuple, list)) or (isinstance(bounds, np.ndarray) and bounds.ndim == 1)
    ok = pair and len(bounds) == 2 and all(is_real(b) and np.isfinite(b) for b in bounds)
    if not ok or not 0 <= bounds[0] < bounds[1]:
        raise ValueError(param_error("bounds", func, "a (low, high) pair with 0 ≤ low < high", describe(bounds)))
    return float(bounds[0]), float(bounds[1])

"""``rank``: training samples ordered from most harmful to most helpful (scenario S6)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._inputs import validate_validation_data
from ._methods import METHODS, NEEDS_VALIDATION
from ._validation import as_array, check_choice, check_distinct, describe, index_group, is_real, param_error
from .losses import MARGIN_LOSSES, REGRESSION_LOSSES, Loss
from .rankers import methods
from .rankers._samples import SampleOps
from .rankers.inverse_hvp import InverseHVP, get_solver
from .trajectory import Trajectory, check_trajectory_data


def rank(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any = None,
    y_val: Any = None,
    *,
    method: str = "unrolled",
    solver: str | InverseHVP = "auto",
    damping: float | str = "auto",
    checkpoint_every: int | None = None,
    progress: bool | None = None,
    samples: Any = None,
    shared: methods.Shared | None = None,
) -> pd.DataFrame:
    """Rank training samples, most harmful first.

    Args:
        trajectory: from :func:`influence.fit`.
        x_train, y_train: the data the trajectory was recorded on.
        x_val, y_val: validation data (required except for ``self_influence``, ``margin`` and ``loss``).
        method: ``"unrolled"`` (exact removal effect through the recorded run),
            ``"influence_function"``, ``"tracin"``, ``"self_influence"``, ``"margin"``
            (area under the margin over the run's checkpoints, for mislabel detection;
            classification losses) or ``"loss"``.
        solver: inverse-Hessian solver for ``influence_function``: ``"exact"``,
            ``"cg"``, ``"lissa"``, an :class:`~influence.rankers.inverse_hvp.InverseHVP`,
            or ``"auto"`` (exact up to 1000 parameters, else CG).
        damping: λ added to the Hessian (which includes weight decay's curvature) for
            ``influence_function``; ``"auto"``
            shifts by the estimated most negative eigenvalue (non-convex nets)
            and keeps the condition number ≤ 100 (recorded in ``attrs["damping"]``).
        checkpoint_every: steps between TracIn / self-influence / margin checkpoints
            (default: one per epoch).
        progress: progress bars on long stages: ``None`` (default) once a stage has run 2 s,
            ``True`` at once, ``False`` never.
        samples: score only these training indices (a shard; see
            :func:`influence.rank_in_processes`). Default: all.
        shared: the method's shared part, from :func:`shared_part` on the same run, data
            and settings, used rather than computed (the workers of
            :func:`influence.rank_in_processes`). Default: computed here.

    Returns:
        DataFrame, one row per training sample, most harmful first, with columns
        ``index`` (row in x_train), ``rank`` (0 = most harmful), ``score``
        (higher = more harmful), ``removal_effect`` (predicted change of
        validation loss if the sample is removed; negative = harmful; NaN for
        methods without one; TracIn's is the uncalibrated at-visit effect, see
        :mod:`influence.rankers.methods`), ``label``, ``predicted_label`` (the model's
        output for regression losses, NaN for callable losses), ``train_loss`` (at the
        final weights) and ``in_run`` (False for samples of weight c_i = 0, which the run
        did not train on: they are listed after all others, see :func:`order_by_harm`). ``attrs`` holds
        ``method``, ``seconds``, ``val_loss`` and ``outside_run`` (how many
        samples have ``in_run`` False); for ``influence_function`` also ``damping``,
        ``solver``, ``relative_residual`` (‖(H + λI)s − ∇E‖/‖∇E‖ of the solve,
        measured with one more Hessian-vector product; above 1 % it warns) and ``decay``
        (the mean of D, the curvature the optimizer's weight decay adds to H; 0 without
        decay; see :mod:`influence.rankers.methods`).
    """
    func = "rank"
    x, y, xv, yv, checkpoint_every = check_rank_arguments(
        trajectory,
        x_train,
        y_train,
        x_val,
        y_val,
        method=method,
        solver=solver,
        damping=damping,
        checkpoint_every=checkpoint_every,
    )

    chosen = np.arange(len(x))
    if samples is not None:
        chosen = as_array(samples, param="samples", func=func)
        valid = chosen.ndim == 1 and np.issubdtype(chosen.dtype, np.integer)
        if not valid or chosen.min() < 0 or chosen.max() >= len(x):
            raise ValueError(param_error("samples", func, f"training indices in [0, {len(x) - 1}]", describe(samples)))
        check_distinct(chosen, param="samples", func=func, expected="distinct training indices", given=samples)

    start = time.perf_counter()
    ops = SampleOps(trajectory, x, y, progress=progress, samples=chosen)
    compute: Any = {
        "unrolled": methods.by_unrolled,
        "influence_function": methods.by_influence_function,
        "tracin": methods.by_tracin,
        "self_influence": methods.by_self_influence,
        "margin": methods.by_margin,
        "loss": methods.by_loss,
    }[method]
    kwargs: dict[str, Any] = {"ops": ops, "checkpoint_every": checkpoint_every, "progress": progress}
    if method == "influence_function":
        kwargs.update(solver=_solver(trajectory, solver), damping=damping)
    if shared is not None:
        kwargs.update(shared=shared)
    args = (trajectory, x, y, xv, yv) if method in NEEDS_VALIDATION else (trajectory, x, y)
    score, effect, extra = compute(*args, **kwargs)
    if not np.all(np.isfinite(score)):
        raise FloatingPointError(f"rank: method '{method}' produced non-finite scores; check damping and the run.")
    if len(score) > 1 and np.all(score == score[0]):
        warnings.warn(
            f"rank: all {len(score)} '{method}' scores are equal ({float(score[0]):g}): the order is the sample "
            "index and ranks nothing. A run whose outputs saturate (probabilities clipped at 0 or 1, so every "
            "gradient is 0: lower the learning rate) or that did not train gives this.",
            RuntimeWarning,
            stacklevel=2,
        )
    seconds = time.perf_counter() - start

    losses, outputs = ops.losses_and_outputs(ops.weights(trajectory.final_weights))
    table = pd.DataFrame(
        {
            "index": chosen,
            # float64 for every method (a float32 model's unrolled scores came as float32, the others not)
            "score": np.asarray(score, dtype=np.float64),
            "removal_effect": np.full(len(chosen), np.nan) if effect is None else np.asarray(effect, np.float64),
            "label": _label_column(y[chosen]),
            "predicted_label": _predicted_labels(trajectory, outputs),
            "train_loss": losses,
            "in_run": trajectory.sample_weight[chosen] != 0,
        }
    )
    table = order_by_harm(table)
    val_loss = float("nan")
    if xv is not None:
        from .verify import validation_loss

        val_loss = validation_loss(trajectory, trajectory.final_weights, xv, yv)
    table.attrs.update(method=method, seconds=seconds, val_loss=val_loss, **extra)
    return table


def shared_part(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any = None,
    y_val: Any = None,
    *,
    method: str,
    solver: str | InverseHVP = "auto",
    damping: float | str = "auto",
    checkpoint_every: int | None = None,
    progress: bool | None = None,
) -> methods.Shared | None:
    """The part of ``method``'s scores that every sample shares (:class:`~influence.rankers.methods.Shared`),
    computed once for :func:`rank`'s ``shared``; None where the method has none worth shipping.

    influence_function: the damping and s = (H + λI)⁻¹∇E; tracin: ∇E at each checkpoint (and the
    checkpoint weights where the run has no stored history); self_influence and margin: the
    checkpoint weights where the run has no stored history.
    """
    x, y, xv, yv, checkpoint_every = check_rank_arguments(
        trajectory,
        x_train,
        y_train,
        x_val,
        y_val,
        method=method,
        solver=solver,
        damping=damping,
        checkpoint_every=checkpoint_every,
    )
    ops = SampleOps(trajectory, x, y, progress=progress, samples=np.arange(0))  # no per-sample work here
    # Called here, not through a dispatcher: the solve's residual warning names the caller of
    # rank_in_processes from the same depth as the caller of rank.
    if method == "influence_function":
        return methods.share_influence_function(
            trajectory, x, y, xv, yv, ops=ops, solver=_solver(trajectory, solver), damping=damping
        )
    if method == "tracin":
        steps = methods.checkpoint_steps(trajectory, checkpoint_every)
        return methods.share_checkpoints(trajectory, x, y, xv, yv, ops=ops, steps=steps, gradients=True)
    if method in ("self_influence", "margin"):
        steps_of = methods.checkpoint_steps if method == "self_influence" else methods.margin_steps
        shared = methods.share_checkpoints(trajectory, x, y, ops=ops, steps=steps_of(trajectory, checkpoint_every))
        return None if shared.weights is None else shared  # the run's own history holds them
    return None  # loss: final weights only; unrolled: nothing per sample to split


def _solver(trajectory: Trajectory, solver: str | InverseHVP) -> InverseHVP:
    if isinstance(solver, str) and solver == "auto":
        solver = "exact" if sum(w.size for w in trajectory.final_weights) <= 1000 else "cg"
    return get_solver(solver)


def check_rank_arguments(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    *,
    method: str,
    solver: str | InverseHVP = "auto",
    damping: float | str = "auto",
    checkpoint_every: int | None = None,
    func: str = "rank",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, int | None]:
    """What :func:`rank` refuses, checked before any work; returns ``(x, y, x_val, y_val, checkpoint_every)``
    as rank uses them (validation data None where the method takes none).

    :func:`influence.rank_in_processes` calls it once, under its own name, before starting workers.
    """
    check_choice(method, METHODS, param="method", func=func)
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    if method == "margin":
        check_margin_loss(trajectory.loss, trajectory.model, func)
    xv = yv = None
    if method in NEEDS_VALIDATION or x_val is not None:
        if x_val is None or y_val is None:
            missing = "x_val" if x_val is None else "y_val"  # the one missing, not always x_val
            raise ValueError(param_error(missing, func, f"validation data for method '{method}'", "None"))
        xv, yv = validate_validation_data(func, trajectory.model, trajectory.loss, x, y, x_val, y_val)
    auto_damping = isinstance(damping, str) and damping == "auto"
    if not auto_damping and not (is_real(damping) and 0 <= float(damping) < np.inf):  # NumPy scalars too
        raise ValueError(param_error("damping", func, "'auto' or a finite number ≥ 0", describe(damping)))
    if method != "influence_function":  # given for another method, they would be ignored without a word
        for param, value in (("solver", solver), ("damping", damping)):
            if not (isinstance(value, str) and value == "auto"):
                expected = f"left at 'auto' for method '{method}' (it sets influence_function's inverse-Hessian solve)"
                raise ValueError(param_error(param, func, expected, describe(value)))
    elif not (isinstance(solver, str) and solver == "auto"):
        get_solver(solver)  # refuses unknown names
    if checkpoint_every is not None:
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, (int, np.integer))
            or checkpoint_every < 1
        ):
            raise ValueError(
                param_error("checkpoint_every", func, "a positive int or None", describe(checkpoint_every))
            )
        checkpoint_every = int(checkpoint_every)  # np.int64 (from an array of settings) too
    return x, y, xv, yv, checkpoint_every


def _label_column(labels: np.ndarray) -> Any:
    """One label per row: scalars for (n,) and (n, 1) labels (Keras's usual binary shape), arrays otherwise."""
    if labels.ndim > 1 and int(np.prod(labels.shape[1:])) == 1:
        return labels.reshape(len(labels))
    return list(labels) if labels.ndim > 1 else labels


def order_by_harm(table: pd.DataFrame) -> pd.DataFrame:
    """Rows most harmful first (``score`` descending, ties in row order), then a fresh ``rank`` column.

    Samples outside the run (``in_run`` False: weight c_i = 0) come after every other
    sample: they did not shape the model, so they have no harm to rank, and the score-only
    methods would otherwise put them first (their loss is a held-out loss, higher than a
    trained sample's), showing a user the very samples they had already dropped.
    """
    table = table.drop(columns="rank", errors="ignore")
    order = np.lexsort((-table["score"].to_numpy(), ~table["in_run"].to_numpy(dtype=bool)))  # stable
    table = table.iloc[order].reset_index(drop=True)
    table.insert(1, "rank", np.arange(len(table)))
    table.attrs["outside_run"] = int((~table["in_run"]).sum())
    return table


def check_margin_loss(loss: Loss, model: Any, func: str) -> None:
    """A margin needs class scores: a cross-entropy loss, and one sigmoid output for binary cross-entropy.

    Reads only the loss and the model, so a command can check it before training.
    """
    single_output = int(np.prod(model.output_shape[1:])) == 1
    if loss.name not in MARGIN_LOSSES or (loss.name == "binary_crossentropy" and not single_output):
        raise ValueError(
            param_error(
                "method",
                func,
                f"a method other than 'margin' for loss '{loss.name}' ('margin' needs class scores: loss "
                "'sparse_categorical_crossentropy', 'categorical_crossentropy', or 'binary_crossentropy' "
                "with one output)",
                "'margin'",
            )
        )


def _predicted_labels(trajectory: Trajectory, outputs: np.ndarray) -> np.ndarray:
    if trajectory.loss.integer_labels or trajectory.loss.name == "categorical_crossentropy":
        return np.argmax(outputs, axis=-1)
    if trajectory.loss.name == "binary_crossentropy" and outputs.ndim == 2 and outputs.shape[1] == 1:
        # A logit of 0 is a probability of 0.5: logits are cut at 0, probabilities at 0.5.
        return (outputs[:, 0] > (0.0 if trajectory.loss.from_logits else 0.5)).astype(int)
    if trajectory.loss.name in REGRESSION_LOSSES:  # the prediction itself, laid out as the label column
        return _label_column(outputs.astype(np.float64))
    return np.full(len(outputs), np.nan)


def effects_by_sample(value: Any, *, param: str, func: str) -> dict[int, float] | np.ndarray:
    """Removal effects keyed by sample: a rank table's by its ``index`` column (a dict), an
    :class:`~influence.UnrolledResult`'s or an (n,) array's by position.

    A column taken out of a rank table (``table["removal_effect"]``) is refused: the table is
    sorted most harmful first, so its positions are ranks, not samples (it was read as if they were).
    """
    if isinstance(value, pd.DataFrame):
        if not {"index", "removal_effect"} <= set(value.columns):
            raise ValueError(param_error(param, func, "a rank table", "a DataFrame without them"))
        return dict(zip(value["index"].astype(np.int64).tolist(), value["removal_effect"].astype(np.float64)))
    if isinstance(value, pd.Series):
        raise ValueError(
            param_error(
                param,
                func,
                "the rank table itself, an UnrolledResult or an (n,) array in sample order",
                "a pandas Series (a column of a rank table is in ranking order, most harmful first; "
                "its positions are not sample indices)",
            )
        )
    if hasattr(value, "removal_effect"):  # an UnrolledResult
        return np.asarray(value.removal_effect)
    effect = as_array(value, param=param, func=func)
    if effect.ndim != 1:
        raise ValueError(param_error(param, func, "an (n,) array of removal effects", f"shape {effect.shape}"))
    return effect


def predicted_group_effect(table_or_effect: Any, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """First-order effect of removing each group: the sum of its members' removal effects.

    ``table_or_effect`` is a :func:`rank` table (with ``removal_effect``; its ``index``
    column names the samples, so a shard's or a filtered table works for the samples it
    holds), an :class:`~influence.UnrolledResult` or the (n,) removal-effect array. Groups
    are lists of distinct sample indices. Verify with :func:`influence.actual_removal_effect`
    on the same groups.

    The sum ignores how removals interact. Samples that pull the model the same way (e.g.
    mislabeled digits sharing one wrong class) overshoot it: removing one makes the next
    matter less. On a digits MLP, the 10 most harmful samples were predicted at −0.169 and
    changed the validation loss by −0.050 (examples/s6_ranking.py). To choose a set to
    remove, :func:`influence.greedy_removal` re-differentiates after each removal.
    """
    func = "predicted_group_effect"
    found = effects_by_sample(table_or_effect, param="table_or_effect", func=func)
    if isinstance(found, dict):
        effect_of, known = found, f"indices of the table's 'index' column ({len(found)} samples)"
    else:
        effect_of, known = dict(enumerate(found)), f"indices in [0, {len(found) - 1}]"
    if any(np.isnan(v) for v in effect_of.values()):
        raise ValueError(
            param_error(
                "table_or_effect", func, "a table with removal effects", "a table without them (self_influence or loss)"
            )
        )
    if not isinstance(groups, (list, tuple, np.ndarray)):
        raise ValueError(param_error("groups", func, "a list of index lists", describe(groups)))
    out = []
    for g in groups:
        idx = index_group(g)
        if idx is None or any(int(i) not in effect_of for i in idx):
            raise ValueError(param_error("groups", func, known, describe(g)))
        check_distinct(idx, param="groups", func=func, expected="distinct sample indices in each group", given=g)
        out.append(float(sum(effect_of[int(i)] for i in idx)))
    return np.asarray(out)

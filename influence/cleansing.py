"""``greedy_removal``: choose samples to remove, re-linearising the run after each round.

The removal effects of :func:`influence.unrolled` are first-order: summing them
predicts a group's effect well while the group is small, but a sample's effect
changes once others are gone (two copies of one mislabel each look half as
harmful as either alone). Removing ``per_round`` samples at a time, retraining
the recorded run without everything removed so far (c_i = 0, DESIGN §1) and
differentiating again follows those interactions. Every round retrains anyway,
so each row also carries the *actual* validation loss after its round: the
choice is verified as it is made.

Cost: ⌈k / per_round⌉ × (one replay of the run + one reverse pass without
input gradients); compiled programs are shared, so only the first round traces.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import pandas as pd

from ._inputs import validate_validation_data
from ._progress import progress_bar
from ._validation import check_positive, describe, param_error
from .trajectory import Trajectory, check_trajectory_data, retrain
from .unroll import unrolled
from .verify import retrained_val_loss, validation_loss


def greedy_removal(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    k: int,
    *,
    per_round: int = 1,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Pick ``k`` training samples to remove, most harmful first, re-differentiating between rounds.

    Args:
        trajectory: from :func:`influence.fit`.
        x_train, y_train: the data the trajectory was recorded on, (n, ...) and (n, ...).
        x_val, y_val: validation data; E = mean validation loss of the final model.
        k: how many samples to remove (1 ≤ k < n).
        per_round: samples removed per round before retraining and differentiating
            again; ``per_round = k`` is the one-shot top-k of ``rank(method="unrolled")``.
        progress: a progress bar over rounds: ``None`` (default) once the rounds have run 2 s,
            ``True`` at once, ``False`` never.

    Returns:
        A DataFrame with one row per removed sample, in the order chosen:
        ``index``; ``round`` (0-based); ``label``; ``predicted_effect``, its
        removal effect when chosen (given the earlier removals; negative =
        harmful); ``predicted_round_effect``, the sum over its round;
        ``val_loss_after_round``, the validation loss of the run retrained without
        every sample removed up to and including its round (actual, not
        predicted). ``attrs`` holds ``val_loss_before`` (the replayed run with
        nothing removed) and ``seconds``.
    """
    func = "greedy_removal"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    xv, yv = validate_validation_data(func, trajectory.model, trajectory.loss, x, y, x_val, y_val)
    check_positive(k, param="k", func=func, kind=int)
    check_positive(per_round, param="per_round", func=func, kind=int)
    weights = np.asarray(trajectory.sample_weight, dtype=np.float64).copy()
    removable = weights > 0  # samples with weight 0 are already out of the run
    if k >= removable.sum():
        raise ValueError(
            param_error(
                "k",
                func,
                f"fewer than the {int(removable.sum())} training samples in the run (sample weight > 0)",
                describe(k),
            )
        )

    start = time.perf_counter()
    current = trajectory
    before = retrained_val_loss(trajectory, x, y, xv, yv)
    rows: list[dict[str, Any]] = []
    rounds = math.ceil(k / per_round)
    for round_ in progress_bar(range(rounds), progress=progress, desc="greedy removal", unit="round"):
        effect = unrolled(current, x, y, xv, yv, progress=False, input_grad=False).removal_effect
        candidates = np.flatnonzero(removable)
        take = min(per_round, k - len(rows), len(candidates))
        chosen = candidates[np.argsort(effect[candidates], kind="stable")[:take]]
        weights[chosen] = 0.0
        removable[chosen] = False
        final = retrain(trajectory, x, y, sample_weight=weights)
        after = validation_loss(trajectory, final, xv, yv)
        for i in chosen:
            rows.append(
                {
                    "index": int(i),
                    "round": round_,
                    "label": y[i],
                    "predicted_effect": float(effect[i]),
                    "predicted_round_effect": float(effect[chosen].sum()),
                    "val_loss_after_round": after,
                }
            )
        # The next round differentiates the run without everything removed so far.
        current = dataclasses.replace(
            trajectory, sample_weight=weights.copy(), final_weights=final, weights_history=None, state_history=None
        )
    table = pd.DataFrame(rows)
    table.attrs.update({"val_loss_before": before, "seconds": time.perf_counter() - start, "per_round": per_round})
    return table

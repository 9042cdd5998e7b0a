"""The statistics the benchmark reports rest on: agreement with leave-one-out retraining
(benchmarks/loo_fidelity.py) and the paired comparison behind data_debugging's cleansing advice."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import data_debugging as dd  # noqa: E402
import loo_fidelity  # noqa: E402
import unrolled as unrolled_benchmark  # noqa: E402


def test_agreement_of_a_perfect_and_of_a_reversed_prediction():
    actual = np.random.default_rng(0).normal(size=200)
    perfect = loo_fidelity.agreement(2.0 * actual + 1.0, actual)
    assert perfect == pytest.approx({"pearson": 1.0, "spearman": 1.0, "kendall": 1.0, "top_overlap": 1.0})
    reversed_ = loo_fidelity.agreement(-actual, actual)
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["top_overlap"] == 0.0


def test_top_overlap_counts_the_most_negative_changes():
    actual = np.arange(100, dtype=float)  # samples 0–4 are the 5 % whose removal helps most
    predicted = actual.copy()
    predicted[[3, 4]] = 50.0  # two of them predicted as harmless
    predicted[[60, 61]] = -1.0  # two others predicted as most helpful
    assert loo_fidelity.agreement(predicted, actual)["top_overlap"] == pytest.approx(3 / 5)


def cleansing_run(changes: dict[str, dict[int, float]]) -> dict:
    """A data_debugging run whose test loss after removing the top-k changes by ``changes[method][k]``."""
    return {
        "no_removal": {"test_loss": 1.0},
        "methods": {m: {"cleansing": {str(k): {"test_loss": 1.0 + changes[m][k]} for k in dd.KS}} for m in dd.METHODS},
    }


def test_best_per_budget_group_separates_a_steady_lead_from_a_tie():
    rng = np.random.default_rng(1)
    runs = []
    for i in range(12):
        changes = {m: {k: 0.0 for k in dd.KS} for m in dd.METHODS}
        for k in (10, 20):  # unrolled lower than influence_function by 0.01 in every run, others far behind
            changes["unrolled"][k] = -0.05 + 0.002 * rng.normal()
            changes["influence_function"][k] = changes["unrolled"][k] + 0.01
        for k in (50, 100):  # margin and tracin trade places run by run: a tie
            changes["margin"][k] = -0.10 + (0.02 if i % 2 else -0.02)
            changes["tracin"][k] = -0.10 + (-0.02 if i % 2 else 0.02)
        runs.append(cleansing_run(changes))
    groups = dd.best_per_budget_group(runs, dd.KS)
    small, large = groups["k ≤ 20"], groups["k ≥ 50"]
    assert (small["best"], small["runner_up"]) == ("unrolled", "influence_function")
    assert small["paired_difference"] == pytest.approx(-0.01)
    assert small["separated"] and small["best_lower_in_runs"] == 12
    assert {large["best"], large["runner_up"]} == {"margin", "tracin"}
    assert abs(large["paired_difference"]) < 1e-12 and not large["separated"]
    assert large["best_lower_in_runs"] == 6
    advice = dd.budget_advice(groups, len(runs))
    assert "for k ≤ 20 use `unrolled`" in advice and "are level within two standard errors" in advice


def scored_case(
    found: dict[str, float],
    test_loss: dict[str, float],
    *,
    auc: dict[str, float] | None = None,
    lds: dict[str, float] | None = None,
    seed: int = 0,
) -> dict:
    """A data_debugging case whose methods find ``found[m]`` of the flips at every budget and reach
    ``test_loss[m]`` (``"random"`` included) after removing the top-k at every k."""
    auc = auc or {m: 0.5 + found[m] / 2 for m in dd.METHODS}
    lds = lds or {m: 0.0 for m in dd.EFFECT_METHODS}

    def removal(loss: float) -> dict:
        return {"test_loss": loss, "val_loss": loss}

    return {
        "dataset": "digits",
        "noise": 0.1,
        "seed": seed,
        "no_removal": {"test_loss": 1.0},
        "random_removal": {
            str(k): {"test_loss": {"mean": test_loss["random"]}, "val_loss": {"mean": test_loss["random"]}}
            for k in dd.KS
        },
        "diagnostics": {"unrolled_test_objective": {str(k): removal(test_loss["unrolled"]) for k in dd.KS}},
        "methods": {
            m: {
                "detection": {"found": {f"{b:.2f}": found[m] for b in dd.BUDGETS}, "auc": auc[m]},
                "cleansing": {str(k): removal(test_loss[m]) for k in dd.KS},
                **({"lds": {"spearman": lds[m]}} if m in dd.EFFECT_METHODS else {}),
            }
            for m in dd.METHODS
        },
    }


FOUND = {"unrolled": 0.3, "influence_function": 0.3, "tracin": 0.4, "self_influence": 0.6, "margin": 0.8, "loss": 0.8}
LOSSES = {m: 1.0 for m in (*dd.METHODS, "random")}


def test_detection_target_holds_on_a_tie_with_loss_and_fails_one_flip_short():
    met = dd.target_detection([scored_case(FOUND, LOSSES)])
    assert met["met"] and met["single_methods_meeting_everywhere"] == ["margin"]
    assert all(row["best_method"] == "margin" for row in met["rows"])
    short = dd.target_detection([scored_case(FOUND, LOSSES), scored_case({**FOUND, "margin": 0.79}, LOSSES)])
    assert not short["met"] and short["single_methods_meeting_everywhere"] == []
    assert [row["met"] for row in short["rows"]] == [True] * len(dd.BUDGETS) + [False] * len(dd.BUDGETS)


def test_cleansing_target_needs_unrolled_strictly_below_loss_tracin_and_random():
    below = {**LOSSES, "unrolled": 0.9}
    result = dd.target_cleansing([scored_case(FOUND, below)], dd.KS)
    assert result["met"] and [row["k"] for row in result["rows"]] == list(dd.TARGET_KS)
    assert all(row["unrolled_val_lowest"] for row in result["rows"])
    level_with_random = {**below, "random": 0.9}  # a tie is not a win
    result = dd.target_cleansing([scored_case(FOUND, level_with_random)], dd.KS)
    assert not result["met"]
    assert all(row["beats"] == {"loss": True, "tracin": True, "random": False} for row in result["rows"])


def test_recommendation_names_the_winners_and_counts_the_cells_against_loss():
    runs = []
    for seed in range(4):
        found = {**FOUND, "margin": 0.8 if seed else 0.75}  # margin one cell-row short of loss in one run
        auc = {m: 0.5 + found[m] / 2 for m in dd.METHODS} | {"margin": 0.99, "loss": 0.98}
        losses = {**LOSSES, "unrolled": 0.9, "influence_function": 0.95}
        lds = {"unrolled": 0.8, "influence_function": 0.5, "tracin": 0.3}
        runs.append(scored_case(found, losses, auc=auc, lds=lds, seed=seed))
    text, facts = dd.recommendation(runs, dd.KS)
    assert facts["detection_default"] == "margin" and facts["auc_wins"]["margin"] == 4
    assert facts["detection_default_vs_loss_cells"] == {
        "cells": 4 * len(dd.BUDGETS),
        "at_least_loss": 3 * len(dd.BUDGETS),
        "above_loss": 0,
        "below_loss": len(dd.BUDGETS),
    }
    assert facts["cleansing_default"] == "unrolled" and facts["removal_effect_default"] == "unrolled"
    assert "use `margin` (needs no validation data)" in text
    assert f"in {3 * len(dd.BUDGETS)} of {4 * len(dd.BUDGETS)} (run, budget) cells" in text
    assert "4 runs (1 data set/noise cases × 4 training seeds)" in text
    assert "mean LDS +0.800 vs +0.500 for `influence_function`, highest in 4 of 4 runs" in text


def test_unrolled_targets_compare_each_figure_with_its_own_threshold():
    speed = {kind: {"ratio": r} for kind, r in zip(("cold", "warm", "steady", "loop"), (2.0, 1.5, 2.01, 1.0))}
    fidelity = [
        {"role": "main", "key": "mlp_sgd", "model": "MLP", "optimizer": "SGD", "pearson": 0.97, "spearman": 0.979,
         "pearson_target": 0.97, "spearman_target": 0.98},
        {"role": "main", "key": "cnn_sgd", "model": "CNN", "optimizer": "SGD", "pearson": 0.95, "spearman": 0.5,
         "pearson_target": 0.9, "spearman_target": None},
        {"role": "extra", "key": "mlp_seed1", "model": "MLP", "optimizer": "SGD", "pearson": 0.0, "spearman": 0.0,
         "pearson_target": 0.97, "spearman_target": 0.98},
    ]  # fmt: skip
    memory = {"loglog_slopes": {"checkpointed": {"states_held": 0.5}}, "agreement": None}
    met = {k: v["met"] for k, v in unrolled_benchmark.evaluate_targets(speed, fidelity, memory).items()}
    assert met == {
        "speed_cold": True,  # ≤ 2.0 includes 2.0
        "speed_warm": True,
        "speed_steady": False,
        "speed_loop": True,
        "fidelity_mlp_sgd_pearson": True,
        "fidelity_mlp_sgd_spearman": False,
        "fidelity_cnn_sgd_pearson": True,  # no Spearman target for the CNN, and extra rows are not targets
        "checkpointed_sqrt_T": True,
    }
    memory["loglog_slopes"]["checkpointed"]["states_held"] = 1.0  # held states growing like T
    assert not unrolled_benchmark.evaluate_targets(speed, fidelity, memory)["checkpointed_sqrt_T"]["met"]

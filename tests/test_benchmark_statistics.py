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

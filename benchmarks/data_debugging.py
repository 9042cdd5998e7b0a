"""Data-debugging benchmark (issue 5): do the six ranking methods of ``influence.rank`` find
mislabeled training samples, does removing what they flag improve held-out loss, and do their
predicted removal effects predict real retraining?

Setup
    Two scikit-learn embedded data sets, each with 10 % and 20 % of the *training* labels flipped:

    * digits: pixels / 16, shuffled with seed 0: 1000 train / 400 validation / 397 test. Flipped
      labels go to a different random class. MLP 64-32-10 (tanh, softmax), plain SGD with learning
      rate 0.5, batch 50, 8 epochs (T = 160 steps).
    * breast_cancer: shuffled with seed 0: 284 train / 113 validation / 172 test (50/20/30 %);
      features standardized with the training split's mean and standard deviation. Flipped labels
      swap the class. MLP 30-16-2 (tanh, softmax), plain SGD with learning rate 0.2, batch 50,
      10 epochs (T = 60 steps).

    The flipped samples are the first 10 % / 20 % of one fixed permutation of the training indices
    (seed 1), so the 10 % set is contained in the 20 % set. Model weights come from
    ``keras.utils.set_random_seed(0)``; ``influence.fit(seed=0)`` fixes the batch order. Every
    method ranks with the validation split (loss: sparse categorical cross-entropy);
    ``influence_function`` uses ``solver="auto"`` (exact Hessian up to 1000 parameters, so exact on
    breast_cancer and CG on digits) and ``damping="auto"``.

1. Mislabel detection
    Fraction of the flipped samples among the top 5 / 10 / 20 / 30 % of each ranking (found@k), and
    ROC AUC of the score against the flipped mask (``sklearn.metrics.roc_auc_score``). A random
    ranking finds k on average; a perfect one min(1, k / noise).

2. Data cleansing
    Remove the top-k (k = 10, 20, 50, 100) of each ranking by retraining the *recorded* run with
    c_i = 0 for those samples (``influence.retrain``: same batches, same |B_t|, same learning rates),
    and measure the held-out *test* loss and accuracy. Baselines: no removal (the same replay with
    c = 1) and random removal of k samples (mean ± std over 5 draws, seed 2). Diagnostic for target 2
    (not a method: it reads the test set): unrolled's top-k with the test loss itself as its
    objective, next to the validation loss each method's removal reaches.

3. Linear datamodeling score (LDS)
    50 random halves of the training set (seed 3; a subset keeps n // 2 samples and removes the
    rest). Actual effect = val_loss(retrain with c = keep mask) − val_loss(retrain with c = 1), the
    50 retrainings computed once per (data set, noise) and shared by all methods. Predicted effect =
    ``influence.predicted_group_effect(table, [removed indices])`` (sum of the members' removal
    effects) for unrolled, influence_function and tracin. LDS = Spearman correlation of predicted
    and actual over the subsets, with a 95 % bootstrap interval over subsets (1000 resamples,
    seed 4). Extra, marked score-based: −(sum of scores of the removed samples) for self_influence,
    margin and loss, which have no removal effect.

4. Time
    ``table.attrs["seconds"]`` (the method's own computation) and the wall time of the ``rank``
    call (also the table, final-weight losses and validation loss). Each ``rank`` call traces its
    own ``tf.function``s, so these are cold per-call costs in a warm process. The load average at start
    and end is recorded: other processes may share the cores.

5. Robustness (extra)
    Sections 1–4 and the targets use training seed 0. The whole protocol is repeated with training
    seeds 1–4 (model initialization and batch order; data, flips, removal draws and LDS subsets fixed)
    and summarized as mean ± std over the five seeds plus how many seeds meet targets 1 and 2.

6. Other splits (extra)
    One split and one set of flips can mislead (breast cancer's validation split has 113 samples).
    Seeds 1–4 each draw their own train/validation/test split and flips (``load_split``) and train
    with that seed; the protocol is otherwise unchanged. The recommended default in the Markdown is
    derived from all 36 runs (4 cases × (5 + 4)), next to the choice each group of runs makes alone.

Targets (stated met/missed in the Markdown, booleans in the JSON)
    (1) the toolkit's best method (any of unrolled, influence_function, tracin, self_influence, margin) at
        least equals the loss baseline's found@k at every budget, for every (data set, noise);
    (2) in cleansing, unrolled has a lower test loss than loss, tracin and random removal at
        k = 10 and 20, for every (data set, noise);
    (3) LDS per method (reported; no threshold).

Outputs
    ``reports/benchmarks/data_debugging.json`` (all raw numbers, settings, machine, targets),
    ``reports/benchmarks/data_debugging.md`` (tables, recommended default) and the plots
    ``data_debugging_detection.png`` (found@k curves), ``data_debugging_cleansing.png`` (test loss
    against k) and ``data_debugging_lds.png`` (predicted against actual group effects).
    ``--quick`` (digits 10 % only, training seed 0 and one own split, 10 LDS subsets, k = 10, 20) writes under
    ``reports/_scratch/benchmarks/`` unless ``--out-dir`` is given.

Usage (from the repository root)::

    python benchmarks/data_debugging.py            # full run, about 6 minutes on 2 cores
    python benchmarks/data_debugging.py --quick    # smoke test (2 runs), under a minute
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from _common import benchmark_parser, fmt, output_dir, report_header, write_report
from scipy import stats
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.metrics import roc_auc_score

import influence as inf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

tf.get_logger().setLevel("ERROR")
NAME = "data_debugging"

SPLIT_SEED, FLIP_SEED, RANDOM_REMOVAL_SEED, LDS_SEED, BOOTSTRAP_SEED = 0, 1, 2, 3, 4
TRAINING_SEEDS, QUICK_TRAINING_SEEDS = (0, 1, 2, 3, 4), (0,)  # model init and batch order; 0 is the main run
LOSS = "sparse_categorical_crossentropy"
METHODS = ("unrolled", "influence_function", "tracin", "self_influence", "margin", "loss")
EFFECT_METHODS = ("unrolled", "influence_function", "tracin")  # methods with a removal effect
TOOLKIT_METHODS = ("unrolled", "influence_function", "tracin", "self_influence", "margin")  # all but the baseline
NOISES = (0.1, 0.2)
BUDGETS = (0.05, 0.10, 0.20, 0.30)  # fractions of the ranking inspected
KS = (10, 20, 50, 100)
QUICK_KS = (10, 20)
TARGET_KS = (10, 20)
RANDOM_DRAWS = 5
LDS_SUBSETS, QUICK_LDS_SUBSETS = 50, 10
BOOTSTRAP = 1000
TIE_TOL = 1e-12


# --------------------------------------------------------------------------- data and models


@dataclass(frozen=True)
class Spec:
    """A data set with its model and training settings."""

    name: str
    classes: int
    model_desc: str
    build: Callable[[int], keras.Model]
    learning_rate: float
    batch_size: int
    epochs: int

    def fit(self, x: np.ndarray, y: np.ndarray, seed: int) -> inf.Trajectory:
        """The recorded run every benchmark on these cases trains: this model (weights from ``seed``),
        SGD at this learning rate, batch and epochs, batch order from ``seed``, loss LOSS."""
        return inf.fit(
            self.build(seed), x, y, loss=LOSS, optimizer=inf.optimizers.SGD(self.learning_rate),
            batch_size=self.batch_size, epochs=self.epochs, seed=seed,
        )  # fmt: skip


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray  # with flipped labels
    y_train_clean: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    flipped: np.ndarray  # sorted indices into the training set

    @property
    def flipped_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.y_train), dtype=bool)
        mask[self.flipped] = True
        return mask


def mlp(inputs: int, hidden: int, classes: int) -> Callable[[int], keras.Model]:
    def build(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input((inputs,)),
                keras.layers.Dense(hidden, activation="tanh"),
                keras.layers.Dense(classes, activation="softmax"),
            ]
        )

    return build


SPECS = {
    "digits": Spec("digits", 10, "MLP 64-32-10 tanh/softmax", mlp(64, 32, 10), 0.5, 50, 8),
    "breast_cancer": Spec("breast_cancer", 2, "MLP 30-16-2 tanh/softmax", mlp(30, 16, 2), 0.2, 50, 10),
}


def load(name: str, noise: float, split_seed: int = SPLIT_SEED, flip_seed: int = FLIP_SEED) -> Data:
    """Shuffled split, standardized/scaled features, ``noise`` of the training labels flipped.

    The seeds default to this benchmark's (SPLIT_SEED, FLIP_SEED); benchmarks/reweighting.py
    also draws other splits and flips.
    """
    if name == "digits":
        raw = load_digits()
        x, y = raw.data / 16.0, raw.target.astype(np.int64)
        order = np.random.default_rng(split_seed).permutation(len(x))
        n_train, n_val = 1000, 400
    else:
        raw = load_breast_cancer()
        x, y = raw.data, raw.target.astype(np.int64)
        order = np.random.default_rng(split_seed).permutation(len(x))
        n_train, n_val = int(0.5 * len(x)), int(0.2 * len(x))
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    if name == "breast_cancer":
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        x = (x - mean) / std
    x = x.astype(np.float32)
    classes = SPECS[name].classes
    rng = np.random.default_rng(flip_seed)
    flip_order = rng.permutation(n_train)
    shifts = rng.integers(1, classes, size=n_train)  # to a different class (binary: the other one)
    flipped = np.sort(flip_order[: int(round(noise * n_train))])
    y_train = y[train].copy()
    y_train[flipped] = (y_train[flipped] + shifts[flipped]) % classes
    return Data(x[train], y_train, y[train], x[val], y[val], x[test], y[test], flipped)


OWN_SPLIT_SEEDS = (1, 2, 3, 4)  # for benchmarks that also draw other splits: one per training seed


def load_split(name: str, noise: float, seed: int, own_split: bool) -> Data:
    """This benchmark's split and flips, or (``own_split``) a split and flips drawn with ``seed``."""
    return load(name, noise, split_seed=seed, flip_seed=seed) if own_split else load(name, noise)


def run_all_cases(
    quick: bool,
    run_seed: Callable[[str, float, int], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
    seeds: tuple[int, ...] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], tuple[int, ...]]:
    """``run_seed(data set, noise, seed)`` for every case and seed, keyed ``"digits 10%"``.

    ``seeds``: default TRAINING_SEEDS. ``quick``: digits 10 % with the first seed only. Prints
    ``line(result)`` after each run; returns the results per case and the seeds used. (For the
    benchmarks that reuse these cases.)
    """
    seeds = seeds or TRAINING_SEEDS
    seeds = seeds[:1] if quick else seeds
    cases = [("digits", 0.1)] if quick else [(name, noise) for name in SPECS for noise in NOISES]
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, noise in cases:
        key = f"{name} {noise:.0%}"
        runs[key] = []
        for seed in seeds:
            runs[key].append(run_seed(name, noise, seed))
            print(f"{key} seed {seed}: {line(runs[key][-1])}", flush=True)
    return runs, seeds


def run_split_groups(
    quick: bool,
    run_seed: Callable[[str, float, int, bool], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
) -> dict[str, dict[str, Any]]:
    """:func:`run_all_cases` in two groups, for benchmarks that test a finding beyond one split.

    ``"split 0"``: this benchmark's split and flips, TRAINING_SEEDS; ``"own splits"``:
    OWN_SPLIT_SEEDS, each drawing its own split and flips (:func:`load_split`).
    ``run_seed(data set, noise, seed, own_split)``. Returns ``{group: {"seeds", "own_split", "runs"}}``.
    """
    groups: dict[str, dict[str, Any]] = {}
    for group, group_seeds, own_split in (("split 0", TRAINING_SEEDS, False), ("own splits", OWN_SPLIT_SEEDS, True)):
        print(f"-- {group}", flush=True)
        runs, seeds = run_all_cases(
            quick, lambda name, noise, seed, own=own_split: run_seed(name, noise, seed, own), line, seeds=group_seeds
        )
        groups[group] = {"seeds": list(seeds), "own_split": own_split, "runs": runs}
    return groups


class Evaluator:
    """Loss and accuracy of given trainable weights on the validation and test splits."""

    def __init__(self, trajectory: inf.Trajectory, data: Data) -> None:
        self.trajectory = trajectory
        self.fn = inf.ModelFunction(trajectory.model)
        self.splits = {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}

    def loss(self, weights: list[np.ndarray], split: str) -> float:
        x, y = self.splits[split]
        return inf.validation_loss(self.trajectory, weights, x, y)

    def accuracy(self, weights: list[np.ndarray], split: str) -> float:
        x, y = self.splits[split]
        out = self.fn([tf.constant(w, dtype=self.fn.dtype) for w in weights], tf.constant(x, dtype=self.fn.dtype))
        return float(np.mean(np.argmax(np.asarray(out), axis=-1) == y))

    def metrics(self, weights: list[np.ndarray]) -> dict[str, float]:
        return {
            "val_loss": self.loss(weights, "val"),
            "test_loss": self.loss(weights, "test"),
            "test_accuracy": self.accuracy(weights, "test"),
        }


# --------------------------------------------------------------------------- one (data set, noise) case


def detection(score: np.ndarray, order: np.ndarray, data: Data) -> dict[str, Any]:
    """found@k for the budgets, ROC AUC, and the full found curve (for the plot)."""
    mask = data.flipped_mask
    n, n_flipped = len(mask), int(mask.sum())
    curve = np.cumsum(mask[order]) / n_flipped
    found = {f"{b:.2f}": float(curve[math.ceil(b * n) - 1]) for b in BUDGETS}
    return {"found": found, "auc": float(roc_auc_score(mask, score)), "curve": curve}


def spearman_with_ci(predicted: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    rho = float(stats.spearmanr(predicted, actual).statistic)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    boot = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, len(actual), size=len(actual))
        value = stats.spearmanr(predicted[idx], actual[idx]).statistic
        if np.isfinite(value):
            boot.append(value)
    low, high = np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan)
    return {
        "spearman": rho,
        "ci95": [float(low), float(high)],
        "pearson": float(stats.pearsonr(predicted, actual).statistic),
        "predicted": predicted,
    }


def run_case(
    spec: Spec, noise: float, ks: tuple[int, ...], n_subsets: int, seed: int, own_split: bool = False
) -> dict[str, Any]:
    """The whole protocol for one (data set, noise, training seed).

    ``own_split``: the split and flips are drawn with ``seed`` too (:func:`load_split`).
    """
    data = load_split(spec.name, noise, seed, own_split)
    x, y = data.x_train, data.y_train
    n = len(x)
    print(
        f"\n== {spec.name}, {noise:.0%} flipped ({len(data.flipped)} of {n} training labels), training seed {seed}"
        + (f", own split and flips (seed {seed})" if own_split else ""),
        flush=True,
    )

    start = time.perf_counter()
    trajectory = spec.fit(x, y, seed)
    fit_wall = time.perf_counter() - start
    evaluator = Evaluator(trajectory, data)
    full = inf.retrain(trajectory, x, y)  # the replayed baseline (replay round-off cancels in differences)
    replay_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(full, trajectory.final_weights))
    baseline = evaluator.metrics(full)

    # clean-label reference (same split, same schedule, true labels): what the noise costs
    clean_trajectory = spec.fit(x, data.y_train_clean, seed)
    clean = Evaluator(clean_trajectory, data).metrics(clean_trajectory.final_weights)
    print(
        f"   fit {fit_wall:.1f} s, T = {trajectory.steps}; test loss {baseline['test_loss']:.4f} "
        f"(clean labels {clean['test_loss']:.4f}), test acc {baseline['test_accuracy']:.3f}",
        flush=True,
    )

    def removal_metrics(removed: np.ndarray) -> dict[str, float]:
        c = np.ones(n, dtype=np.float32)
        c[removed] = 0.0
        return evaluator.metrics(inf.retrain(trajectory, x, y, sample_weight=c))

    # random removal baseline
    rng = np.random.default_rng(RANDOM_REMOVAL_SEED)
    random_removal: dict[str, Any] = {}
    for k in ks:
        draws = [removal_metrics(rng.choice(n, size=k, replace=False)) for _ in range(RANDOM_DRAWS)]
        random_removal[str(k)] = {
            key: {"mean": float(np.mean([d[key] for d in draws])), "std": float(np.std([d[key] for d in draws]))}
            for key in draws[0]
        } | {"draws": draws}

    # LDS ground truth: n_subsets retrainings on random halves, shared by all methods
    rng = np.random.default_rng(LDS_SEED)
    keep_masks = []
    for _ in range(n_subsets):
        keep = np.zeros(n, dtype=bool)
        keep[rng.permutation(n)[: n // 2]] = True
        keep_masks.append(keep)
    start = time.perf_counter()
    actual = np.array(
        [
            evaluator.loss(inf.retrain(trajectory, x, y, sample_weight=keep.astype(np.float32)), "val")
            - baseline["val_loss"]
            for keep in keep_masks
        ]
    )
    lds_retrain_s = time.perf_counter() - start
    removed_groups = [np.flatnonzero(~keep) for keep in keep_masks]
    print(f"   {n_subsets} LDS retrainings in {lds_retrain_s:.1f} s", flush=True)

    methods: dict[str, Any] = {}
    for method in METHODS:
        start = time.perf_counter()
        table = inf.rank(trajectory, x, y, data.x_val, data.y_val, method=method, progress=False)
        wall = time.perf_counter() - start
        by_index = table.sort_values("index")
        score = by_index["score"].to_numpy()
        order = table["index"].to_numpy()
        attrs = {k: v for k, v in table.attrs.items() if isinstance(v, (int, float, str))}
        entry: dict[str, Any] = {"seconds": float(table.attrs["seconds"]), "wall_s": wall, "attrs": attrs}
        entry["detection"] = detection(score, order, data)

        effect = by_index["removal_effect"].to_numpy()
        has_effect = not np.any(np.isnan(effect))
        cleansing = {}
        for k in ks:
            removed = order[:k]
            row = removal_metrics(removed)
            row["flipped_removed"] = int(np.isin(removed, data.flipped).sum())
            if has_effect:
                row["predicted_val_change"] = float(inf.predicted_group_effect(table, [removed])[0])
            cleansing[str(k)] = row
        entry["cleansing"] = cleansing

        if has_effect:
            entry["lds"] = spearman_with_ci(inf.predicted_group_effect(table, removed_groups), actual)
            entry["lds"]["kind"] = "removal_effect"
        else:
            entry["lds"] = spearman_with_ci(np.array([-score[g].sum() for g in removed_groups]), actual)
            entry["lds"]["kind"] = "score-based"
        methods[method] = entry
        d = entry["detection"]
        print(
            f"   {method:<19} {entry['seconds']:6.2f} s  AUC {d['auc']:.3f}  found@10% {d['found']['0.10']:.2f}  "
            f"test loss @k={ks[0]} {cleansing[str(ks[0])]['test_loss']:.4f}  LDS {entry['lds']['spearman']:+.3f}",
            flush=True,
        )

    # Diagnostic for target 2, not a method (it reads the test set): unrolled with the test loss itself
    # as its objective. It separates the removal estimates from the gap between validation and test.
    oracle = inf.rank(trajectory, x, y, data.x_test, data.y_test, method="unrolled", progress=False)
    oracle_order = oracle["index"].to_numpy()
    diagnostics = {"unrolled_test_objective": {str(k): removal_metrics(oracle_order[:k]) for k in ks}}

    return {
        "dataset": spec.name,
        "seed": seed,
        "own_split": own_split,
        "split_seed": seed if own_split else SPLIT_SEED,
        "flip_seed": seed if own_split else FLIP_SEED,
        "noise": noise,
        "n_train": n,
        "n_val": len(data.y_val),
        "n_test": len(data.y_test),
        "n_flipped": len(data.flipped),
        "flipped": data.flipped,
        "steps": trajectory.steps,
        "fit_wall_s": fit_wall,
        "training_s": trajectory.seconds,
        "replay_max_abs_diff": replay_diff,
        "no_removal": baseline,
        "clean_labels_reference": clean,
        "random_removal": random_removal,
        "lds_actual": actual,
        "lds_keep_fraction": 0.5,
        "lds_retrain_s": lds_retrain_s,
        "methods": methods,
        "diagnostics": diagnostics,
    }


# --------------------------------------------------------------------------- targets and summary


def case_key(case: dict[str, Any]) -> str:
    return f"{case['dataset']} {case['noise']:.0%}"


def target_detection(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """(1) best toolkit method's found@k ≥ loss's found@k at every budget of every case."""
    rows, met = [], True
    for case in cases:
        for b in BUDGETS:
            key = f"{b:.2f}"
            found = {m: case["methods"][m]["detection"]["found"][key] for m in METHODS}
            best = max(TOOLKIT_METHODS, key=lambda m: found[m])
            ok = found[best] >= found["loss"] - TIE_TOL
            met &= ok
            rows.append(
                {
                    "case": case_key(case),
                    "budget": b,
                    "best_method": best,
                    "best_found": found[best],
                    "loss_found": found["loss"],
                    "met": bool(ok),
                }
            )
    # a single method that meets it everywhere (stronger than per-budget best)
    single = [
        m
        for m in TOOLKIT_METHODS
        if all(
            case["methods"][m]["detection"]["found"][f"{b:.2f}"]
            >= case["methods"]["loss"]["detection"]["found"][f"{b:.2f}"] - TIE_TOL
            for case in cases
            for b in BUDGETS
        )
    ]
    return {"met": bool(met), "rows": rows, "single_methods_meeting_everywhere": single}


def target_cleansing(cases: list[dict[str, Any]], ks: tuple[int, ...]) -> dict[str, Any]:
    """(2) unrolled's test loss < loss's, tracin's and random's at k = 10 and 20 in every case."""
    rows, met = [], True
    for case in cases:
        for k in (k for k in TARGET_KS if k in ks):
            unrolled = case["methods"]["unrolled"]["cleansing"][str(k)]["test_loss"]
            others = {
                "loss": case["methods"]["loss"]["cleansing"][str(k)]["test_loss"],
                "tracin": case["methods"]["tracin"]["cleansing"][str(k)]["test_loss"],
                "random": case["random_removal"][str(k)]["test_loss"]["mean"],
            }
            beats = {name: bool(unrolled < value) for name, value in others.items()}
            met &= all(beats.values())
            # What unrolled optimizes: the validation loss after removal, lowest of the four?
            val = {m: case["methods"][m]["cleansing"][str(k)]["val_loss"] for m in ("unrolled", "loss", "tracin")}
            val["random"] = case["random_removal"][str(k)]["val_loss"]["mean"]
            oracle = case["diagnostics"]["unrolled_test_objective"][str(k)]["test_loss"]
            rows.append(
                {
                    "case": case_key(case),
                    "k": k,
                    "unrolled": unrolled,
                    **others,
                    "beats": beats,
                    "val_loss": val,
                    "unrolled_val_lowest": bool(val["unrolled"] < min(v for m, v in val.items() if m != "unrolled")),
                    "unrolled_test_objective": oracle,
                    "test_objective_beats": bool(oracle < min(others.values())),
                }
            )
    return {"met": bool(met), "rows": rows}


def mean_over(runs: list[dict[str, Any]], get: Callable[[dict[str, Any], str], float], methods=METHODS) -> dict:
    return {m: float(np.mean([get(run, m) for run in runs])) for m in methods}


def test_loss_change(run: dict[str, Any], method: str, k: int) -> float:
    after = (
        run["random_removal"][str(k)]["test_loss"]["mean"]
        if method == "random"
        else (run["methods"][method]["cleansing"][str(k)]["test_loss"])
    )
    return after - run["no_removal"]["test_loss"]


def best_per_budget_group(runs: list[dict[str, Any]], ks: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Per budget group (``"k ≤ 20"`` = the target's k, ``"k ≥ 50"`` = the rest): the method with the lowest mean
    test-loss change over the group's k, the runner-up, and their paired difference run by run.

    ``separated`` says whether the paired mean difference is at least two standard errors (over runs) from zero:
    a choice that is not separated is a tie on these runs, not a recommendation.
    """
    groups = {"k ≤ " + str(max(TARGET_KS)): [k for k in ks if k <= max(TARGET_KS)]}
    if any(k > max(TARGET_KS) for k in ks):
        groups["k ≥ " + str(min(k for k in ks if k > max(TARGET_KS)))] = [k for k in ks if k > max(TARGET_KS)]
    out = {}
    for label, group in groups.items():
        per_run = {m: np.array([np.mean([test_loss_change(r, m, k) for k in group]) for r in runs]) for m in METHODS}
        mean = {m: float(v.mean()) for m, v in per_run.items()}
        best, second = sorted(METHODS, key=mean.__getitem__)[:2]
        diff = per_run[best] - per_run[second]
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
        out[label] = {
            "best": best,
            "mean_change": mean[best],
            "runner_up": second,
            "mean_by_method": mean,
            "paired_difference": float(diff.mean()),
            "paired_se": se,
            "best_lower_in_runs": int(np.sum(diff < 0)),
            "separated": bool(abs(diff.mean()) >= 2 * se),
        }
    return out


def budget_advice(groups: dict[str, dict[str, Any]], n_runs: int) -> str:
    """Which method lowers test loss most for small (target) and for larger k, and whether the runner-up is level."""

    def detail(v: dict[str, Any]) -> str:
        mean = v["mean_by_method"]
        return (
            f"{mean[v['best']]:+.4f}, next "
            + ", ".join(f"`{m}` {mean[m]:+.4f}" for m in sorted(mean, key=mean.__getitem__)[1:3])
            + f"; paired difference to `{v['runner_up']}` {v['paired_difference']:+.4f} ± {v['paired_se']:.4f} s.e., "
            f"lower in {v['best_lower_in_runs']}/{n_runs} runs)"
        )

    parts = [
        f"for {label} use `{v['best']}` ({detail(v)}"
        if v["separated"]
        else f"for {label} `{v['best']}` and `{v['runner_up']}` are level within two standard errors ({detail(v)}"
        for label, v in groups.items()
    ]
    if len({v["best"] for v in groups.values()}) == 1 and all(v["separated"] for v in groups.values()):
        return f"`{next(iter(groups.values()))['best']}` is the cleansing default: " + "; ".join(parts) + ". "
    return "By budget: " + "; ".join(parts) + ". "


def describe_runs(runs: list[dict[str, Any]]) -> str:
    """'20 runs (4 data set/noise cases × 5 training seeds)', naming the own-split seeds where there are any."""
    n_cases = len({case_key(r) for r in runs})

    def seeds(own: bool) -> int:
        return len({r["seed"] for r in runs if r.get("own_split", False) == own})

    parts = []
    if seeds(False):
        parts.append(f"{seeds(False)} training seed{'s' if seeds(False) > 1 else ''}")
    if seeds(True):
        parts.append(f"{seeds(True)} seed{'s' if seeds(True) > 1 else ''} that each draw their own split and flips")
    if seeds(False) and seeds(True):
        parts[0] += " on this benchmark's split"
    return f"{len(runs)} runs ({n_cases} data set/noise cases × {' + '.join(parts)})"


def recommendation(runs: list[dict[str, Any]], ks: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    """A 'recommended default' paragraph derived from the numbers (and the numbers it rests on).

    ``runs`` are all (data set, noise, training seed) runs; every statement is an average or a count over them.
    """
    n_runs = len(runs)
    where = describe_runs(runs)

    def winner_counts(better: Callable[[dict[str, Any]], str], candidates=METHODS) -> dict[str, int]:
        counts = {m: 0 for m in candidates}
        for run in runs:
            counts[better(run)] += 1
        return counts

    auc = mean_over(runs, lambda r, m: r["methods"][m]["detection"]["auc"])
    found10 = mean_over(runs, lambda r, m: r["methods"][m]["detection"]["found"]["0.10"])
    auc_wins = winner_counts(lambda r: max(METHODS, key=lambda m: r["methods"][m]["detection"]["auc"]))
    det_best = max(METHODS, key=lambda m: auc[m])
    det_second = max((m for m in METHODS if m != det_best), key=lambda m: auc[m])
    toolkit_best = max(TOOLKIT_METHODS, key=lambda m: auc[m])
    no_validation = ("self_influence", "margin")
    detection_text = (
        f"**Mislabel detection:** use `{det_best}`"
        + (
            f" (the baseline; the toolkit's `{toolkit_best}`, which also needs no validation data, is within "
            f"{auc[det_best] - auc[toolkit_best]:.4f} AUC)"
            if det_best == "loss" and toolkit_best in no_validation and auc[det_best] - auc[toolkit_best] < 0.01
            else " (the baseline: no toolkit method beats it here)"
            if det_best == "loss"
            else " (needs no validation data)"
            if det_best in no_validation
            else ""
        )
        + f": highest ROC AUC averaged over {where}, {auc[det_best]:.3f} vs {auc[det_second]:.3f} for "
        f"`{det_second}`; best AUC in {auc_wins[det_best]} of {n_runs} runs; mean found@10 % "
        f"{found10[det_best]:.2f} vs {found10[det_second]:.2f}. "
    )
    facts_vs_loss: dict[str, Any] = {}
    if det_best != "loss":
        cells = [
            (
                r["methods"][det_best]["detection"]["found"][f"{b:.2f}"],
                r["methods"]["loss"]["detection"]["found"][f"{b:.2f}"],
            )
            for r in runs
            for b in BUDGETS
        ]
        facts_vs_loss = {
            "cells": len(cells),
            "at_least_loss": sum(a >= b - TIE_TOL for a, b in cells),
            "above_loss": sum(a > b + TIE_TOL for a, b in cells),
            "below_loss": sum(a < b - TIE_TOL for a, b in cells),
        }
        detection_text += (
            f"Against the `loss` baseline (AUC {auc['loss']:.3f}, found@10 % {found10['loss']:.2f}), "
            f"`{det_best}` finds at least as many flipped labels in {facts_vs_loss['at_least_loss']} of {len(cells)} "
            "(run, budget) cells "
            f"(more in {facts_vs_loss['above_loss']}, fewer in {facts_vs_loss['below_loss']}). "
        )
    detection_text += (
        "The validation-based rankings find clearly fewer flipped labels ("
        + ", ".join(f"`{m}` {auc[m]:.3f}" for m in EFFECT_METHODS)
        + "; they rank by estimated harm to the validation loss, not by how badly a sample fits its own label). "
    )

    delta = {
        k: {m: float(np.mean([test_loss_change(r, m, k) for r in runs])) for m in (*METHODS, "random")} for k in ks
    }
    per_k = {}
    for k in ks:
        best = min(METHODS, key=lambda m: delta[k][m])
        wins = winner_counts(
            lambda r, k=k: min(METHODS, key=lambda m: r["methods"][m]["cleansing"][str(k)]["test_loss"])
        )
        per_k[k] = {"best": best, "mean_change": delta[k][best], "wins": wins[best], "random": delta[k]["random"]}
    overall = {m: float(np.mean([delta[k][m] for k in ks])) for m in METHODS}
    budget_groups = best_per_budget_group(runs, ks)
    clean_best = min(METHODS, key=lambda m: overall[m])
    cleansing_text = (
        f"**Data cleansing** (mean change of test loss after removing the top-k, same {n_runs} runs): "
        + "; ".join(
            f"k = {k}: `{v['best']}` {v['mean_change']:+.4f} (lowest in {v['wins']}/{n_runs} runs; random "
            f"{v['random']:+.4f})"
            for k, v in per_k.items()
        )
        + f". Averaged over all k, `{clean_best}` is lowest ({overall[clean_best]:+.4f}; "
        + ", ".join(f"`{m}` {overall[m]:+.4f}" for m in METHODS if m != clean_best)
        + ")"
        + ". "
        + budget_advice(budget_groups, n_runs)
        + (
            f"No method has the lowest test loss in a majority of the {n_runs} runs at any k: these are average "
            "tendencies, not uniform wins. "
            if all(v["wins"] <= n_runs / 2 for v in per_k.values())
            else ""
        )
    )

    lds = mean_over(runs, lambda r, m: r["methods"][m]["lds"]["spearman"], EFFECT_METHODS)
    lds_best = max(EFFECT_METHODS, key=lambda m: lds[m])
    lds_second = max((m for m in EFFECT_METHODS if m != lds_best), key=lambda m: lds[m])
    lds_wins = winner_counts(
        lambda r: max(EFFECT_METHODS, key=lambda m: r["methods"][m]["lds"]["spearman"]), EFFECT_METHODS
    )
    lds_text = (
        f"**Predicting removal effects:** `{lds_best}` — mean LDS {lds[lds_best]:+.3f} vs {lds[lds_second]:+.3f} "
        f"for `{lds_second}`, highest in {lds_wins[lds_best]} of {n_runs} runs."
    )
    facts = {
        "runs": n_runs,
        "mean_auc": auc,
        "mean_found_at_0.10": found10,
        "auc_wins": auc_wins,
        "detection_default": det_best,
        "detection_best_toolkit_method": toolkit_best,
        "detection_default_vs_loss_cells": facts_vs_loss,
        "mean_test_loss_change_by_k": delta,
        "cleansing_best_by_k": per_k,
        "mean_test_loss_change_all_k": overall,
        "cleansing_default": clean_best,
        "cleansing_best_by_budget_group": budget_groups,
        "mean_lds": lds,
        "lds_wins": lds_wins,
        "removal_effect_default": lds_best,
    }
    return detection_text + cleansing_text + lds_text, facts


def robustness(runs: list[dict[str, Any]], ks: tuple[int, ...]) -> dict[str, Any]:
    """Per case: mean ± std over training seeds, and how often targets 1 and 2 hold."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(case_key(r) for r in runs):
        group = [r for r in runs if case_key(r) == key]

        def stat(values: list[float]) -> dict[str, float]:
            return {"mean": float(np.mean(values)), "std": float(np.std(values))}

        methods = {}
        for m in METHODS:
            methods[m] = {
                "auc": stat([r["methods"][m]["detection"]["auc"] for r in group]),
                "found_0.10": stat([r["methods"][m]["detection"]["found"]["0.10"] for r in group]),
                "lds": stat([r["methods"][m]["lds"]["spearman"] for r in group]),
            } | {
                f"test_loss_k{k}": stat([r["methods"][m]["cleansing"][str(k)]["test_loss"] for r in group]) for k in ks
            }
        cleansing_rows = target_cleansing(group, ks)["rows"]
        out[key] = {
            "seeds": [r["seed"] for r in group],
            "no_removal_test_loss": stat([r["no_removal"]["test_loss"] for r in group]),
            "random_test_loss": {
                str(k): stat([r["random_removal"][str(k)]["test_loss"]["mean"] for r in group]) for k in ks
            },
            "methods": methods,
            "target1_met_seeds": sum(target_detection([r])["met"] for r in group),
            "target2_met_seeds": sum(target_cleansing([r], ks)["met"] for r in group),
            "unrolled_beats": {
                str(k): {
                    name: sum(row["beats"][name] for row in cleansing_rows if row["k"] == k)
                    for name in ("loss", "tracin", "random")
                }
                for k in TARGET_KS
                if k in ks
            },
        }
    return out


# --------------------------------------------------------------------------- plots


def plot_detection(cases: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        n, noise = case["n_train"], case["noise"]
        frac = np.arange(1, n + 1) / n
        for m in METHODS:
            d = case["methods"][m]["detection"]
            ax.plot(frac, d["curve"], label=f"{m} (AUC {d['auc']:.2f})")
        ax.plot(frac, frac, "k:", label="random")
        ax.plot(frac, np.minimum(1, frac / noise), "k--", lw=0.8, label="perfect")
        for b in BUDGETS:
            ax.axvline(b, color="0.85", lw=0.6, zorder=0)
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_title(case_key(case) + " flipped")
        ax.set_xlabel("fraction of training set inspected")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("fraction of flipped labels found")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cleansing(cases: list[dict[str, Any]], ks: tuple[int, ...], path: Path) -> None:
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for m in METHODS:
            ax.plot(ks, [case["methods"][m]["cleansing"][str(k)]["test_loss"] for k in ks], "o-", ms=3, label=m)
        mean = [case["random_removal"][str(k)]["test_loss"]["mean"] for k in ks]
        std = [case["random_removal"][str(k)]["test_loss"]["std"] for k in ks]
        ax.errorbar(ks, mean, yerr=std, fmt="s:", color="0.4", ms=3, capsize=2, label=f"random (±std, {RANDOM_DRAWS})")
        ax.axhline(case["no_removal"]["test_loss"], color="k", lw=0.8, ls="--", label="no removal")
        ax.axhline(case["clean_labels_reference"]["test_loss"], color="g", lw=0.8, ls="-.", label="clean labels")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(case_key(case) + " flipped")
        ax.set_xlabel("k removed (retrained)")
    axes[0][0].set_ylabel("test loss")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lds(cases: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        actual = np.asarray(case["lds_actual"])
        for m in EFFECT_METHODS:
            lds = case["methods"][m]["lds"]
            pred = np.asarray(lds["predicted"])
            # removal effects of different methods live on different scales: standardize for the plot
            z = (pred - pred.mean()) / (pred.std() or 1.0)
            ax.scatter(z, actual, s=10, label=f"{m} (ρ {lds['spearman']:+.2f})")
        ax.set_title(case_key(case) + " flipped")
        ax.set_xlabel("predicted group effect (standardized)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("actual Δ val loss (retrained)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def yes(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def markdown(report: dict[str, Any]) -> str:
    cases, ks, settings = report["cases"], tuple(report["settings"]["ks"]), report["settings"]
    out = [
        "# Data-debugging benchmark (issue 5)",
        "",
        f"Generated by `python benchmarks/data_debugging.py{' --quick' if settings['quick'] else ''}` "
        f"in {report['total_wall_s'] / 60:.1f} min on {report['machine']['cpu_count']} CPUs "
        f"(TensorFlow {report['machine']['tensorflow']}, Keras {report['machine']['keras']}; load average "
        f"{report['machine']['loadavg_1_5_15_min']['start'][0]:.1f} at start, "
        f"{report['machine']['loadavg_1_5_15_min']['end'][0]:.1f} at end — other processes share the cores, "
        "so times are indicative). "
        "See the module docstring for the full protocol.",
        "",
        "| data set | model | SGD lr | batch | epochs | T | train/val/test | flipped | test loss (noisy) | "
        "test loss (clean labels) | test acc (noisy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        spec = settings["datasets"][c["dataset"]]
        out.append(
            f"| {c['dataset']} | {spec['model']} | {spec['learning_rate']} | {spec['batch_size']} | {spec['epochs']} | "
            f"{c['steps']} | {c['n_train']}/{c['n_val']}/{c['n_test']} | {c['n_flipped']} ({c['noise']:.0%}) | "
            f"{c['no_removal']['test_loss']:.4f} | {c['clean_labels_reference']['test_loss']:.4f} | "
            f"{c['no_removal']['test_accuracy']:.3f} |"
        )

    # targets
    t = report["targets"]
    out += ["", "## Targets", ""]
    single = ", ".join(f"`{m}`" for m in t["detection"]["single_methods_meeting_everywhere"]) or "none"
    out.append(
        f"1. Best toolkit method ≥ loss baseline in found@k at every budget: {yes(t['detection']['met'])} "
        f"(single methods that meet it at every budget of every case: {single})."
    )
    out.append(
        f"2. Cleansing: unrolled's test loss below loss, TracIn and random at k = "
        f"{', '.join(str(k) for k in TARGET_KS if k in ks)}: {yes(t['cleansing']['met'])}."
    )
    lds_parts = [
        f"{c['dataset']} {c['noise']:.0%}: "
        + ", ".join(f"{m} {c['methods'][m]['lds']['spearman']:+.2f}" for m in EFFECT_METHODS)
        for c in cases
    ]
    out.append("3. LDS (Spearman, 95 % bootstrap CI in the LDS table): " + "; ".join(lds_parts) + ".")
    out += ["", "Target 1 in detail (best toolkit method per budget vs loss):", ""]
    out += ["| case | budget | best toolkit method | its found | loss found | met |", "|---|---|---|---|---|---|"]
    for r in t["detection"]["rows"]:
        out.append(
            f"| {r['case']} | {r['budget']:.0%} | `{r['best_method']}` | {r['best_found']:.3f} | "
            f"{r['loss_found']:.3f} | {'yes' if r['met'] else 'no'} |"
        )
    rows = t["cleansing"]["rows"]
    out += ["", "Target 2 in detail (test loss after removing the top-k):", ""]
    out += [
        "| case | k | unrolled | loss | tracin | random (mean) | met | val loss: unrolled / best other "
        "| unrolled, test loss as objective (diagnostic) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        missed = ", ".join(n for n, b in r["beats"].items() if not b)
        best_other = min(v for m, v in r["val_loss"].items() if m != "unrolled")
        out.append(
            f"| {r['case']} | {r['k']} | {r['unrolled']:.4f} | {r['loss']:.4f} | {r['tracin']:.4f} | "
            f"{r['random']:.4f} | {'yes' if not missed else f'no ({missed})'} | "
            f"{r['val_loss']['unrolled']:.4f} / {best_other:.4f} | {r['unrolled_test_objective']:.4f} |"
        )
    out += [
        "",
        f"Unrolled removes the samples whose removal lowers the *validation* loss most, and it has the lowest "
        f"validation loss after removal (of unrolled, loss, TracIn, random) in "
        f"{sum(r['unrolled_val_lowest'] for r in rows)} of {len(rows)} cells. The last column is a diagnostic, "
        "not a method (it reads the test set): the same unrolled ranking with the *test* loss as its objective "
        f"is below loss, TracIn and random in {sum(r['test_objective_beats'] for r in rows)} of {len(rows)} "
        "cells.",
    ]
    missed_rows = [r for r in rows if not all(r["beats"].values())]
    explained = [r for r in missed_rows if r["unrolled_val_lowest"] and r["test_objective_beats"]]
    if missed_rows:
        out[-1] += (
            f" In {len(explained)} of the {len(missed_rows)} missed cells both hold, so there the miss lies "
            "between what the validation split rewards and what the test split measures, not in the removal "
            "estimates."
        )

    # detection
    budgets = settings["budgets"]
    out += [
        "",
        "## 1. Mislabel detection",
        "",
        "Fraction of the flipped labels found in the top b of the ranking; ROC AUC.",
        "",
    ]
    out.append("| case | method | " + " | ".join(f"found@{b:.0%}" for b in budgets) + " | AUC |")
    out.append("|---|---|" + "---|" * (len(budgets) + 1))
    for c in cases:
        for m in METHODS:
            d = c["methods"][m]["detection"]
            out.append(
                f"| {case_key(c)} | {m} | "
                + " | ".join(f"{d['found'][f'{b:.2f}']:.3f}" for b in budgets)
                + f" | {d['auc']:.3f} |"
            )
        perfect = [min(1.0, b / c["noise"]) for b in budgets]
        out.append(
            f"| {case_key(c)} | *random / perfect* | "
            + " | ".join(f"{b:.2f} / {p:.2f}" for b, p in zip(budgets, perfect))
            + " | 0.5 |"
        )  # noqa: E501

    # cleansing
    out += [
        "",
        "## 2. Data cleansing",
        "",
        "Test loss (test accuracy) after removing the top-k and retraining the recorded run; "
        f"random = mean ± std over {RANDOM_DRAWS} draws; [n] = flipped samples among the k removed.",
        "",
        "| case | method | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for c in cases:
        out.append(
            f"| {case_key(c)} | *no removal* | "
            + " | ".join(f"{c['no_removal']['test_loss']:.4f} ({c['no_removal']['test_accuracy']:.3f})" for _ in ks)
            + " |"
        )
        for m in METHODS:
            cl = c["methods"][m]["cleansing"]
            out.append(
                f"| {case_key(c)} | {m} | "
                + " | ".join(
                    f"{r['test_loss']:.4f} ({r['test_accuracy']:.3f}) [{r['flipped_removed']}]"
                    for r in (cl[str(k)] for k in ks)
                )
                + " |"
            )
        rr = c["random_removal"]
        out.append(
            f"| {case_key(c)} | *random* | "
            + " | ".join(
                f"{rr[str(k)]['test_loss']['mean']:.4f} ± {rr[str(k)]['test_loss']['std']:.4f} "
                f"({rr[str(k)]['test_accuracy']['mean']:.3f})"
                for k in ks
            )
            + " |"
        )

    # LDS
    out += [
        "",
        "## 3. Linear datamodeling score",
        "",
        f"Spearman ρ between predicted and actual change of validation loss over {settings['lds_subsets']} random "
        "50 % subsets (95 % bootstrap CI); Pearson r as an extra. Self-influence, margin and loss have no removal "
        "effect: their rows use −(sum of scores of the removed samples) and are marked score-based.",
        "",
        "Scale check for the removal-effect methods: mean predicted vs mean actual change over the subsets "
        "(first order cannot be exact for removing half the data, but the order of magnitude should match).",
        "",
        "| case | method | kind | LDS (Spearman) | 95 % CI | Pearson | mean predicted Δ | mean actual Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        actual_mean = float(np.mean(c["lds_actual"]))
        for m in METHODS:
            lds = c["methods"][m]["lds"]
            scale = (
                f"{float(np.mean(lds['predicted'])):+.4f} | {actual_mean:+.4f}"
                if lds["kind"] == "removal_effect"
                else "— | —"
            )
            out.append(
                f"| {case_key(c)} | {m} | {lds['kind']} | {lds['spearman']:+.3f} | "
                f"[{lds['ci95'][0]:+.2f}, {lds['ci95'][1]:+.2f}] | {lds['pearson']:+.3f} | {scale} |"
            )
    ratios = {
        m: float(np.median([np.mean(c["methods"][m]["lds"]["predicted"]) / np.mean(c["lds_actual"]) for c in cases]))
        for m in EFFECT_METHODS
    }
    out += [
        "",
        "Median over cases of mean predicted ÷ mean actual: "
        + ", ".join(f"{m} {ratio:.2g}" for m, ratio in ratios.items())
        + " (1 = calibrated on average; the sign and size show which removal effects can be read as numbers).",
    ]

    # time
    out += [
        "",
        "## 4. Time",
        "",
        '`attrs["seconds"]` (the method\'s computation) / wall time of the `rank` call, in seconds; '
        "each call traces its own functions. Training (`fit`, incl. tracing) and the shared LDS retrainings for scale.",
        "",
        "| case | fit | " + " | ".join(METHODS) + " | LDS retrainings |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for c in cases:
        out.append(
            f"| {case_key(c)} | {c['fit_wall_s']:.2f} | "
            + " | ".join(f"{c['methods'][m]['seconds']:.2f} / {c['methods'][m]['wall_s']:.2f}" for m in METHODS)
            + f" | {c['lds_retrain_s']:.2f} ({settings['lds_subsets']} runs) |"
        )
    if_attrs = [
        f"{case_key(c)}: solver {c['methods']['influence_function']['attrs'].get('solver')}, "
        f"damping {fmt(c['methods']['influence_function']['attrs'].get('damping'), '.3g')}"
        for c in cases
    ]
    out += ["", "influence_function settings chosen by `auto`: " + "; ".join(if_attrs) + "."]

    seeds = settings["seeds"]["training_all"]
    tks = settings["target_ks"]
    if len(seeds) > 1:
        out += robustness_section(
            f"## 5. Robustness over training seeds {', '.join(str(s) for s in seeds)}",
            f"Sections 1–4 and the targets use training seed {seeds[0]}. Here the whole protocol is repeated with "
            "other model initializations and batch orders (same data, flips, random-removal draws and LDS subsets): "
            "mean ± std over seeds.",
            report["robustness"],
            len(seeds),
            tks,
        )
    own_seeds = settings["seeds"].get("own_splits", [])
    if own_seeds:
        out += robustness_section(
            f"## 6. Other splits: seeds {', '.join(str(s) for s in own_seeds)}",
            "Sections 1–5 use one train/validation/test split and one set of flipped labels. Here each seed draws "
            "its own split and flips (`load(split_seed=seed, flip_seed=seed)`) and trains with the same seed; the "
            "rest of the protocol is unchanged: mean ± std over these splits.",
            report["robustness_own_splits"],
            len(own_seeds),
            tks,
        )

    out += ["", "## Recommended default", "", report["recommendation"]["text"], ""]
    by_group = report.get("recommendation_by_group", {})
    if len(by_group) > 1:
        out += recommendation_agreement(report["recommendation"], by_group)
    out += [
        "Plots: `data_debugging_detection.png` (found@k curves), `data_debugging_cleansing.png` "
        "(test loss against k), `data_debugging_lds.png` (predicted against actual group effects).",
        "",
    ]
    return "\n".join(out)


def robustness_section(heading: str, intro: str, rob: dict[str, Any], n: int, tks: list[int]) -> list[str]:
    """Markdown: mean ± std per (case, method) over ``n`` runs, then targets 1 and 2 met per run."""
    out = [
        "",
        heading,
        "",
        intro,
        "",
        "| case | method | AUC | found@10% | " + " | ".join(f"test loss k = {k}" for k in tks) + " | LDS |",
        "|---|---|---|---|" + "---|" * (len(tks) + 1),
    ]
    for key, r in rob.items():
        for m in METHODS:
            v = r["methods"][m]
            out.append(
                f"| {key} | {m} | {v['auc']['mean']:.3f} ± {v['auc']['std']:.3f} | "
                f"{v['found_0.10']['mean']:.3f} ± {v['found_0.10']['std']:.3f} | "
                + " | ".join(f"{v[f'test_loss_k{k}']['mean']:.4f} ± {v[f'test_loss_k{k}']['std']:.4f}" for k in tks)
                + f" | {v['lds']['mean']:+.3f} ± {v['lds']['std']:.3f} |"
            )
        out.append(
            f"| {key} | *random* | | | "
            + " | ".join(
                f"{r['random_test_loss'][str(k)]['mean']:.4f} ± {r['random_test_loss'][str(k)]['std']:.4f}" for k in tks
            )
            + " | |"
        )
    out += [
        "",
        "Targets per run: target 1 (best toolkit method ≥ loss at every budget) and target 2 (unrolled below "
        "loss, TracIn and random at every target k) met in how many runs; head-to-head counts of unrolled's "
        "test loss below each opponent's.",
        "",
        "| case | target 1 met | target 2 met | "
        + " | ".join(f"unrolled < {o} @ k = {k}" for k in tks for o in ("loss", "tracin", "random"))
        + " |",
        "|---|---|---|" + "---|" * (3 * len(tks)),
    ]
    for key, r in rob.items():
        out.append(
            f"| {key} | {r['target1_met_seeds']}/{n} | {r['target2_met_seeds']}/{n} | "
            + " | ".join(f"{r['unrolled_beats'][str(k)][o]}/{n}" for k in tks for o in ("loss", "tracin", "random"))
            + " |"
        )
    return out


def recommendation_agreement(overall: dict[str, Any], by_group: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: each recommendation as derived from every group of runs alone and from all of them."""
    columns = {**{f"{g} ({f['runs']} runs)": f for g, f in by_group.items()}, f"all {overall['runs']} runs": overall}

    def questions(f: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
        """question → (method, the mean it rests on, whether it is level with the runner-up)."""
        det, lds = f["detection_default"], f["removal_effect_default"]
        rows = {"mislabel detection (mean AUC)": (det, f"{f['mean_auc'][det]:.3f}", False)}
        for label, v in f["cleansing_best_by_budget_group"].items():
            tie = "" if v["separated"] else f", level with `{v['runner_up']}`"
            rows[f"cleansing, {label} (mean test-loss change)"] = (
                v["best"],
                f"{v['mean_change']:+.4f}{tie}",
                not v["separated"],
            )
        rows["removal effects (mean LDS)"] = (lds, f"{f['mean_lds'][lds]:+.3f}", False)
        return rows

    table = {name: questions(f) for name, f in columns.items()}
    rows = list(next(iter(table.values())))
    out = [
        "Each recommendation derived from one group of runs alone and from all of them (method and the mean it "
        "rests on):",
        "",
        "| question | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for q in rows:
        out.append(f"| {q} | " + " | ".join(f"`{table[c][q][0]}` {table[c][q][1]}" for c in columns) + " |")
    groups = [c for c in columns if not c.startswith("all ")]
    differ = [q for q in rows if len({table[c][q][0] for c in groups}) > 1]
    ties = [q for q in differ if all(table[c][q][2] for c in columns)]
    out += [
        "",
        f"The groups agree on {len(rows) - len(differ)} of {len(rows)} recommendations"
        + (f"; they differ on {', '.join(differ)}" if differ else "")
        + (
            f", where every choice is level with its runner-up: {'these are' if len(ties) > 1 else 'that is'} "
            "a tie, not a recommendation"
            if ties and ties == differ
            else ""
        )
        + ". (“Level with”: the paired difference to the runner-up is within two standard errors over the runs.)",
        "",
    ]
    return out


def strip_curves(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON keeps found@k only at every 1 % of the ranking, not the whole per-sample curve."""
    for case in cases:
        n = case["n_train"]
        idx = [max(0, math.ceil(p / 100 * n) - 1) for p in range(1, 101)]
        for entry in case["methods"].values():
            curve = np.asarray(entry["detection"].pop("curve"))
            entry["detection"]["curve_every_percent"] = curve[idx]
    return cases


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    load_before = os.getloadavg()
    quick = args.quick
    ks = QUICK_KS if quick else KS
    n_subsets = QUICK_LDS_SUBSETS if quick else LDS_SUBSETS
    seeds = QUICK_TRAINING_SEEDS if quick else TRAINING_SEEDS
    grid = [("digits", 0.1)] if quick else [(name, noise) for name in SPECS for noise in NOISES]
    out_dir = output_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)

    own_seeds = OWN_SPLIT_SEEDS[:1] if quick else OWN_SPLIT_SEEDS
    runs = [run_case(SPECS[name], noise, ks, n_subsets, seed) for seed in seeds for name, noise in grid]
    own_runs = [
        run_case(SPECS[name], noise, ks, n_subsets, seed, own_split=True) for seed in own_seeds for name, noise in grid
    ]
    cases = [r for r in runs if r["seed"] == seeds[0]]  # the main run: tables, targets and plots
    extra_runs = [r for r in runs if r["seed"] != seeds[0]]

    plot_detection(cases, out_dir / f"{NAME}_detection.png")
    plot_cleansing(cases, ks, out_dir / f"{NAME}_cleansing.png")
    plot_lds(cases, out_dir / f"{NAME}_lds.png")

    # The recommended default rests on every run; each group's own choice shows whether it depends on the split.
    text, facts = recommendation(runs + own_runs, ks)
    by_group = {"split 0": recommendation(runs, ks)[1], "own splits": recommendation(own_runs, ks)[1]}
    targets = {"detection": target_detection(cases), "cleansing": target_cleansing(cases, ks)}
    report: dict[str, Any] = {
        **report_header(NAME, load_at_start=load_before),
        "settings": {
            "quick": quick,
            "methods": METHODS,
            "budgets": BUDGETS,
            "ks": ks,
            "target_ks": [k for k in TARGET_KS if k in ks],
            "random_draws": RANDOM_DRAWS,
            "lds_subsets": n_subsets,
            "lds_keep_fraction": 0.5,
            "bootstrap": BOOTSTRAP,
            "seeds": {
                "split": SPLIT_SEED,
                "flip": FLIP_SEED,
                "random_removal": RANDOM_REMOVAL_SEED,
                "lds": LDS_SEED,
                "bootstrap": BOOTSTRAP_SEED,
                "training_main": seeds[0],
                "training_all": seeds,
                "own_splits": own_seeds,
                "own_splits_note": "each seed draws the split, the flips and the training run (load_split)",
                "training_note": "keras.utils.set_random_seed(seed) before building the model and fit(seed=seed)",
            },
            "loss": LOSS,
            "influence_function": {"solver": "auto", "damping": "auto"},
            "datasets": {
                s.name: {
                    "model": s.model_desc,
                    "optimizer": "SGD",
                    "learning_rate": s.learning_rate,
                    "batch_size": s.batch_size,
                    "epochs": s.epochs,
                }
                for s in SPECS.values()
            },
        },
        "targets": {
            "detection_best_toolkit_ge_loss_every_budget": targets["detection"]["met"],
            "cleansing_unrolled_beats_loss_tracin_random_k10_k20": targets["cleansing"]["met"],
            "detection": targets["detection"],
            "cleansing": targets["cleansing"],
            "lds": {case_key(c): {m: c["methods"][m]["lds"]["spearman"] for m in METHODS} for c in cases},
        },
        "robustness": robustness(runs, ks),
        "robustness_own_splits": robustness(own_runs, ks),
        "recommendation": {"text": text, **facts},
        "recommendation_by_group": by_group,
        "cases": strip_curves(cases),
        "extra_seed_runs": strip_curves(extra_runs),
        "own_split_runs": strip_curves(own_runs),
    }
    report["total_wall_s"] = time.perf_counter() - start
    json_path, md_path = write_report(out_dir, NAME, report, markdown(report))
    print(f"\nwrote {json_path}, {md_path} and {NAME}_*.png in {report['total_wall_s']:.0f} s")


def main() -> None:
    parser = benchmark_parser(
        __doc__, "smoke run: digits 10 %% only, 10 LDS subsets, k=10,20", "data_debugging.{json,md} and the plots"
    )
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()

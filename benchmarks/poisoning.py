"""Poisoning / repair benchmark (scenario S5): optimise *training* data through training, compare the
four outer optimizers, and set it beside a test-time adversarial attack on the frozen model.

Setup
    scikit-learn digits, pixels / 16 in [0, 1], shuffled with seed 0: 1000 train / 400 validation /
    397 test. MLP 64-32-10 (tanh, softmax), float32, initial weights from
    ``keras.utils.set_random_seed(0)``; plain SGD, learning rate 0.5, batch 50, 8 epochs (T = 160
    steps), ``influence.fit(seed=0)``. Every outer step of ``influence.optimize_training_inputs``
    retrains with the recorded schedule (same batches, learning rates) and takes dE/dx_i or dE/dy_i
    from the unrolled reverse pass; E is the mean cross-entropy on the validation split. The held-out
    *test* split is never used by any optimisation: its numbers come from the model retrained on the
    final (poisoned / repaired) training data, which is the real outcome.

1. Poisoning 1 % and 3 % of the training inputs (10 / 30 samples; labels untouched), goal="poison":
    two choices of samples, (a) ``random``: the first 10 / 30 of one permutation of the training
    indices (seed 2, so the 1 % set is inside the 3 % set), (b) ``top_grad``: the 10 / 30 samples
    with the largest L2 norm of dE/dx_i of the clean run (one unrolled pass). Constraint: box
    [0, 1] only (no L∞ budget), plus the random sets with an L∞ budget of 0.25. Outer optimizer:
    the best of section 3 at its tuned step size. Control: the same samples replaced by uniform
    noise in [0, 1] (box case) or moved by random ±budget (budget case), retrained once.

2. Repair of flipped labels through their soft labels: 10 % of the training labels (100) moved to a
    different random class (seed 1, as in ``data_debugging.py``); trained on one-hot labels with
    categorical cross-entropy; then goal="repair", target="labels" on the 100 flipped samples (the
    indices are given, an oracle setting). Recovered = argmax of the optimised soft label equals the
    true label. References: the same run with the true labels restored (oracle), and with the
    flipped samples removed (c_i = 0). Control: the soft labels of 100 random *clean* samples
    (seed 3) optimised the same way (how many keep their correct label?). Extra: all 1000 soft labels
    optimised at once (no oracle indices), with the best optimizer and with plain SGD, each with its
    step size re-tuned on this task (``GRIDS["repair_all"]``).

3. The four outer optimizers (SGD, SGD + momentum 0.9, RMSprop, Adam) on the 3 % random poisoning
    task and on the repair task. Step sizes: a half-decade grid per optimizer (``GRIDS``), each point
    run for ``TUNE_STEPS`` outer steps; the point with the best final validation loss (highest for
    poisoning, lowest for repair) is then run for ``STEPS`` steps. Curves: validation loss against
    outer step and against wall time (warm: tracing happened in the tuning runs).

4. Test-time adversarial examples: the clean model frozen, the first 100 test images attacked with an
    L∞ budget of 0.1 inside [0, 1] (``influence.adversarial_examples``), the same four optimizers,
    each tuned over a grid by the final loss after ``ADV_STEPS`` steps.

Outputs
    ``reports/benchmarks/poisoning.json`` (settings, machine, every curve, tuning grids, indices),
    ``reports/benchmarks/poisoning.md`` (tables, interpretation) and the plots
    ``poisoning_curves_poison.png``, ``poisoning_curves_repair.png``,
    ``poisoning_curves_adversarial.png`` (optimizer comparisons), ``poisoning_settings.png``
    (section 1 curves), ``poisoning_examples.png`` (original vs poisoned inputs) and
    ``poisoning_soft_labels.png`` (repaired soft labels of flipped samples).
    ``--quick`` (2-point grids, few steps) writes under ``reports/_scratch/benchmarks/`` unless
    ``--out-dir`` is given.

Usage (from the repository root)::

    python benchmarks/poisoning.py            # full run, 5-8 minutes on 2 cores
    python benchmarks/poisoning.py --quick    # smoke test, about a minute
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import argparse
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
from sklearn.datasets import load_digits

import influence as inf
from influence.demo import mlp as demo_mlp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

tf.get_logger().setLevel("ERROR")
NAME = "poisoning"

SPLIT_SEED, FLIP_SEED, POISON_SEED, CONTROL_SEED, NOISE_SEED, MODEL_SEED = 0, 1, 2, 3, 4, 0
N_TRAIN, N_VAL, CLASSES = 1000, 400, 10
LEARNING_RATE, BATCH_SIZE, EPOCHS = 0.5, 50, 8
FRACTIONS = (0.01, 0.03)
FLIP_NOISE = 0.10
BUDGET = 0.25  # L∞ radius of the budgeted poisoning runs
ADV_IMAGES, ADV_BUDGET = 100, 0.1
STEPS, TUNE_STEPS, ADV_STEPS = 50, 15, 30
FRESH_SEEDS, QUICK_FRESH_SEEDS = (1, 2, 3), (1,)  # other runs (init + batch order) the final data are replayed on
QUICK_STEPS, QUICK_TUNE_STEPS, QUICK_ADV_STEPS = 4, 2, 5
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
LABELS = {"sgd": "SGD", "momentum": "SGD + momentum 0.9", "rmsprop": "RMSprop", "adam": "Adam"}
COLORS = {"sgd": "tab:blue", "momentum": "tab:orange", "rmsprop": "tab:green", "adam": "tab:red"}


def _half_decades(lo: int, hi: int) -> tuple[float, ...]:
    """1, 3, 10, 30 ... between 10**lo and 10**hi (inclusive), rounded."""
    return tuple(float(f"{m * 10.0**e:.3g}") for e in range(lo, hi + 1) for m in (1, 3) if m * 10.0**e <= 10.0**hi)


# Step-size grids per task and optimizer. dE/dx_i of one training pixel is ~1e-4..1e-3 and dE/dy_i
# ~1e-3..1e-2, so plain SGD needs large step sizes; RMSprop and Adam steps are ~lr per coordinate.
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "poison": {
        "sgd": _half_decades(1, 3) + (3000.0,),
        "momentum": _half_decades(0, 2) + (300.0,),
        "rmsprop": _half_decades(-3, 0),
        "adam": _half_decades(-3, 0),
    },
    "repair": {
        "sgd": _half_decades(0, 2) + (300.0,),
        "momentum": _half_decades(-1, 2),
        "rmsprop": _half_decades(-2, 0) + (3.0,),
        "adam": _half_decades(-2, 0) + (3.0,),
    },
    "repair_all": {
        "sgd": _half_decades(0, 2),
        "momentum": _half_decades(-1, 1) + (30.0,),
        "rmsprop": _half_decades(-3, -1),
        "adam": _half_decades(-3, -1),
    },
    "adversarial": {
        "sgd": _half_decades(0, 4),
        "momentum": _half_decades(-1, 3),
        "rmsprop": _half_decades(-4, -1) + (0.3,),
        "adam": _half_decades(-4, -1) + (0.3,),
    },
}


def make_optimizer(key: str, lr: float) -> inf.optimizers.Optimizer:
    if key == "sgd":
        return inf.optimizers.SGD(float(lr))
    if key == "momentum":
        return inf.optimizers.SGD(float(lr), momentum=0.9)
    if key == "rmsprop":
        return inf.optimizers.RMSprop(float(lr))
    return inf.optimizers.Adam(float(lr))


# --------------------------------------------------------------------------- data, models, evaluation


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray  # true labels
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load() -> Data:
    raw = load_digits()
    x, y = (raw.data / 16.0).astype(np.float32), raw.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    tr, va, te = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_VAL], order[N_TRAIN + N_VAL :]
    return Data(x[tr], y[tr], x[va], y[va], x[te], y[te])


def flip_labels(y: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``noise`` of the labels moved to a different random class; returns (noisy labels, sorted flipped indices)."""
    rng = np.random.default_rng(FLIP_SEED)
    order = rng.permutation(len(y))
    shifts = rng.integers(1, CLASSES, size=len(y))
    flipped = np.sort(order[: int(round(noise * len(y)))])
    noisy = y.copy()
    noisy[flipped] = (noisy[flipped] + shifts[flipped]) % CLASSES
    return noisy, flipped


def build_model(seed: int = MODEL_SEED) -> keras.Model:
    """The demo's MLP 64-32-10 (tanh, softmax), initial weights fixed by ``seed``."""
    return demo_mlp(seed)


def one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(CLASSES, dtype=np.float32)[y]


class Evaluator:
    """Loss and error of trainable weights on the validation and test splits (class-index labels in, either loss)."""

    def __init__(self, trajectory: inf.Trajectory, data: Data) -> None:
        self.trajectory = trajectory
        self.fn = inf.ModelFunction(trajectory.model)
        self.splits = {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}

    def metrics(self, weights: list[np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        w = [tf.constant(v, dtype=self.fn.dtype) for v in weights]
        for split, (x, y) in self.splits.items():
            labels = one_hot(y) if self.trajectory.loss.continuous_labels else y
            out[f"{split}_loss"] = inf.validation_loss(self.trajectory, weights, x, labels)
            pred = np.argmax(np.asarray(self.fn(w, tf.constant(x, dtype=self.fn.dtype))), axis=-1)
            out[f"{split}_error"] = float(np.mean(pred != y))
        return out


class Runs:
    """The main recorded run (seed 0) plus runs with other seeds (other initial weights and batch order).

    ``metrics(x, y)`` replays the main run on the given training data (``influence.retrain``) and reports
    validation/test loss and error; ``fresh`` adds the test metrics of the *other* runs replayed on the same data,
    i.e. whether an effect optimised through the main run's schedule survives a different training run.
    """

    def __init__(self, data: Data, x: np.ndarray, y: np.ndarray, loss: str, fresh_seeds: tuple[int, ...]) -> None:
        self.trajs = [
            inf.fit(
                build_model(seed),
                x,
                y,
                loss=loss,
                optimizer=inf.optimizers.SGD(LEARNING_RATE),
                batch_size=BATCH_SIZE,
                epochs=EPOCHS,
                seed=seed,
            )
            for seed in (MODEL_SEED, *fresh_seeds)
        ]
        self.fresh_seeds = fresh_seeds
        self.evaluators = [Evaluator(t, data) for t in self.trajs]

    @property
    def main(self) -> inf.Trajectory:
        return self.trajs[0]

    def metrics(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> dict[str, Any]:
        runs = [
            ev.metrics(inf.retrain(t, x, y, sample_weight=sample_weight)) for t, ev in zip(self.trajs, self.evaluators)
        ]
        out: dict[str, Any] = dict(runs[0])
        if self.fresh_seeds:
            out["fresh"] = {
                "seeds": self.fresh_seeds,
                "test_error": [r["test_error"] for r in runs[1:]],
                "test_loss": [r["test_loss"] for r in runs[1:]],
                "test_error_mean": float(np.mean([r["test_error"] for r in runs[1:]])),
                "test_loss_mean": float(np.mean([r["test_loss"] for r in runs[1:]])),
            }
        return out


def curves(res: inf.InputOptimization) -> dict[str, Any]:
    actual = np.diff(res.val_loss)
    pred = np.asarray(res.predicted_change)
    return {
        "optimizer": res.optimizer,
        "val_loss": res.val_loss,
        "val_error": res.val_error,
        "seconds": res.seconds,
        "predicted_change": pred,
        "actual_change": actual,
        "first_step_ratio_actual_over_predicted": float(actual[0] / pred[0]) if len(pred) and pred[0] else None,
        "prediction_corr": float(np.corrcoef(pred, actual)[0, 1]) if len(pred) > 2 and np.std(pred) > 0 else None,
    }


# --------------------------------------------------------------------------- step-size tuning + comparison


def better(goal: str, a: float, b: float) -> bool:
    """Is final loss ``a`` better than ``b`` for the goal (poison/adversarial: higher; repair: lower)?"""
    return a < b if goal == "repair" else a > b


def tune_one(
    goal: str,
    run_one: Callable[[str, float, int], inf.InputOptimization],
    key: str,
    grid: tuple[float, ...],
    tune_steps: int,
    task: str = "",
) -> tuple[float, dict[str, Any]]:
    """The step size of ``grid`` with the best final validation loss after ``tune_steps`` outer steps."""
    finals: dict[str, float | None] = {}
    best_lr = None
    for lr in grid:
        t0 = time.perf_counter()
        final = float(run_one(key, lr, tune_steps).val_loss[-1])
        finals[repr(lr)] = final if np.isfinite(final) else None
        if np.isfinite(final) and (best_lr is None or better(goal, final, finals[repr(best_lr)])):
            best_lr = lr
        print(f"  [{task or goal}] tune {key:8s} lr={lr:<8g} final={final:.4f} ({time.perf_counter() - t0:.1f} s)")
    assert best_lr is not None, f"every step size diverged for {key} on {task or goal}"
    tuning = {
        "grid": list(grid),
        "tune_steps": tune_steps,
        "final_val_loss": finals,
        "best_lr": best_lr,
        "best_at_grid_edge": best_lr in (grid[0], grid[-1]) and len(grid) > 2,
    }
    return best_lr, tuning


def tune_and_compare(
    task: str, run_one: Callable[[str, float, int], inf.InputOptimization], grid_scale: int, tune_steps: int, steps: int
) -> dict[str, Any]:
    """Grid over step sizes (``tune_steps`` each), then the best step size per optimizer for ``steps`` steps."""
    goal = "repair" if task == "repair" else "poison"
    out: dict[str, Any] = {"tuning": {}, "runs": {}}
    for key in OPTIMIZERS:
        grid = GRIDS[task][key] if grid_scale == 0 else GRIDS[task][key][1 : 1 + grid_scale]
        best_lr, out["tuning"][key] = tune_one(goal, run_one, key, grid, tune_steps, task)
        res = run_one(key, best_lr, steps)
        out["runs"][key] = {"lr": best_lr, **curves(res), "result": res}
        print(f"  [{task}] {key:8s} lr={best_lr:g}: {res.val_loss[0]:.4f} -> {res.val_loss[-1]:.4f}")
    finals = {k: float(out["runs"][k]["val_loss"][-1]) for k in OPTIMIZERS}
    best = max(finals, key=finals.get) if goal == "poison" else min(finals, key=finals.get)  # type: ignore[arg-type]
    out["best"] = best
    total = finals[best] - float(out["runs"][best]["val_loss"][0])
    for key in OPTIMIZERS:
        run = out["runs"][key]
        change = np.asarray(run["val_loss"]) - run["val_loss"][0]
        reached = np.nonzero(change / total >= 0.9)[0] if total else np.array([])
        run["steps_to_90pct_of_best"] = int(reached[0]) if len(reached) else None
        run["seconds_to_90pct_of_best"] = float(run["seconds"][reached[0]]) if len(reached) else None
        run["seconds_per_step"] = float(np.diff(run["seconds"]).mean())
    return out


# --------------------------------------------------------------------------- the four sections


def section_poison(data: Data, quick: bool) -> dict[str, Any]:
    steps, tune_steps = (QUICK_STEPS, QUICK_TUNE_STEPS) if quick else (STEPS, TUNE_STEPS)
    x, y = data.x_train, data.y_train
    runs = Runs(data, x, y, "sparse_categorical_crossentropy", QUICK_FRESH_SEEDS if quick else FRESH_SEEDS)
    traj = runs.main
    clean = runs.metrics(x, y)
    print(f"clean run: val {clean['val_loss']:.4f}/{clean['val_error']:.3f}, test {clean['test_error']:.3f}")
    grad = inf.unrolled(traj, x, y, data.x_val, data.y_val, progress=False).input_grad
    grad_norm = np.linalg.norm(grad.reshape(len(x), -1), axis=1)
    perm = np.random.default_rng(POISON_SEED).permutation(len(x))
    sets = {}
    for frac in FRACTIONS:
        k = int(round(frac * len(x)))
        sets[("random", k)] = np.sort(perm[:k])
        sets[("top_grad", k)] = np.sort(np.argsort(-grad_norm)[:k])
    k3 = int(round(FRACTIONS[-1] * len(x)))

    def run_one(key: str, lr: float, n_steps: int, idx: np.ndarray | None = None, budget: float | None = None):
        return inf.optimize_training_inputs(
            traj,
            x,
            y,
            data.x_val,
            data.y_val,
            sets[("random", k3)] if idx is None else idx,
            goal="poison",
            target="inputs",
            outer_optimizer=make_optimizer(key, lr),
            steps=n_steps,
            bounds=(0.0, 1.0),
            budget=budget,
        )

    print("section 3, poisoning: tuning the outer optimizers on 3 % random")
    comparison = tune_and_compare("poison", run_one, 2 if quick else 0, tune_steps, steps)
    best, best_lr = comparison["best"], comparison["runs"][comparison["best"]]["lr"]

    print(f"section 1: poisoning settings with {best} lr={best_lr:g}")
    settings: list[dict[str, Any]] = []
    noise_rng = np.random.default_rng(NOISE_SEED)
    for (selection, k), idx in sets.items():
        for budget in (None, BUDGET) if selection == "random" else (None,):
            if selection == "random" and k == k3 and budget is None:
                res = comparison["runs"][best]["result"]  # the comparison run is this setting
            else:
                res = run_one(best, best_lr, steps, idx, budget)
            after = runs.metrics(res.x, y)
            x_noise = x.copy()
            if budget is None:
                x_noise[idx] = noise_rng.uniform(0, 1, size=x[idx].shape)
            else:
                x_noise[idx] = np.clip(x[idx] + budget * noise_rng.choice([-1.0, 1.0], size=x[idx].shape), 0, 1)
            control = runs.metrics(x_noise, y)
            moved = res.x[idx] - x[idx]
            settings.append(
                {
                    "selection": selection,
                    "k": k,
                    "fraction": k / len(x),
                    "budget": budget,
                    "indices": idx,
                    "optimizer": best,
                    "lr": best_lr,
                    "steps": steps,
                    "before": clean,
                    "after": after,
                    "noise_control": control,
                    "max_abs_change": float(np.abs(moved).max()),
                    "mean_abs_change": float(np.abs(moved).mean()),
                    "fraction_pixels_moved": float(np.mean(np.abs(moved) > 0.01)),
                    "fraction_pixels_at_bounds": float(np.mean((res.x[idx] <= 0.0) | (res.x[idx] >= 1.0))),
                    "fraction_pixels_at_bounds_before": float(np.mean((x[idx] <= 0.0) | (x[idx] >= 1.0))),
                    "curves": curves(res),
                }
            )
            print(
                f"  {selection:8s} k={k:3d} budget={budget}: test error {clean['test_error']:.3f} -> "
                f"{after['test_error']:.3f} (noise control {control['test_error']:.3f})"
            )
    poisoned = comparison["runs"][best]["result"].x
    check = hypergradient_check(traj, poisoned, y, data, sets[("random", k3)])
    print(f"  float64 check at the poisoned data: predicted {check['predicted']:.6g}, central diff {check['fd']:.6g}")
    for key in OPTIMIZERS:  # the final test metrics of each optimizer's poisoned data (3 % random)
        comparison["runs"][key]["test_after"] = runs.metrics(comparison["runs"][key]["result"].x, y)
        del comparison["runs"][key]["result"]
    return {
        "clean": clean,
        "comparison": comparison,
        "settings": settings,
        "examples": {"indices": sets[("random", k3)], "original": x[sets[("random", k3)]]},
        "poisoned_examples": poisoned[sets[("random", k3)]],
        "labels_of_examples": y[sets[("random", k3)]],
        "hypergradient_check": check,
        "traj": traj,
    }


def hypergradient_check(
    traj: inf.Trajectory, x: np.ndarray, y: np.ndarray, data: Data, idx: np.ndarray, h: float = 1e-5
) -> dict[str, Any]:
    """float64 central difference of E along a random direction on the poisoned rows vs ⟨dE/dx, d⟩, at ``x``."""
    x64, xv = x.astype(np.float64), data.x_val.astype(np.float64)
    t64 = inf.as_float64_trajectory(traj, x64, y)
    grad = inf.unrolled(t64, x64, y, xv, data.y_val, progress=False).input_grad
    direction = np.zeros_like(x64)
    direction[idx] = np.random.default_rng(NOISE_SEED).normal(size=x64[idx].shape)

    def loss(xx: np.ndarray) -> float:
        return inf.validation_loss(t64, inf.retrain(t64, xx, y), xv, data.y_val)

    predicted = float(np.sum(grad * direction))
    fd = (loss(x64 + h * direction) - loss(x64 - h * direction)) / (2 * h)
    return {"h": h, "predicted": predicted, "fd": fd, "relative_error": abs(fd - predicted) / abs(fd)}


def section_repair(data: Data, quick: bool) -> dict[str, Any]:
    steps, tune_steps = (QUICK_STEPS, QUICK_TUNE_STEPS) if quick else (STEPS, TUNE_STEPS)
    y_true = data.y_train
    y_noisy, flipped = flip_labels(y_true, FLIP_NOISE)
    x, Y = data.x_train, one_hot(y_noisy)
    yv = one_hot(data.y_val)
    runs = Runs(data, x, Y, "categorical_crossentropy", QUICK_FRESH_SEEDS if quick else FRESH_SEEDS)
    traj = runs.main
    noisy = runs.metrics(x, Y)
    oracle = runs.metrics(x, one_hot(y_true))
    c = np.ones(len(x))
    c[flipped] = 0
    removed = runs.metrics(x, Y, sample_weight=c)
    clean_pool = np.setdiff1d(np.arange(len(x)), flipped)
    control_idx = np.sort(np.random.default_rng(CONTROL_SEED).choice(clean_pool, size=len(flipped), replace=False))
    print(f"noisy run: val {noisy['val_loss']:.4f}/{noisy['val_error']:.3f}, test {noisy['test_error']:.3f}")

    def run_one(key: str, lr: float, n_steps: int, idx: np.ndarray | None = None) -> inf.InputOptimization:
        return inf.optimize_training_inputs(
            traj,
            x,
            Y,
            data.x_val,
            yv,
            flipped if idx is None else idx,
            goal="repair",
            target="labels",
            outer_optimizer=make_optimizer(key, lr),
            steps=n_steps,
        )

    def summarize(res: inf.InputOptimization, idx: np.ndarray) -> dict[str, Any]:
        soft = res.y[idx]
        hard = Y.copy()
        hard[idx] = one_hot(np.argmax(soft, axis=1))
        is_flipped = np.isin(idx, flipped)
        correct = np.argmax(soft, axis=1) == y_true[idx]
        return {
            "after_soft": runs.metrics(x, res.y),
            "after_hard_argmax": runs.metrics(x, hard),
            "flipped_in_set": int(is_flipped.sum()),
            "flipped_recovered": int(np.sum(correct & is_flipped)),
            "clean_in_set": int((~is_flipped).sum()),
            "clean_kept": int(np.sum(correct & ~is_flipped)),
            "still_on_given_label": int(np.sum(np.argmax(soft, axis=1) == y_noisy[idx])),
            "mean_prob_true_label": float(np.mean(soft[np.arange(len(idx)), y_true[idx]])),
            "prob_true_label_below_half": int(np.sum(soft[np.arange(len(idx)), y_true[idx]] < 0.5)),
            "mean_max_prob": float(np.mean(soft.max(axis=1))),
            "soft_labels": soft,
        }

    print("section 3, repair: tuning the outer optimizers on the flipped labels")
    comparison = tune_and_compare("repair", run_one, 2 if quick else 0, tune_steps, steps)
    best, best_lr = comparison["best"], comparison["runs"][comparison["best"]]["lr"]
    for key in OPTIMIZERS:
        run = comparison["runs"][key]
        run["summary"] = summarize(run.pop("result"), flipped) | {"optimizer": key, "lr": run["lr"]}
    main = comparison["runs"][best]["summary"]
    print(f"  flipped: {main['flipped_recovered']}/{len(flipped)} recovered with {best}")

    print(f"section 2: control (clean samples) and all labels with {best} lr={best_lr:g}")
    res = run_one(best, best_lr, steps, control_idx)
    control = summarize(res, control_idx) | {"curves": curves(res)}
    print(f"  control: {control['clean_kept']}/{len(control_idx)} clean labels kept")
    everything: dict[str, Any] = {}
    for key in dict.fromkeys((best, "sgd")):  # the best optimizer and plain SGD, step size re-tuned for 1000 samples
        grid = GRIDS["repair_all"][key] if not quick else GRIDS["repair_all"][key][1:3]
        lr, tuning = tune_one("repair", lambda k, r, n: run_one(k, r, n, np.arange(len(x))), key, grid, tune_steps)
        res = run_one(key, lr, steps, np.arange(len(x)))
        summary = summarize(res, np.arange(len(x)))
        summary.pop("soft_labels")
        everything[key] = summary | {"lr": lr, "tuning": tuning, "curves": curves(res)}
        print(
            f"  all labels ({key}, lr {lr:g}): {summary['flipped_recovered']}/{len(flipped)} flipped recovered, "
            f"{summary['clean_kept']}/{summary['clean_in_set']} clean kept"
        )
    return {
        "flipped": flipped,
        "control_indices": control_idx,
        "noisy": noisy,
        "oracle_true_labels": oracle,
        "flipped_removed": removed,
        "comparison": comparison,
        "main": main | {"optimizer": best, "lr": best_lr},
        "control": control | {"optimizer": best, "lr": best_lr},
        "all_labels": everything,
        "given_labels_flipped": y_noisy[flipped],
        "true_labels_flipped": y_true[flipped],
    }


def section_adversarial(data: Data, model: keras.Model, quick: bool) -> dict[str, Any]:
    steps = QUICK_ADV_STEPS if quick else ADV_STEPS
    x, y = data.x_test[:ADV_IMAGES], data.y_test[:ADV_IMAGES]

    def run_one(key: str, lr: float, n_steps: int) -> inf.InputOptimization:
        return inf.adversarial_examples(
            model,
            "sparse_categorical_crossentropy",
            x,
            y,
            outer_optimizer=make_optimizer(key, lr),
            steps=n_steps,
            bounds=(0.0, 1.0),
            budget=ADV_BUDGET,
        )

    print("section 4: test-time adversarial examples")
    comparison = tune_and_compare("adversarial", run_one, 2 if quick else 0, steps, steps)
    for key in OPTIMIZERS:
        res = comparison["runs"][key].pop("result")
        comparison["runs"][key]["max_abs_change"] = float(np.abs(res.x - x).max())
    return {"images": ADV_IMAGES, "budget": ADV_BUDGET, "steps": steps, "comparison": comparison}


# --------------------------------------------------------------------------- plots


def plot_comparison(comparison: dict[str, Any], title: str, ylabel: str, path: Path, error: bool = True) -> None:
    ncols = 3 if error else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.3 * ncols, 3.6))
    for key in OPTIMIZERS:
        run = comparison["runs"][key]
        label = f"{LABELS[key]} (lr {run['lr']:g})"
        steps = np.arange(len(run["val_loss"]))
        axes[0].plot(steps, run["val_loss"], "-", color=COLORS[key], label=label)
        axes[1].plot(run["seconds"], run["val_loss"], "-", color=COLORS[key], label=label)
        if error:
            axes[2].plot(steps, 100 * np.asarray(run["val_error"]), "-", color=COLORS[key], label=label)
    axes[0].set_xlabel("outer step")
    axes[1].set_xlabel("wall time (s, 2 CPU cores)")
    for ax in axes[:2]:
        ax.set_ylabel(ylabel)
    if error:
        axes[2].set_xlabel("outer step")
        axes[2].set_ylabel("error (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_settings(poison: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for s in poison["settings"]:
        label = f"{s['selection']} {s['k']} ({100 * s['fraction']:.0f} %)" + (
            f", L∞ {s['budget']:g}" if s["budget"] else ""
        )
        style = "--" if s["budget"] else "-"
        axes[0].plot(s["curves"]["val_loss"], style, label=label)
        axes[1].plot(100 * np.asarray(s["curves"]["val_error"]), style, label=label)
    axes[0].set_ylabel("validation loss (retrained)")
    axes[1].set_ylabel("validation error (%)")
    for ax in axes:
        ax.set_xlabel("outer step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Poisoning training inputs ({poison['settings'][0]['optimizer']}), digits MLP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(poison: dict[str, Any], path: Path, n: int = 10) -> None:
    original, poisoned, labels = (
        poison["examples"]["original"],
        poison["poisoned_examples"],
        poison["labels_of_examples"],
    )
    n = min(n, len(original))
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8))
    for j in range(n):
        for row, img in enumerate((original[j], poisoned[j])):
            axes[row, j].imshow(img.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
        axes[0, j].set_title(f"label {labels[j]}", fontsize=8)
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("poisoned", fontsize=8)
    fig.suptitle("3 % random poisoning set: first training inputs before / after (box [0, 1], no budget)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soft_labels(repair: dict[str, Any], path: Path, n: int = 10) -> None:
    soft = np.asarray(repair["main"]["soft_labels"])[:n]
    given, true = repair["given_labels_flipped"][:n], repair["true_labels_flipped"][:n]
    fig, axes = plt.subplots(1, len(soft), figsize=(1.5 * len(soft), 2.4), sharey=True)
    for ax, p, g, t in zip(np.atleast_1d(axes), soft, given, true):
        colors = ["tab:green" if c == t else "tab:red" if c == g else "0.6" for c in range(CLASSES)]
        ax.bar(range(CLASSES), p, color=colors)
        ax.set_xticks(range(CLASSES), [str(c) for c in range(CLASSES)], fontsize=6)
        ax.set_title(f"given {g}, true {t}", fontsize=7)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("optimised soft label")
    fig.suptitle(
        f"Repair ({LABELS[repair['main']['optimizer']]}): soft labels of the first flipped samples "
        "(green = true class, red = flipped label given)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def pct(v: float | None) -> str:
    return fmt(None if v is None else 100 * v, ".1f", " %")


def fresh_err(metrics: dict[str, Any]) -> str:
    """Mean test error of the other training runs replayed on the same data."""
    return pct(metrics["fresh"]["test_error_mean"]) if "fresh" in metrics else "—"


def comparison_table(
    comparison: dict[str, Any],
    at: tuple[int, ...],
    extra: Callable[[dict], list[str]] | None = None,
    extra_head: tuple[str, ...] = (),
) -> list[str]:
    steps = len(comparison["runs"][OPTIMIZERS[0]]["val_loss"]) - 1
    at = tuple(s for s in at if s <= steps)
    head = (
        ["optimizer", "step size (grid)"]
        + [f"loss @{s}" for s in at]
        + ["error @end", "steps to 90 %", "s to 90 %", "s/step"]
    )
    head += list(extra_head)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in OPTIMIZERS:
        run, tune = comparison["runs"][key], comparison["tuning"][key]
        grid = ", ".join(f"{v:g}" for v in tune["grid"])
        edge = " ⚠ edge" if tune["best_at_grid_edge"] else ""
        row = [LABELS[key] + (" **(best)**" if key == comparison["best"] else ""), f"{run['lr']:g}{edge} ({grid})"]
        row += [f"{run['val_loss'][s]:.4f}" for s in at]
        row += [
            pct(run["val_error"][-1]),
            fmt(run["steps_to_90pct_of_best"], "d"),
            fmt(run["seconds_to_90pct_of_best"], ".1f"),
            fmt(run["seconds_per_step"], ".3f"),
        ]
        row += extra(run) if extra else []
        out.append("| " + " | ".join(row) + " |")
    return out


def markdown(report: dict[str, Any]) -> str:
    s, poison, repair, adv = report["settings"], report["poisoning"], report["repair"], report["adversarial"]
    clean = poison["clean"]
    quick = " --quick" if s["quick"] else ""
    out = [
        "# Poisoning, repair and adversarial examples (scenario S5)",
        "",
        f"Generated by `python benchmarks/poisoning.py{quick}` in {report['total_wall_s'] / 60:.1f} min on "
        f"{report['machine']['cpu_count']} CPUs (TensorFlow {report['machine']['tensorflow']}, Keras "
        f"{report['machine']['keras']}). Protocol: module docstring of `benchmarks/poisoning.py`.",
        "",
        f"digits (pixels / 16), {N_TRAIN} train / {N_VAL} validation / {s['split']['test']} test; "
        f"MLP 64-32-10 tanh/softmax float32; SGD lr {LEARNING_RATE}, batch {BATCH_SIZE}, {EPOCHS} epochs "
        f"(T = {poison['steps_T']}). Every outer step = one retraining with the recorded schedule + one unrolled "
        "reverse pass. Test numbers are always from the model *retrained* on the final training data; the test "
        f"split is never seen by the optimisation. One test image = {100 / s['split']['test']:.2f} percentage "
        f"points of test error; one validation image = {100 / N_VAL:.2f}.",
        "",
        "## 1. Poisoning training inputs (validation loss maximised)",
        "",
        f"Outer optimizer: {LABELS[poison['settings'][0]['optimizer']]}, step size {poison['settings'][0]['lr']:g} "
        f"(best of section 3), {poison['settings'][0]['steps']} outer steps; labels of the poisoned samples "
        "unchanged. `random`: a fixed random subset (seed 2); `top_grad`: the samples with the largest ‖dE/dx_i‖₂ "
        "in the clean run. Control: the same samples replaced by uniform noise (box) or moved by random ±budget.",
        "",
        "The poisoned training runs are chaotic: replays are bitwise reproducible (in one process and between two "
        "runs of this script), but an earlier revision of this script, with the same computation for this run, "
        "ended the 3 % Adam run at validation loss 2.374 instead of 2.315 (curves equal to 3 decimals up to "
        "step 25): float32 round-off amplified by the poisoned dynamics. Read the last digits accordingly.",
        "",
        f"`other runs` = the same final training data replayed through {len(s['fresh_seeds'])} other training runs "
        f"(seeds {', '.join(map(str, s['fresh_seeds']))}: other initial weights and batch order; mean test error): "
        "does the attack survive a training run it was not optimised through?",
        "",
        "| samples | L∞ budget | val loss | val error | test loss | test error | test error, other runs |"
        " noise control: test error (other runs) | max abs Δpixel | pixels moved > 0.01 |"
        " pixels at 0 or 1 (before → after) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| none (clean) | — | {clean['val_loss']:.4f} | {pct(clean['val_error'])} | {clean['test_loss']:.4f} | "
        f"{pct(clean['test_error'])} | {fresh_err(clean)} | — | — | — | — |",
    ]
    for st in poison["settings"]:
        a, ctrl = st["after"], st["noise_control"]
        out.append(
            f"| {st['selection']} {st['k']} ({100 * st['fraction']:.0f} %) | {fmt(st['budget'], 'g')} | "
            f"{a['val_loss']:.4f} | {pct(a['val_error'])} | {a['test_loss']:.4f} | **{pct(a['test_error'])}** | "
            f"{fresh_err(a)} | {pct(ctrl['test_error'])} ({fresh_err(ctrl)}) | {st['max_abs_change']:.2f} | "
            f"{100 * st['fraction_pixels_moved']:.0f} % | "
            f"{100 * st['fraction_pixels_at_bounds_before']:.0f} → {100 * st['fraction_pixels_at_bounds']:.0f} % |"
        )
    best3 = max(
        (st for st in poison["settings"] if st["k"] == max(x["k"] for x in poison["settings"])),
        key=lambda st: st["after"]["test_error"],
    )
    out += [
        "",
        "Published reference, side by side (a different setting): Koh, Steinhardt & Liang, *Stronger data "
        "poisoning attacks break data sanitization defenses* (arXiv 1811.00741, 2018; Machine Learning 2022) "
        "report that **adding** 3 % poisoned points raised the test error of a **linear** model (SVM) on Enron spam "
        "from 3 % to 24 % (IMDB: 12 % to 29 %), *with* data-sanitization defenses in place. (This figure is often "
        "attributed to Koh & Liang 2017, *Understanding black-box predictions via influence functions*, whose "
        "training-set attack instead perturbs existing images to flip single test predictions.) Here 3 % of the "
        f"training points are **modified** (not added) in a 10-class MLP with no defense: best 3 % setting "
        f"{best3['selection']} (budget {fmt(best3['budget'], 'g')}): test error {pct(clean['test_error'])} → "
        f"{pct(best3['after']['test_error'])} in the run it was optimised through, {fresh_err(best3['after'])} "
        "averaged over other training runs. Different data, model, threat model and optimiser: compare the order of "
        "magnitude only.",
        "",
        "## 2. Repairing flipped labels through their soft labels",
        "",
    ]
    m, ctrl = repair["main"], repair["control"]
    n_flip = len(repair["flipped"])
    out += [
        f"{n_flip} training labels ({100 * FLIP_NOISE:.0f} %) flipped to another class; one-hot labels, categorical "
        f"cross-entropy. Soft labels optimised with {LABELS[m['optimizer']]} (step size {m['lr']:g}, "
        f"{s['steps']} outer steps, best of section 3), kept on the simplex by the package's projection. "
        "`soft` = retrained on the optimised soft labels; `argmax` = retrained on their argmax as hard labels.",
        "",
        "| run | labels optimised | recovered / kept | val loss | val error | test loss | test error |"
        " test error, other runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("noisy labels (before)", "—", "—", repair["noisy"]),
        ("flipped samples removed (c_i = 0)", "—", "—", repair["flipped_removed"]),
        ("true labels restored (oracle)", "—", "—", repair["oracle_true_labels"]),
        ("repair, soft labels", f"{n_flip} flipped", f"{m['flipped_recovered']}/{n_flip} recovered", m["after_soft"]),
        (
            "repair, argmax labels",
            f"{n_flip} flipped",
            f"{m['flipped_recovered']}/{n_flip} recovered",
            m["after_hard_argmax"],
        ),
        (
            "control, soft labels",
            f"{ctrl['clean_in_set']} clean",
            f"{ctrl['clean_kept']}/{ctrl['clean_in_set']} kept",
            ctrl["after_soft"],
        ),
    ]
    for key, e in repair["all_labels"].items():
        rows.append(
            (
                f"all labels, soft ({LABELS[key]}, lr {e['lr']:g} re-tuned)",
                f"all {N_TRAIN}",
                f"{e['flipped_recovered']}/{n_flip} recovered, {e['clean_kept']}/{e['clean_in_set']} kept",
                e["after_soft"],
            )
        )
    for name, what, count, mt in rows:
        out.append(
            f"| {name} | {what} | {count} | {mt['val_loss']:.4f} | {pct(mt['val_error'])} | "
            f"{mt['test_loss']:.4f} | {pct(mt['test_error'])} | {fresh_err(mt)} |"
        )
    out += [
        "",
        f"Flipped samples: mean probability on the true label after repair {m['mean_prob_true_label']:.2f} "
        f"(mean max probability {m['mean_max_prob']:.2f}); {m['still_on_given_label']} still put the most mass on "
        "the flipped label. Control: mean probability on the (correct) given label "
        f"{ctrl['mean_prob_true_label']:.2f}.",
        "",
        "## 3. The four outer optimizers",
        "",
        f"Step size: half-decade grid per optimizer, {s['tune_steps']} outer steps per grid point, the best final "
        f"validation loss wins, then {s['steps']} steps at that step size (curves: "
        "`poisoning_curves_poison.png`, `poisoning_curves_repair.png`). ⚠ edge = best at an end of the grid. "
        "`steps to 90 %` = first outer step whose change of validation loss reaches 90 % of the best optimizer's "
        "final change. Wall time is measured warm (tracing done in the tuning runs) on a shared 2-core machine.",
        "",
        "### Poisoning 3 % (random set), validation loss (higher = stronger attack)",
        "",
    ]
    at = (0, 1, 5, 10, 25, 50)
    out += comparison_table(
        poison["comparison"],
        at,
        lambda run: [
            pct(run["test_after"]["test_error"]),
            fresh_err(run["test_after"]),
            fmt(run["first_step_ratio_actual_over_predicted"], ".2f"),
        ],
        ("test error @end", "other runs", "step 1 actual/predicted"),
    )
    out += ["", "### Repair of the flipped soft labels, validation loss (lower = better)", ""]
    out += comparison_table(
        repair["comparison"],
        at,
        lambda run: [
            f"{run['summary']['flipped_recovered']}/{n_flip}",
            pct(run["summary"]["after_soft"]["test_error"]),
            fmt(run["first_step_ratio_actual_over_predicted"], ".2f"),
        ],
        ("recovered", "test error @end", "step 1 actual/predicted"),
    )
    out += [
        "",
        "## 4. Test-time adversarial examples (frozen clean model)",
        "",
        f"The first {adv['images']} test images, L∞ budget {adv['budget']:g}, box [0, 1], {adv['steps']} steps; loss "
        "and error on the attacked images (`poisoning_curves_adversarial.png`). Step size tuned over the grid by the "
        "final loss at the same number of steps.",
        "",
    ]
    out += comparison_table(adv["comparison"], (0, 1, 2, 5, 10, 30))
    out += ["", "## Interpretation", ""] + [f"- {line}" for line in report["interpretation"]]
    return "\n".join(out) + "\n"


def progress(comparison: dict[str, Any]) -> str:
    """Each optimizer's final change of loss as a share of the best optimizer's, e.g. 'SGD 18 %, Adam 100 %'."""
    runs = comparison["runs"]
    total = runs[comparison["best"]]["val_loss"][-1] - runs[comparison["best"]]["val_loss"][0]
    return ", ".join(
        f"{LABELS[k]} {100 * (runs[k]['val_loss'][-1] - runs[k]['val_loss'][0]) / total:.0f} %" for k in OPTIMIZERS
    )


def close_to_best(comparison: dict[str, Any], tol: float = 0.03) -> list[str]:
    """Optimizers whose final change is within ``tol`` (relative) of the best one's."""
    runs = comparison["runs"]
    total = runs[comparison["best"]]["val_loss"][-1] - runs[comparison["best"]]["val_loss"][0]
    return [LABELS[k] for k in OPTIMIZERS if (runs[k]["val_loss"][-1] - runs[k]["val_loss"][0]) / total >= 1 - tol]


def interpretation(report: dict[str, Any]) -> list[str]:
    poison, repair, adv = report["poisoning"], report["repair"], report["adversarial"]
    clean = poison["clean"]
    lines = []
    by = {(st["selection"], st["k"], st["budget"]): st for st in poison["settings"]}
    k1, k3 = (int(round(f * N_TRAIN)) for f in FRACTIONS)
    r1, r3, t3 = by.get(("random", k1, None)), by.get(("random", k3, None)), by.get(("top_grad", k3, None))
    b3 = by.get(("random", k3, BUDGET))
    if r1 and r3 and t3 and b3:
        strength = "strong" if r3["after"]["test_error"] > 3 * clean["test_error"] else "modest"
        survives = r3["after"].get("fresh", {}).get("test_error_mean")
        clean_fresh = clean.get("fresh", {}).get("test_error_mean")
        lines.append(
            f"Poisoning through the recorded run is {strength} here: modifying {k3} random training inputs (box only) "
            f"raises the retrained model's test error from {pct(clean['test_error'])} to "
            f"{pct(r3['after']['test_error'])} ({k1} inputs: {pct(r1['after']['test_error'])}); the {k3} samples with "
            f"the largest input gradient give {pct(t3['after']['test_error'])}. An L∞ budget of {BUDGET:g} caps it at "
            f"{pct(b3['after']['test_error'])}. The same samples replaced by uniform noise give "
            f"{pct(r3['noise_control']['test_error'])}, so the damage comes from the optimisation, not from losing "
            "those samples."
            + (
                f" The test loss rises with the validation loss ({clean['test_loss']:.3f} → "
                f"{r3['after']['test_loss']:.3f}), so this is not overfitting the validation split."
                if r3["after"]["test_loss"] - clean["test_loss"] > 0.5 * (r3["after"]["val_loss"] - clean["val_loss"])
                else ""
            )
        )
        increase = r3["after"]["test_error"] - clean["test_error"]
        if survives is not None and clean_fresh is not None and increase > 0.02:
            transfer = (survives - clean_fresh) / increase
            lines.append(
                "Transfer: the attack is optimised through the recorded schedule (initial weights, batch order, "
                f"learning rates). Replayed through {len(report['settings']['fresh_seeds'])} other training runs, "
                f"the same poisoned data (random {k3}) give {pct(survives)} test error against {pct(clean_fresh)} for "
                f"clean data in those runs, i.e. {100 * transfer:.0f} % of the error increase survives (top_grad "
                f"{k3}: {fresh_err(t3['after'])})."
                + (
                    " An attack measured on the run it was optimised through overstates what an attacker who does "
                    "not control the training seed achieves."
                    if transfer < 0.5
                    else " Most of the damage does not depend on the exact schedule."
                )
            )
    pc, rc, ac = poison["comparison"], repair["comparison"], adv["comparison"]
    per_step = [pc["runs"][k]["seconds_per_step"] for k in OPTIMIZERS] + [
        rc["runs"][k]["seconds_per_step"] for k in OPTIMIZERS
    ]
    lines.append(
        f"Outer optimizers, final change of validation loss as a share of the best: poisoning {progress(pc)}; "
        f"repair {progress(rc)}; test-time attack {progress(ac)}. Within 3 % of the best: poisoning "
        f"{', '.join(close_to_best(pc))}; repair {', '.join(close_to_best(rc))}; attack "
        f"{', '.join(close_to_best(ac))}. Every outer step costs the same work for all four (one retraining + one "
        f"unrolled pass; measured {min(per_step):.2f}–{max(per_step):.2f} s per step on this shared 2-core "
        "machine, the spread being load noise), so the curves against wall time have the shape of the curves "
        "against steps and the comparison is about progress per step."
    )
    adaptive = {"rmsprop", "adam"}
    if pc["best"] in adaptive:
        sgd_steps = np.diff(pc["runs"]["sgd"]["val_loss"])
        lines.append(
            "Why the adaptive optimizers win at poisoning: dE/dx_i is tiny and very unevenly scaled across pixels "
            "and samples, so one SGD step size is too small for most pixels or too large for a few (at its tuned "
            f"step size, {int(np.sum(sgd_steps < 0))} of SGD's {len(sgd_steps)} steps *lowered* the poisoning "
            "objective); RMSprop/Adam move every pixel by about the step size per step and push pixels to the box "
            "bounds, close to a sign-gradient attack."
        )
    m, ctrl = repair["main"], repair["control"]
    n_flip, n_ctrl = len(repair["flipped"]), ctrl["clean_in_set"]
    lines.append(
        f"Repair with known indices: {m['flipped_recovered']}/{n_flip} flipped labels are recovered and the test "
        f"error goes {pct(repair['noisy']['test_error'])} → {pct(m['after_soft']['test_error'])} (true labels "
        f"restored: {pct(repair['oracle_true_labels']['test_error'])}; flipped samples removed: "
        f"{pct(repair['flipped_removed']['test_error'])})."
        + (
            f" The repaired run even beats the true labels on validation loss ({m['after_soft']['val_loss']:.3f} vs "
            f"{repair['oracle_true_labels']['val_loss']:.3f}): soft labels are fitted to the validation set and to "
            "this schedule, not only corrected."
            if m["after_soft"]["val_loss"] < repair["oracle_true_labels"]["val_loss"]
            else ""
        )
        + f" Other training runs: {fresh_err(repair['noisy'])} → {fresh_err(m['after_soft'])} (true labels "
        f"{fresh_err(repair['oracle_true_labels'])}). A few test images are within noise."
    )
    if ctrl["clean_kept"] < 0.9 * n_ctrl:
        lines.append(
            f"The control is the warning: optimised the same way, only {ctrl['clean_kept']}/{n_ctrl} *clean* samples "
            f"keep their correct label ({ctrl['prob_true_label_below_half']} end with less than half of their mass on "
            f"it), while the validation loss goes {repair['noisy']['val_loss']:.3f} → "
            f"{ctrl['after_soft']['val_loss']:.3f}. The label hypergradient says which label *lowers validation "
            "loss under this training run*, not which label is true: argmax of a repaired soft label is a good "
            "relabelling only for samples already known (or ranked) to be wrong."
        )
    else:
        lines.append(
            f"Control: {ctrl['clean_kept']}/{n_ctrl} clean samples keep their correct label when optimised the same "
            "way, so the repair does not simply scramble the labels it is given."
        )
    for key, e in repair["all_labels"].items():
        lines.append(
            f"All {N_TRAIN} soft labels free ({LABELS[key]}, step size {e['lr']:g}): {e['flipped_recovered']}/{n_flip} "
            f"flipped recovered, {e['clean_in_set'] - e['clean_kept']}/{e['clean_in_set']} clean labels changed, "
            f"test error {pct(e['after_soft']['test_error'])} (other runs {fresh_err(e['after_soft'])}, noisy "
            f"{fresh_err(repair['noisy'])})."
        )
    best_adv = ac["runs"][ac["best"]]
    reach = ", ".join(f"{LABELS[k]} {fmt(ac['runs'][k]['steps_to_90pct_of_best'], 'd')}" for k in OPTIMIZERS)
    lines.append(
        f"Test-time attack vs training-time poisoning: an L∞ {adv['budget']:g} perturbation of each attacked test "
        f"image takes the error on those images {pct(best_adv['val_error'][0])} → {pct(best_adv['val_error'][-1])} "
        f"in {adv['steps']} steps of ≈{1000 * best_adv['seconds_per_step']:.0f} ms (steps to 90 %: {reach})."
        + (
            " All four optimizers end at the same loss within 3 %: the budget binds, and the optimizers differ "
            "only in how fast they reach the corner of the L∞ ball."
            if len(close_to_best(ac)) == len(OPTIMIZERS)
            else ""
        )
        + " Poisoning instead changes a few training inputs, each step costs a full retraining, and the damage falls "
        "on every test image. Different threat models: the attacker controls the test inputs vs a few training "
        "inputs."
    )

    def stat(comp: dict[str, Any], field: str) -> str:
        vals = [run[field] for run in comp["runs"].values() if run[field] is not None]
        return f"{min(vals):.2f}–{max(vals):.2f}" if vals else "—"

    check = poison["hypergradient_check"]
    lines.append(
        "First-order predictions ⟨∇E, Δ⟩ of each outer step, actual/predicted on the first step: poisoning "
        f"{stat(pc, 'first_step_ratio_actual_over_predicted')}, repair "
        f"{stat(rc, 'first_step_ratio_actual_over_predicted')}; correlation of predicted and actual per-step changes "
        f"over the whole run: poisoning {stat(pc, 'prediction_corr')}, repair {stat(rc, 'prediction_corr')}."
        + (
            " The tuned poisoning steps are large, so the linearisation only guides the direction; once the poison "
            "has grown the retrained loss is a rough function of the inputs."
            if min(run["prediction_corr"] or 1.0 for run in pc["runs"].values()) < 0.5
            else ""
        )
        + " The hypergradient itself stays exact: at the final 3 % "
        f"poisoned data a float64 central difference along a random direction gives {check['fd']:.6g} vs "
        f"⟨∇E, d⟩ = {check['predicted']:.6g} (relative error {check['relative_error']:.1e})."
    )
    return lines


def strip(obj: Any) -> Any:
    """Drop non-serialisable objects (trajectories, raw results) before writing the JSON."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in ("traj", "result")}
    if isinstance(obj, (list, tuple)):
        return [strip(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    quick = args.quick
    out_dir = output_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load()

    poison = section_poison(data, quick)
    traj = poison.pop("traj")
    poison["steps_T"] = traj.steps
    repair = section_repair(data, quick)
    model = traj.model
    for variable, value in zip(model.trainable_variables, traj.final_weights):  # the clean model, frozen
        variable.assign(value)
    adversarial = section_adversarial(data, model, quick)

    plot_comparison(
        poison["comparison"],
        "Poisoning 3 % of the training inputs: retrained validation loss",
        "validation loss (retrained)",
        out_dir / f"{NAME}_curves_poison.png",
    )
    plot_comparison(
        repair["comparison"],
        "Repairing 10 % flipped labels (soft labels): retrained validation loss",
        "validation loss (retrained)",
        out_dir / f"{NAME}_curves_repair.png",
    )
    plot_comparison(
        adversarial["comparison"],
        f"Test-time attack, {ADV_IMAGES} test images, L∞ {ADV_BUDGET}",
        "loss on attacked images",
        out_dir / f"{NAME}_curves_adversarial.png",
    )
    plot_settings(poison, out_dir / f"{NAME}_settings.png")
    plot_examples(poison, out_dir / f"{NAME}_examples.png")
    plot_soft_labels(repair, out_dir / f"{NAME}_soft_labels.png")

    report: dict[str, Any] = {
        **report_header(NAME),
        "settings": {
            "quick": quick,
            "data": "sklearn digits, x / 16, shuffled with seed 0",
            "split": {"train": N_TRAIN, "val": N_VAL, "test": len(data.x_test)},
            "model": "MLP 64-32-10 tanh/softmax float32, keras.utils.set_random_seed(0)",
            "training": {
                "optimizer": "SGD",
                "learning_rate": LEARNING_RATE,
                "batch_size": BATCH_SIZE,
                "epochs": EPOCHS,
                "fit_seed": 0,
            },
            "seeds": {
                "split": SPLIT_SEED,
                "flip": FLIP_SEED,
                "poison_subset": POISON_SEED,
                "repair_control": CONTROL_SEED,
                "noise_control": NOISE_SEED,
                "model": MODEL_SEED,
            },
            "poison_fractions": FRACTIONS,
            "poison_budget": BUDGET,
            "bounds": [0.0, 1.0],
            "flip_noise": FLIP_NOISE,
            "steps": QUICK_STEPS if quick else STEPS,
            "fresh_seeds": QUICK_FRESH_SEEDS if quick else FRESH_SEEDS,
            "tune_steps": QUICK_TUNE_STEPS if quick else TUNE_STEPS,
            "adversarial": {
                "images": ADV_IMAGES,
                "budget": ADV_BUDGET,
                "steps": QUICK_ADV_STEPS if quick else ADV_STEPS,
            },
            "grids": GRIDS,
            "momentum": 0.9,
            "rmsprop": {"rho": 0.9, "epsilon": 1e-7},
            "adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
        },
        "poisoning": poison,
        "repair": repair,
        "adversarial": adversarial,
    }
    report["interpretation"] = interpretation(report)
    report["total_wall_s"] = time.perf_counter() - start
    md = markdown(report)
    json_path, md_path = write_report(out_dir, NAME, strip(report), md)
    print(f"\nwrote {json_path}, {md_path} and {NAME}_*.png in {report['total_wall_s']:.0f} s")


def main() -> None:
    parser = benchmark_parser(
        __doc__, "smoke run: 2-point step-size grids, a few outer steps", "poisoning.{json,md} and the plots"
    )
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()

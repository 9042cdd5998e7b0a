"""Benchmark of ``influence.unrolled``: speed of the reverse pass, fidelity against actual
retraining, and memory of the three memory strategies.

Setup
    scikit-learn ``load_digits`` (pixels / 16), shuffled with seed 0: 1000 train / 400 validation /
    397 test. 10 % of the training labels are flipped (seed 0; each to a different random class).
    Main model: MLP 64-32-10 (tanh, softmax), float32, sparse categorical cross-entropy, batch 50,
    8 epochs, plain SGD with learning rate 0.5: T = 160 steps. Weights from
    ``keras.utils.set_random_seed(0)``; ``influence.fit(seed=0)`` fixes the batch order.

1. Speed
    Ratio ``UnrolledResult.seconds / Trajectory.seconds`` (reverse pass ÷ training loop) in one
    process, measured before anything else in it has run TensorFlow:

    * cold: a process's first ``fit`` and first ``unrolled``; both include tracing their
      ``tf.function``s and first-use costs (before them TensorFlow ran only fit's untimed input checks).
      The median of three processes: the benchmark's own and two fresh ones started after the
      other speed runs (one cold call is a single draw of compile time on a shared machine);
    * warm: the model reset to the same initial weights, ``fit`` again (a fresh but identical
      Trajectory; the compiled program of this model, loss and optimizer is reused) and ``unrolled``
      on it; the repeat (of ``--repeats``, default 11) with the median ratio;
    * steady: the same Trajectory again: median of 11 ``unrolled`` calls ÷ median of 11 ``retrain``
      calls (the training loop of ``fit`` without recording the history, after one warm-up call);
    * loop: the compiled reverse loop ÷ the compiled training loop, called directly (no Python
      around them): the per-step cost ratio.

    Warm, steady and loop are repeated with plain TensorFlow graphs (``fit(jit_compile=False)``)
    to show what XLA compilation changes.

2. Fidelity
    ``removal_effect[i]`` against the actual change of validation loss when sample i is
    removed: ``val_loss(retrain(c_i = 0)) − val_loss(retrain(c = 1))`` (the retrained baseline, so
    float noise of the replay cancels), for the 25 samples with the most negative removal effect
    plus 25 others drawn at random (seed 0). Pearson, Spearman and Kendall τ (scipy.stats).
    Models: (a) the main MLP with SGD 0.5, (b) the same MLP with Adam 0.01, (c) a CNN on the
    digits as 8×8×1 images, Conv2D(8, 3, tanh) → Flatten → Dense(10, softmax), SGD 0.3 (under
    fit's default ``jit_compile="auto"``: plain graphs on a CPU, XLA on a GPU; the same figures).
    Diagnostic rows: each model in float64 (``influence.as_float64``), with a derivative check
    (central difference ``(E(c_i = 1 − ε) − E(c_i = 1 + ε)) / 2ε``, ε = 1e-5, for the same samples:
    tests the hypergradient itself rather than its first-order extrapolation to a whole removal;
    a one-sided ε = 1e-3 is not enough for Adam, whose update is strongly nonlinear), a
    second-order diagnostic (each sample's curvature d²E/dc_i² from a central second difference
    through retraining, ε = 1e-2 and 1e-3; prediction removal_effect + curvature / 2: does the
    Taylor polynomial of degree 2 close the gap?), and the main MLP with a smaller learning rate
    (0.1) to show how the linearisation error grows with the step size.

3. Memory against the number of steps
    T = 160, 640, 2560 (8, 32, 128 epochs), ``fit(record_budget_bytes=0)`` so the trajectory holds
    no history and every strategy has to produce the states itself. For each (strategy, T):

    * analytical: ``strategy.states_held(T)`` × bytes per state (weights + optimizer state);
    * per-step reverse buffers (read off the code, not part of ``states_held``): each reverse
      call of L steps (a segment, or a chunk of at most 256 steps / 16 MiB of states) stacks
      dE/dx and dE/dc per batch entry, L·B·(d + 1) values;
    * measured: in a fresh subprocess, RSS peak (VmHWM, reset through ``/proc/self/clear_refs``)
      minus RSS just before the call, for the first call (includes tracing) and for warm calls
      on the same trajectory (program cached; 3 calls, 1 for replay; time = the fastest, as the
      machine may be shared). Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so large freed
      buffers go back to the kernel and RSS follows live memory more closely.

    Replay costs O(T²) steps and is skipped above T = 640 (its time is extrapolated). The log-log
    slope of checkpointed held states against T (≈ 0.5 for √T) is fitted, and the three
    strategies' removal effects are compared at T = 160.

Outputs
    ``reports/benchmarks/unrolled.json`` (all numbers, settings, machine, targets met/missed) and
    ``reports/benchmarks/unrolled.md`` (tables). ``--quick`` (10 samples, T = 160 only, no
    diagnostic rows) writes to ``reports/_scratch/benchmarks/`` unless ``--out-dir`` is given.

Targets
    reverse ÷ training ≤ 2.0; fidelity Pearson ≥ 0.97 and Spearman ≥ 0.98 (MLP, SGD and Adam),
    Pearson ≥ 0.9 (CNN).

Usage (from the repository root)::

    python benchmarks/unrolled.py            # full run: about 4-5 CPU-minutes on 2 cores (longer if shared)
    python benchmarks/unrolled.py --quick    # smoke test, 1-2 minutes
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from _common import (
    MB,
    benchmark_parser,
    fmt,
    output_dir,
    proc_status_kb,
    report_header,
    reset_peak_rss,
    run_json_worker,
    write_report,
)
from scipy import stats
from sklearn.datasets import load_digits

import influence as inf
from influence.demo import mlp as demo_mlp

# Every fit builds a new Program whose tf.functions are traced afresh (by design); TensorFlow's
# "triggered tf.function retracing" warnings about that would only clutter the output.
tf.get_logger().setLevel("ERROR")


SEED = 0
N_TRAIN, N_VAL = 1000, 400
FLIP_FRACTION = 0.1
CLASSES = 10
LOSS = "sparse_categorical_crossentropy"
BATCH = 50
EPOCHS = 8
SGD_LR, ADAM_LR, CNN_LR, SMALL_SGD_LR = 0.5, 0.01, 0.3, 0.1

N_HARMFUL, N_RANDOM = 25, 25  # fidelity sample: most harmful + random others
COLD_EXTRA_PROCESSES = 2  # cold = median over the main process and these fresh ones
DERIVATIVE_EPS = 1e-5  # central difference, float64 rows only
CURVATURE_EPS = (1e-2, 1e-3)  # central second differences for the second-order diagnostic (float64 rows)

MEMORY_EPOCHS = (8, 32, 128)  # T = 160, 640, 2560
STRATEGIES = ("store_all", "checkpointed", "replay")
WARM_CALLS = {"store_all": 3, "checkpointed": 3, "replay": 1}
REPLAY_MAX_STEPS = 640
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "MALLOC_MMAP_THRESHOLD_": "131072"}

RATIO_TARGET = 2.0
RESPONSE_SAMPLES = 3  # samples whose E(c_i) curve is traced: the largest rank displacements
RESPONSE_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
PEARSON_TARGET, SPEARMAN_TARGET = 0.97, 0.98
CNN_PEARSON_TARGET = 0.9
SQRT_SLOPE_RANGE = (0.4, 0.6)  # checkpointed held states ∝ T^slope
AGREEMENT_TOL = 1e-4  # max |difference| between strategies / max |removal effect|


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray  # with flipped labels
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    flipped: np.ndarray  # indices into the training set

    def images(self) -> Data:
        """The same data with inputs shaped (n, 8, 8, 1)."""
        shape = (-1, 8, 8, 1)
        return Data(
            self.x_train.reshape(shape),
            self.y_train,
            self.x_val.reshape(shape),
            self.y_val,
            self.x_test.reshape(shape),
            self.y_test,
            self.flipped,
        )

    def astype(self, dtype: type) -> Data:
        return Data(
            self.x_train.astype(dtype),
            self.y_train,
            self.x_val.astype(dtype),
            self.y_val,
            self.x_test.astype(dtype),
            self.y_test,
            self.flipped,
        )


def load_data(seed: int = SEED) -> Data:
    """Digits / 16, shuffled: 1000 train, 400 validation, rest test; 10 % of train labels flipped."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, val, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_VAL], order[N_TRAIN + N_VAL :]
    y_train = y[train].copy()
    flipped = np.sort(rng.choice(N_TRAIN, int(FLIP_FRACTION * N_TRAIN), replace=False))
    y_train[flipped] = (y_train[flipped] + rng.integers(1, CLASSES, size=len(flipped))) % CLASSES
    return Data(x[train], y_train, x[val], y[val], x[test], y[test], flipped)


def build_mlp(seed: int = SEED) -> keras.Model:
    """The demo's MLP 64-32-10 (tanh, softmax), initial weights fixed by ``seed``."""
    return demo_mlp(seed)


def build_cnn(seed: int = SEED) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )


@dataclass(frozen=True)
class Case:
    """One fidelity row: a model, its optimizer, dtype and targets."""

    key: str
    model: str
    build: Callable[[], keras.Model]
    optimizer: Callable[[], inf.optimizers.Optimizer]
    optimizer_desc: str
    images: bool = False
    float64: bool = False
    role: str = "main"
    pearson_target: float | None = None
    spearman_target: float | None = None
    derivative_check: bool = False


def fidelity_cases(quick: bool) -> list[Case]:
    """The three main rows (with targets); unless ``quick``, their float64 twins and a small-lr MLP."""

    def sgd(lr: float) -> Callable[[], inf.optimizers.Optimizer]:
        return lambda: inf.optimizers.SGD(learning_rate=lr)

    def adam() -> inf.optimizers.Optimizer:
        return inf.optimizers.Adam(learning_rate=ADAM_LR)

    mlp, cnn = "MLP 64-32-10", "CNN conv8(3×3)-10"
    targets = {"pearson_target": PEARSON_TARGET, "spearman_target": SPEARMAN_TARGET}
    main = [
        Case("mlp_sgd", mlp, build_mlp, sgd(SGD_LR), f"SGD {SGD_LR}", **targets),
        Case("mlp_adam", mlp, build_mlp, adam, f"Adam {ADAM_LR}", **targets),
        Case("cnn_sgd", cnn, build_cnn, sgd(CNN_LR), f"SGD {CNN_LR}", images=True, pearson_target=CNN_PEARSON_TARGET),
    ]
    if quick:
        return main
    diagnostic = {"role": "diagnostic", "pearson_target": None, "spearman_target": None}
    float64 = [replace(c, key=c.key + "_float64", float64=True, derivative_check=True, **diagnostic) for c in main]
    small_lr = Case(f"mlp_sgd_lr{SMALL_SGD_LR}", mlp, build_mlp, sgd(SMALL_SGD_LR), f"SGD {SMALL_SGD_LR}", **diagnostic)
    return main + float64 + [small_lr]


class Evaluator:
    """Validation/test loss and accuracy of given trainable weights."""

    def __init__(self, trajectory: inf.Trajectory, data: Data) -> None:
        self.loss = trajectory.loss
        self.fn = inf.ModelFunction(trajectory.model)
        self.val = (tf.constant(data.x_val, dtype=self.fn.dtype), tf.constant(data.y_val))
        self.test = (tf.constant(data.x_test, dtype=self.fn.dtype), tf.constant(data.y_test))

    def _outputs(self, weights: list[np.ndarray], x: tf.Tensor) -> tf.Tensor:
        return self.fn([tf.constant(w) for w in weights], x)

    def val_loss(self, weights: list[np.ndarray]) -> float:
        x, y = self.val
        return float(self.loss.mean(y, self._outputs(weights, x)))

    def accuracy(self, weights: list[np.ndarray], split: str) -> float:
        x, y = self.val if split == "val" else self.test
        return float(np.mean(np.argmax(np.asarray(self._outputs(weights, x)), axis=1) == np.asarray(y)))


# --------------------------------------------------------------------------- 1. speed


def fit_mlp(model: keras.Model, data: Data, epochs: int = EPOCHS, **kwargs: Any) -> inf.Trajectory:
    optimizer = inf.optimizers.SGD(learning_rate=SGD_LR)
    return inf.fit(
        model, data.x_train, data.y_train, loss=LOSS, optimizer=optimizer, batch_size=BATCH, epochs=epochs,
        seed=SEED, **kwargs,
    )  # fmt: skip


def unrolled(trajectory: inf.Trajectory, data: Data, strategy: Any = "auto") -> inf.UnrolledResult:
    return inf.unrolled(
        trajectory, data.x_train, data.y_train, data.x_val, data.y_val, strategy=strategy, progress=False
    )


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def loop_seconds(trajectory: inf.Trajectory, data: Data, calls: int = 21) -> dict[str, float]:
    """Median time of the compiled training loop and of the compiled reverse loop alone (no Python around)."""
    from influence.trajectory import _data_tensors

    program = trajectory.program()
    x, y, c = _data_tensors(program, data.x_train, data.y_train, trajectory.sample_weight)
    w0 = [tf.constant(w) for w in trajectory.initial_weights]
    s0 = trajectory.initial_state()
    history = [tf.constant(h) for h in trajectory.weights_history or []]
    states = [tf.constant(h) for h in trajectory.state_history or []]
    lam_s = [tf.zeros_like(s) for s in s0]

    def train() -> None:
        program.run(w0, s0, 0, trajectory.steps, x, y, c)[0][0].numpy()

    def reverse() -> None:
        program.reverse(history, states, 0, w0, lam_s, x, y, c)[2].numpy()

    train()
    reverse()
    # Interleaved, so a change of machine load during the measurement hits both sides alike.
    times = [(timed(train)[1], timed(reverse)[1]) for _ in range(calls)]
    out = {"training_s": statistics.median(t for t, _ in times), "reverse_s": statistics.median(r for _, r in times)}
    out["ratio"] = out["reverse_s"] / out["training_s"]
    out["ratio_of_minima"] = min(r for _, r in times) / min(t for t, _ in times)
    return out


def cold_worker() -> None:
    """A fresh process's first fit and first unrolled (compiling included): one more cold sample."""
    data = load_data()
    trajectory = fit_mlp(build_mlp(), data)
    result = unrolled(trajectory, data)
    emit(training_s=trajectory.seconds, reverse_s=result.seconds, ratio=result.seconds / trajectory.seconds)


def cold_samples(first: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The median of this process's cold run and COLD_EXTRA_PROCESSES fresh ones: one cold call is one draw
    of compile time on a shared machine. Every run is kept in ``runs``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-worker"]
    runs = [first] + [run_json_worker(cmd, timeout=timeout, env=dict(os.environ), stderr_lines=10)
                      for _ in range(COLD_EXTRA_PROCESSES)]  # fmt: skip
    measured = [r for r in runs if "ratio" in r]
    median_run = sorted(measured, key=lambda r: r["ratio"])[(len(measured) - 1) // 2]
    cold = {key: median_run[key] for key in ("training_s", "reverse_s", "ratio")}
    cold["runs"] = runs
    return cold


def speed_section(data: Data, repeats: int, cold_timeout: float) -> dict[str, Any]:
    """Cold, warm and steady-state reverse ÷ training ratios for the main MLP (must run first)."""
    model = build_mlp()
    initial = model.get_weights()

    trajectory, fit_wall = timed(lambda: fit_mlp(model, data))
    result, unrolled_wall = timed(lambda: unrolled(trajectory, data))
    cold = {
        "training_s": trajectory.seconds,
        "reverse_s": result.seconds,
        "ratio": result.seconds / trajectory.seconds,
        "fit_call_s": fit_wall,
        "unrolled_call_s": unrolled_wall,
    }
    reference = result.removal_effect

    def warm_runs(jit_compile: bool) -> dict[str, Any]:
        runs = []
        for _ in range(repeats + (0 if jit_compile else 1)):  # plain graphs: the first repeat traces
            model.set_weights(initial)
            trajectory = fit_mlp(model, data, jit_compile=jit_compile)
            result = unrolled(trajectory, data)
            runs.append(
                {
                    "training_s": trajectory.seconds,
                    "reverse_s": result.seconds,
                    "ratio": result.seconds / trajectory.seconds,
                    "max_abs_diff_vs_cold": float(np.max(np.abs(result.removal_effect - reference))),
                }
            )
        runs = runs if jit_compile else runs[1:]
        median_run = sorted(runs, key=lambda run: run["ratio"])[(len(runs) - 1) // 2]
        warm: dict[str, Any] = {key: median_run[key] for key in ("training_s", "reverse_s", "ratio")}
        warm["ratio_of_minima"] = min(run["reverse_s"] for run in runs) / min(run["training_s"] for run in runs)
        warm["runs"] = runs
        return warm

    def steady_runs(trajectory: inf.Trajectory) -> dict[str, Any]:
        inf.retrain(trajectory, data.x_train, data.y_train)  # compiles the non-recording training loop
        retrain_all, reverse_all = [], []
        for _ in range(11):  # interleaved, as in loop_seconds
            retrain_all.append(timed(lambda: inf.retrain(trajectory, data.x_train, data.y_train))[1])
            reverse_all.append(unrolled(trajectory, data).seconds)
        return {
            "training_s": statistics.median(retrain_all),
            "reverse_s": statistics.median(reverse_all),
            "ratio": statistics.median(reverse_all) / statistics.median(retrain_all),
            "ratio_of_minima": min(reverse_all) / min(retrain_all),
            "training_all_s": retrain_all,
            "reverse_all_s": reverse_all,
        }

    warm = warm_runs(jit_compile=True)
    steady = steady_runs(trajectory)
    loop = loop_seconds(trajectory, data)
    # The same measurements with plain TensorFlow graphs (fit(jit_compile=False)), for comparison.
    model.set_weights(initial)
    plain_trajectory = fit_mlp(model, data, jit_compile=False)
    unrolled(plain_trajectory, data)
    plain = {"warm": warm_runs(jit_compile=False), "steady": steady_runs(plain_trajectory)}
    plain["loop"] = loop_seconds(plain_trajectory, data)
    cold = cold_samples(cold, cold_timeout) if cold_timeout > 0 else cold

    return {
        "steps": trajectory.steps,
        "strategy": result.strategy,
        "repeats": repeats,
        "definitions": {
            "training_s": "Trajectory.seconds: fit's training loop (compiling on first use, T steps recording the "
            "weight history) — excludes input checks",
            "reverse_s": "UnrolledResult.seconds: everything after input checks (compiling on first use, "
            "validation gradient, reverse pass over T steps)",
            "cold": "first fit and first unrolled of a process; both include tracing and XLA-compiling their "
            "functions and first-use costs (TensorFlow ran only fit's untimed input checks before); the median of "
            f"the benchmark's own process and {COLD_EXTRA_PROCESSES} fresh ones",
            "warm": "model reset to the same initial weights, fit again (a new Trajectory; the compiled program "
            "of this model, loss and optimizer is reused), unrolled on it; the repeat with the median ratio",
            "steady": "same Trajectory: median of 11 unrolled calls / median of 11 retrain calls (retrain = fit's "
            "loop without recording)",
            "loop": "the compiled functions alone, no Python around them: reverse loop over T steps / training "
            "loop over T steps (median of 21 interleaved calls each) — the per-step cost ratio",
        },
        "cold": cold,
        "warm": warm,
        "steady": steady,
        "loop": loop,
        "plain_graphs": plain,
        "bytes_per_state": state_bytes(trajectory),
        "params": int(sum(w.size for w in trajectory.initial_weights)),
    }


def state_bytes(trajectory: inf.Trajectory) -> int:
    """Bytes of one (weights + optimizer state) copy."""
    state = trajectory.initial_state()
    return int(
        sum(w.nbytes for w in trajectory.initial_weights) + sum(s.dtype.size * s.shape.num_elements() for s in state)
    )


# --------------------------------------------------------------------------- 2. fidelity


def fidelity_row(case: Case, data: Data, n_harmful: int, n_random: int) -> dict[str, Any]:
    """Predicted vs actual removal effects for one model/optimizer/dtype."""
    data = data.images() if case.images else data
    model = case.build()
    if case.float64:
        model = inf.as_float64(model)
        data = data.astype(np.float64)
    x, y = data.x_train, data.y_train
    trajectory = inf.fit(model, x, y, loss=LOSS, optimizer=case.optimizer(), batch_size=BATCH, epochs=EPOCHS, seed=SEED)
    result = unrolled(trajectory, data)
    evaluator = Evaluator(trajectory, data)

    start = time.perf_counter()
    baseline_weights = inf.retrain(trajectory, x, y)
    baseline = evaluator.val_loss(baseline_weights)
    effect = result.removal_effect
    harmful = np.argsort(effect)[:n_harmful]
    rest = np.setdiff1d(np.arange(len(x)), harmful)
    others = np.random.default_rng(SEED).choice(rest, n_random, replace=False)
    chosen = np.concatenate([harmful, others])

    def curve(i: int, scales: tuple[float, ...]) -> np.ndarray:
        """Retrained change of validation loss with sample i's weight scaled (the package's check)."""
        table = inf.removal_curve(trajectory, x, y, data.x_val, data.y_val, int(i),
                                  scales=scales, removal_effect=effect)  # fmt: skip
        return table["actual_change"].to_numpy()

    actual = inf.actual_removal_effect(trajectory, x, y, data.x_val, data.y_val, chosen, progress=False)
    predicted = effect[chosen]
    retrain_s = time.perf_counter() - start

    row = {
        "key": case.key,
        "model": case.model,
        "optimizer": case.optimizer_desc,
        "dtype": "float64" if case.float64 else "float32",
        "role": case.role,
        "steps": trajectory.steps,
        "strategy": result.strategy,
        "val_loss": baseline,
        "val_accuracy": evaluator.accuracy(baseline_weights, "val"),
        "test_accuracy": evaluator.accuracy(baseline_weights, "test"),
        "unrolled_val_loss_minus_retrained": result.val_loss - baseline,
        "n_compared": len(chosen),
        "pearson": float(stats.pearsonr(predicted, actual)[0]),
        "spearman": float(stats.spearmanr(predicted, actual)[0]),
        "kendall_tau": float(stats.kendalltau(predicted, actual)[0]),
        "spearman_within_harmful": float(stats.spearmanr(predicted[:n_harmful], actual[:n_harmful])[0]),
        "spearman_within_random": float(stats.spearmanr(predicted[n_harmful:], actual[n_harmful:])[0]),
        "mean_actual_over_predicted_harmful": float(np.mean(actual[:n_harmful] / predicted[:n_harmful])),
        "flipped_among_most_harmful": f"{int(np.isin(harmful, data.flipped).sum())}/{n_harmful}",
        "pearson_target": case.pearson_target,
        "spearman_target": case.spearman_target,
        "fit_s": trajectory.seconds,
        "unrolled_s": result.seconds,
        "retrain_all_s": retrain_s,
        "samples": {"index": chosen, "predicted": predicted, "actual": actual},
    }
    if case.role == "main" and case.spearman_target is not None:
        # The samples that cost Spearman most (largest rank displacement): their validation loss along c_i.
        displacement = np.abs(stats.rankdata(predicted) - stats.rankdata(actual))
        worst = np.argsort(-displacement, kind="stable")[:RESPONSE_SAMPLES]
        row["response_curves"] = {
            "weights": list(RESPONSE_WEIGHTS),
            "samples": [
                {
                    "index": int(chosen[k]),
                    "flipped": bool(np.isin(chosen[k], data.flipped)),
                    "predicted": float(predicted[k]),
                    "change": curve(chosen[k], RESPONSE_WEIGHTS).tolist(),
                }
                for k in worst
            ],
        }
    if case.derivative_check:
        eps = DERIVATIVE_EPS
        finite_diff = np.array([np.subtract(*curve(i, (1.0 - eps, 1.0 + eps))) / (2 * eps) for i in chosen])
        row["derivative_check"] = {
            "eps": eps,
            "what": "central difference (E(c_i = 1 - eps) - E(c_i = 1 + eps)) / (2 eps) vs removal_effect "
            "(both = -dE/dc_i)",
            "pearson": float(stats.pearsonr(predicted, finite_diff)[0]),
            "spearman": float(stats.spearmanr(predicted, finite_diff)[0]),
            "max_rel_error": float(np.max(np.abs(predicted - finite_diff)) / np.max(np.abs(finite_diff))),
        }
        # Is the miss the second-order term? Curvature κ_i = d²E/dc_i² from a central second difference
        # through retraining; the Taylor prediction of removal (Δc_i = −1) is removal_effect_i + κ_i / 2.
        # Two step sizes: a smooth response gives the same κ for both.
        row["second_order"] = []
        for eps in CURVATURE_EPS:
            kappa = np.array([np.sum(curve(i, (1.0 - eps, 1.0 + eps))) / eps**2 for i in chosen])
            second = predicted + 0.5 * kappa
            row["second_order"].append(
                {
                    "eps": eps,
                    "pearson": float(stats.pearsonr(second, actual)[0]),
                    "spearman": float(stats.spearmanr(second, actual)[0]),
                    "kendall_tau": float(stats.kendalltau(second, actual)[0]),
                    "curvature": kappa,
                }
            )
    return row


# --------------------------------------------------------------------------- 3. memory (worker side)


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def memory_worker(strategy: str, epochs: int, save: str | None) -> None:
    """Fit without history, then measure the first unrolled call (traces) and warm calls (program cached)."""
    data = load_data()
    trajectory = fit_mlp(build_mlp(), data, epochs=epochs, record_budget_bytes=0)
    assert trajectory.weights_history is None
    emit(steps=trajectory.steps, bytes_per_state=state_bytes(trajectory), fit_s=trajectory.seconds)
    for stage, calls in (("first", 1), ("warm", WARM_CALLS[strategy])):
        gc.collect()
        baseline_kb = proc_status_kb("self", "VmRSS") or 0
        if not reset_peak_rss():
            emit(error="cannot reset VmHWM through /proc/self/clear_refs")
            return
        seconds = []
        for _ in range(calls):
            result = unrolled(trajectory, data, strategy)
            seconds.append(result.seconds)
        peak_kb = proc_status_kb("self", "VmHWM") or 0
        emit(
            **{
                f"{stage}_s": min(seconds),
                f"{stage}_all_s": seconds,
                f"{stage}_peak_growth_mb": (peak_kb - baseline_kb) / 1024,
                f"{stage}_baseline_rss_mb": baseline_kb / 1024,
                "strategy_desc": result.strategy,
            }
        )
    if save:
        np.save(save, result.removal_effect)


# --------------------------------------------------------------------------- 3. memory (parent side)


def launch_memory_worker(strategy: str, epochs: int, save: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", "--strategy", strategy]
    cmd += ["--epochs", str(epochs), "--save", str(save)]
    return run_json_worker(cmd, timeout=timeout, env={**os.environ, **WORKER_ENV}, stderr_lines=10)


def loglog_slope(steps: list[int], values: list[float]) -> float | None:
    pairs = [(t, v) for t, v in zip(steps, values) if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    t, v = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(t, v, 1)[0])


def memory_section(
    epochs_list: tuple[int, ...], bytes_per_state: int, input_size: int, timeout: float
) -> dict[str, Any]:
    n_batches = math.ceil(N_TRAIN / BATCH)
    strategies = {"store_all": inf.StoreAll(), "checkpointed": inf.Checkpointed(), "replay": inf.Replay()}
    rows = []
    effects: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for epochs in epochs_list:
            steps = epochs * n_batches
            for name in STRATEGIES:
                held = strategies[name].states_held(steps)
                # One reverse call stacks its steps' buffers: a segment, or a chunk of it (unroll.chunk_limit).
                longest = strategies[name].longest_chunk(steps, bytes_per_state)
                buffer_bytes = longest * BATCH * (input_size + 1) * 4
                row: dict[str, Any] = {
                    "strategy": name,
                    "epochs": epochs,
                    "steps": steps,
                    "states_held": held,
                    "held_bytes": held * bytes_per_state,
                    "held_mb": held * bytes_per_state / MB,
                    "longest_call": longest,
                    "reverse_buffer_mb": buffer_bytes / MB,
                }
                print(f"  memory: {name:<12} T={steps:<5}", end=" ", flush=True)
                if name == "replay" and steps > REPLAY_MAX_STEPS:
                    row["status"] = f"skipped: O(T²) recomputation (T > {REPLAY_MAX_STEPS})"
                    measured = [r for r in rows if r["strategy"] == "replay" and r.get("warm_s")]
                    if measured:
                        row["estimated_s"] = measured[-1]["warm_s"] * (steps / measured[-1]["steps"]) ** 2
                else:
                    save = Path(scratch) / f"{name}_{steps}.npy"
                    row |= launch_memory_worker(name, epochs, save, timeout)
                    if save.exists() and steps == epochs_list[0] * n_batches:
                        effects[name] = np.load(save)
                print(
                    f"{row['status']}; first {fmt(row.get('first_s'), '.2f')} s, "
                    f"warm {fmt(row.get('warm_s'), '.2f')} s, "
                    f"peak growth {fmt(row.get('first_peak_growth_mb'), '.1f')} / "
                    f"{fmt(row.get('warm_peak_growth_mb'), '.1f')} MB",
                    flush=True,
                )
                rows.append(row)

    def column(name: str, key: str) -> tuple[list[int], list[float]]:
        selected = [r for r in rows if r["strategy"] == name]
        return [r["steps"] for r in selected], [r.get(key) for r in selected]

    slopes = {
        name: {
            "states_held": loglog_slope(*column(name, "states_held")),
            "measured_warm_peak_growth": loglog_slope(*column(name, "warm_peak_growth_mb")),
            "time_warm": loglog_slope(*column(name, "warm_s")),
        }
        for name in STRATEGIES
    }
    agreement = None
    if len(effects) == len(STRATEGIES):
        scale = float(np.max(np.abs(effects["store_all"])))
        diffs = {
            f"{a}_vs_{b}": float(np.max(np.abs(effects[a] - effects[b])))
            for i, a in enumerate(STRATEGIES)
            for b in STRATEGIES[i + 1 :]
        }
        agreement = {
            "steps": epochs_list[0] * n_batches,
            "max_abs_diff": diffs,
            "max_abs_removal_effect": scale,
            "max_relative_diff": max(diffs.values()) / scale,
        }
    return {
        "bytes_per_state": bytes_per_state,
        "worker_env": WORKER_ENV,
        "rows": rows,
        "loglog_slopes": slopes,
        "agreement": agreement,
    }


# --------------------------------------------------------------------------- report


def target(description: str, measured: Any, met: bool | None) -> dict[str, Any]:
    return {"target": description, "measured": measured, "met": met}


def evaluate_targets(speed: dict, fidelity: list[dict], memory: dict) -> dict[str, dict[str, Any]]:
    targets = {
        f"speed_{kind}": target(
            f"reverse ÷ training ≤ {RATIO_TARGET:g} ({kind})",
            speed[kind]["ratio"],
            speed[kind]["ratio"] <= RATIO_TARGET,
        )
        for kind in ("cold", "warm", "steady", "loop")
    }
    for row in fidelity:
        if row["role"] != "main":
            continue
        for metric in ("pearson", "spearman"):
            goal = row[f"{metric}_target"]
            if goal is not None:
                targets[f"fidelity_{row['key']}_{metric}"] = target(
                    f"{row['model']}, {row['optimizer']}: {metric.capitalize()} ≥ {goal:g}", row[metric],
                    row[metric] >= goal,
                )  # fmt: skip
    slope = memory["loglog_slopes"]["checkpointed"]["states_held"]
    if slope is not None:
        low, high = SQRT_SLOPE_RANGE
        targets["checkpointed_sqrt_T"] = target(
            f"checkpointed held states ∝ √T: log-log slope in [{low:g}, {high:g}]", slope, low <= slope <= high
        )
    if memory["agreement"] is not None:
        rel = memory["agreement"]["max_relative_diff"]
        targets["strategies_agree"] = target(
            f"strategies agree at T={memory['agreement']['steps']}: max |Δ| / max |effect| ≤ {AGREEMENT_TOL:g}",
            rel,
            rel <= AGREEMENT_TOL,
        )
    return targets


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["setup"]
    speed, memory = report["speed"], report["memory"]
    lines = [
        "# `influence.unrolled`: speed, fidelity, memory",
        "",
        f"Digits (x/16): {s['n_train']} train ({s['flipped_labels']} labels flipped) / {s['n_val']} val / "
        f"{s['n_test']} test, seed {s['seed']}; batch {s['batch']}, {s['epochs']} epochs → T = {speed['steps']} steps.",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_total_gib']} GiB RAM, Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}. Command: `{report['command']}`. Load average (1 min) "
        f"{m['load_average_1_5_15min']['start'][0]:.1f} at start, {m['load_average_1_5_15min']['end'][0]:.1f} at end "
        "(other work on the machine inflates and scatters the timings).",
        "",
        "## 1. Speed (MLP 64-32-10, SGD 0.5, float32)",
        "",
        "| run | graphs | training (s) | reverse (s) | reverse ÷ training |",
        "|---|---|---:|---:|---:|",
    ]
    for kind in ("cold", "warm", "steady", "loop"):
        r = speed[kind]
        lines.append(f"| {kind} | XLA (default) | {r['training_s']:.4f} | {r['reverse_s']:.4f} | {r['ratio']:.2f} |")
    for kind in ("warm", "steady", "loop"):
        r = speed["plain_graphs"][kind]
        lines.append(
            f"| {kind} | plain (`jit_compile=False`) | {r['training_s']:.4f} | {r['reverse_s']:.4f} | "
            f"{r['ratio']:.2f} |"
        )
    lines += [""] + [f"- **{k}**: {v}" for k, v in speed["definitions"].items()]
    cold_runs = [r for r in speed["cold"].get("runs", []) if "ratio" in r]
    if len(cold_runs) > 1:
        lines.append(
            f"- Cold ratios of the {len(cold_runs)} processes (the table shows the median one): "
            + ", ".join(f"{r['ratio']:.2f}" for r in cold_runs)
            + "."
        )
    lines += [
        f"- Ratio of the fastest calls (less sensitive to other load): warm {speed['warm']['ratio_of_minima']:.2f}, "
        f"steady {speed['steady']['ratio_of_minima']:.2f}, loop {speed['loop']['ratio_of_minima']:.2f}.",
        "- XLA speed-up (plain ÷ XLA time): training loop "
        f"{speed['plain_graphs']['loop']['training_s'] / speed['loop']['training_s']:.1f}×, reverse loop "
        f"{speed['plain_graphs']['loop']['reverse_s'] / speed['loop']['reverse_s']:.1f}×.",
        f"- Strategy chosen by `auto`: {speed['strategy']}.",
        "",
    ]

    lines += [
        "## 2. Fidelity: predicted vs actual removal effect",
        "",
        f"{s['n_harmful']} most harmful + {s['n_random']} random samples; actual = val loss(retrain without i) − val "
        "loss(retrain with all). *derivative check* (float64 rows): Pearson of removal_effect vs the central "
        f"difference (E(c_i = 1−ε) − E(c_i = 1+ε))/2ε, ε = {DERIVATIVE_EPS:g}.",
        "",
        "Spearman harmful / random: within each half of the sample; actual/predicted: mean ratio over the "
        "harmful half (1 = the linear prediction is exact).",
        "",
        "| model | optimizer | dtype | role | val loss | val acc | Pearson | Spearman | Kendall τ | "
        "Spearman harmful / random | actual/predicted | flipped in top | derivative check |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["fidelity"]:
        check = r.get("derivative_check")
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['dtype']} | {r['role']} | {r['val_loss']:.3f} | "
            f"{r['val_accuracy']:.3f} | {r['pearson']:.3f} | {r['spearman']:.3f} | {r['kendall_tau']:.3f} | "
            f"{r['spearman_within_harmful']:.2f} / {r['spearman_within_random']:.2f} | "
            f"{r['mean_actual_over_predicted_harmful']:.2f} | "
            f"{r['flipped_among_most_harmful']} | {fmt(check and check['pearson'], '.6f')} |"
        )

    second_rows = [r for r in report["fidelity"] if r.get("second_order")]
    if second_rows:
        lines += [
            "",
            "### Diagnostic: first plus second order",
            "",
            "Not a method of the package: the curvature κ_i = d²E/dc_i² of each compared sample is measured by a "
            "central second difference through retraining, (E(c_i = 1+ε) − 2E(1) + E(c_i = 1−ε))/ε², and the "
            "removal is predicted by the Taylor polynomial removal_effect_i + κ_i/2. Two step sizes: a smooth "
            "response gives the same numbers for both.",
            "",
            "| model | optimizer | ε | Pearson | Spearman | Kendall τ | first order alone: Pearson / Spearman |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in second_rows:
            for d in r["second_order"]:
                lines.append(
                    f"| {r['model']} | {r['optimizer']} | {d['eps']:g} | {d['pearson']:.4f} | {d['spearman']:.4f} | "
                    f"{d['kendall_tau']:.4f} | {r['pearson']:.4f} / {r['spearman']:.4f} |"
                )

    curves = [(r, r["response_curves"]) for r in report["fidelity"] if "response_curves" in r]
    if curves:
        lines += [
            "",
            "### Where first order misses: validation-loss change along c_i",
            "",
            "For the samples whose rank moves most between predicted and actual (what lowers Spearman): retrained "
            "validation-loss change with sample i's "
            "weight set to c_i (c_i = 1: unchanged, 0: removed). The prediction is the straight line of slope "
            "−dE/dc_i through c_i = 1.",
        ]
        for row, curve in curves:
            weights = curve["weights"]
            lines += [
                "",
                f"{row['model']}, {row['optimizer']}:",
                "",
                "| sample | flipped | predicted (c_i = 0) | " + " | ".join(f"c_i = {w:g}" for w in weights) + " |",
                "|---|---|---:|" + "---:|" * len(weights),
            ]
            for sample in curve["samples"]:
                values = " | ".join(f"{v:+.5f}" for v in sample["change"])
                lines.append(
                    f"| {sample['index']} | {'yes' if sample['flipped'] else 'no'} | {sample['predicted']:+.5f} | "
                    f"{values} |"
                )

    lines += [
        "",
        f"## 3. Memory vs T (fit with record_budget_bytes=0; {memory['bytes_per_state']} bytes per state)",
        "",
        "Held = `states_held(T)` × bytes per state. Buffers = the reverse pass's per-step dE/dx and dE/dc "
        "stacks for its longest call (a segment, or a chunk of ≤ 256 steps), L·B·(d+1)·4 bytes (not counted "
        "by `states_held`). Peak growth = "
        "VmHWM − RSS before the call(s), in a fresh process: 1st call traces; warm calls reuse the program "
        "(time: fastest warm call). MB = MiB.",
        "",
        "| strategy | T | states held | held (MB) | buffers (MB) | 1st call (s) | warm (s) | "
        "peak growth 1st (MB) | peak growth warm (MB) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in memory["rows"]:
        warm = fmt(r.get("warm_s"), ".2f")
        if "estimated_s" in r:
            warm = f"≈{r['estimated_s']:.0f} (est.)"
        lines.append(
            f"| {r['strategy']} | {r['steps']} | {r['states_held']} | {r['held_mb']:.2f} | "
            f"{r['reverse_buffer_mb']:.2f} | {fmt(r.get('first_s'), '.2f')} | {warm} | "
            f"{fmt(r.get('first_peak_growth_mb'), '.1f')} | {fmt(r.get('warm_peak_growth_mb'), '.1f')} | "
            f"{r['status']} |"
        )
    lines += ["", "Log-log slopes vs T (held states / measured warm peak growth / warm time):", ""]
    for name, sl in memory["loglog_slopes"].items():
        lines.append(
            f"- {name}: {fmt(sl['states_held'], '.2f')} / {fmt(sl['measured_warm_peak_growth'], '.2f')} / "
            f"{fmt(sl['time_warm'], '.2f')}"
        )
    if memory["agreement"]:
        a = memory["agreement"]
        diffs = ", ".join(f"{k}: {v:.2e}" for k, v in a["max_abs_diff"].items())
        lines.append(
            f"- Agreement at T={a['steps']} (max |Δ removal_effect|): {diffs}; max |removal_effect| = "
            f"{a['max_abs_removal_effect']:.2e}."
        )

    lines += ["", "## Targets", ""]
    verdict = {True: "**met**", False: "**missed**", None: "**not measured**"}
    for t in report["targets"].values():
        lines.append(f"- {t['target']}: {verdict[t['met']]} ({fmt(t['measured'], '.4g')})")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _non_monotone(values: list[float]) -> bool:
    steps = np.diff(values)
    return bool(np.any(steps > 1e-6) and np.any(steps < -1e-6))


def _quadratic_fit_error(weights: list[float], change: list[float], predicted: float) -> float:
    """Max misfit of change ≈ predicted·s + b·s² (s = 1 − c_i, b least squares), relative to the curve's range."""
    s = 1.0 - np.asarray(weights)
    rest = np.asarray(change) - predicted * s  # what the slope leaves: b·s² if the curve is quadratic
    b = float(np.sum(rest * s**2) / np.sum(s**4))
    span = float(np.ptp(np.concatenate([change, predicted * s])))
    return float(np.max(np.abs(rest - b * s**2)) / span)


def notes(fidelity: list[dict]) -> list[str]:
    """Plain-language reading of missed fidelity targets, from the diagnostic rows."""
    out = []
    by_key = {r["key"]: r for r in fidelity}
    for row in fidelity:
        goals = {"pearson": row["pearson_target"], "spearman": row["spearman_target"]}
        missed = [m for m, goal in goals.items() if goal is not None and row[m] < goal]
        diag = by_key.get(row["key"] + "_float64")
        if row["role"] != "main" or not missed or diag is None:
            continue
        measured = ", ".join(f"{m.capitalize()} {row[m]:.3f} < {goals[m]:g}" for m in missed)
        float64 = ", ".join(f"{m.capitalize()} {diag[m]:.3f}" for m in missed)
        same = all(abs(diag[m] - row[m]) < 0.01 for m in missed)
        text = f"{row['model']} {row['optimizer']}: missed ({measured}). float64: {float64}, " + (
            "so float32 round-off is not the cause. " if same else "so float32 round-off matters. "
        )
        check = diag.get("derivative_check")
        if check:
            exact = check["pearson"] > 0.9999 and check["max_rel_error"] < 1e-3
            text += (
                f"Derivative check: Pearson {check['pearson']:.7f}, max rel. error {check['max_rel_error']:.1e} — "
                + (
                    "the hypergradient is exact; the gap is the first-order extrapolation from dE/dc_i to removing "
                    "the whole sample (c_i: 1 → 0)."
                    if exact
                    else "the hypergradient disagrees with finite differences: investigate."
                )
            )
        second = diag.get("second_order") or []
        if second:
            spearman = [d["spearman"] for d in second]
            pearson = [d["pearson"] for d in second]
            eps_list = " and ".join(f"{d['eps']:g}" for d in second)
            if min(spearman) >= 0.98 and max(spearman) - min(spearman) < 0.01:
                text += (
                    f" Adding the exact second-order term (curvature from central second differences, ε = "
                    f"{eps_list}) gives Pearson {min(pearson):.4f}, Spearman {min(spearman):.4f}: the whole gap is "
                    "the curvature of the response, which first order leaves out by definition."
                )
            else:
                text += (
                    f" Adding a second-order term does not settle it: with ε = {eps_list} the Taylor prediction "
                    f"gives Spearman {', '.join(f'{v:.3f}' for v in spearman)} (Pearson "
                    f"{', '.join(f'{v:.3f}' for v in pearson)}); the curvature itself depends on the step, so the "
                    "response is not smooth at that scale."
                )
        curves = row.get("response_curves")
        if curves:
            bent = [c for c in curves["samples"] if _non_monotone(c["change"])]
            if bent:
                text += (
                    f" {len(bent)} of the {len(curves['samples'])} most rank-displaced samples respond "
                    "non-monotonically to their weight (see the c_i table: the validation loss falls, then rises "
                    "again before c_i = 0), which no first-order (or single-slope) prediction can follow."
                )
            errors = [_quadratic_fit_error(curves["weights"], c["change"], c["predicted"]) for c in curves["samples"]]
            if max(errors) <= 0.15:
                text += (
                    " A quadratic in c_i with the hypergradient's slope at c_i = 1 and one fitted curvature "
                    f"follows each of these curves to within {max(errors):.0%} of its range: the response is "
                    "smooth and curved, so a second-order term would predict these removals. Each sample's exact "
                    "curvature costs a tangent pass through the whole run (more than retraining that sample), so "
                    "the package leaves it to `removal_curve`, which measures it for the candidates a user cares "
                    "about."
                )
            else:
                text += (
                    " A quadratic with the hypergradient's slope at c_i = 1 misses these curves by up to "
                    f"{max(errors):.0%} of their range: the response is irregular, not only curved."
                )
        out.append(text)
    small = by_key.get(f"mlp_sgd_lr{SMALL_SGD_LR}")
    if small and out:
        out.append(
            f"With SGD {SMALL_SGD_LR} instead of {SGD_LR} the same MLP gives Pearson {small['pearson']:.3f}, "
            f"Spearman {small['spearman']:.3f}: the linearisation error grows with the step size."
        )
    return out


def speed_memory_notes(speed: dict, memory: dict) -> list[str]:
    """What the speed and memory numbers mean, computed from them."""
    out = []
    loop, cold = speed["loop"]["ratio"], speed["cold"]
    out.append(
        f"Per step, a compiled reverse step costs {loop:.2f} compiled training steps (loop ratio): it does a "
        "Hessian-vector product by reverse-over-reverse, the optimizer's VJP and per-sample dE/dx, dE/dc. In "
        "floating-point operations a reverse-over-reverse step is about 3 training steps (9 against 3 matrix "
        "products per dense layer); at this model size the time goes to per-op overhead, which XLA removes by "
        "fusing the step."
    )
    if cold["ratio"] > RATIO_TARGET:
        out.append(
            f"Cold ({cold['ratio']:.2f}): the first calls are dominated by tracing and XLA compilation, and the "
            "reverse graph (second order) is larger to compile than the training step."
        )
    first = [r["first_peak_growth_mb"] for r in memory["rows"] if r.get("first_peak_growth_mb")]
    if first:
        out.append(
            f"First calls grow the peak by {min(first):.0f}–{max(first):.0f} MB whatever T is: tracing and XLA "
            "compilation, paid once per process and program."
        )
    rows = [r for r in memory["rows"] if r["strategy"] == "store_all" and r.get("warm_peak_growth_mb")]
    if rows:
        r = rows[-1]
        model = r["held_mb"] + 2 * r["reverse_buffer_mb"]
        out.append(
            f"store_all at T = {r['steps']}: measured warm peak growth {r['warm_peak_growth_mb']:.1f} MB vs held "
            f"states {r['held_mb']:.1f} MB + 2 × reverse buffers {r['reverse_buffer_mb']:.1f} MB = {model:.1f} MB, "
            "the accounting of `UnrolledResult.memory_bytes` and of `auto`'s budget (the per-step dE/dx, dE/dc "
            "buffers and their stacked copy coexist at the end of a reverse call)."
        )
    return out


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()
    out_dir = output_dir(args)
    n_harmful, n_random = (5, 5) if args.quick else (N_HARMFUL, N_RANDOM)
    repeats = 1 if args.quick else args.repeats
    data = load_data()

    print("1. speed", flush=True)  # first: "cold" must be the process's first TensorFlow work
    speed = speed_section(data, repeats, cold_timeout=0 if args.quick else args.timeout)
    for kind in ("cold", "warm", "steady", "loop"):
        r = speed[kind]
        print(f"  {kind:<6} training {r['training_s']:.3f} s, reverse {r['reverse_s']:.3f} s, ratio {r['ratio']:.2f}")

    print("2. fidelity", flush=True)
    fidelity = []
    for case in fidelity_cases(args.quick):
        row = fidelity_row(case, data, n_harmful, n_random)
        fidelity.append(row)
        print(
            f"  {case.key:<18} val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f}: Pearson "
            f"{row['pearson']:.3f}, Spearman {row['spearman']:.3f}, Kendall {row['kendall_tau']:.3f}"
            + (f", derivative check {row['derivative_check']['pearson']:.6f}" if "derivative_check" in row else ""),
            flush=True,
        )

    print("3. memory", flush=True)
    epochs_list = MEMORY_EPOCHS[:1] if args.quick else MEMORY_EPOCHS
    memory = memory_section(epochs_list, speed["bytes_per_state"], data.x_train.shape[1], args.timeout)

    report = {
        **report_header("influence.unrolled: speed, fidelity vs retraining, memory vs T"),
        "setup": {
            "data": "sklearn load_digits, x/16, shuffled with seed",
            "n_train": N_TRAIN,
            "n_val": N_VAL,
            "n_test": len(data.x_test),
            "flipped_labels": len(data.flipped),
            "seed": SEED,
            "batch": BATCH,
            "epochs": EPOCHS,
            "loss": LOSS,
            "models": {
                "mlp": "Dense(32, tanh) → Dense(10, softmax) on 64 inputs",
                "cnn": "Conv2D(8, 3, tanh) → Flatten → Dense(10, softmax) on 8×8×1",
            },
            "learning_rates": {"mlp_sgd": SGD_LR, "mlp_adam": ADAM_LR, "cnn_sgd": CNN_LR, "diagnostic": SMALL_SGD_LR},
            "n_harmful": n_harmful,
            "n_random": n_random,
            "memory_epochs": list(epochs_list),
            "replay_max_steps": REPLAY_MAX_STEPS,
            "quick": args.quick,
        },
        "speed": speed,
        "fidelity": fidelity,
        "memory": memory,
    }
    report["targets"] = evaluate_targets(speed, fidelity, memory)
    report["notes"] = notes(fidelity) + speed_memory_notes(speed, memory)
    report["total_s"] = time.perf_counter() - started
    report["machine"]["load_average_1_5_15min"] = {"start": load_before, "end": os.getloadavg()}
    json_path, md_path = write_report(out_dir, "unrolled", report, markdown(report))
    print(f"wrote {json_path} and {md_path} ({report['total_s']:.0f} s)")


def main() -> None:
    parser = benchmark_parser(__doc__, "smoke run: 10 samples, T=160 only, no diagnostics", "unrolled.{json,md}")
    parser.add_argument("--repeats", type=int, default=11, help="warm fit+unrolled repetitions (median ratio reported)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a memory worker is killed")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cold-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.strategy, args.epochs, args.save)
    elif args.cold_worker:
        cold_worker()
    else:
        run(args)


if __name__ == "__main__":
    main()

"""``influence demo``: find flipped labels in scikit-learn's embedded digits and write a report.

The data ship with scikit-learn (no download): 1797 8×8 digits scaled to
[0, 1], shuffled with a fixed seed, split 1000 train / 400 validation / rest
test, and 10% of the training labels flipped to another class at a fixed
seed. An MLP 64-32-10 (tanh, softmax, float32) is trained with plain SGD
(lr 0.5, batch 50, 8 epochs) by :func:`influence.fit`; the samples are ranked
by the unrolled removal effect (and five other methods for comparison); the
15 most harmful and 15 random samples are verified by retraining without
each; the report goes to ``reports/demo/index.html``. Reruns resume from
``reports/demo/shards``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_SEED, NOISE_SEED, MODEL_SEED, TRAIN_SEED = 0, 1, 0, 0
N_TRAIN, N_VAL, NOISE_FRACTION = 1000, 400, 0.1
DEFAULT_OUT = os.path.join("reports", "demo")
METHODS = ("unrolled", "influence_function", "tracin", "self_influence", "margin", "loss")


@dataclass(frozen=True)
class NoisyDigits:
    """The demo data: float32 inputs (n, 64), int64 labels, the flipped-label mask and the labels before flipping."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    flipped: np.ndarray
    clean_labels: np.ndarray


def noisy_digits(n_train: int = N_TRAIN, n_val: int = N_VAL, noise: float = NOISE_FRACTION) -> NoisyDigits:
    """Digits / 16, shuffled (seed 0), split train/val/test, ``noise`` of train labels flipped (seed 1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(DATA_SEED).permutation(len(x))
    x, y = x[order], y[order]
    clean = y[:n_train].copy()
    rng = np.random.default_rng(NOISE_SEED)
    flipped_idx = rng.choice(n_train, size=int(round(noise * n_train)), replace=False)
    y_train = clean.copy()
    y_train[flipped_idx] = (clean[flipped_idx] + rng.integers(1, 10, size=len(flipped_idx))) % 10  # never the same
    flipped = np.zeros(n_train, dtype=bool)
    flipped[flipped_idx] = True
    end = n_train + n_val
    return NoisyDigits(x[:n_train], y_train, x[n_train:end], y[n_train:end], x[end:], y[end:], flipped, clean)


def mlp(seed: int = MODEL_SEED):
    """MLP 64-32-10, tanh hidden layer, softmax output, float32, initial weights fixed by ``seed``."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="mlp_64_32_10",
    )


def run_demo(
    out_dir: str | os.PathLike = DEFAULT_OUT, *, quick: bool = False, restart: bool = False, progress: bool = True
):
    """Run the demo and return the :class:`~influence.report.job.RankingOutcome`.

    ``quick`` is a small smoke run for tests (300 training samples, 2 epochs,
    5 + 5 verification retrains); the full run takes well under two minutes on 2 CPU cores.
    """
    from .optimizers import SGD
    from .report.job import RankingJob, run_ranking

    data = noisy_digits(n_train=300, n_val=150) if quick else noisy_digits()
    epochs, verify, repair = (2, 5, 3) if quick else (8, 15, 10)
    lr, batch_size = 0.5, 50
    model = mlp()
    job = RankingJob(
        out_dir=Path(out_dir),
        model=model,
        x_train=data.x_train,
        y_train=data.y_train,
        x_val=data.x_val,
        y_val=data.y_val,
        optimizer=SGD(lr),
        loss="sparse_categorical_crossentropy",
        batch_size=batch_size,
        epochs=epochs,
        seed=TRAIN_SEED,
        methods=METHODS,
        verify_top=verify,
        verify_random=verify,
        repair_top=repair,
        repair_steps=2 if quick else 5,
        learn_weights_steps=2 if quick else 30,
        summary={
            "data": f"scikit-learn digits (8×8, /16): {len(data.x_train)} train / {len(data.x_val)} validation; "
            f"{int(data.flipped.sum())} train labels flipped ({data.flipped.mean():.0%}, seed {NOISE_SEED})",
            "model": f"MLP 64-32-10 (tanh, softmax), float32, {model.count_params():,} parameters",
            "training": f"influence.fit: SGD lr {lr}, batch {batch_size}, {epochs} epochs, seed {TRAIN_SEED}",
        },
        images=data.x_train.reshape(-1, 8, 8),
        noise_mask=data.flipped,
        clean_labels=data.clean_labels,
        restart=restart,
        progress=progress,
    )
    return run_ranking(job)

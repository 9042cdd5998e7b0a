"""``influence demo``: the toolkit on scikit-learn's embedded digits, end to end."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def _digits(seed: int = 0) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float64)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1000], y[:1000], x[1000:1400], y[1000:1400]


def run_demo(out_dir: str = os.path.join("reports", "demo"), quick: bool = False) -> dict:
    """Train on digits, take the one-step hypergradient dE/dX, check it in float64, write a summary."""
    import keras

    from .checks import as_float64, check_gradient
    from .one_step import one_step

    start = time.perf_counter()
    x_train, y_train, x_val, y_val = _digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print("[1/3] training a 64-32-10 MLP on 1000 digits", flush=True)
    model.fit(x_train, y_train, batch_size=50, epochs=2 if quick else 8, verbose=0)
    model64 = as_float64(model)
    batch = slice(0, 16 if quick else 64)
    lr = 0.5
    print("[2/3] one-step hypergradient dE/dX (float64, hvp route)", flush=True)
    grad = one_step(
        model64, "sparse_categorical_crossentropy", x_train[batch], y_train[batch], x_val, y_val, learning_rate=lr
    )

    def val_loss_after_step(x_batch: np.ndarray) -> float:
        import tensorflow as tf

        from . import _tree
        from .autodiff import gradient
        from .losses import get_loss
        from .model_function import ModelFunction

        fn, loss = ModelFunction(model64), get_loss("sparse_categorical_crossentropy")
        w = fn.weights
        g = gradient(lambda ww: loss.mean(tf.constant(y_train[batch]), fn(ww, tf.constant(x_batch))), w)
        return float(loss.mean(tf.constant(y_val), fn(_tree.axpy(-lr, g, w), tf.constant(x_val))))

    print("[3/3] float64 finite-difference check along random directions", flush=True)
    check = check_gradient(val_loss_after_step, x_train[batch], grad, directions=3)
    norms = np.linalg.norm(grad, axis=1)
    summary = {
        "data": "scikit-learn digits, 1000 train / 400 validation",
        "model": "MLP 64-32-10 (tanh, softmax)",
        "batch": int(grad.shape[0]),
        "learning_rate": lr,
        "check_ok": check.ok,
        "check_max_rel_error": check.max_rel_error,
        "most_sensitive_train_samples": [int(i) for i in np.argsort(-norms)[:5]],
        "seconds": round(time.perf_counter() - start, 2),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(check)
    print(f"wrote {os.path.join(out_dir, 'summary.json')}")
    return summary

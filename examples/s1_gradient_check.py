"""S1 — "My finite-difference gradient check fails".

A small Keras CNN (conv + max-pool + dropout + dense softmax) on scikit-learn's
8×8 digits. The usual hand-written check — float32 central differences with
h = 1e-4, one pixel at a time, against a tape gradient — reports relative errors
up to order 1 although the tape gradient is right, and with dropout on
(training=True) relative errors of 1e4 and more: every call draws new masks.
This script shows:

(a) that naive check and its errors;
(b) ``inf.check_input_gradient``, which rebuilds the model in float64, fixes the
    dropout masks by a seed, and passes (training off and on). On the raw digits
    it first reports a kink: their background pixels are exactly 0, so max-pool
    windows tie; the check says so, and with ``jitter=1e-2`` (inputs moved off
    the ties) it passes;
(c) ``inf.check_gradient`` on a float32 function, which fails and explains why,
    and the same check in float64 (``inf.as_float64`` and a dtype-preserving
    loss), which passes.

Run: ``python examples/s1_gradient_check.py`` (about 8 s on 2 CPUs).
"""

import os
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the output

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import influence as inf

LOSS = "sparse_categorical_crossentropy"
H = 1e-4  # the step of the naive float32 check
PIXELS = [(0, 3, 3, 0), (1, 4, 2, 0), (2, 5, 5, 0), (3, 2, 6, 0)]  # (sample, row, col, channel)


def mean_loss32(model, x, y, training=False):
    """The mean loss in float32, as a user writes it (Keras's loss, the float32 model)."""
    x = tf.constant(x, tf.float32)
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=training)))


def tape_gradient(model, x, y, training=False):
    """∂(mean loss)/∂x with one float32 tape."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = mean_loss32(model, x, y, training)
    return tape.gradient(loss, x).numpy()


def naive_check(model, x, y, training):
    """Relative errors of float32 central differences, one pixel at a time."""
    grad = tape_gradient(model, x, y, training)
    errors = []
    for pixel in PIXELS:
        plus, minus = x.copy(), x.copy()
        plus[pixel] += H
        minus[pixel] -= H
        fd = (float(mean_loss32(model, plus, y, training)) - float(mean_loss32(model, minus, y, training))) / (2 * H)
        errors.append(abs(fd - grad[pixel]) / abs(grad[pixel]))
    return np.array(errors)


def wrap(text):
    """An explanation, wrapped and indented under its line."""
    return textwrap.fill(text, width=110, initial_indent="      ", subsequent_indent="      ")


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images.reshape(-1, 8, 8, 1) / 16).astype("float32")
    y = digits.target
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Dropout(0.25),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", LOSS)
    model.fit(x[:1000], y[:1000], epochs=3, batch_size=100, verbose=0)

    x_raw, y_b = x[1000:1016], y[1000:1016]
    # Move the inputs off the ties of exact-zero background pixels (see (b)); the checks then judge only
    # the gradient, not the function's kinks.
    x_b = (x_raw + 1e-3 * np.random.default_rng(0).standard_normal(x_raw.shape)).astype("float32")

    # (a) The naive check: float32 round-off (~1e-7·|loss|/h ≈ 1e-3) is as large as a single pixel's
    # derivative (~1e-3), and with training=True every call draws new dropout masks.
    naive_eval = naive_check(model, x_b, y_b, training=False)
    naive_train = naive_check(model, x_b, y_b, training=True)
    print(f"(a) naive float32, h={H:g}, {len(PIXELS)} pixels: rel. errors {np.array2string(naive_eval, precision=2)}")
    print(f"    ... with dropout on (training=True): rel. errors {np.array2string(naive_train, precision=0)}")

    # (b) float64 rebuild, random directions, Richardson extrapolation; dropout masks fixed by seed.
    raw = inf.check_input_gradient(model, LOSS, x_raw, y_b)
    print(f"(b) check_input_gradient on raw pixels: ok={raw.ok}, at_kink={raw.at_kink}")
    print(wrap(raw.explanation))
    # jitter=1e-2 checks at x + 1e-2·z (z standard normal): off the ties.
    checks = {
        t: inf.check_input_gradient(model, LOSS, x_raw, y_b, training=t, seed=0, jitter=1e-2) for t in (False, True)
    }
    for training, chk in checks.items():
        print(f"    jitter=1e-2, training={training}: {chk}")

    # (c) check_gradient on a float32 function explains its failure instead of printing a big number.
    grad32 = tape_gradient(model, x_b, y_b)
    chk32 = inf.check_gradient(lambda v: mean_loss32(model, v, y_b).numpy(), x_b, grad32)
    print(f"(c) float32 f and grad: {str(chk32).splitlines()[0]}")
    print(wrap(chk32.explanation))
    # The fix: a float64 copy of the model and a loss that keeps float64 (Keras loss objects return float32).
    model64 = inf.as_float64(model)
    loss64 = inf.losses.get_loss(LOSS)
    x64 = tf.constant(x_b, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x64)
        value = loss64.mean(y_b, model64(x64))
    grad64 = tape.gradient(value, x64).numpy()
    chk64 = inf.check_gradient(lambda v: loss64.mean(y_b, model64(tf.constant(v))).numpy(), x_b, grad64)
    print(f"    float64 f and grad (as_float64): {chk64}")

    # Every claim printed above.
    assert naive_eval.max() > 0.05, f"naive float32 check should be off by > 5%: {naive_eval}"
    assert naive_train.max() > 10, f"naive check with dropout should be off by > 10x: {naive_train}"
    assert not raw.ok and raw.at_kink, f"raw digits should be reported at a kink: {raw}"
    assert "max-pool tie" in raw.explanation, raw.explanation
    for training, chk in checks.items():
        assert chk.ok and chk.max_rel_error < 1e-6, f"float64 check (training={training}) should pass: {chk}"
    assert not chk32.ok and "float32" in chk32.explanation, f"float32 check should fail, explained: {chk32}"
    assert chk64.ok and chk64.max_rel_error < 1e-6, f"float64 check should pass: {chk64}"


if __name__ == "__main__":
    main()

"""S2 — gradient of the validation loss w.r.t. training inputs, through one fit step.

A Keras MLP trained on scikit-learn's 8×8 digits takes one more SGD step on a
batch (X, y): w' = w − η ∇_w mean_j ℓ(x_j, y_j; w). The question is dE/dX, the
gradient of the validation loss E(w') with respect to the batch's inputs. The
known workaround nests two tapes and builds the dense Jacobian of ∇_w with respect
to X (|w|·|X| numbers) and contracts it by hand. This script shows:

(a) ``inf.one_step(..., method="hvp")`` (nested tapes, O(|w| + |X|) memory) and
    ``method="jacobian"`` (the dense reference) agree on a float64 copy of the
    model (``inf.as_float64``);
(b) the hvp result passes ``inf.check_gradient``: float64 central differences
    of a function that performs the SGD step and evaluates the validation loss;
(c) the same for dE/dc, the gradient with respect to the batch's sample weights
    (``wrt="sample_weights"``; the step then descends mean_j c_j·ℓ_j);
(d) the float32 model gives the float64 answer to float32 precision.

Run: ``python examples/s2_one_step.py`` (about 8 s on 2 CPUs).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the output

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import influence as inf

LOSS = "sparse_categorical_crossentropy"
LR = 0.5  # η of the step


def rel_diff(a, b):
    """max |a − b| / max |b|: one number for two arrays that should be equal."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def validation_loss_after_step(model64, x_batch, y_batch, x_val, y_val, sample_weight):
    """E(w − η ∇_w mean_j c_j ℓ_j), written out with one tape in float64: what one_step differentiates."""
    loss = inf.losses.get_loss(LOSS)  # keeps float64 (Keras loss objects return float32)
    weights = model64.trainable_variables
    with tf.GradientTape() as tape:
        per_sample = loss.per_sample(y_batch, model64(tf.constant(x_batch)))
        batch_loss = tf.reduce_mean(tf.constant(sample_weight) * per_sample)
    stepped = [w - LR * g for w, g in zip(weights, tape.gradient(batch_loss, weights))]
    y_pred, _ = model64.stateless_call(stepped, model64.non_trainable_variables, tf.constant(x_val))
    return loss.mean(y_val, y_pred).numpy()


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16).astype("float32")
    y = digits.target
    # tanh, not ReLU: finite differences need a function that is smooth at the point.
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile("adam", LOSS)
    model.fit(x[:1000], y[:1000], epochs=2, batch_size=100, verbose=0)

    model64 = inf.as_float64(model)
    x_batch, y_batch = x[:32].astype("float64"), y[:32]
    x_val, y_val = x[1500:1600].astype("float64"), y[1500:1600]
    ones = np.ones(len(x_batch))
    args = (model64, LOSS, x_batch, y_batch, x_val, y_val)

    # (a) hvp vs the dense Jacobian reference.
    g_hvp = inf.one_step(*args, learning_rate=LR, method="hvp")
    g_jac = inf.one_step(*args, learning_rate=LR, method="jacobian")
    n_weights = sum(int(np.prod(w.shape)) for w in model64.trainable_variables)
    jacobian_size = f"{n_weights}×{x_batch.size} Jacobian"
    print(f"(a) dE/dX {g_hvp.shape}: hvp vs jacobian ({jacobian_size}) rel. diff {rel_diff(g_hvp, g_jac):.1e}")

    # (b) float64 finite differences of the step-then-evaluate function, along random directions.
    chk_x = inf.check_gradient(
        lambda xb: validation_loss_after_step(model64, xb, y_batch, x_val, y_val, ones), x_batch, g_hvp
    )
    print(f"(b) dE/dX vs float64 finite differences: {chk_x}")

    # (c) The same for the sample weights c of the batch (all ones here).
    c_hvp = inf.one_step(*args, learning_rate=LR, method="hvp", wrt="sample_weights")
    c_jac = inf.one_step(*args, learning_rate=LR, method="jacobian", wrt="sample_weights")
    chk_c = inf.check_gradient(
        lambda c: validation_loss_after_step(model64, x_batch, y_batch, x_val, y_val, c), ones, c_hvp
    )
    print(f"(c) dE/dc {c_hvp.shape}: hvp vs jacobian rel. diff {rel_diff(c_hvp, c_jac):.1e}; {chk_c}")

    # (d) The float32 model (what was trained) gives the float64 answer to float32 precision.
    g32 = inf.one_step(
        model, LOSS, x_batch.astype("float32"), y_batch, x_val.astype("float32"), y_val, learning_rate=LR
    )
    print(f"(d) float32 model: dE/dX {g32.dtype}, rel. diff to float64 {rel_diff(g32, g_hvp):.1e}")

    # Every claim printed above.
    assert g_hvp.shape == x_batch.shape and g_hvp.dtype == np.float64, (g_hvp.shape, g_hvp.dtype)
    assert rel_diff(g_hvp, g_jac) < 1e-10, f"hvp and jacobian should agree in float64: {rel_diff(g_hvp, g_jac)}"
    assert chk_x.ok and chk_x.max_rel_error < 1e-6, f"dE/dX should pass the float64 check: {chk_x}"
    assert rel_diff(c_hvp, c_jac) < 1e-10, f"dE/dc: hvp and jacobian should agree: {rel_diff(c_hvp, c_jac)}"
    assert chk_c.ok and chk_c.max_rel_error < 1e-6, f"dE/dc should pass the float64 check: {chk_c}"
    assert g32.dtype == np.float32 and rel_diff(g32, g_hvp) < 1e-4, f"float32 vs float64: {rel_diff(g32, g_hvp)}"


if __name__ == "__main__":
    main()

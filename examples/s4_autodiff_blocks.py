"""S4 — advanced autodiff building blocks, on small float64 models.

Shows, with the public ``influence`` API only:

1. ``inf.hvp`` (forward-over-reverse, the Hessian never formed) equals the dense
   ``inf.hessian(...) @ v`` of a small tanh MLP to 1e-10 (float64).
2. One ``inf.newton_step`` on logistic regression (breast-cancer features,
   standardized; a convex problem) lowers the training loss.
3. ``inf.fit(..., input_gradient_penalty=ρ)`` trains on ℓ + ρ‖∂ℓ/∂x‖² (double
   backprop); ``inf.check_unrolled`` confirms the unrolled input gradient of that
   objective against float64 finite differences through retraining.
4. The BatchNorm trap: in training mode BatchNorm mixes the samples of a batch, so
   per-sample hypergradients would be wrong. ``inf.fit`` refuses such a model with a
   clear message, ``inf.coupling_layers`` names the culprit, and ``training=False``
   (moving statistics) is accepted.

Run: ``python examples/s4_autodiff_blocks.py`` (about 10 s on 2 CPUs).
"""

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_breast_cancer

import influence as inf


def tanh_mlp(n_in: int, n_hidden: int, n_out: int) -> keras.Model:
    """A small float64 MLP (float64 Input too: a float32 Input would round the inputs)."""
    x = keras.Input((n_in,), dtype="float64")
    h = keras.layers.Dense(n_hidden, activation="tanh", dtype="float64")(x)
    return keras.Model(x, keras.layers.Dense(n_out, dtype="float64")(h))


def hvp_vs_hessian() -> float:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(32, 4)))
    y = tf.constant(rng.integers(0, 3, size=32))
    model = tanh_mlp(4, 5, 3)  # P = 4·5 + 5 + 5·3 + 3 = 43 weights: a dense Hessian is fine
    f = inf.ModelFunction(model)  # outputs = f(weights, x), the weights as explicit arguments
    loss = inf.losses.get_loss("sparse_categorical_crossentropy", from_logits=True)

    def loss_fn(weights):
        return loss.mean(y, f(weights, x))

    weights = f.weights
    v = [tf.constant(rng.normal(size=w.shape)) for w in weights]
    hv = tf.concat([tf.reshape(t, [-1]) for t in inf.hvp(loss_fn, weights, v)], 0)
    dense = inf.hessian(loss_fn, weights) @ tf.concat([tf.reshape(t, [-1]) for t in v], 0)[:, None]
    err = float(tf.reduce_max(tf.abs(hv - dense[:, 0])) / tf.reduce_max(tf.abs(dense)))
    print(f"1. hvp vs hessian @ v   P = {len(hv)}, max rel. difference {err:.1e}")
    return err


def newton_on_logistic_regression() -> tuple[float, float]:
    x_all, y_all = load_breast_cancer(return_X_y=True)
    x_all = (x_all - x_all.mean(0)) / x_all.std(0)  # standardized: a well-conditioned Hessian
    x, y = tf.constant(x_all), tf.constant(y_all.astype("float64"))
    inp = keras.Input((30,), dtype="float64")
    model = keras.Model(inp, keras.layers.Dense(1, dtype="float64")(inp))  # logits; P = 31
    f = inf.ModelFunction(model)
    loss = inf.losses.get_loss("binary_crossentropy", from_logits=True)

    def loss_fn(weights):
        return loss.mean(y[:, None], f(weights, x))

    before = float(loss_fn(f.weights))
    # A little damping keeps the step sane where the data are nearly separable.
    after = float(loss_fn(inf.newton_step(loss_fn, f.weights, damping=1e-3)))
    print(f"2. one Newton step      logistic loss {before:.4f} -> {after:.4f}")
    return before, after


def input_gradient_penalty_check() -> inf.GradientCheck:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 4))
    y = rng.integers(0, 3, size=48)
    x_val, y_val = rng.normal(size=(24, 4)), rng.integers(0, 3, size=24)
    traj = inf.fit(
        tanh_mlp(4, 6, 3),
        x,
        y,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=inf.optimizers.SGD(learning_rate=0.3),
        batch_size=16,
        epochs=2,
        input_gradient_penalty=0.1,
    )
    # Float64 central differences of E(x_3) through retraining on ℓ + 0.1‖∂ℓ/∂x‖², vs dE/dx_3.
    chk = inf.check_unrolled(traj, x, y, x_val, y_val, index=3, wrt="inputs")
    print(f"3. input-grad penalty   check_unrolled ok={chk.ok}, max rel. error {chk.max_rel_error:.1e}")
    return chk


def batchnorm_trap() -> tuple[str, list[str]]:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 4)), rng.integers(0, 3, size=32)
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))
    try:
        inf.fit(model, x, y, batch_size=8)
        message = ""
    except ValueError as err:
        message = str(err)
    print(f"4. BatchNorm refused    {message}")
    coupling = inf.coupling_layers(model)
    print(f"   coupling_layers      {coupling}")
    traj = inf.fit(model, x, y, batch_size=8, training=False)  # moving statistics: samples independent
    print(f"   training=False       accepted, {traj.steps} steps")
    return message, coupling


def main() -> None:
    keras.utils.set_random_seed(0)
    err = hvp_vs_hessian()
    before, after = newton_on_logistic_regression()
    chk = input_gradient_penalty_check()
    message, coupling = batchnorm_trap()

    assert err < 1e-10, f"hvp differs from hessian @ v by {err:.1e} (float64: want < 1e-10)"
    assert after < 0.9 * before, f"the Newton step did not lower the loss by 10%: {before} -> {after}"
    assert chk.ok, f"check_unrolled failed for the input-gradient-penalty run: {chk}"
    assert "do not interact in training mode" in message, f"unexpected BatchNorm message: {message!r}"
    assert coupling == ["bn"], f"coupling_layers should name the BatchNorm layer, got {coupling}"


if __name__ == "__main__":
    main()

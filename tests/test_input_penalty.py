"""Training with an input-gradient penalty (S4): ℓ_j + ρ‖∂ℓ_j/∂x_j‖², differentiated through the run.

The forward run is checked against a hand-written double-backprop loop with Keras's own model call;
the reverse pass against float64 finite differences through retraining; the rankers' gradients and
Hessian against nested tapes on the penalized loss.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam
from influence.rankers._samples import SampleOps

LOSS = "sparse_categorical_crossentropy"
RHO = 0.5


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(13, 5)), rng.integers(0, 3, 13), rng.normal(size=(7, 5)), rng.integers(0, 3, 7)


def penalized_losses(model, x, y, rho=RHO):
    """Per-sample ℓ_j + ρ‖∂ℓ_j/∂x_j‖² from Keras's model call, one tape per sample (the reference)."""
    values = []
    for j in range(len(x)):
        xj = tf.constant(x[j : j + 1])
        with tf.GradientTape() as tape:
            tape.watch(xj)
            loss = keras.losses.sparse_categorical_crossentropy(y[j : j + 1], model(xj))[0]
        values.append(loss + rho * tf.reduce_sum(tape.gradient(loss, xj) ** 2))
    return tf.stack(values)


def test_fit_follows_a_hand_written_double_backprop_loop(data):
    x, y, _, _ = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2,
                   input_gradient_penalty=RHO)  # fmt: skip
    assert traj.input_gradient_penalty == RHO
    reference = mlp(5, 3, out_activation="softmax")
    for batch in traj.batches:
        with tf.GradientTape() as tape:
            objective = tf.reduce_mean(penalized_losses(reference, x[batch], y[batch]))
        for variable, grad in zip(
            reference.trainable_variables, tape.gradient(objective, reference.trainable_variables)
        ):
            variable.assign_sub(0.3 * grad)
    for ours, theirs in zip(traj.final_weights, reference.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-13)
    plain = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    assert max(np.abs(a - b).max() for a, b in zip(plain.final_weights, traj.final_weights)) > 1e-3


@pytest.mark.parametrize("optimizer", [SGD(0.3), Adam(0.02)], ids=["sgd", "adam"])
def test_hypergradients_through_penalized_training_match_retraining(optimizer, data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=optimizer, batch_size=5, epochs=2,
                   seed=1, input_gradient_penalty=RHO)  # fmt: skip
    for index in (0, 12):
        for wrt in ("inputs", "sample_weights"):
            chk = inf.check_unrolled(traj, x, y, xv, yv, index, wrt=wrt)
            assert chk.ok and chk.max_rel_error <= 1e-5, (wrt, chk)


def test_rankers_use_the_penalized_objective(data):
    x, y, _, _ = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2,
                   input_gradient_penalty=RHO)  # fmt: skip
    ops = SampleOps(traj, x, y)
    w = ops.weights(traj.final_weights)
    model = traj.model  # fit leaves the final weights in it
    variables = model.trainable_variables

    with tf.GradientTape(persistent=True) as tape:
        per_sample = penalized_losses(model, x, y)
        mean = tf.reduce_mean(per_sample)
    jac = tape.jacobian(per_sample, variables)
    rng = np.random.default_rng(0)
    v = [tf.constant(rng.normal(size=var.shape)) for var in variables]
    dots = sum(tf.reduce_sum(tf.reshape(j, [len(x), -1]) * tf.reshape(vi, [1, -1]), axis=1) for j, vi in zip(jac, v))
    np.testing.assert_allclose(ops.gradient_dots(w, v), dots.numpy(), rtol=1e-10, atol=1e-12)
    norms = sum(tf.reduce_sum(tf.reshape(j, [len(x), -1]) ** 2, axis=1) for j in jac)
    np.testing.assert_allclose(ops.squared_gradient_norms(w), norms.numpy(), rtol=1e-10)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            mean = tf.reduce_mean(penalized_losses(model, x, y))
        g = inner.gradient(mean, variables)
        gv = sum(tf.reduce_sum(a * b) for a, b in zip(g, v))
    hv = outer.gradient(gv, variables)
    for ours, theirs in zip(ops.hvp(w, v), hv):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-9, atol=1e-12)
    flat_v = np.concatenate([t.numpy().ravel() for t in v])
    np.testing.assert_allclose(ops.dense_hessian(w) @ flat_v, np.concatenate([t.numpy().ravel() for t in hv]),
                               rtol=1e-9, atol=1e-12)  # fmt: skip
    # The loss column and the loss ranking stay the plain loss ℓ_j (the penalty is a training term).
    plain = keras.losses.sparse_categorical_crossentropy(y, model(x)).numpy()
    np.testing.assert_allclose(ops.losses_and_outputs(w)[0], plain, rtol=1e-12)


def test_saved_run_keeps_its_penalty(tmp_path, data):
    x, y, _, _ = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2,
                   input_gradient_penalty=RHO)  # fmt: skip
    inf.save_trajectory(traj, tmp_path / "run")
    loaded = inf.load_trajectory(tmp_path / "run")
    assert loaded.input_gradient_penalty == RHO
    for a, b in zip(inf.retrain(loaded, x, y), traj.final_weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rho", [-0.1, float("nan"), True, "0.1"])
def test_penalty_must_be_a_non_negative_number(rho, data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="input_gradient_penalty"):
        inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, input_gradient_penalty=rho)


def test_penalty_needs_floating_point_inputs():
    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, 10, (8, 4))
    with pytest.raises(ValueError, match="floating-point inputs"):
        inf.fit(model, tokens, np.arange(8) % 2, loss=LOSS, input_gradient_penalty=0.1)


def test_streamed_and_cnn_runs_take_the_penalty_too(tmp_path):
    """The penalty lives in the batch loss, so streamed batches and convolutions get it like any other."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4, 4, 1)), rng.integers(0, 3, 12)
    xv, yv = rng.normal(size=(5, 4, 4, 1)), rng.integers(0, 3, 5)
    np.save(tmp_path / "x.npy", x)
    x_map = np.load(tmp_path / "x.npy", mmap_mode="r")

    def cnn():
        keras.utils.set_random_seed(0)
        return inf.as_float64(keras.Sequential([
            keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3, activation="tanh"), keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]))  # fmt: skip

    kwargs = {"loss": LOSS, "optimizer": SGD(0.2), "batch_size": 5, "epochs": 2, "input_gradient_penalty": RHO}
    memory = inf.fit(cnn(), x, y, jit_compile=False, **kwargs)
    streamed = inf.fit(cnn(), x_map, y, **kwargs)
    assert streamed.streamed
    assert all(np.array_equal(a, b) for a, b in zip(memory.final_weights, streamed.final_weights))
    expected = inf.unrolled(memory, x, y, xv, yv)
    got = inf.unrolled(streamed, x_map, y, xv, yv)
    np.testing.assert_allclose(got.input_grad, expected.input_grad, rtol=1e-12, atol=1e-16)
    chk = inf.check_unrolled(memory, x, y, xv, yv, 2, wrt="inputs")
    assert chk.ok and chk.max_rel_error <= 1e-5, chk


def test_one_step_with_the_penalty_is_the_one_step_run(data):
    """S2 with double backprop: hvp == dense Jacobian == float64 finite differences == a 1-step unrolled run."""
    x, y, xv, yv = data
    lr = 0.4
    model = mlp(5, 3, out_activation="softmax")
    initial = [w.numpy() for w in model.trainable_variables]

    def val_loss_after_penalized_step(inputs):
        with tf.GradientTape() as tape:
            step_loss = tf.reduce_mean(penalized_losses(model, inputs, y))
        grads = tape.gradient(step_loss, model.trainable_variables)
        stepped = [v - lr * g for v, g in zip(model.trainable_variables, grads)]
        out = tf.constant(xv)
        for kernel, bias, activation in ((stepped[0], stepped[1], tf.tanh), (stepped[2], stepped[3], tf.nn.softmax)):
            out = activation(out @ kernel + bias)
        return float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yv, out)))

    kwargs = {"learning_rate": lr, "input_gradient_penalty": RHO}
    fast = inf.one_step(model, LOSS, x, y, xv, yv, **kwargs)
    reference = inf.one_step(model, LOSS, x, y, xv, yv, method="jacobian", **kwargs)
    np.testing.assert_allclose(fast, reference, rtol=1e-10, atol=1e-14)
    assert np.abs(fast - inf.one_step(model, LOSS, x, y, xv, yv, learning_rate=lr)).max() > 1e-4
    chk = inf.check_gradient(val_loss_after_penalized_step, x, fast)
    assert chk.ok and chk.max_rel_error <= 1e-6, chk

    dc = inf.one_step(model, LOSS, x, y, xv, yv, wrt="sample_weights", **kwargs)
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(lr), batch_size=len(x), epochs=1, shuffle=False,
                   input_gradient_penalty=RHO)  # fmt: skip
    res = inf.unrolled(traj, x, y, xv, yv)
    np.testing.assert_allclose(res.removal_effect, -dc, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(res.input_grad, fast, rtol=1e-10, atol=1e-15)
    assert all(np.array_equal(a, b) for a, b in zip(traj.initial_weights, initial))


def test_one_step_refuses_the_penalty_where_samples_interact():
    keras.utils.set_random_seed(6)
    model = inf.as_float64(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                             keras.layers.BatchNormalization(), keras.layers.Dense(1)]))  # fmt: skip
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 1))
    with pytest.raises(ValueError, match="input-gradient penalty"):
        inf.one_step(model, "mse", x, y, x, y, training=True, input_gradient_penalty=0.1)
    assert inf.one_step(model, "mse", x, y, x, y, training=False, input_gradient_penalty=0.1).shape == x.shape


def test_a_penalty_float32_cannot_hold_is_exact_in_float64(data):
    """ρ = 0.3 was cast from a Python float through float32 (0.30000001192…): float64 runs were
    1.5e-8 off their own references. ρ = 0.5 (above) is exact in float32 and could not show it."""
    x, y, xv, yv = data
    model = mlp(5, 3, out_activation="softmax")
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(0.1), epochs=1, input_gradient_penalty=0.3)
    weights = [tf.constant(w) for w in traj.final_weights]
    got = traj.program().objective(weights, tf.constant(x), tf.constant(y), training=False)
    np.testing.assert_allclose(got.numpy(), penalized_losses(model, x, y, rho=0.3).numpy(), rtol=1e-14)

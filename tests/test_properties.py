"""Property-based checks (hypothesis) of the core identities over random small shapes."""

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import influence as inf
from influence import _tree, autodiff
from influence.losses import get_loss

# Each example traces fresh graphs (new shapes), so a handful of examples keeps the suite fast.
SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 6),
        "features": st.integers(1, 5),
        "hidden": st.integers(1, 6),
        "classes": st.integers(2, 4),
        "seed": st.integers(0, 10_000),
    }
)


def _setup(p):
    keras.utils.set_random_seed(p["seed"])
    model = inf.as_float64(
        keras.Sequential(
            [
                keras.Input((p["features"],)),
                keras.layers.Dense(p["hidden"], activation="tanh"),
                keras.layers.Dense(p["classes"], activation="softmax"),
            ]
        )
    )
    rng = np.random.default_rng(p["seed"])
    x = rng.normal(size=(p["batch"], p["features"]))
    y = rng.integers(0, p["classes"], p["batch"])
    v = [tf.constant(rng.normal(size=w.shape)) for w in model.trainable_variables]
    return model, x, y, v


@SETTINGS
@given(shapes)
def test_hvp_equals_dense_hessian_times_vector(p):
    model, x, y, v = _setup(p)
    fn, loss = inf.ModelFunction(model), get_loss("sparse_categorical_crossentropy")

    def mean_loss(w):
        return loss.mean(tf.constant(y), fn(w, tf.constant(x)))

    fast = _tree.flatten(autodiff.hvp(mean_loss, fn.weights, v)).numpy()
    dense = autodiff.hessian(mean_loss, fn.weights).numpy() @ _tree.flatten(v).numpy()
    assert np.allclose(fast, dense, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(shapes)
def test_vectorized_per_sample_dots_equal_a_loop(p):
    model, x, y, v = _setup(p)
    vectorized = inf.per_sample_gradient_dots(model, "sparse_categorical_crossentropy", x, y, v)
    fn, loss = inf.ModelFunction(model), get_loss("sparse_categorical_crossentropy")
    looped = [
        float(
            _tree.dot(
                autodiff.gradient(
                    lambda w, j=j: loss.mean(tf.constant(y[j : j + 1]), fn(w, tf.constant(x[j : j + 1]))), fn.weights
                ),
                v,
            )
        )
        for j in range(len(x))
    ]
    assert np.allclose(vectorized, looped, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(shapes, st.floats(0.01, 1.0))
def test_one_step_hvp_equals_the_jacobian_reference(p, lr):
    model, x, y, _ = _setup(p)
    fast = inf.one_step(model, "sparse_categorical_crossentropy", x, y, x, y, learning_rate=lr)
    ref = inf.one_step(model, "sparse_categorical_crossentropy", x, y, x, y, learning_rate=lr, method="jacobian")
    assert np.allclose(fast, ref, rtol=1e-9, atol=1e-13)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes, st.integers(1, 4), st.integers(1, 3))
def test_unrolled_memory_strategies_agree(p, batch_size, epochs):
    model, x, y, _ = _setup(p)
    traj = inf.fit(
        model,
        x,
        y,
        loss="sparse_categorical_crossentropy",
        optimizer=inf.optimizers.SGD(0.2),
        batch_size=batch_size,
        epochs=epochs,
        record_budget_bytes=0,
    )
    a = inf.unrolled(traj, x, y, x, y, strategy="store_all")
    b = inf.unrolled(traj, x, y, x, y, strategy=inf.Checkpointed(every=2))
    assert np.allclose(a.removal_effect, b.removal_effect, rtol=1e-10, atol=1e-15)
    assert np.allclose(a.input_grad, b.input_grad, rtol=1e-10, atol=1e-15)

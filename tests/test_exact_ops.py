"""Normalization layers and dropout masks: exact second derivatives, the same masks everywhere."""

import dataclasses
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import influence as inf
from influence._exact_ops import exact_ops, portable_uniform
from influence.optimizers import SGD, Adam

LOSS = "sparse_categorical_crossentropy"


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(13, 5)), rng.integers(0, 3, 13), rng.normal(size=(7, 5)), rng.integers(0, 3, 7)


def _variance_hvp(z: tf.Tensor, v: tf.Tensor) -> np.ndarray:
    """H·v of Σ var(z) along the last axis, through ``tf.nn.moments``."""
    with tf.GradientTape() as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            total = tf.reduce_sum(tf.nn.moments(z, axes=[-1])[1])
        contracted = tf.reduce_sum(inner.gradient(total, z) * v)
    return outer.gradient(contracted, z).numpy()


def test_moments_have_exact_second_derivatives_inside_and_tensorflows_outside():
    z = tf.constant([[0.3, -1.2, 0.7, 2.0]], tf.float64)
    v = tf.constant([[1.0, 0.5, -0.3, 0.2]], tf.float64)
    # var(z) = |z − mean|²/d has the Hessian (2/d)(I − 11ᵀ/d): exact H·v.
    exact = (2 / 4) * (v.numpy() - v.numpy().mean())
    with exact_ops():
        np.testing.assert_allclose(_variance_hvp(z, v), exact, rtol=1e-12)
    # Outside the block TensorFlow's own moments run (stop_gradient(mean): H·v = (2/d)·v).
    np.testing.assert_allclose(_variance_hvp(z, v), (2 / 4) * v.numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    "norm",
    [
        lambda: keras.layers.LayerNormalization(),
        lambda: keras.layers.GroupNormalization(groups=2),
    ],
    ids=["layer_norm", "group_norm"],
)
def test_normalization_layers_match_retraining_finite_differences(norm, data):
    x, y, xv, yv = data
    keras.utils.set_random_seed(4)
    model = inf.as_float64(
        keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(6), norm(), keras.layers.Activation("tanh"), keras.layers.Dense(3)]
        )
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    traj = inf.fit(model, x, y, loss=loss, optimizer=SGD(0.3), batch_size=5, epochs=2, seed=4)
    for wrt in ("inputs", "sample_weights"):
        chk = inf.check_unrolled(traj, x, y, xv, yv, 6, wrt=wrt)
        assert chk.ok, (wrt, chk)  # through TensorFlow's moments: relative errors 1e-3 to 2e-1


def _dropout_model() -> keras.Model:
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.4),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_a_float32_dropout_run_replays_in_float64_with_the_same_masks(data):
    x, y, xv, yv = data
    traj = inf.fit(_dropout_model(), x.astype("float32"), y, loss=LOSS, optimizer=Adam(0.05), batch_size=5, epochs=3)
    traj64 = inf.as_float64_trajectory(traj, x.astype("float32"), y)
    # Other masks end ~0.3 apart; the same masks differ by float32 round-off only.
    for a, b in zip(traj64.final_weights, traj.final_weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    float32_grad = inf.unrolled(traj, x.astype("float32"), y, xv, yv).sample_weight_grad
    float64_grad = inf.unrolled(traj64, x, y, xv, yv).sample_weight_grad
    np.testing.assert_allclose(float32_grad, float64_grad, rtol=1e-3, atol=1e-6)
    assert inf.check_unrolled(traj, x.astype("float32"), y, xv, yv, 3).ok


def test_xla_and_plain_graphs_draw_the_same_dropout_masks(data):
    x, y, _, _ = data
    runs = [  # a fresh model each: fit leaves the final weights in the model
        inf.fit(
            inf.as_float64(_dropout_model()),
            x,
            y,
            loss=LOSS,
            optimizer=SGD(0.3),
            batch_size=5,
            epochs=2,
            seed=1,
            jit_compile=jit,
        )
        for jit in (True, False)
    ]
    for a, b in zip(runs[0].final_weights, runs[1].final_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_portable_uniform_is_uniform_and_the_same_in_every_graph_mode():
    seed = tf.constant([12345, 0], tf.int32)
    eager = portable_uniform([300, 1000], seed).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for jit in (False, True):
            graph = tf.function(lambda: portable_uniform([300, 1000], seed), jit_compile=jit)().numpy()
            assert np.array_equal(graph, eager), jit
    assert eager.dtype == np.float32 and eager.min() >= 0 and eager.max() < 1
    # 300 000 draws: mean and deciles within a few standard errors of U(0, 1).
    assert abs(eager.mean() - 0.5) < 0.003
    counts = np.histogram(eager, bins=10, range=(0, 1))[0] / eager.size
    assert np.abs(counts - 0.1).max() < 0.003
    # Neighbouring seeds (consecutive steps, neighbouring layers) give unrelated masks.
    other = portable_uniform([300, 1000], seed + tf.constant([1, 0])).numpy()
    assert abs(np.corrcoef(eager.ravel(), other.ravel())[0, 1]) < 0.01
    assert abs(np.mean((eager < 0.4) == (other < 0.4)) - (0.4**2 + 0.6**2)) < 0.005


def test_dropout_keeps_the_expected_fraction_and_rescales(data):
    x = tf.ones([200, 500], tf.float64)
    with exact_ops():
        out = tf.nn.experimental.stateless_dropout(x, rate=0.3, seed=tf.constant([5, 1])).numpy()
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.005
    np.testing.assert_allclose(out[kept], 1 / (1 - 0.3), rtol=1e-15)


@pytest.mark.parametrize(
    "noise",
    [
        lambda: keras.layers.GaussianNoise(0.3),
        lambda: keras.layers.GaussianDropout(0.3),
        lambda: keras.layers.AlphaDropout(0.3),
    ],
    ids=["gaussian_noise", "gaussian_dropout", "alpha_dropout"],
)
def test_noise_layers_draw_the_same_numbers_in_float32_and_float64(noise, data):
    x, y, xv, yv = data
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh"),
            noise(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    traj = inf.fit(model, x.astype("float32"), y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    traj64 = inf.as_float64_trajectory(traj, x.astype("float32"), y)  # raises if it ends elsewhere
    for a, b in zip(traj64.final_weights, traj.final_weights):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_portable_normal_has_the_standard_moments():
    with exact_ops():
        z = tf.random.stateless_normal([400_000], seed=tf.constant([3, 4]), dtype=tf.float64).numpy()
    assert abs(z.mean()) < 0.006 and abs(z.std() - 1) < 0.006
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.003


def test_a_float64_replay_that_ends_elsewhere_is_refused(data):
    x, y, xv, yv = data
    traj = inf.fit(_dropout_model(), x.astype("float32"), y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    # As if a layer drew other random numbers in float64: the recorded end is not where the replay ends.
    moved = dataclasses.replace(traj, final_weights=[w + 0.1 for w in traj.final_weights])
    with pytest.raises(ValueError, match="the float64 replay ends 0.1 .* from the recorded float32 run"):
        inf.check_unrolled(moved, x.astype("float32"), y, xv, yv, 0)

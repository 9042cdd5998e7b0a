"""Steps under tf.distribute.MirroredStrategy on two logical CPU devices give one device's numbers."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam

LOSS = "sparse_categorical_crossentropy"


@pytest.fixture(scope="module")
def strategy():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("two logical CPU devices are not configured")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


@pytest.mark.parametrize("optimizer", [SGD(0.3), Adam(0.02)], ids=["sgd", "adam"])
def test_two_replicas_give_the_same_trajectory_and_hypergradients(strategy, optimizer):
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.default_rng(0)
    # 13 samples, batch 5: odd batch widths exercise the padding to a multiple of the replica count.
    x, y, xv, yv = rng.normal(size=(13, 5)), rng.integers(0, 3, 13), rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    single = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=optimizer, batch_size=5, epochs=2)
    mirrored = inf.fit(
        mlp(5, 3, out_activation="softmax"),
        x,
        y,
        loss=LOSS,
        optimizer=optimizer,
        batch_size=5,
        epochs=2,
        distribute=strategy,
    )
    for a, b in zip(single.final_weights, mirrored.final_weights):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-14)
    one = inf.unrolled(single, x, y, xv, yv)
    two = inf.unrolled(mirrored, x, y, xv, yv)
    assert np.allclose(one.removal_effect, two.removal_effect, rtol=1e-10, atol=1e-15)
    assert np.allclose(one.input_grad, two.input_grad, rtol=1e-10, atol=1e-15)
    assert mirrored.program().replicas == 2 and mirrored.program().schedule.batches.shape[1] == 6


def test_label_grads_under_a_strategy_match_and_bad_strategies_are_refused(strategy):
    rng = np.random.default_rng(1)
    x, y, xv, yv = rng.normal(size=(8, 4)), rng.normal(size=(8, 2)), rng.normal(size=(4, 4)), rng.normal(size=(4, 2))
    single = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.1, momentum=0.9), batch_size=4, epochs=2)
    mirrored = inf.fit(
        mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.1, momentum=0.9), batch_size=4, epochs=2, distribute=strategy
    )
    one, two = inf.unrolled(single, x, y, xv, yv), inf.unrolled(mirrored, x, y, xv, yv)
    assert np.allclose(one.label_grad, two.label_grad, rtol=1e-10, atol=1e-15)
    with pytest.raises(TypeError, match="'distribute' parameter of fit must be a tf.distribute.Strategy or None"):
        inf.fit(mlp(4, 2), x, y, loss="mse", distribute="mirrored")

"""Shared fixtures: fixed seeds, small float64 models and data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so distributed tests can compare 1 vs 2 replicas (must precede TF's start-up).
_cpu = tf.config.list_physical_devices("CPU")[0]
try:
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # devices already initialised by another import: distributed tests will skip
    pass

import influence as inf  # noqa: E402


@pytest.fixture(autouse=True)
def _seeds():
    keras.utils.set_random_seed(0)
    # XLA refusals are warned about once per process: each test that expects the warning gets it.
    from influence import program

    program._XLA_REFUSALS_SAID.clear()


def mlp(n_in: int, n_out: int, *, hidden=(8,), activation="tanh", out_activation=None, seed=0):
    """A small float64 MLP (Sequential)."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((n_in,))]
    layers += [keras.layers.Dense(h, activation=activation) for h in hidden]
    layers.append(keras.layers.Dense(n_out, activation=out_activation))
    return inf.as_float64(keras.Sequential(layers))


@pytest.fixture
def classifier():
    """float64 MLP 5-8-3 with softmax output."""
    return mlp(5, 3, out_activation="softmax")


@pytest.fixture
def regressor():
    """float64 MLP 4-8-2, linear output."""
    return mlp(4, 2)


@pytest.fixture
def class_data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(6, 5)), rng.integers(0, 3, 6), rng.normal(size=(7, 5)), rng.integers(0, 3, 7)


@pytest.fixture
def reg_data():
    rng = np.random.default_rng(2)
    return rng.normal(size=(6, 4)), rng.normal(size=(6, 2)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))


def s1_cnn(seed=0):
    """The S1 CNN: conv, pooling, dropout, dense on 28x28x1 (float32, as users build it)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Dropout(0.25),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )

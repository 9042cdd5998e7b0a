"""one_step: hvp route == jacobian reference == float64 finite differences of the real step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence import _tree
from influence.autodiff import gradient
from influence.losses import get_loss

LR = 0.3


def val_loss_after_step(model, loss_name, x, y, xv, yv, c=None, lr=LR):
    """E(w - lr ∇L) computed directly, for finite differences (float64)."""
    fn = inf.ModelFunction(model)
    loss = get_loss(loss_name)
    weights = np.ones(len(x)) if c is None else c
    w = fn.weights
    g = gradient(lambda ww: tf.reduce_mean(tf.constant(weights) * loss(tf.constant(y), fn(ww, tf.constant(x)))), w)
    return float(loss.mean(tf.constant(yv), fn(_tree.axpy(-lr, g, w), tf.constant(xv))))


CASES = {
    "regression": ("mse", "reg"),
    "classification": ("sparse_categorical_crossentropy", "class"),
}


@pytest.fixture
def case_setup(request, classifier, regressor, class_data, reg_data):
    loss_name, kind = CASES[request.param]
    return (regressor, reg_data, loss_name) if kind == "reg" else (classifier, class_data, loss_name)


@pytest.mark.parametrize("case_setup", list(CASES), indirect=True)
def test_input_gradient_hvp_equals_jacobian_and_finite_differences(case_setup):
    model, (x, y, xv, yv), loss_name = case_setup
    fast = inf.one_step(model, loss_name, x, y, xv, yv, learning_rate=LR, method="hvp")
    ref = inf.one_step(model, loss_name, x, y, xv, yv, learning_rate=LR, method="jacobian")
    assert fast.shape == x.shape and fast.dtype == np.float64
    assert np.max(np.abs(fast - ref)) <= 1e-10 * np.max(np.abs(ref))
    chk = inf.check_gradient(lambda z: val_loss_after_step(model, loss_name, z, y, xv, yv), x, fast)
    assert chk.ok, chk
    assert chk.max_rel_error <= 1e-6


@pytest.mark.parametrize("case_setup", list(CASES), indirect=True)
def test_sample_weight_gradient_matches_finite_differences(case_setup):
    model, (x, y, xv, yv), loss_name = case_setup
    c = np.ones(len(x))
    fast = inf.one_step(model, loss_name, x, y, xv, yv, learning_rate=LR, wrt="sample_weights")
    ref = inf.one_step(model, loss_name, x, y, xv, yv, learning_rate=LR, wrt="sample_weights", method="jacobian")
    assert fast.shape == (len(x),)
    assert np.allclose(fast, ref, rtol=1e-10, atol=1e-15)
    chk = inf.check_gradient(lambda cc: val_loss_after_step(model, loss_name, x, y, xv, yv, c=cc), c, fast)
    assert chk.ok, chk


def test_label_gradient_for_continuous_targets(regressor, reg_data):
    x, y, xv, yv = reg_data
    fast = inf.one_step(regressor, "mse", x, y, xv, yv, learning_rate=LR, wrt="labels")
    ref = inf.one_step(regressor, "mse", x, y, xv, yv, learning_rate=LR, wrt="labels", method="jacobian")
    assert fast.shape == y.shape
    assert np.allclose(fast, ref, rtol=1e-10, atol=1e-15)
    chk = inf.check_gradient(lambda yy: val_loss_after_step(regressor, "mse", x, yy, xv, yv), y, fast)
    assert chk.ok, chk


def test_functional_model_and_keras_loss_object_stay_float64():
    keras.utils.set_random_seed(3)
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu")(inp)
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([hidden, inp]))
    model = inf.as_float64(keras.Model(inp, out))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 4)), rng.integers(0, 3, 5)
    xv, yv = rng.normal(size=(4, 4)), rng.integers(0, 3, 4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fast = inf.one_step(model, loss, x, y, xv, yv, learning_rate=LR)
    assert fast.dtype == np.float64
    chk = inf.check_gradient(lambda z: val_loss_after_step_logits(model, z, y, xv, yv), x, fast)
    assert chk.ok, chk


def val_loss_after_step_logits(model, x, y, xv, yv):
    fn = inf.ModelFunction(model)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    w = fn.weights
    g = gradient(lambda ww: ce(tf.constant(y), fn(ww, tf.constant(x))), w)
    return float(ce(tf.constant(yv), fn(_tree.axpy(-LR, g, w), tf.constant(xv))))


def test_dropout_in_training_mode_is_deterministic_with_a_seed():
    keras.utils.set_random_seed(5)
    model = inf.as_float64(
        keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.Dropout(0.5),
                keras.layers.Dense(2),
            ]
        )
    )
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(4, 6)), rng.normal(size=(4, 2)), rng.normal(size=(3, 6)), rng.normal(size=(3, 2))
    a = inf.one_step(model, "mse", x, y, xv, yv, training=True, seed=7)
    b = inf.one_step(model, "mse", x, y, xv, yv, training=True, seed=7)
    ref = inf.one_step(model, "mse", x, y, xv, yv, training=True, seed=7, method="jacobian")
    off = inf.one_step(model, "mse", x, y, xv, yv, training=False)
    assert np.array_equal(a, b)
    assert np.allclose(a, ref, rtol=1e-10, atol=1e-15)
    assert not np.allclose(a, off)  # the masks really are applied


def test_batchnorm_training_mode_is_exact_because_the_batch_loss_is_differentiated_whole():
    keras.utils.set_random_seed(6)
    model = inf.as_float64(
        keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(1)]
        )
    )
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(5, 3)), rng.normal(size=(5, 1)), rng.normal(size=(4, 3)), rng.normal(size=(4, 1))
    fast = inf.one_step(model, "mse", x, y, xv, yv, training=True)
    ref = inf.one_step(model, "mse", x, y, xv, yv, training=True, method="jacobian")
    assert np.allclose(fast, ref, rtol=1e-10, atol=1e-15)


def test_hvp_runs_at_784_features_batch_64_in_float32():
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.random((64, 784)).astype("float32")
    y = rng.integers(0, 10, 64)
    g = inf.one_step(model, "sparse_categorical_crossentropy", x, y, x[:32], y[:32], learning_rate=0.1)
    assert g.shape == (64, 784) and g.dtype == np.float32
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_float32_and_float64_models_agree_to_float32_precision(class_data):
    keras.utils.set_random_seed(0)
    model32 = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    x, y, xv, yv = class_data
    g32 = inf.one_step(model32, "sparse_categorical_crossentropy", x.astype("float32"), y, xv.astype("float32"), yv)
    g64 = inf.one_step(inf.as_float64(model32), "sparse_categorical_crossentropy", x, y, xv, yv)
    assert np.allclose(g32, g64, rtol=1e-3, atol=1e-6)


def test_mlp_fixture_is_float64():
    assert all(v.dtype == "float64" for v in mlp(2, 1).trainable_variables)


def test_token_models_sample_weight_gradient_by_hvp_equals_the_jacobian_and_inf_hvp_takes_embeddings():
    """An Embedding's gradient comes as IndexedSlices: the hvp route and inf.hvp used to crash on it."""
    keras.utils.set_random_seed(1)
    model = inf.as_float64(keras.Sequential([
        keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3), keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, activation="softmax"),
    ]))  # fmt: skip
    rng = np.random.default_rng(5)
    tokens, y, tokens_val, y_val = (
        rng.integers(0, 10, (5, 4)),
        rng.integers(0, 3, 5),
        rng.integers(0, 10, (6, 4)),
        rng.integers(0, 3, 6),
    )
    loss = "sparse_categorical_crossentropy"
    fast = inf.one_step(model, loss, tokens, y, tokens_val, y_val, wrt="sample_weights")
    ref = inf.one_step(model, loss, tokens, y, tokens_val, y_val, wrt="sample_weights", method="jacobian")
    np.testing.assert_allclose(fast, ref, rtol=1e-10, atol=1e-15)
    assert np.all(fast != 0)

    fn, per_sample = inf.ModelFunction(model), get_loss(loss)
    v = [tf.constant(rng.normal(size=w.shape)) for w in fn.weights]

    def mean_loss(w):
        return per_sample.mean(tf.constant(y), fn(w, tf.constant(tokens)))

    forward = inf.hvp(mean_loss, fn.weights, v)
    reverse = inf.autodiff.hvp_reverse(mean_loss, fn.weights, v)
    for a, b in zip(forward, reverse):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-14)
    assert np.abs(forward[0].numpy()).max() > 0  # the embedding table's block


def test_keras_style_sample_weight_column_equals_a_vector(classifier, class_data):
    """(B, 1) weights used to broadcast against (B,) losses into a (B, B) matrix: a silently wrong step."""
    x, y, xv, yv = class_data
    c = np.linspace(0.5, 1.5, len(x))
    for wrt in ("inputs", "sample_weights"):
        as_vector = inf.one_step(classifier, "sparse_categorical_crossentropy", x, y, xv, yv, wrt=wrt, sample_weight=c)
        as_column = inf.one_step(classifier, "sparse_categorical_crossentropy", x, y, xv, yv, wrt=wrt,
                                 sample_weight=c[:, None])  # fmt: skip
        np.testing.assert_array_equal(as_column, as_vector)
    with pytest.raises(ValueError, match="'sample_weight' parameter of one_step must be shape"):
        inf.one_step(classifier, "sparse_categorical_crossentropy", x, y, xv, yv, sample_weight=np.ones((len(x), 2)))

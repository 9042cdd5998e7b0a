"""Built-in per-sample losses: Keras's values, float64 kept, exact hypergradients through them."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence.losses import get_loss
from influence.optimizers import SGD

REGRESSION = {
    "mse": keras.losses.MeanSquaredError,
    "mae": keras.losses.MeanAbsoluteError,
    "huber": keras.losses.Huber,
    "log_cosh": keras.losses.LogCosh,
}


@pytest.mark.parametrize("name", list(REGRESSION))
@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_losses_equal_keras_per_sample_and_stay_float64(name, outputs):
    rng = np.random.default_rng(0)
    # Residuals up to ±4 cross Huber's δ = 1 on both sides.
    y_true, y_pred = rng.normal(size=(6, outputs)), 2.0 * rng.normal(size=(6, outputs))
    keras_loss = REGRESSION[name](reduction=None, dtype="float64")
    expected = keras_loss(y_true, y_pred).numpy()
    for spelled in (name, REGRESSION[name]()):
        got = get_loss(spelled)(tf.constant(y_true), tf.constant(y_pred))
        assert got.dtype == tf.float64 and got.shape == (6,)
        # Keras subtracts log 2 rounded to float32 (1.9e-9 off) even in float64; influence does not.
        atol = 2e-9 if name == "log_cosh" else 1e-15
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=atol)


def test_huber_delta_is_honoured():
    y_true, y_pred = np.zeros((4, 1)), np.array([[0.2], [0.9], [1.5], [-3.0]])
    for delta in (0.5, 2.0):
        expected = keras.losses.Huber(delta=delta, reduction=None, dtype="float64")(y_true, y_pred).numpy()
        got = get_loss(keras.losses.Huber(delta=delta))(tf.constant(y_true), tf.constant(y_pred)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert get_loss(keras.losses.Huber(delta=0.5)) != get_loss(keras.losses.Huber(delta=2.0))


@pytest.mark.parametrize("loss", ["huber", "log_cosh"])
def test_unrolled_through_robust_regression_losses_matches_retraining(loss):
    rng = np.random.default_rng(3)
    x, xv = rng.normal(size=(10, 4)), rng.normal(size=(6, 4))
    # Targets of scale 2: some residuals beyond Huber's δ = 1 (its linear part is exercised).
    y, yv = 2.0 * rng.normal(size=(10, 2)), 2.0 * rng.normal(size=(6, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss=loss, optimizer=SGD(0.1, momentum=0.5), batch_size=4, epochs=2, seed=0)
    res = inf.unrolled(traj, x, y, xv, yv)
    assert res.label_grad is not None and res.label_grad.shape == y.shape
    for wrt in ("inputs", "labels", "sample_weights"):
        chk = inf.check_unrolled(traj, x, y, xv, yv, 1, wrt=wrt, h=1e-4)
        assert chk.ok and chk.max_rel_error <= 1e-5, (wrt, chk)


def test_huber_delta_survives_saving_and_loading_a_run(tmp_path):
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(8, 4)), rng.normal(size=(8, 2)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss=keras.losses.Huber(delta=0.3), batch_size=4, epochs=1)
    inf.save_trajectory(traj, tmp_path / "run")
    loaded = inf.load_trajectory(tmp_path / "run")
    assert loaded.loss == traj.loss and loaded.loss.options == (("delta", 0.3),)
    assert inf.unrolled(loaded, x, y, xv, yv).val_loss == inf.unrolled(traj, x, y, xv, yv).val_loss


@pytest.mark.parametrize(
    "loss, option",
    [
        (keras.losses.CategoricalCrossentropy(label_smoothing=0.2), "label_smoothing"),
        (keras.losses.BinaryCrossentropy(label_smoothing=0.1), "label_smoothing"),
        (keras.losses.SparseCategoricalCrossentropy(ignore_class=3), "ignore_class"),
        (keras.losses.CategoricalCrossentropy(axis=0), "axis"),
        (keras.losses.MeanSquaredError(reduction="sum"), "reduction"),
    ],
)
def test_keras_loss_settings_the_translation_lacks_are_refused_not_dropped(loss, option):
    with pytest.raises(ValueError, match=f"'loss' parameter of get_loss must be a Keras loss without {option}"):
        get_loss(loss)


def test_callable_losses_must_return_per_sample_values_in_the_predictions_dtype():
    y, p = tf.constant([0, 1], tf.int64), tf.constant([[2.0, 0.5], [0.1, 1.0]], tf.float64)
    float32 = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    with pytest.raises(TypeError, match=r"must be a per-sample loss returning the predictions' dtype \(float64\)"):
        get_loss(lambda yt, yp: float32(yt, yp))(y, p)
    with pytest.raises(ValueError, match=r"must be a per-sample loss returning shape \(B,\)"):
        get_loss(lambda yt, yp: tf.reduce_mean(yp))(y, p)

    def summed(yt, yp):
        return tf.reduce_sum(yp, axis=1)

    assert get_loss(summed)(y, p).dtype == tf.float64
    assert get_loss(summed) == get_loss(summed)  # one wrapper per callable: runs share compiled programs


def _soft_label_data():
    rng = np.random.default_rng(4)
    x, xv = rng.normal(size=(10, 4)), rng.normal(size=(6, 4))
    y, yv = rng.dirichlet(np.ones(3), 10), np.eye(3)[rng.integers(0, 3, 6)]
    return x, y, xv, yv


def test_keras_loss_functions_are_taken_as_their_names_so_label_gradients_are_exact():
    """keras.losses.categorical_crossentropy runs TF's fused op, whose label second derivative is missing."""
    x, y, xv, yv = _soft_label_data()
    assert get_loss(keras.losses.categorical_crossentropy) == get_loss("categorical_crossentropy")
    assert get_loss(keras.losses.mean_squared_error) == get_loss("mse")
    assert get_loss(keras.losses.sparse_categorical_crossentropy).integer_labels
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, loss=keras.losses.categorical_crossentropy,
                   optimizer=SGD(0.3), batch_size=5, epochs=2)  # fmt: skip
    chk = inf.check_unrolled(traj, x, y, xv, yv, 1, wrt="labels")
    assert chk.ok and chk.max_rel_error <= 1e-5, chk


def test_a_callable_through_the_fused_cross_entropy_is_warned_about():
    x, y, xv, yv = _soft_label_data()

    def fused(y_true, logits):
        return tf.nn.softmax_cross_entropy_with_logits(labels=y_true, logits=logits)

    with pytest.warns(UserWarning, match="fused 'SoftmaxCrossEntropyWithLogits'.*label gradients"):
        traj = inf.fit(mlp(4, 3), x, y, loss=fused, optimizer=SGD(0.3), batch_size=5, epochs=2)
    # The warning is right: the label gradient through the fused op misses its second-order term.
    chk = inf.check_unrolled(traj, x, y, xv, yv, 1, wrt="labels")
    assert not chk.ok


def test_a_callable_named_like_a_built_in_keeps_its_own_identity(tmp_path):
    def mse(y_true, y_pred):  # noqa: ARG001 - a user's own loss under a built-in's name
        return tf.reduce_sum(tf.abs(y_true - y_pred), axis=-1)

    loss = get_loss(mse)
    assert loss.name == "mse (callable)" and loss != get_loss("mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss=mse, optimizer=SGD(0.1), batch_size=4)
    with pytest.raises(ValueError, match="custom callables cannot be saved"):
        inf.save_trajectory(traj, tmp_path / "run")


def keras_docs_mse(y_true, y_pred):
    """The custom loss of Keras's documentation, verbatim: it relies on Keras aligning the ranks."""
    return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


@pytest.mark.parametrize("label_shape", [(10,), (10, 1)])
def test_a_callable_gets_labels_at_the_predictions_rank_as_in_keras(label_shape):
    # Labels (B,) against Dense(1)'s (B, 1) would broadcast to (B, B) and still return B values.
    rng = np.random.default_rng(5)
    x, xv = rng.normal(size=(10, 4)), rng.normal(size=(6, 4))
    y, yv = rng.normal(size=label_shape), rng.normal(size=(6, *label_shape[1:]))
    common = dict(optimizer=SGD(0.1), batch_size=4, epochs=2, seed=0)
    custom = inf.fit(mlp(4, 1), x, y, loss=keras_docs_mse, **common)
    built_in = inf.fit(mlp(4, 1), x, y, loss="mse", **common)
    for got, expected in zip(custom.final_weights, built_in.final_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    a, b = inf.unrolled(custom, x, y, xv, yv), inf.unrolled(built_in, x, y, xv, yv)
    np.testing.assert_allclose(a.removal_effect, b.removal_effect, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.label_grad, b.label_grad, rtol=1e-10, atol=1e-14)
    assert a.label_grad.shape == label_shape


def test_from_logits_that_contradicts_the_loss_object_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"'from_logits' parameter of get_loss must be the loss object's own setting"):
        get_loss(keras.losses.BinaryCrossentropy(), from_logits=True)
    assert get_loss(keras.losses.BinaryCrossentropy(from_logits=True), from_logits=True).from_logits


class DocsMSE(keras.losses.Loss):
    """A keras.losses.Loss subclass as Keras's guide writes one: call returns per-sample values."""

    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


def test_keras_loss_subclasses_and_other_keras_losses_are_their_per_sample_call():
    """They were refused ('a Keras loss among ...'), though their call is the per-sample loss."""
    rng = np.random.default_rng(6)
    x, y, xv, yv = rng.normal(size=(10, 4)), rng.normal(size=(10, 2)), rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    common = dict(optimizer=SGD(0.1), batch_size=4, epochs=2, seed=0)
    custom = inf.fit(mlp(4, 2), x, y, loss=DocsMSE(), **common)
    built_in = inf.fit(mlp(4, 2), x, y, loss="mse", **common)
    assert custom.loss.name == "DocsMSE"
    a, b = inf.unrolled(custom, x, y, xv, yv), inf.unrolled(built_in, x, y, xv, yv)
    np.testing.assert_allclose(a.removal_effect, b.removal_effect, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.label_grad, b.label_grad, rtol=1e-10, atol=1e-14)
    labels, outputs = (
        tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float64),
        tf.constant([[0.3, -0.2], [0.5, 2.0]], tf.float64),
    )
    hinge = get_loss(keras.losses.Hinge())  # a built-in Keras class without a translation
    expected = np.mean(np.maximum(1 - (2 * labels.numpy() - 1) * outputs.numpy(), 0), axis=-1)
    np.testing.assert_allclose(hinge.per_sample(labels, outputs), expected, rtol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "binary_crossentropy"])
def test_one_sample_with_targets_of_shape_n_for_one_output(loss):
    """(n,) targets of a one-output model work on batches of one sample too: the trailing axis
    of 1 that may be left out is never the batch axis. Self-influence runs per sample, so it
    failed for every such regression or binary run."""
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(8, 3)), rng.normal(size=(1, 3))
    y, yv = (rng.normal(size=8), rng.normal(size=1)) if loss == "mse" else (np.arange(8) % 2, np.array([1]))
    one = get_loss(loss)(tf.constant(y[:1], tf.float64), tf.constant([[0.3]], tf.float64))
    assert one.shape == (1,)
    model = mlp(3, 1, out_activation=None if loss == "mse" else "sigmoid")
    traj = inf.fit(model, x, y, loss=loss, batch_size=1, epochs=1, seed=0)
    assert inf.unrolled(traj, x, y, xv, yv).removal_effect.shape == (8,)
    table = inf.rank(traj, x, y, xv, yv, method="self_influence")
    assert len(table) == 8 and np.isfinite(table["score"]).all()
    column = y.reshape(-1, 1)
    assert np.allclose(
        inf.unrolled(traj, x, column, xv, yv.reshape(-1, 1)).removal_effect,
        inf.unrolled(traj, x, y, xv, yv).removal_effect,
    )


@pytest.mark.parametrize("name", [*REGRESSION, "binary_crossentropy", "sparse_categorical_crossentropy"])
def test_every_loss_takes_numpy_labels(name):
    """The README's building-block recipe, get_loss("mse").mean(y, fn(w, x)), with the numpy labels
    a user has: the regression losses read the labels' shape as a tensor's and failed."""
    rng = np.random.default_rng(0)
    outputs = 3 if name == "sparse_categorical_crossentropy" else 1
    y_pred = tf.constant(rng.uniform(0.1, 0.9, size=(4, outputs)))
    y = rng.integers(0, outputs + 1, size=4) if name != "mse" else rng.normal(size=4)
    loss = get_loss(name)
    assert float(loss.mean(y, y_pred)) == pytest.approx(float(loss.mean(tf.constant(y), y_pred)), rel=1e-12)

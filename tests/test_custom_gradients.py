"""custom_gradient and stop_gradient inside models work end to end through the unrolled pass (S4)."""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import influence as inf
from influence.optimizers import SGD


@tf.custom_gradient
def smooth_abs(x):
    """sqrt(x² + 1) with a hand-written (and correct, twice-differentiable) gradient."""
    value = tf.sqrt(x * x + 1)

    def grad(upstream):
        return upstream * x / tf.sqrt(x * x + 1)

    return value, grad


class SmoothAbs(keras.layers.Layer):
    def call(self, inputs):
        return smooth_abs(inputs)


class DetachedScale(keras.layers.Layer):
    """x * stop_gradient(mean |x|): the scale is data-dependent but not differentiated."""

    def call(self, inputs):
        return inputs * tf.stop_gradient(tf.reduce_mean(tf.abs(inputs), axis=-1, keepdims=True))


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, dtype="float64"),
            SmoothAbs(dtype="float64"),
            DetachedScale(dtype="float64"),
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 4)), rng.integers(0, 3, 12), rng.normal(size=(6, 4)), rng.integers(0, 3, 6)


def test_custom_gradient_layer_unrolled_matches_retraining_finite_differences():
    x, y, xv, yv = _data()
    # Without the stop_gradient layer, every derivative is real: FD through retraining must agree.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, dtype="float64"),
            SmoothAbs(dtype="float64"),
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )
    # A custom gradient is trusted only after a check: fit says so, naming the op.
    with pytest.warns(inf.GradientOverrideWarning, match=r"custom gradient at '[^']*smooth_abs[^']*/IdentityN'"):
        traj = inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=2)
    chk = inf.check_unrolled(traj, x, y, xv, yv, 5, wrt="inputs")
    assert chk.ok, chk


def test_stop_gradient_is_honoured_and_finite_differences_expose_it():
    # stop_gradient makes the autodiff gradient differ from the true derivative of the
    # retrained loss: the float64 check must say so instead of passing silently.
    x, y, xv, yv = _data()
    model = _model()
    with pytest.warns(inf.GradientOverrideWarning, match=r"stop_gradient at '[^']*detached_scale[^']*/StopGradient'"):
        traj = inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=2)
    with warnings.catch_warnings():  # once per model and mode: a refit does not repeat it
        warnings.simplefilter("error", inf.GradientOverrideWarning)
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=1)
    res = inf.unrolled(traj, x, y, xv, yv)
    assert np.all(np.isfinite(res.input_grad))
    chk = inf.check_unrolled(traj, x, y, xv, yv, 5, wrt="inputs")
    assert not chk.ok
    assert "likely wrong" in chk.explanation
    # The detached scale still depends on w, so H·v misses its term and dE/dc is off too:
    # the check must fail loudly for it as well.
    chk_c = inf.check_unrolled(traj, x, y, xv, yv, 5, wrt="sample_weights")
    assert not chk_c.ok and "likely wrong" in chk_c.explanation


def test_newton_step_on_a_small_model_lowers_the_loss():
    x, y, _, _ = _data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(3, activation="softmax", dtype="float64")]
    )
    fn = inf.ModelFunction(model)
    loss = inf.losses.get_loss("sparse_categorical_crossentropy")

    def mean_loss(w):
        return loss.mean(tf.constant(y), fn(w, tf.constant(x)))

    before = float(mean_loss(fn.weights))
    after = float(mean_loss(inf.newton_step(mean_loss, fn.weights, damping=0.1)))
    assert after < before
    h = inf.hessian(mean_loss, fn.weights).numpy()
    assert h.shape == (15, 15) and np.all(np.linalg.eigvalsh(h) > -1e-10)  # softmax regression is convex


def test_float64_weights_behind_a_float32_input_are_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="float64")])
    x, y, _, _ = _data()
    with __import__("pytest").raises(
        ValueError,
        match="'model' parameter of fit must be a model whose inputs are as "
        "precise as its float64 weights. Got a float32 Input",
    ):
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy")


class LogSoftmaxByLogsumexp(keras.layers.Layer):
    """x − logsumexp(x): TensorFlow stops the gradient of its internal max, exactly."""

    def call(self, inputs):
        return inputs - keras.ops.logsumexp(inputs, axis=-1, keepdims=True)


class IntegerSideChannel(keras.layers.Layer):
    """stop_gradient on a value computed from an integer tensor: no derivative passes anyway."""

    def call(self, inputs):
        return inputs + 0.0 * tf.stop_gradient(tf.cast(tf.argmax(inputs, axis=-1)[:, None], inputs.dtype))


class ShapeOnlyConstant(keras.layers.Layer):
    """stop_gradient on ones_like/zeros_like of x: the value depends on x's shape only (it was a false alarm)."""

    def call(self, inputs):
        return inputs * tf.stop_gradient(tf.ones_like(inputs)) + tf.stop_gradient(tf.zeros_like(inputs))


@pytest.mark.parametrize(
    "layer",
    [LogSoftmaxByLogsumexp, IntegerSideChannel, ShapeOnlyConstant, lambda: keras.layers.Dropout(0.3, dtype="float64")],
)
def test_exact_uses_of_stop_gradient_do_not_warn(layer):
    x, y, _, _ = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            layer(dtype="float64") if isinstance(layer, type) else layer(),
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=1)


def test_a_float32_layer_inside_a_float64_model_is_named():
    """Keras casts a layer's inputs to its own dtype: a Dropout left at float32 quantised a "float64" model."""
    x, y, _, _ = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64", name="hidden"),
            keras.layers.Dropout(0.3, name="left_at_float32"),
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )
    with pytest.warns(
        RuntimeWarning, match=r"narrower float type at: layer left_at_float32 \(its inputs cast to float32"
    ):
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=1)


def test_one_step_warns_about_a_stop_gradient_too():
    x, y, xv, yv = _data()
    with pytest.warns(inf.GradientOverrideWarning, match="one_step: the model overrides autodiff with stop_gradient"):
        inf.one_step(_model(), "sparse_categorical_crossentropy", x, y, xv, yv, learning_rate=0.1)


def test_a_loaded_run_warns_again_in_its_new_process(tmp_path):
    x, y, _, _ = _data()
    with pytest.warns(inf.GradientOverrideWarning):
        traj = inf.fit(_model(), x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4)
    inf.save_trajectory(traj, tmp_path / "run")
    custom = {"SmoothAbs": SmoothAbs, "DetachedScale": DetachedScale}
    with pytest.warns(inf.GradientOverrideWarning, match="load_trajectory: the model overrides autodiff") as caught:
        inf.load_trajectory(tmp_path / "run", custom_objects=custom)
    assert caught[0].filename == __file__  # points at the caller's line


class DetachedRecurrenceCell(keras.layers.Layer):
    """A recurrent cell that stops the gradient through its state: truncated backprop in one line."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))
        self.recurrent = self.add_weight(shape=(self.units, self.units))

    def call(self, inputs, states):
        h = tf.tanh(inputs @ self.kernel + tf.stop_gradient(states[0]) @ self.recurrent)
        return h, [h]


def _sequence_model(recurrent):
    """float64 throughout (built so, not cloned: the custom cell has no config to clone from)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5, 3), dtype="float64"),
            recurrent,
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )


def test_a_stop_gradient_inside_a_recurrent_cell_warns():
    """The cell's op lives in the loop body's function graph; its state carries x from the second step on."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5, 3)), rng.integers(0, 3, 8)
    model = _sequence_model(keras.layers.RNN(DetachedRecurrenceCell(4, dtype="float64"), dtype="float64"))
    with pytest.warns(inf.GradientOverrideWarning, match=r"/while/detached_recurrence_cell(_\d+)?/StopGradient"):
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.1), batch_size=4)


@pytest.mark.parametrize("recurrent", [keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN])
def test_built_in_recurrent_layers_do_not_warn(recurrent):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5, 3)), rng.integers(0, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", inf.GradientOverrideWarning)
        model = _sequence_model(recurrent(4, dtype="float64"))
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", batch_size=4)


@pytest.mark.parametrize(
    "augment", [lambda: keras.layers.RandomTranslation(0.2, 0.2), lambda: keras.layers.RandomZoom(0.2)]
)
def test_augmentation_through_an_image_transform_warns_that_its_gradient_is_approximate(augment):
    """TensorFlow's ImageProjectiveTransform gradient is not the transpose of the interpolation (51 % off for a
    bilinear shift): input gradients through these layers were silently wrong. RandomFlip is exact and stays quiet."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 1)).astype("float32"), rng.integers(0, 2, 8)

    def model(layer):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((6, 6, 1)), layer, keras.layers.Flatten(), keras.layers.Dense(2)])

    with pytest.warns(inf.GradientOverrideWarning, match=r"an approximate gradient at .*ImageProjectiveTransform"):
        inf.fit(model(augment()), x, y, loss="sparse_categorical_crossentropy", from_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", inf.GradientOverrideWarning)
        inf.fit(model(keras.layers.RandomFlip()), x, y, loss="sparse_categorical_crossentropy", from_logits=True)
        # In inference mode the layer is the identity: nothing to warn about.
        inf.fit(model(augment()), x, y, loss="sparse_categorical_crossentropy", from_logits=True, training=False)


def _image_model(layer, *, conv=True):
    keras.utils.set_random_seed(0)
    head = [keras.layers.Conv2D(3, 3, padding="same", activation="tanh")] if conv else []
    return keras.Sequential(
        [keras.Input((6, 6, 1)), *head, layer, keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
    )


def _images(n=24):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 2, n)


def test_a_float32_op_in_the_float64_check_is_named_and_xla_falls_back():
    """TensorFlow's bilinear resize returns float32 for float64 images: the float64 copy was quantised without a word
    (relative error 2e-2), and under XLA its gradient raised 'floating point types of different precisions'."""
    x, y = _images()
    traj = inf.fit(_image_model(keras.layers.Resizing(4, 4)), x, y, optimizer=SGD(0.2), batch_size=8, jit_compile=True)
    with (
        pytest.warns(
            RuntimeWarning, match=r"computes in a narrower float type at: .*ResizeBilinear \(returns float32\)"
        ),
        pytest.warns(RuntimeWarning, match="XLA cannot compile"),
    ):
        check = inf.check_unrolled(traj, x, y, x[:8], y[:8], index=2, directions=1)
    assert not check.ok
    assert check.explanation.startswith(
        "Likely cause, from the model's graph: the float64 model computes in a narrower"
    )


def test_a_failed_check_through_an_approximate_gradient_names_the_op_not_a_kink():
    x, y = _images()
    with pytest.warns(inf.GradientOverrideWarning):
        traj = inf.fit(_image_model(keras.layers.RandomTranslation(0.3, 0.3), conv=False), x, y, optimizer=SGD(0.2))
    check = inf.check_unrolled(traj, x, y, x[:8], y[:8], index=1, directions=1)
    assert not check.ok
    assert re.match(r"Likely cause.*ImageProjectiveTransformV3.*only approximate", check.explanation)


def test_a_model_edited_after_its_inspection_is_inspected_again():
    # The graph inspection is cached per model; a Sequential edited in place (pop/add) must
    # not keep the answer of its first inspection, or the new stop_gradient goes unwarned.
    x, y, _, _ = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, dtype="float64"),
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", inf.GradientOverrideWarning)
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=1)
    model.pop()
    model.add(DetachedScale(dtype="float64"))
    model.add(keras.layers.Dense(3, activation="softmax", dtype="float64"))
    with pytest.warns(inf.GradientOverrideWarning, match=r"stop_gradient at '[^']*detached_scale"):
        inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4, epochs=1)

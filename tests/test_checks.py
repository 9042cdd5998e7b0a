"""check_gradient: passes on right gradients, fails and explains on wrong ones (S1)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import s1_cnn

import influence as inf
from influence import _tree
from influence.autodiff import gradient
from influence.losses import get_loss


def test_passes_on_an_exact_gradient_and_checks_tile_coordinates():
    a = np.random.default_rng(0).normal(size=(3, 4))
    x = np.random.default_rng(1).normal(size=(3, 4))
    chk = inf.check_gradient(lambda z: np.sum(np.sin(a * z)), x, a * np.cos(a * x), tile=np.s_[0:2, 1:3])
    assert chk.ok and chk.max_rel_error < 1e-9
    assert len(chk.rel_errors) == 4 + 4  # 4 random directions + 2x2 tile coordinates
    assert "passed" in str(chk)


def test_fails_on_a_wrong_gradient_and_says_the_gradient_is_wrong():
    x = np.random.default_rng(1).normal(size=(5,))
    chk = inf.check_gradient(lambda z: np.sum(z**3), x, 3 * x**2 * 1.01)
    assert not chk.ok
    assert chk.max_rel_error > 1e-3
    assert "gradient itself is likely wrong" in chk.explanation


def test_explains_a_float32_function():
    x = np.random.default_rng(0).normal(size=(20,))
    chk = inf.check_gradient(
        lambda z: np.float32(np.sum(np.tanh(z.astype(np.float32)))), x, 1 - np.tanh(x) ** 2, h=1e-4
    )
    assert not chk.ok
    assert "float32" in chk.explanation


def test_explains_a_random_function():
    rng = np.random.default_rng(0)
    x = np.ones(3)
    chk = inf.check_gradient(lambda z: float(np.sum(z**2) + 1e-3 * rng.normal()), x, 2 * x)
    assert not chk.ok
    assert "not deterministic" in chk.explanation


def test_s1_cnn_input_gradient_passes_in_float64_with_dropout_off_and_with_fixed_masks():
    model = s1_cnn()
    rng = np.random.default_rng(0)
    x = rng.random((2, 28, 28, 1)).astype("float32")
    y = np.array([3, 7])
    off = inf.check_input_gradient(model, "sparse_categorical_crossentropy", x, y, tile=np.s_[0, 10:12, 10:12, 0])
    assert off.ok, off
    fixed = inf.check_input_gradient(model, "sparse_categorical_crossentropy", x, y, training=True, seed=3)
    assert fixed.ok, fixed


def test_s1_cnn_float32_tape_gradient_is_explained_not_just_failed():
    # The user's float32 gradient, checked against the float64 model: it is right to ~1e-6
    # relative, so the float64 check reports a small error instead of an error of order 1.
    model = s1_cnn()
    rng = np.random.default_rng(0)
    x = rng.random((2, 28, 28, 1)).astype("float32")
    y = np.array([3, 7])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = keras.losses.SparseCategoricalCrossentropy()(y, model(xt, training=False))
    g32 = tape.gradient(value, xt).numpy()
    chk = inf.check_input_gradient(model, "sparse_categorical_crossentropy", x, y, grad=g32, rtol=1e-3)
    assert chk.ok, chk
    assert chk.max_rel_error < 1e-3


def test_jitter_moves_the_inputs_off_relu_kinks_as_the_commands_flag_does():
    """Blank digit pixels sit exactly at a fresh ReLU's 0: the check fails there as a kink. The CLI's
    --jitter moved the inputs off; Python users had to add the noise by hand."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x[:16] / 16).reshape(-1, 8, 8, 1), y[:16]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])  # fmt: skip
    loss = "sparse_categorical_crossentropy"
    at_zero = inf.check_input_gradient(model, loss, x, y)
    assert not at_zero.ok and at_zero.at_kink
    moved = inf.check_input_gradient(model, loss, x, y, jitter=1e-2)
    assert moved.ok, moved
    with pytest.raises(ValueError, match="'jitter' parameter of check_input_gradient must be 0 when grad is given"):
        inf.check_input_gradient(model, loss, x, y, grad=np.zeros(x.shape), jitter=1e-3)
    with pytest.raises(ValueError, match="must be a finite number ≥ 0. Got -0.1 instead"):
        inf.check_input_gradient(model, loss, x, y, jitter=-0.1)


def test_detects_a_one_step_jacobian_contracted_with_transposed_axes(classifier, class_data):
    x, y, xv, yv = class_data
    loss = get_loss("sparse_categorical_crossentropy")
    fn = inf.ModelFunction(classifier)
    lr = 0.3
    w = fn.weights

    def val_after(z):
        g = gradient(lambda ww: loss.mean(tf.constant(y), fn(ww, tf.constant(z))), w)
        return float(loss.mean(tf.constant(yv), fn(_tree.axpy(-lr, g, w), tf.constant(xv))))

    xt = tf.constant(x)
    with tf.GradientTape() as outer:
        outer.watch(xt)
        with tf.GradientTape() as inner:
            inner.watch(w)
            value = loss.mean(tf.constant(y), fn(w, xt))
        flat = _tree.flatten(inner.gradient(value, w))
    jac = outer.jacobian(flat, xt).numpy()  # (P, B, d)
    v = _tree.flatten(
        gradient(
            lambda ww: loss.mean(tf.constant(yv), fn(ww, tf.constant(xv))),
            _tree.axpy(-lr, gradient(lambda ww: loss.mean(tf.constant(y), fn(ww, xt)), w), w),
        )
    )
    right = -lr * np.tensordot(v.numpy(), jac, axes=1)
    # The classic mistake: the per-sample Jacobian block laid out (d, B) and reshaped back.
    wrong = -lr * np.tensordot(v.numpy(), np.swapaxes(jac, 1, 2), axes=1).reshape(-1)[: x.size].reshape(x.shape)
    assert inf.check_gradient(val_after, x, right).ok
    bad = inf.check_gradient(val_after, x, wrong)
    assert not bad.ok
    assert bad.max_rel_error > 1e-2


def test_as_float64_keeps_values_and_float64_precision_for_nested_models():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh")])
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(2)(inner(inp)))
    model64 = inf.as_float64(model)
    assert all(v.dtype == "float64" for v in model64.weights)
    x = np.random.default_rng(0).normal(size=(4, 5))
    assert np.allclose(model64(x).numpy(), model(x.astype("float32")).numpy(), atol=1e-6)
    # A 1e-10 change of the input must be visible: no float32 cast anywhere inside.
    delta = model64(x + 1e-10).numpy() - model64(x).numpy()
    assert np.all(np.abs(delta) > 0) and np.all(np.abs(delta) < 1e-8)


def test_as_float64_keeps_adapted_preprocessing_statistics(monkeypatch):
    """An adapted Normalization keeps its statistics in variables that set_weights alone does not apply."""
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(20, 5)).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((5,)), norm, keras.layers.Dense(2)])
    model64 = inf.as_float64(model)
    assert np.allclose(model64(x.astype("float64")).numpy(), model(x).numpy(), atol=1e-5)
    # A layer whose state the copy misses is refused, not copied into another function.
    finalize = keras.layers.Normalization.finalize_state

    def forgetting_the_mean(layer):
        finalize(layer)
        layer.mean = layer.mean * 0

    monkeypatch.setattr(keras.layers.Normalization, "finalize_state", forgetting_the_mean)
    with pytest.raises(ValueError, match=r"as_float64 must be a model whose float64 copy computes the same function"):
        inf.as_float64(model)


@keras.saving.register_keras_serializable(package="tests")
class _GuideStyleModel(keras.Model):
    """Sublayers made in __init__, as in the Keras guides: their dtype is not in the model's config."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.out = keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def test_as_float64_rebuilds_a_subclassed_model_whose_sublayers_are_made_in_init():
    x = np.random.default_rng(0).normal(size=(3, 5))
    model = _GuideStyleModel()
    model(x.astype("float32"))
    model64 = inf.as_float64(model)
    assert {v.dtype for v in model64.weights} == {"float64"}
    assert np.allclose(model64(x).numpy(), model(x.astype("float32")).numpy(), atol=1e-6)
    assert keras.config.dtype_policy().name == "float32"  # the rebuild's policy does not leak


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU runs channels_first convolutions")
def test_a_channels_first_convolution_on_a_cpu_is_refused_by_name():
    """Keras runs it under XLA on a CPU; TensorFlow's CPU kernels, which the float64 checks reach
    outside XLA, refuse the layout with an UnimplementedError about NHWC."""
    model = keras.Sequential(
        [keras.Input((2, 6, 6)), keras.layers.Conv2D(3, 3, data_format="channels_first"), keras.layers.Flatten()]
    )
    with pytest.raises(ValueError, match=r"channels_first convolution.*data_format='channels_last'"):
        inf.as_float64(model)


def test_keras_loss_objects_are_translated_to_float64_losses():
    y = tf.constant([0, 1])
    p = tf.constant([[0.7, 0.3], [0.2, 0.8]], tf.float64)
    loss = get_loss(keras.losses.SparseCategoricalCrossentropy())
    value = loss.mean(y, p)
    assert value.dtype == tf.float64
    assert abs(float(value) - float(-(np.log(0.7) + np.log(0.8)) / 2)) < 1e-15
    # The pitfall itself: the Keras object quantizes float64 inputs to float32.
    assert keras.losses.SparseCategoricalCrossentropy()(y, p).dtype == tf.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grad": np.zeros(4)}, r"'grad' parameter of check_gradient must be the shape of x \(3,\)"),
        ({"grad": np.zeros(3), "h": -1.0}, "'h' parameter of check_gradient must be a positive number"),
        (
            {"grad": np.zeros(3), "directions": -1},
            "'directions' parameter of check_gradient must be a non-negative int",
        ),
        ({"grad": np.zeros(3), "tile": np.s_[7]}, "'tile' parameter of check_gradient must be an index expression"),
        ({"grad": np.array([np.nan, 0, 0])}, "'grad' parameter of check_gradient must be finite"),
    ],
)
def test_check_gradient_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inf.check_gradient(lambda z: float(np.sum(z)), np.zeros(3), **kwargs)


def test_check_gradient_rejects_a_non_scalar_function():
    with pytest.raises(ValueError, match="'f' parameter of check_gradient must be a function returning one number"):
        inf.check_gradient(lambda z: z, np.zeros(3), np.zeros(3))


def test_explains_a_relu_kink_and_a_max_tie_instead_of_blaming_the_gradient():
    # Exact zeros sit on ReLU kinks and ties of a max: f has no gradient there, only one-sided slopes.
    x = np.array([0.0, 0.0, 1.0, -1.0, 0.5, 0.5])
    chk = inf.check_gradient(lambda z: np.sum(np.maximum(z, 0)) + max(z[4], z[5]), x, np.r_[0, 0, 1, 0, 1, 0.0])
    assert not chk.ok  # the verdict stays a failure
    assert "not smooth at this point" in chk.explanation and "ReLU kink or max-pool tie" in chk.explanation
    assert "gradient itself is likely wrong" not in chk.explanation


def digits_cnn_case():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images[:16] / 16.0)[..., None], digits.target[:16]  # many pixels exactly 0
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    return model, x, y


def test_relu_maxpool_cnn_at_exact_zeros_is_explained_as_not_smooth():
    model, x, y = digits_cnn_case()
    chk = inf.check_input_gradient(model, "sparse_categorical_crossentropy", x, y)
    assert not chk.ok
    assert "not smooth at this point" in chk.explanation and "a little noise" in chk.explanation
    assert "gradient itself is likely wrong" not in chk.explanation
    noisy = x + 1e-3 * np.random.default_rng(0).normal(size=x.shape)  # the suggested remedy
    assert inf.check_input_gradient(model, "sparse_categorical_crossentropy", noisy, y).ok


def test_wrong_gradient_of_a_relu_cnn_off_the_kinks_is_still_blamed_on_the_gradient():
    model, x, y = digits_cnn_case()
    noisy = x + 1e-3 * np.random.default_rng(0).normal(size=x.shape)
    model64 = inf.as_float64(model)
    xt = tf.constant(noisy)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = get_loss("sparse_categorical_crossentropy").mean(tf.constant(y), model64(xt))
    wrong = 1.01 * tape.gradient(value, xt).numpy()
    chk = inf.check_input_gradient(model, "sparse_categorical_crossentropy", noisy, y, grad=wrong)
    assert not chk.ok
    assert "gradient itself is likely wrong" in chk.explanation and "not smooth" not in chk.explanation


def _logits_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def test_check_input_gradient_honours_from_logits_and_refuses_logits_read_as_probabilities():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    model = _logits_model()
    loss = "sparse_categorical_crossentropy"
    with pytest.raises(ValueError, match="from_logits=True for a model whose outputs are not probabilities"):
        inf.check_input_gradient(model, loss, x, y)
    by_flag = inf.check_input_gradient(model, loss, x, y, from_logits=True)
    by_object = inf.check_input_gradient(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y)
    assert by_flag.ok and by_flag.max_rel_error == by_object.max_rel_error


@pytest.mark.parametrize(
    "labels, loss, match",
    [
        (np.array([0, 1, 7, 8, 0, 1]), "sparse_categorical_crossentropy", r"class labels in \[0, 2\]"),
        (np.array([0, 1, 2, 0, 1, 2]), "mse", r"targets of shape \(3,\) per sample for loss 'mse'"),
        (
            np.array([0, 1, 2]),
            "sparse_categorical_crossentropy",
            "'y' parameter of check_input_gradient must be as long",
        ),
    ],
)
def test_check_input_gradient_checks_labels_as_fit_does(labels, loss, match):
    """Labels out of range made the loss constant and the check 'pass' with error 0."""
    x = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(ValueError, match=match):
        inf.check_input_gradient(_logits_model(), loss, x, labels, from_logits=True)


def test_a_tiny_derivative_next_to_a_large_value_is_judged_above_round_off_not_blamed():
    """|f| = 230 and f' = 1e-6 along the tile: the quotient's round-off (~1e-11) is 1e-5 of f'."""
    exact = np.array([1e-6, 0.05])
    chk = inf.check_gradient(lambda z: 230.3 + 1e-6 * z[0] + 0.05 * z[1], np.zeros(2), exact, directions=0,
                             tile=np.s_[0:1])  # fmt: skip
    assert chk.ok, chk
    # Round-off does not hide a real error of the same size as the derivative.
    wrong = inf.check_gradient(lambda z: 230.3 + 1e-6 * z[0] + 0.05 * z[1], np.zeros(2), exact * [2, 1],
                               directions=0, tile=np.s_[0:1])  # fmt: skip
    assert not wrong.ok and "likely wrong" in wrong.explanation


def test_a_float32_gradient_that_misses_float64_tolerance_is_explained_by_its_precision():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 40))
    x = rng.normal(size=40)

    def f(z):
        return float(np.sum(np.tanh(a @ z)))

    exact = a.T @ (1 - np.tanh(a @ x) ** 2)
    rounded = (exact * (1 + 3e-6 * rng.normal(size=40))).astype(np.float32)  # a float32 backward pass
    chk = inf.check_gradient(f, x, rounded, directions=6)
    assert not chk.ok and "grad is float32" in chk.explanation and "likely wrong" not in chk.explanation
    assert inf.check_gradient(f, x, rounded, directions=6, rtol=1e-3).ok


def test_a_float32_gradient_with_a_real_error_or_at_a_kink_is_diagnosed_not_blamed_on_its_precision():
    """A float32 grad used to silence every other diagnosis: a sign error (relative error 2) was called
    float32 round-off, with the advice to loosen rtol to 1e-3, and a kink went unreported."""
    x = np.array([0.3, 1.0, -2.0])
    sign = inf.check_gradient(lambda v: float((v**2).sum()), x, (-2 * x).astype(np.float32))
    assert not sign.ok and sign.max_rel_error > 1
    assert "likely wrong" in sign.explanation and "rtol≈1e-3" not in sign.explanation
    assert "cannot explain" in sign.explanation  # the float32 grad is named, and cleared
    kink = inf.check_gradient(
        lambda v: float(np.maximum(v, 0).sum()), np.array([0.0, 1.0, -2.0]), np.array([0, 1, 0], np.float32)
    )
    assert not kink.ok and kink.at_kink and "not smooth" in kink.explanation


class _Square(keras.layers.Layer):  # not registered: as_float64 cannot rebuild it
    def call(self, x):
        return x * x


def test_a_float64_model_is_checked_as_it_is_without_a_rebuild():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="float64"), keras.layers.Dense(4, dtype="float64"),
                              _Square(dtype="float64"), keras.layers.Dense(3, activation="softmax", dtype="float64")])  # fmt: skip
    x, y = np.random.default_rng(0).normal(size=(6, 5)), np.arange(6) % 3
    assert inf.check_input_gradient(model, "sparse_categorical_crossentropy", x, y).ok


def test_a_function_that_is_nan_at_x_is_named_not_called_random():
    """NaN != NaN made check_gradient say 'f is not deterministic'."""
    with pytest.raises(
        ValueError, match=r"'f' parameter of check_gradient must be a function with a finite value at x"
    ):
        inf.check_gradient(lambda z: float("nan"), np.ones(3), np.ones(3))


def test_check_input_gradient_refuses_token_ids_which_have_no_input_gradient():
    """An Embedding model raised AttributeError: 'NoneType' object has no attribute 'numpy'."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Embedding(10, 4), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    ids = np.random.default_rng(0).integers(0, 10, (5, 6))
    y = np.arange(5) % 3
    tokens = keras.Sequential([keras.Input((6,), dtype="int32"), *layers])
    with pytest.raises(
        ValueError, match="must be a model with floating-point inputs. Got a model with int32 inputs \\(token ids"
    ):
        inf.check_input_gradient(tokens, "sparse_categorical_crossentropy", ids, y)
    floats = keras.Sequential([keras.Input((6,)), *layers])  # float ids, cast to integers inside the Embedding
    with pytest.raises(ValueError, match="must be a model whose loss is differentiable in its inputs. Got one whose"):
        inf.check_input_gradient(floats, "sparse_categorical_crossentropy", ids.astype(np.float32), y)

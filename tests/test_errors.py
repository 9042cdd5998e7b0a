"""Every rejected argument gets one clear message naming the parameter (DESIGN §3)."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence import program
from influence.optimizers import SGD


@pytest.fixture
def setup():
    model = mlp(5, 3, out_activation="softmax")
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(6, 5)), rng.integers(0, 3, 6), rng.normal(size=(4, 5)), rng.integers(0, 3, 4)


LOSS = "sparse_categorical_crossentropy"


def call(setup, **overrides):
    model, x, y, xv, yv = setup
    args = {"model": model, "loss": LOSS, "x_train": x, "y_train": y, "x_val": xv, "y_val": yv, **overrides}
    return inf.one_step(**args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (
            {"x_train": np.zeros((6, 7))},
            ValueError,
            r"'x_train' parameter of one_step must be samples of shape \(5,\) \(the model's input shape\). Got samples of shape \(7,\)",
        ),
        ({"x_val": np.zeros((4, 6))}, ValueError, r"'x_val' parameter of one_step must be samples of shape \(5,\)"),
        (
            {"y_train": np.zeros(5, dtype=int)},
            ValueError,
            r"'y_train' parameter of one_step must be as long as 'x_train' \(6 samples\). Got 5 samples",
        ),
        (
            {"x_train": np.full((6, 5), np.nan)},
            ValueError,
            "'x_train' parameter of one_step must be finite .* Got 30 non-finite",
        ),
        ({"x_val": np.array([[np.inf] * 5] * 4)}, ValueError, "'x_val' parameter of one_step must be finite"),
        ({"x_train": np.zeros((0, 5))}, ValueError, "'x_train' parameter of one_step must be a non-empty array"),
        ({"x_train": np.array([["a"] * 5] * 6)}, TypeError, "'x_train' parameter of one_step must be a numeric array"),
        (
            {"y_train": np.array([0, 1, 2, 3, 0, 1])},
            ValueError,
            r"'y_train' parameter of one_step must be class labels in \[0, 2\] \(the model has 3 outputs\). Got labels in \[0, 3\]",
        ),
        ({"y_val": np.array([0.5, 1, 2, 0])}, TypeError, "'y_val' parameter of one_step must be integer class labels"),
        (
            {"method": "exact"},
            ValueError,
            "'method' parameter of one_step must be one of 'hvp', 'jacobian'. Got 'exact'",
        ),
        (
            {"wrt": "weights"},
            ValueError,
            "'wrt' parameter of one_step must be one of 'inputs', 'sample_weights', 'labels'",
        ),
        (
            {"wrt": "labels"},
            ValueError,
            "'wrt' parameter of one_step must be 'inputs' or 'sample_weights' for integer class",
        ),
        ({"learning_rate": 0}, ValueError, "'learning_rate' parameter of one_step must be a positive number. Got 0"),
        ({"learning_rate": "fast"}, ValueError, "'learning_rate' parameter of one_step must be a positive number"),
        ({"loss": "hinge"}, ValueError, "'loss' parameter of one_step must be one of 'mse'"),
        ({"loss": 3}, TypeError, "'loss' parameter of one_step must be a loss name, Keras loss or callable"),
        ({"model": "model.keras"}, TypeError, "'model' parameter of one_step must be a keras.Model. Got 'model.keras'"),
        (
            {"sample_weight": np.ones(3)},
            ValueError,
            "'sample_weight' parameter of one_step must be as long as 'x_train'",
        ),
        ({"x_train": None}, TypeError, "'x_train' parameter of one_step must be an array. Got None"),
    ],
)
def test_one_step_rejects_bad_input(setup, overrides, error, match):
    with pytest.raises(error, match=match):
        call(setup, **overrides)


def test_integer_data_for_a_float_input_is_differentiated_as_floats_and_token_ids_are_refused():
    model = mlp(3, 1)
    x = np.arange(12).reshape(4, 3) % 5  # e.g. pixels stored as ints
    as_ints = inf.one_step(model, "mse", x, np.ones((4, 1)), x.astype(float), np.ones((4, 1)))
    as_floats = inf.one_step(model, "mse", x.astype(float), np.ones((4, 1)), x.astype(float), np.ones((4, 1)))
    np.testing.assert_array_equal(as_ints, as_floats)
    keras.utils.set_random_seed(0)
    tokens = inf.as_float64(
        keras.Sequential(
            [
                keras.Input((3,), dtype="int32"),
                keras.layers.Embedding(5, 2),
                keras.layers.Flatten(),
                keras.layers.Dense(1),
            ]
        )
    )
    with pytest.raises(TypeError, match="'x_train' parameter of one_step must be floating-point inputs"):
        inf.one_step(tokens, "mse", x, np.ones((4, 1)), x, np.ones((4, 1)))
    traj = inf.fit(tokens, x, np.ones((4, 1)), loss="mse", batch_size=2)
    # A finite difference of token ids would feed fractional ids (the check's "gradient" was 0 vs FD 0.9).
    with pytest.raises(ValueError, match="'wrt' parameter of check_unrolled must be 'sample_weights' .* for integer"):
        inf.check_unrolled(traj, x, np.ones((4, 1)), x, np.ones((4, 1)), index=1)
    assert inf.check_unrolled(traj, x, np.ones((4, 1)), x, np.ones((4, 1)), index=1, wrt="sample_weights").ok


def test_unbuilt_model_is_rejected():
    with pytest.raises(ValueError, match="'model' parameter of one_step must be a built Keras model"):
        inf.one_step(
            keras.Sequential([keras.layers.Dense(2)]),
            "mse",
            np.ones((2, 3)),
            np.ones((2, 2)),
            np.ones((2, 3)),
            np.ones((2, 2)),
        )


def _batchnorm_model():
    keras.utils.set_random_seed(0)
    return inf.as_float64(
        keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
    )


def test_per_sample_trick_refuses_batchnorm_in_training_mode():
    model = _batchnorm_model()
    x, y = np.random.default_rng(0).normal(size=(4, 3)), np.array([0, 1, 1, 0])
    v = [np.ones(w.shape) for w in model.trainable_variables]
    assert inf.coupling_layers(model) == ["bn"]
    with pytest.raises(
        ValueError,
        match=r"'model' parameter of per_sample_gradient_dots must be a model whose samples "
        r"do not interact in training mode \(per-sample gradients would be wrong\). Got a model with "
        r"sample-mixing layer\(s\) bn",
    ):
        inf.per_sample_gradient_dots(model, LOSS, x, y, v, training=True)
    # Inference mode uses moving statistics: samples are independent, the trick is valid.
    dots = inf.per_sample_gradient_dots(model, LOSS, x, y, v, training=False)
    assert dots.shape == (4,)


def test_per_sample_trick_finds_unknown_coupling_numerically():
    class BatchCentering(keras.layers.Layer):
        def call(self, inputs, training=False):
            return inputs - keras.ops.mean(inputs, axis=0, keepdims=True) if training else inputs

    keras.utils.set_random_seed(0)
    model = inf.as_float64(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]))
    coupled = keras.Sequential(
        [keras.Input((3,), dtype="float64"), model.layers[0], BatchCentering(dtype="float64"), model.layers[1]]
    )
    x, y = np.random.default_rng(0).normal(size=(4, 3)), np.zeros((4, 2))
    v = [np.ones(w.shape) for w in coupled.trainable_variables]
    with pytest.raises(ValueError, match="found numerically: one sample's input changes other samples' outputs"):
        inf.per_sample_gradient_dots(coupled, "mse", x, y, v, training=True)


def test_coupling_through_a_sample_other_than_the_first_is_found():
    """A layer that mixes in the batch's largest row: changing sample 0 (the only sample probed
    before) moved no other output, so one_step's input-gradient penalty, a per-sample quantity,
    was taken on a coupled model and came out 1.5 % off."""

    class LargestRowShift(keras.layers.Layer):
        def call(self, inputs, training=False):
            if not training:
                return inputs
            largest = keras.ops.argmax(keras.ops.sum(inputs * inputs, axis=1))
            return inputs - 0.5 * keras.ops.take(inputs, largest[None], axis=0)

    keras.utils.set_random_seed(0)
    coupled = keras.Sequential(
        [keras.Input((3,), dtype="float64"), LargestRowShift(dtype="float64"), keras.layers.Dense(2, dtype="float64")]
    )
    x = np.random.default_rng(0).normal(size=(6, 3))
    x[4] *= 10  # the largest row is not sample 0
    y, v = np.zeros((6, 2)), [np.ones(w.shape) for w in coupled.trainable_variables]
    with pytest.raises(ValueError, match="found numerically"):
        inf.per_sample_gradient_dots(coupled, "mse", x, y, v, training=True)


def test_a_frozen_batchnorm_runs_on_moving_statistics_and_is_not_refused():
    """A frozen backbone with BatchNorm and a Dropout head: Keras 3 runs a non-trainable BatchNorm in
    inference mode, so its samples do not interact and training mode (the head's dropout) stays valid."""
    backbone = _batchnorm_model()
    backbone.layers[1].trainable = False
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), backbone, keras.layers.Dropout(0.3, dtype="float64"),
         keras.layers.Dense(2, activation="softmax", dtype="float64")]
    )  # fmt: skip
    assert inf.coupling_layers(model) == []
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(12, 3)), rng.integers(0, 2, 12), rng.normal(size=(6, 3)), rng.integers(0, 2, 6)
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=4, epochs=2)
    assert traj.training
    for wrt in ("inputs", "sample_weights"):
        chk = inf.check_unrolled(traj, x, y, xv, yv, 2, wrt=wrt)
        assert chk.ok, (wrt, chk)


def test_noise_drawn_outside_the_recorded_seeds_is_named_not_mistaken_for_coupling():
    class Noisy(keras.layers.Layer):
        def call(self, inputs, training=False):
            return inputs + 0.1 * tf.random.normal(tf.shape(inputs), dtype=inputs.dtype) if training else inputs

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), Noisy(), keras.layers.Dense(2)])
    x, y = np.random.default_rng(0).normal(size=(8, 3)).astype("float32"), np.zeros(8, int)
    with pytest.raises(ValueError, match=r"outputs differ between two calls with the same seed.*tf.random.normal"):
        inf.fit(model, x, y, loss=LOSS, from_logits=True)


def test_the_interaction_probe_keeps_token_ids_in_range():
    """It bumped sample 0's inputs by 1: the largest token id went out of the Embedding's range."""
    tokens = np.random.default_rng(0).integers(0, 10, size=(12, 5))
    tokens[0, 0] = 9  # the largest id, in the probe's first row
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 3),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])  # fmt: skip
    traj = inf.fit(model, tokens, tokens[:, 1] % 2, loss=LOSS, from_logits=True, training=True)
    assert traj.training


def test_per_sample_gradient_dots_rejects_a_misshaped_vector(setup):
    model, x, y, _, _ = setup
    with pytest.raises(ValueError, match="'vector' parameter of per_sample_gradient_dots must be a list of 4 tensors"):
        inf.per_sample_gradient_dots(model, LOSS, x, y, [np.ones(3)])
    bad = [np.ones(w.shape) for w in model.trainable_variables]
    bad[1] = np.ones(7)
    with pytest.raises(
        ValueError, match=r"'vector' parameter of per_sample_gradient_dots must be entry 1 of shape \(8,\)"
    ):
        inf.per_sample_gradient_dots(model, LOSS, x, y, bad)


def test_as_float64_rejects_non_models():
    with pytest.raises(TypeError, match="'model' parameter of as_float64 must be a keras.Model"):
        inf.as_float64(object())


def test_one_hot_labels_with_a_sparse_loss_and_multi_input_models_get_clear_errors():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.integers(0, 3, 6)
    model = mlp(3, 3, out_activation="softmax")
    with pytest.raises(ValueError, match=r"one-hot or soft targets need loss='categorical_crossentropy'"):
        inf.fit(model, x, np.eye(3)[y], loss="sparse_categorical_crossentropy")
    a, b = keras.Input((2,), dtype="float64"), keras.Input((1,), dtype="float64")
    joined = keras.layers.Concatenate()([a, b])
    two_inputs = keras.Model([a, b], keras.layers.Dense(3, activation="softmax", dtype="float64")(joined))
    with pytest.raises(ValueError, match="a model with one input and one output. Got a model with 2 inputs"):
        inf.fit(two_inputs, x, y)
    inp = keras.Input((3,), dtype="float64")
    two_outputs = keras.Model(
        inp, [keras.layers.Dense(3, dtype="float64")(inp), keras.layers.Dense(1, dtype="float64")(inp)]
    )
    with pytest.raises(ValueError, match="Got a model with 2 outputs"):
        inf.fit(two_outputs, x, y)


def test_small_conveniences_of_the_api():
    assert inf.optimizers.get_optimizer("Nesterov", func="fit") == inf.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    assert inf.optimizers.get_optimizer("AdamW", func="fit") == inf.optimizers.Adam(0.001, weight_decay=0.004)
    with pytest.raises(ValueError, match="must be a positive number or a schedule"):
        inf.optimizers.SGD(learning_rate=[0.1, 0.2])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)), rng.integers(0, 3, 8)
    traj = inf.fit(mlp(3, 3, out_activation="softmax"), x, y, optimizer=inf.optimizers.SGD(0.1), batch_size=4)
    res = inf.unrolled(traj, x, y, x, y)
    assert np.allclose(inf.predicted_group_effect(res, [[0, 1]]), res.removal_effect[:2].sum())
    one = inf.actual_removal_effect(traj, x, y, x, y, 3, progress=False)
    assert one.shape == (1,) and one[0] == inf.actual_removal_effect(traj, x, y, x, y, [3], progress=False)[0]


def test_logits_loss_on_a_softmax_output_warns():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.integers(0, 3, 6)
    with pytest.warns(UserWarning, match="from_logits=True but the model's output layer applies softmax"):
        inf.fit(mlp(3, 3, out_activation="softmax"), x, y, from_logits=True)


def test_one_step_and_attacks_refuse_logits_read_as_probabilities():
    """A linear output under the default from_logits=False gave negative cross-entropies and meaningless scores."""
    keras.utils.set_random_seed(0)
    model = inf.as_float64(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(6, 4)), rng.integers(0, 3, 6)
    loss = "sparse_categorical_crossentropy"
    for call in (
        lambda: inf.one_step(model, loss, x, y, x, y),
        lambda: inf.adversarial_examples(model, loss, x, y, steps=1),
    ):
        with pytest.raises(ValueError, match="outputs on the first 6 samples lie in"):
            call()
    assert inf.one_step(model, loss, x, y, x, y, from_logits=True).shape == x.shape
    # Probabilities pass: softmax outputs, and binary sigmoid outputs.
    sigmoid = inf.as_float64(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")]))
    assert inf.one_step(sigmoid, "binary_crossentropy", x, y % 2, x, y % 2).shape == x.shape


@pytest.mark.parametrize(
    "change, match",
    [
        ({"y": np.array([0, 1, 5, 0])}, r"'y' parameter of per_sample_gradient_dots must be class labels in \[0, 2\]"),
        ({"x": np.ones((4, 7))}, r"'x' parameter of per_sample_gradient_dots must be samples of shape \(5,\)"),
        ({"model": "logits"}, "from_logits=True for a model whose outputs are not probabilities"),
    ],
)
def test_per_sample_gradient_dots_checks_its_data_as_fit_does(change, match):
    model = mlp(5, 3, out_activation="softmax")
    args = {"model": model, "x": np.ones((4, 5)), "y": np.array([0, 1, 2, 0])}
    args.update(change)
    if args["model"] == "logits":
        args["model"] = mlp(5, 3)
    vector = [np.ones(w.shape) for w in args["model"].trainable_variables]
    with pytest.raises(ValueError, match=match):
        inf.per_sample_gradient_dots(args["model"], "sparse_categorical_crossentropy", args["x"], args["y"], vector)


def test_mixed_precision_and_one_number_per_sample_outputs_are_refused_clearly():
    """mixed_bfloat16 trained and differentiated in bfloat16 without a word; a Reshape(()) output crashed with
    an IndexError in the label check."""
    x, y = np.random.default_rng(0).normal(size=(8, 3)).astype("float32"), np.zeros(8)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        half = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1, dtype="float32")])
    finally:
        keras.config.set_dtype_policy("float32")
    with pytest.raises(ValueError, match=r"must be a model that computes in its weights' dtype.*mixed_bfloat16"):
        inf.fit(half, x, y, loss="mse")
    scalar = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1), keras.layers.Reshape(())])
    with pytest.raises(ValueError, match=r"outputs have a feature axis.*output shape \(B,\); end it with Dense\(1\)"):
        inf.fit(scalar, x, y, loss="mse")


def test_one_step_takes_float64_validation_targets_for_a_float32_model():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    x, xv = rng.normal(size=(6, 3)).astype("float32"), rng.normal(size=(4, 3)).astype("float32")
    y, yv = rng.normal(size=(6, 1)), rng.normal(size=(4, 1))  # float64, as numpy makes them

    def squared(y_true, y_pred):
        return tf.reduce_sum(tf.square(y_true - y_pred), axis=-1)

    grad = inf.one_step(model, squared, x, y, xv, yv, learning_rate=0.1)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_a_string_for_training_and_a_budget_that_is_not_a_byte_count_are_refused():
    x, y = np.random.default_rng(0).normal(size=(8, 3)).astype("float32"), np.zeros(8, int)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="'training' parameter of fit must be True, False or None. Got 'False'"):
        inf.fit(model, x, y, from_logits=True, training="False")  # bool("False") is True: dropout would be on
    traj = inf.fit(model, x, y, from_logits=True)
    for budget in (-1, "1GB", None):
        with pytest.raises(ValueError, match="'memory_budget_bytes' parameter of unrolled must be a positive int"):
            inf.unrolled(traj, x, y, x, y, memory_budget_bytes=budget)


def test_a_trainable_flag_changed_after_fit_is_named_not_a_keras_internal_error(class_data):
    x, y, xv, yv = class_data
    model = mlp(5, 3, out_activation="softmax")
    model.layers[0].trainable = False
    traj = inf.fit(model, x, y, optimizer=SGD(0.3), batch_size=3)
    model.layers[0].trainable = True  # a second fine-tuning stage unfreezes it
    expected = r"trainable variables changed since fit \(2 recorded, 4 now; was a layer's `trainable` flag changed"
    with pytest.raises(ValueError, match=expected):
        inf.unrolled(traj, x, y, xv, yv)
    with pytest.raises(ValueError, match="'trajectory' parameter of Trajectory.final_model"):
        traj.final_model()
    model.layers[0].trainable = False  # restored: the run is usable again
    assert inf.unrolled(traj, x, y, xv, yv).removal_effect.shape == (6,)


class _Square(keras.layers.Layer):  # Keras names it "__square", which is no valid root name scope
    def call(self, inputs):
        return inputs * inputs


def test_a_layer_of_a_private_class_runs_through_fit_and_unrolled(class_data):
    x, y, xv, yv = class_data
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), _Square(), keras.layers.Dense(3)])
    assert model.layers[1].name.startswith("__square")  # "__square_1" after another one
    traj = inf.fit(model, x, y, from_logits=True, batch_size=3)
    assert np.all(np.isfinite(inf.unrolled(traj, x, y, xv, yv).removal_effect))


def test_complex_dict_and_dataset_inputs_are_named_as_given():
    """Complex inputs lost their imaginary part silently; a dict or a Dataset was described as a 0-d object array."""
    x, y = np.ones((4, 3)), np.zeros(4, int)
    model = mlp(3, 2, out_activation="softmax")
    with pytest.raises(TypeError, match=r"'x_train' parameter of fit must be a real-valued array. Got .* complex128"):
        inf.fit(model, x + 1j, y)
    with pytest.raises(TypeError, match="'x_train' parameter of fit must be a numeric array. Got a dict instead"):
        inf.fit(model, {"features": x}, y)
    dataset = tf.data.Dataset.from_tensor_slices(x)
    with pytest.raises(TypeError, match=r"Got a _TensorSliceDataset \(collect a tf.data.Dataset into arrays first\)"):
        inf.fit(model, dataset, y)


def test_token_ids_given_as_floats_are_named_where_input_gradients_are_zero(monkeypatch):
    """An Embedding behind a float keras.Input casts the ids: input_grad was 0 without a word, and
    check_unrolled compared that 0 with finite differences that jump between ids."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=(12, 5)).astype("float32")
    y = (x[:, 1] > 4).astype(int)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Embedding(10, 3, name="tokens"), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    traj = inf.fit(model, x, y, from_logits=True, batch_size=4)
    with pytest.warns(RuntimeWarning, match=r"unrolled: the model casts floats to integers at 'tokens/Cast'"):
        assert not np.any(inf.unrolled(traj, x, y, x, y).input_grad)
    # Inspected once per program and input signature (it serialized every layer's config on every call),
    # and said again on every call.
    inspections = []
    monkeypatch.setattr(program, "integer_casts", lambda *a, **k: inspections.append(1) or ["tokens/Cast"])
    with pytest.warns(RuntimeWarning, match=r"casts floats to integers at 'tokens/Cast'"):
        inf.unrolled(traj, x, y, x, y)
    assert inspections == []
    with pytest.raises(ValueError, match=r"'wrt' parameter of check_unrolled .* Got 'inputs', but the model casts"):
        inf.check_unrolled(traj, x, y, x, y, index=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # removal effects alone: nothing to warn about
        inf.unrolled(traj, x, y, x, y, input_grad=False)

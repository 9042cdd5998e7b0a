"""Optimising training inputs / soft labels through training, and test-time attacks (S5)."""

import keras
import numpy as np
import pytest
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam, RMSprop


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.2, 0.8, size=(3, 4))
    y = rng.integers(0, 3, 30)
    x = np.clip(centers[y] + 0.1 * rng.normal(size=(30, 4)), 0, 1)
    yv = rng.integers(0, 3, 15)
    xv = np.clip(centers[yv] + 0.1 * rng.normal(size=(15, 4)), 0, 1)
    return x, y, xv, yv


@pytest.fixture(scope="module")
def blob_run(blobs):
    """The recorded run the poisoning/repair tests start from (optimisation never mutates it)."""
    x, y, _, _ = blobs
    return inf.fit(
        mlp(4, 3, out_activation="softmax"),
        x,
        y,
        loss="sparse_categorical_crossentropy",
        optimizer=SGD(0.5),
        batch_size=10,
        epochs=3,
    )


@pytest.mark.parametrize("goal", ["poison", "repair"])
def test_one_outer_step_changes_the_retrained_loss_as_predicted_to_first_order(goal, blobs, blob_run):
    x, y, xv, yv = blobs
    traj = blob_run
    res = inf.optimize_training_inputs(
        traj, x, y, xv, yv, [0, 1, 2, 3], goal=goal, outer_optimizer=SGD(0.05), steps=1, bounds=None
    )
    actual = res.val_loss[1] - res.val_loss[0]
    predicted = res.predicted_change[0]
    assert (actual > 0) if goal == "poison" else (actual < 0)
    assert abs(actual - predicted) <= 0.05 * abs(predicted)
    assert np.array_equal(res.x[4:], x[4:])  # only the chosen samples move


def test_constraints_hold_and_every_outer_optimizer_poisons(blobs, blob_run):
    x, y, xv, yv = blobs
    traj = blob_run
    for opt in [SGD(0.5), SGD(0.2, momentum=0.9), RMSprop(0.05), Adam(0.05)]:
        res = inf.optimize_training_inputs(
            traj, x, y, xv, yv, np.arange(6), goal="poison", outer_optimizer=opt, steps=3, bounds=(0.0, 1.0), budget=0.3
        )
        moved = res.x[:6] - x[:6]
        assert res.x.min() >= 0.0 and res.x.max() <= 1.0
        assert np.abs(moved).max() <= 0.3 + 1e-12
        assert res.val_loss[-1] > res.val_loss[0], opt
        assert len(res.val_loss) == 4 and np.all(np.diff(res.seconds) > 0)


def test_soft_label_repair_recovers_a_flipped_label(blobs):
    x, y, xv, yv = blobs
    y_true = np.eye(3)[y]
    y_noisy = y_true.copy()
    y_noisy[[0, 1, 2]] = np.eye(3)[(y[[0, 1, 2]] + 1) % 3]
    traj = inf.fit(
        mlp(4, 3, out_activation="softmax"),
        x,
        y_noisy,
        loss="categorical_crossentropy",
        optimizer=SGD(0.5),
        batch_size=10,
        epochs=5,
    )
    res = inf.optimize_training_inputs(
        traj,
        x,
        y_noisy,
        xv,
        np.eye(3)[yv],
        [0, 1, 2],
        goal="repair",
        target="labels",
        outer_optimizer=Adam(0.5),
        steps=8,
    )
    assert np.allclose(res.y[[0, 1, 2]].sum(axis=1), 1.0)  # soft labels stay on the simplex
    assert res.val_loss[-1] < res.val_loss[0]
    recovered = np.argmax(res.y[[0, 1, 2]], axis=1) == y[[0, 1, 2]]
    assert recovered.sum() >= 2


@pytest.mark.parametrize("loss", ["mse", "binary_crossentropy"])
def test_regression_and_binary_targets_move_by_the_step_and_stay_where_the_loss_defines_them(loss):
    """A small SGD step moves each target by −η·dE/dy: no simplex across samples (regression), [0, 1] (binary)."""
    rng = np.random.default_rng(1)
    x, xv = rng.uniform(size=(20, 4)), rng.uniform(size=(10, 4))
    if loss == "mse":
        y, yv, out = x @ rng.normal(size=(4, 1)), xv @ rng.normal(size=(4, 1)), None
    else:
        y, yv, out = (x[:, :1] > 0.5).astype(float), (xv[:, :1] > 0.5).astype(float), "sigmoid"
    traj = inf.fit(mlp(4, 1, out_activation=out), x, y, loss=loss, optimizer=SGD(0.3), batch_size=5, epochs=2)
    idx = [0, 1, 2]
    grad = inf.unrolled(traj, x, y, xv, yv).label_grad[idx]
    eta = 1e-3 / np.abs(grad).max()
    res = inf.optimize_training_inputs(traj, x, y, xv, yv, idx, goal="repair", target="labels",
                                       outer_optimizer=SGD(eta), steps=1, bounds=None)  # fmt: skip
    expected = y[idx] - eta * grad
    if loss == "binary_crossentropy":
        expected = np.clip(expected, 0, 1)
        assert np.any(expected == y[idx])  # a label at 0 or 1 pushed outward stays there
    np.testing.assert_allclose(res.y[idx], expected, rtol=0, atol=1e-12)
    assert np.array_equal(res.y[3:], y[3:])


def test_adversarial_examples_raise_the_frozen_models_loss_within_the_budget(blobs):
    x, y, _, _ = blobs
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    traj = inf.fit(
        model,
        x.astype("float32"),
        y,
        loss="sparse_categorical_crossentropy",
        optimizer=SGD(0.5),
        batch_size=10,
        epochs=10,
    )
    assert traj.steps == 30
    res = inf.adversarial_examples(
        model, "sparse_categorical_crossentropy", x, y, outer_optimizer=Adam(0.05), steps=5, budget=0.2
    )
    assert res.val_loss[-1] > res.val_loss[0]
    assert np.abs(res.x - x).max() <= 0.2 + 1e-6 and res.x.min() >= 0 and res.x.max() <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"goal": "destroy"}, "'goal' parameter of optimize_training_inputs must be one of 'poison', 'repair'"),
        (
            {"target": "labels"},
            "'target' parameter of optimize_training_inputs must be 'inputs' for a run on class-index",
        ),
        (
            {"indices": [100]},
            r"'indices' parameter of optimize_training_inputs must be integer sample indices in \[0, 29\]",
        ),
        ({"indices": [3, 3]}, "'indices' parameter of optimize_training_inputs must be distinct sample indices"),
        ({"steps": 0}, "'steps' parameter of optimize_training_inputs must be a positive int"),
        ({"bounds": (1, 0)}, "'bounds' parameter of optimize_training_inputs must be None or a"),
        ({"bounds": ("0", "1")}, "'bounds' parameter of optimize_training_inputs must be None or a"),  # was TypeError
        ({"budget": -0.1}, "'budget' parameter of optimize_training_inputs must be a positive number"),
        (
            {"outer_optimizer": keras.optimizers.Adam()},
            r"^The 'outer_optimizer' parameter of optimize_training_inputs must be None, an influence.optimizers "
            r"optimizer .* Got Adam \(a Keras optimizer\) instead.$",
        ),
        ({"outer_optimizer": "nadam"}, "'outer_optimizer' parameter of optimize_training_inputs must be None, an"),
    ],
)
def test_optimize_training_inputs_rejects_bad_input(kwargs, match, blobs):
    x, y, xv, yv = blobs
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, loss="sparse_categorical_crossentropy", batch_size=10)
    args = {"indices": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        inf.optimize_training_inputs(traj, x, y, xv, yv, **args)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"x_val": np.zeros((15, 5))}, "'x_val' parameter of optimize_training_inputs"),
        ({"y_val": np.zeros(14, dtype=int)}, "'y_val' parameter of optimize_training_inputs"),
        ({"y_val": np.zeros((15, 3), dtype=int)}, "'y_val' parameter of optimize_training_inputs"),
    ],
)
def test_validation_data_is_checked_before_the_first_retraining(bad, match, blobs, blob_run):
    x, y, xv, yv = blobs
    args = {"x_val": xv, "y_val": yv, **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        inf.optimize_training_inputs(blob_run, x, y, args["x_val"], args["y_val"], [0], steps=1, progress=False)


def test_one_hot_labels_stored_as_integers_can_be_optimised():
    rng = np.random.default_rng(0)
    x, xv = rng.uniform(size=(12, 4)), rng.uniform(size=(6, 4))
    onehot, yv = np.eye(3, dtype=int)[rng.integers(0, 3, 12)], np.eye(3)[rng.integers(0, 3, 6)]
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), x, onehot, loss="categorical_crossentropy",
                   optimizer=SGD(0.5), batch_size=4, epochs=2)  # fmt: skip
    res = inf.optimize_training_inputs(traj, x, onehot, xv, yv, [0, 1], goal="repair", target="labels", steps=2)
    assert res.y.dtype == np.float64 and np.allclose(res.y.sum(axis=1), 1)
    assert not np.array_equal(res.y[:2], onehot[:2]) and np.array_equal(res.y[2:], onehot[2:])
    assert res.val_loss[-1] < res.val_loss[0]


@pytest.mark.parametrize("from_logits", [False, True])
def test_binary_targets_report_a_classification_error(from_logits):
    rng = np.random.default_rng(3)
    x, xv = rng.uniform(size=(12, 4)), rng.uniform(size=(8, 4))
    y, yv = (x[:, :1] > 0.5).astype(float), (xv[:, :1] > 0.5).astype(float)
    traj = inf.fit(mlp(4, 1, out_activation=None if from_logits else "sigmoid"), x, y, loss="binary_crossentropy",
                   from_logits=from_logits, optimizer=SGD(1.0), batch_size=4, epochs=30)  # fmt: skip
    res = inf.optimize_training_inputs(traj, x, y, xv, yv, [0, 1], steps=1, progress=False)
    traj.model.set_weights(traj.final_weights)
    outputs = np.asarray(traj.model(xv))
    expected = np.mean((outputs > (0.0 if from_logits else 0.5)) != (yv > 0.5))
    assert res.val_error[0] == expected and 0 < expected < 0.5
    assert np.all(np.isfinite(res.val_error))


def test_class_index_labels_of_shape_n_by_1_count_one_error_per_sample():
    from influence.input_optimization import classification_error

    loss = inf.losses.get_loss("sparse_categorical_crossentropy")
    outputs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])  # predicts 0, 1, 0
    labels = np.array([0, 1, 1])
    # (n, 1) labels once broadcast against the (n,) predictions and counted n² pairs (5/9)
    assert classification_error(loss, outputs, labels) == classification_error(loss, outputs, labels[:, None]) == 1 / 3


def test_simplex_projection_is_the_closest_point_on_the_simplex():
    from influence.input_optimization import project_to_simplex

    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 4))
    projected = project_to_simplex(points)
    assert np.allclose(projected.sum(axis=1), 1) and projected.min() >= 0
    # No random point of the simplex is closer.
    others = rng.dirichlet(np.ones(4), size=(200,))
    for p, q in zip(points, projected):
        assert np.linalg.norm(p - q) <= np.min(np.linalg.norm(others - p, axis=1)) + 1e-12
    assert np.allclose(project_to_simplex(np.eye(4)), np.eye(4))


def test_soft_label_repair_runs_on_a_float32_model_and_numpy_step_sizes_are_accepted(blobs):
    x, y, xv, yv = blobs
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    y_hot = np.eye(3, dtype="float32")[y]
    traj = inf.fit(
        model, x.astype("float32"), y_hot, loss="categorical_crossentropy", optimizer=SGD(0.5), batch_size=10, epochs=2
    )
    res = inf.optimize_training_inputs(
        traj,
        x.astype("float32"),
        y_hot,
        xv,
        np.eye(3)[yv],
        [0, 1],
        goal="repair",
        target="labels",
        outer_optimizer=SGD(np.float32(1.0), momentum=np.float64(0.5)),
        steps=3,
    )
    assert res.y.dtype == np.float32 and len(res.val_loss) == 4
    from influence.input_optimization import project_to_simplex

    assert project_to_simplex(np.ones((2, 3), np.float32)).dtype == np.float32


def test_standardized_inputs_are_refused_by_the_default_box_and_kept_whole_without_one(blobs):
    _, y, xv, yv = blobs
    rng = np.random.default_rng(3)
    standardized = rng.normal(size=(30, 4))  # features, not pixels: outside [0, 1]
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), standardized, y, loss="sparse_categorical_crossentropy")
    refused = (
        r"^The 'bounds' parameter of optimize_training_inputs must be a \(low, high\) box that holds the starting "
        r"inputs, which lie in \[-.*pass bounds=None for no box, or a wider range. Got \(0.0, 1.0\) instead.$"
    )
    with pytest.raises(ValueError, match=refused):
        inf.optimize_training_inputs(traj, standardized, y, xv, yv, [0, 1], steps=1)
    res = inf.optimize_training_inputs(traj, standardized, y, xv, yv, [0, 1], steps=1, bounds=None)
    assert np.array_equal(res.x[2:], standardized[2:]) and not np.array_equal(res.x[:2], standardized[:2])
    assert np.abs(res.x[:2] - standardized[:2]).max() <= 0.1 + 1e-9  # one Adam(0.1) step, no clipping into [0, 1]
    with pytest.raises(ValueError, match="'bounds' parameter of adversarial_examples must be a"):
        inf.adversarial_examples(traj.model, "sparse_categorical_crossentropy", standardized, y, steps=1)


def test_optimizer_names_take_the_default_outer_step_size(blobs, blob_run):
    from influence.input_optimization import OUTER_LEARNING_RATE, outer_optimizer_named

    assert OUTER_LEARNING_RATE == 0.1
    for name in ("sgd", "momentum", "rmsprop", "adam"):
        assert outer_optimizer_named(name, "f").learning_rate == OUTER_LEARNING_RATE, name
    x, y, xv, yv = blobs
    by_name = inf.optimize_training_inputs(blob_run, x, y, xv, yv, [0, 1], outer_optimizer="adam", steps=1)
    default = inf.optimize_training_inputs(blob_run, x, y, xv, yv, [0, 1], steps=1)
    np.testing.assert_array_equal(by_name.x, default.x)


def test_curves_name_momentum_and_nesterov_apart(blobs):
    x, y, _, _ = blobs
    model = mlp(4, 3, out_activation="softmax")
    labels = [
        inf.adversarial_examples(
            model, "sparse_categorical_crossentropy", x[:4], y[:4], outer_optimizer=opt, steps=1
        ).optimizer  # fmt: skip
        for opt in (SGD(0.1), SGD(0.1, momentum=0.9), SGD(0.1, momentum=0.9, nesterov=True), Adam(0.1))
    ]
    assert labels == ["SGD", "SGD (momentum)", "SGD (Nesterov)", "Adam"]


def test_inputs_that_cannot_move_training_are_refused_and_an_array_box_is_taken(blobs):
    """Token ids were cast to floats and never moved (val_loss constant), samples of weight 0 likewise;
    bounds=np.array([0, 1]) was refused as not a (low, high) pair."""
    x, y, xv, yv = blobs
    c = np.ones(len(x))
    c[:2] = 0.0
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, optimizer=SGD(0.5), batch_size=10, sample_weight=c)
    with pytest.raises(ValueError, match=r"'indices' .* must be samples trained on .* Got samples \[0, 1\] of sample"):
        inf.optimize_training_inputs(traj, x, y, xv, yv, [0, 1, 5], steps=1)
    out = inf.optimize_training_inputs(traj, x, y, xv, yv, [5], steps=1, bounds=np.array([0.0, 1.0]))
    assert np.all((out.x >= 0) & (out.x <= 1))
    ids = np.random.default_rng(0).integers(0, 6, size=(12, 3))
    keras.utils.set_random_seed(0)
    tokens = keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(6, 2), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    run = inf.fit(tokens, ids, ids[:, 0] % 2, from_logits=True, batch_size=4)
    with pytest.raises(ValueError, match="'target' parameter of optimize_training_inputs must be 'labels' for integer"):
        inf.optimize_training_inputs(run, ids, ids[:, 0] % 2, ids, ids[:, 0] % 2, [0], steps=1)

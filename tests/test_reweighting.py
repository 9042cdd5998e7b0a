"""Learning per-sample training weights through the recorded run (meta-learning of data)."""

import numpy as np
import pytest
from conftest import mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import influence as inf
from influence.input_optimization import label_classes
from influence.optimizers import SGD, Adam
from influence.reweighting import _stratified_choice


@pytest.fixture(scope="module")
def noisy_blobs():
    """40 training samples of 3 separated blobs, the labels of 6 (known) flipped; clean validation data."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.1, 0.9, size=(3, 4))
    y = rng.integers(0, 3, 40)
    x = np.clip(centers[y] + 0.08 * rng.normal(size=(40, 4)), 0, 1)
    flipped = np.arange(6)
    y_noisy = y.copy()
    y_noisy[flipped] = (y[flipped] + 1) % 3
    yv = rng.integers(0, 3, 30)
    xv = np.clip(centers[yv] + 0.08 * rng.normal(size=(30, 4)), 0, 1)
    return x, y_noisy, xv, yv, flipped


@pytest.fixture(scope="module")
def noisy_run(noisy_blobs):
    x, y, _, _, _ = noisy_blobs
    return inf.fit(
        mlp(4, 3, out_activation="softmax"),
        x,
        y,
        loss="sparse_categorical_crossentropy",
        optimizer=SGD(1.0),
        batch_size=10,
        epochs=8,
    )


@pytest.mark.parametrize("goal", ["repair", "poison"])
def test_one_outer_step_changes_the_retrained_loss_as_predicted_to_first_order(goal, noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    learned = [0, 1, 2, 10, 11, 12]
    start = np.full(40, 0.8)  # inside the box, so no weight is clipped by the first step
    run = noisy_run.replayed_on(x, y, sample_weight=start)
    res = inf.learn_sample_weights(
        run, x, y, xv, yv, indices=learned, goal=goal, outer_optimizer=SGD(1.0), steps=1, progress=False
    )
    actual = res.val_loss[1] - res.val_loss[0]
    predicted = res.predicted_change[0]
    assert (actual < 0) if goal == "repair" else (actual > 0)
    assert abs(actual - predicted) <= 0.05 * abs(predicted)
    # Only the learned weights moved, by the SGD step −η·dE/dc (repair) or +η·dE/dc (poison).
    grad = inf.unrolled(run, x, y, xv, yv, input_grad=False).sample_weight_grad
    step = -grad if goal == "repair" else grad
    np.testing.assert_allclose(res.sample_weight[learned], start[learned] + step[learned], rtol=1e-12)
    others = np.setdiff1d(np.arange(40), learned)
    np.testing.assert_array_equal(res.sample_weight[others], start[others])
    np.testing.assert_array_equal(res.history[0], start)
    np.testing.assert_array_equal(res.history[1], res.sample_weight)


@pytest.mark.parametrize("goal", ["repair", "poison"])
def test_penalty_adds_its_pull_towards_the_recorded_weights_to_each_step(goal, noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    learned = np.array([0, 1, 2, 10, 11, 12])
    start = np.full(40, 0.8)
    run = noisy_run.replayed_on(x, y, sample_weight=start)
    lam, eta, sign = 0.5, 1.0, (1.0 if goal == "repair" else -1.0)
    res = inf.learn_sample_weights(
        run, x, y, xv, yv, indices=learned, goal=goal, outer_optimizer=SGD(eta), steps=2, penalty=lam, progress=False
    )
    # Step 1 starts at c⁰ (no pull); step 2 descends sign·dE/dc + λ(c¹ − c⁰)/m at c¹.
    c1 = start.copy()
    c1[learned] -= eta * sign * inf.unrolled(run, x, y, xv, yv, input_grad=False).sample_weight_grad[learned]
    np.testing.assert_allclose(res.history[1], c1, rtol=1e-12)
    at_c1 = noisy_run.replayed_on(x, y, sample_weight=c1)
    grad = inf.unrolled(at_c1, x, y, xv, yv, input_grad=False).sample_weight_grad[learned]
    pull = lam * (c1[learned] - start[learned]) / len(learned)
    expected = c1[learned] - eta * (sign * grad + pull)
    np.testing.assert_allclose(res.history[2][learned], expected, rtol=1e-10)
    without_pull = c1[learned] - eta * sign * grad
    assert np.abs(without_pull - expected).max() > 1e-3  # the check above would see a missing pull
    # predicted_change stays about E: ⟨dE/dc, Δc⟩ without the penalty's gradient.
    np.testing.assert_allclose(res.predicted_change[1], np.dot(grad, res.history[2][learned] - c1[learned]), rtol=1e-10)


def test_a_larger_penalty_keeps_the_learned_weights_nearer_the_recorded_ones(noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    distance = []
    for lam in (0.0, 3.0, 30.0):
        res = inf.learn_sample_weights(
            noisy_run, x, y, xv, yv, outer_optimizer=Adam(0.1), steps=8, penalty=lam, progress=False
        )
        distance.append(np.abs(res.sample_weight - 1.0).sum())
    assert distance[0] > distance[1] > distance[2]


def test_repair_down_weights_the_flipped_labels_and_lowers_the_validation_loss(noisy_blobs, noisy_run):
    x, y, xv, yv, flipped = noisy_blobs
    res = inf.learn_sample_weights(noisy_run, x, y, xv, yv, outer_optimizer=Adam(0.1), steps=12, progress=False)
    assert res.val_loss[-1] < 0.5 * res.val_loss[0]  # 0.339 → 0.121 when written
    assert res.sample_weight.min() >= 0.0 and res.sample_weight.max() <= 1.0
    clean = np.setdiff1d(np.arange(40), flipped)
    assert res.sample_weight[flipped].mean() < 0.4 < 0.9 < res.sample_weight[clean].mean()
    assert res.history.shape == (13, 40) and res.val_loss.shape == res.val_error.shape == (13,)
    assert res.predicted_change.shape == (12,) and np.all(np.diff(res.seconds) > 0)
    assert res.optimizer == "Adam"
    # The returned run is the recorded schedule retrained with the learned weights.
    np.testing.assert_array_equal(res.trajectory.sample_weight, res.sample_weight)
    retrained = inf.retrain(noisy_run, x, y, sample_weight=res.sample_weight)
    for a, b in zip(res.trajectory.final_weights, retrained):
        np.testing.assert_array_equal(a, b)
    assert inf.validation_loss(res.trajectory, res.trajectory.final_weights, xv, yv) == pytest.approx(res.val_loss[-1])


def test_holdout_returns_the_weights_of_its_best_step(noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    # A held-out split with 3 of its 10 labels wrong: repairing on the other 20 lowers its loss
    # at first, then raises it (1.23 → 1.02 at step 3 → 1.16 at step 8 when written).
    y_held = np.where(np.arange(10) < 3, (yv[:10] + 1) % 3, yv[:10])
    held = (xv[:10], y_held)
    kwargs = {"outer_optimizer": Adam(0.3), "steps": 8, "progress": False}
    res = inf.learn_sample_weights(noisy_run, x, y, xv[10:], yv[10:], holdout=held, **kwargs)
    assert res.holdout_loss.shape == res.holdout_error.shape == res.val_loss.shape == (9,)
    assert res.best_step == int(np.argmin(res.holdout_loss)) and 0 < res.best_step < 8
    assert not res.stopped_early
    np.testing.assert_array_equal(res.sample_weight, res.history[res.best_step])
    np.testing.assert_array_equal(res.trajectory.sample_weight, res.sample_weight)
    # Each entry is the held-out loss of the run retrained with that entry's weights.
    for k in (0, res.best_step, 8):
        run = inf.retrain(noisy_run, x, y, sample_weight=res.history[k])
        assert inf.validation_loss(noisy_run, run, *held) == pytest.approx(res.holdout_loss[k], rel=1e-9)
    # The held-out data never entered E: the same call without it takes the same path.
    free = inf.learn_sample_weights(noisy_run, x, y, xv[10:], yv[10:], **kwargs)
    np.testing.assert_array_equal(free.history, res.history)
    assert free.holdout_loss is None and free.best_step == 8


def test_patience_stops_once_the_holdout_loss_stops_improving(noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    wrong = (xv, (yv + 1) % 3)  # held-out labels the repaired model gets worse on
    res = inf.learn_sample_weights(
        noisy_run, x, y, xv, yv, outer_optimizer=Adam(0.1), steps=8, holdout=wrong, patience=2, progress=False
    )
    assert res.holdout_loss[1] > res.holdout_loss[0] and res.holdout_loss[2] > res.holdout_loss[0]
    assert res.best_step == 0 and res.stopped_early
    assert res.history.shape == (3, 40) and res.predicted_change.shape == (2,)
    np.testing.assert_array_equal(res.sample_weight, noisy_run.sample_weight)  # the recorded weights were best


def test_holdout_fraction_splits_the_validation_samples(noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    res = inf.learn_sample_weights(noisy_run, x, y, xv, yv, steps=1, holdout=0.3, progress=False)
    # 9 of the 30 samples held out, 21 in E: their losses add up to the loss on all 30.
    full = inf.validation_loss(noisy_run, noisy_run.final_weights, xv, yv)
    assert (9 * res.holdout_loss[0] + 21 * res.val_loss[0]) / 30 == pytest.approx(full, rel=1e-9)
    again = inf.learn_sample_weights(noisy_run, x, y, xv, yv, steps=1, holdout=0.3, progress=False)
    np.testing.assert_array_equal(again.holdout_loss, res.holdout_loss)  # a fixed split


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    fraction=st.floats(0.05, 0.95),
)
def test_holdout_split_keeps_every_class_in_proportion(sizes, fraction):
    classes = np.random.default_rng(1).permutation(np.repeat(np.arange(len(sizes)), sizes))
    count = int(round(fraction * len(classes)))
    held = _stratified_choice(classes, count)
    assert len(held) == count and len(np.unique(held)) == count and np.all(np.diff(held) > 0)
    for k, size in enumerate(sizes):  # each class gets floor or ceil of its share
        share = count * size / len(classes)
        assert np.floor(share) <= np.sum(classes[held] == k) <= np.ceil(share)
    np.testing.assert_array_equal(_stratified_choice(classes, count), held)  # a fixed split


def test_holdout_strata_follow_the_loss():
    def loss(name):
        return inf.losses.get_loss(name)

    for labels in (np.array([2, 0, 1]), np.array([[2], [0], [1]])):  # class indices, (n,) or (n, 1)
        np.testing.assert_array_equal(label_classes(loss("sparse_categorical_crossentropy"), labels), [2, 0, 1])
    one_hot = np.eye(3)[[2, 0, 1]]
    np.testing.assert_array_equal(label_classes(loss("categorical_crossentropy"), one_hot), [2, 0, 1])
    np.testing.assert_array_equal(label_classes(loss("binary_crossentropy"), np.array([[0.9], [0.1]])), [1, 0])
    assert label_classes(loss("binary_crossentropy"), np.array([[0.9, 0.1], [0.1, 0.2]])) is None  # several outputs
    assert label_classes(loss("mse"), np.array([[0.3, 1.0], [2.0, 0.1]])) is None  # one stratum


def test_upper_bound_above_one_lets_helpful_samples_gain_weight(noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    res = inf.learn_sample_weights(
        noisy_run, x, y, xv, yv, outer_optimizer=Adam(0.1), steps=2, bounds=np.array([0.0, 2.0]), progress=False
    )  # bounds as a numpy pair too, as optimize_training_inputs takes them (it was refused as not a pair)
    assert res.sample_weight.max() > 1.0 and res.sample_weight.max() <= 2.0


def test_replayed_on_with_sample_weights_is_the_run_fit_with_them(noisy_blobs):
    x, y, xv, yv, _ = noisy_blobs
    c = np.linspace(0.0, 1.0, 40)

    def run(sample_weight=None):
        return inf.fit(
            mlp(4, 3, out_activation="softmax"),
            x,
            y,
            loss="sparse_categorical_crossentropy",
            batch_size=10,
            epochs=2,
            sample_weight=sample_weight,
        )

    replayed = run().replayed_on(x, y, sample_weight=c)
    fitted = run(c)
    for a, b in zip(replayed.final_weights, fitted.final_weights):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        inf.unrolled(replayed, x, y, xv, yv).sample_weight_grad,
        inf.unrolled(fitted, x, y, xv, yv).sample_weight_grad,
        rtol=1e-9,
        atol=1e-14,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bounds": (-1.0, 1.0)}, r"'bounds' parameter of learn_sample_weights must be a \(low, high\) pair with 0 ≤"),
        ({"bounds": (1.0, 0.5)}, r"'bounds' parameter .* 0 ≤ low < high"),
        ({"bounds": "wide"}, r"'bounds' parameter .* 0 ≤ low < high"),
        ({"bounds": (0.0, 0.5)}, r"'bounds' parameter .* holds the recorded weights .* lie in \[1, 1\]"),
        (
            {"indices": [0, 40]},
            r"'indices' parameter of learn_sample_weights must be integer sample indices in \[0, 39\]",
        ),
        ({"indices": [2, 2]}, r"'indices' parameter of learn_sample_weights must be distinct sample indices"),
        ({"indices": []}, r"'indices' parameter .* integer sample indices"),
        ({"goal": "improve"}, r"'goal' parameter of learn_sample_weights must be one of"),
        ({"steps": 0}, r"'steps' parameter of learn_sample_weights must be"),
        ({"penalty": -0.1}, r"'penalty' parameter of learn_sample_weights must be a finite number ≥ 0"),
        ({"penalty": float("inf")}, r"'penalty' parameter .* finite number ≥ 0"),
        ({"penalty": True}, r"'penalty' parameter .* finite number ≥ 0"),
        ({"outer_optimizer": "newton"}, r"'outer_optimizer' parameter of learn_sample_weights"),
        ({"patience": 2}, r"'patience' parameter of learn_sample_weights must be None unless holdout is given"),
        ({"holdout": 0.3, "patience": 0}, r"'patience' parameter of learn_sample_weights must be"),
        ({"holdout": 1.5}, r"'holdout' parameter of learn_sample_weights must be a fraction in \(0, 1\)"),
        ({"holdout": "half"}, r"'holdout' parameter .* a fraction in \(0, 1\) or an \(x, y\) pair"),
        ({"holdout": 0.01}, r"holdout=0.01 of 30 validation samples leaves 0 held out and 30 to learn from"),
        ({"holdout": (np.zeros((5, 3)), np.zeros(5, int))}, r"'holdout\[0\]' parameter of learn_sample_weights"),
        ({"holdout": (np.zeros((5, 4)), np.zeros(4, int))}, r"'holdout\[1\]' parameter .* as long as 'holdout\[0\]'"),
    ],
)
def test_learn_sample_weights_rejects_bad_input(kwargs, match, noisy_blobs, noisy_run):
    x, y, xv, yv, _ = noisy_blobs
    with pytest.raises(ValueError, match=match):
        inf.learn_sample_weights(noisy_run, x, y, xv, yv, **kwargs)


def test_replayed_on_refuses_weights_of_the_wrong_shape(noisy_blobs, noisy_run):
    x, y, _, _, _ = noisy_blobs
    with pytest.raises(ValueError, match=r"'sample_weight' parameter of Trajectory.replayed_on must be"):
        noisy_run.replayed_on(x, y, sample_weight=np.ones(39))

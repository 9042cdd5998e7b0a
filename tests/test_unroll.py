"""Unrolled hypergradients == end-to-end float64 finite differences through retraining."""

import dataclasses

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam, RMSprop
from influence.unroll import choose_strategy

LOSS = "sparse_categorical_crossentropy"


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    # 13 samples with batch 5: the last batch of each epoch is short (padding is exercised).
    return rng.normal(size=(13, 5)), rng.integers(0, 3, 13), rng.normal(size=(7, 5)), rng.integers(0, 3, 7)


OPTIMIZERS = {
    "sgd": SGD(0.3),
    "momentum": SGD(0.1, momentum=0.9),
    "nesterov_weight_decay": SGD(0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
    "rmsprop": RMSprop(0.01, momentum=0.5),
    "rmsprop_centered": RMSprop(0.01, centered=True),
    "adam": Adam(0.02, weight_decay=0.004),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_input_and_sample_weight_grads_match_retraining_finite_differences(name, data):
    x, y, xv, yv = data
    model = mlp(5, 3, out_activation="softmax")
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=OPTIMIZERS[name], batch_size=5, epochs=2, seed=1)
    assert traj.steps == 6
    for index in (0, 12):
        chk_x = inf.check_unrolled(traj, x, y, xv, yv, index, wrt="inputs")
        assert chk_x.ok and chk_x.max_rel_error <= 1e-5, chk_x
        chk_c = inf.check_unrolled(traj, x, y, xv, yv, index, wrt="sample_weights")
        assert chk_c.ok and chk_c.max_rel_error <= 1e-5, chk_c


def test_adam_check_names_epsilon_when_a_dead_feature_limits_the_linear_range(data):
    # Feature 2 is 0 in every sample: its first-layer weights keep a zero gradient, Adam divides
    # by √v + ε ≈ ε, and the retrained loss is linear only for h ≪ ε. The gradient is right.
    x, y, xv, yv = data
    x = x.copy()
    x[:, 2] = 0.0
    opt = Adam(0.01)  # Keras's ε = 1e-7
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=opt, batch_size=5, epochs=2)
    coarse = inf.check_unrolled(traj, x, y, xv, yv, 0, wrt="inputs")
    assert not coarse.ok
    assert "for Adam (ε = 1e-07) a sound gradient can fail" in coarse.explanation
    assert "Re-check with h = 1e-09, or for attribution train with a larger ε" in coarse.explanation
    fine = inf.check_unrolled(traj, x, y, xv, yv, 0, wrt="inputs", h=1e-9)
    assert fine.ok, fine
    # A run already at ε = 1e-5 was told to train with ε = 1e-5.
    wider = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=Adam(0.01, epsilon=1e-5),
                    batch_size=5, epochs=2)  # fmt: skip
    hint = inf.check_unrolled(wider, x, y, xv, yv, 0, wrt="inputs", h=1.0).explanation
    assert "Re-check with h = 1e-07." in hint and "larger ε" not in hint


def test_label_grad_matches_finite_differences_for_regression():
    rng = np.random.default_rng(1)
    x, y, xv, yv = rng.normal(size=(10, 4)), rng.normal(size=(10, 2)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=Adam(0.05), batch_size=4, epochs=2)
    res = inf.unrolled(traj, x, y, xv, yv)
    assert res.label_grad is not None and res.label_grad.shape == y.shape
    chk = inf.check_unrolled(traj, x, y, xv, yv, 3, wrt="labels")
    assert chk.ok and chk.max_rel_error <= 1e-5, chk


def test_integer_valued_labels_of_a_continuous_loss_get_label_grads():
    """One-hot labels stored as ints (and integer regression targets) are read as real numbers by their loss."""
    rng = np.random.default_rng(0)
    x, xv = rng.uniform(size=(12, 4)), rng.uniform(size=(6, 4))
    onehot = np.eye(3, dtype=int)[rng.integers(0, 3, 12)]
    yv = np.eye(3)[rng.integers(0, 3, 6)]
    as_int = inf.fit(mlp(4, 3, out_activation="softmax"), x, onehot, loss="categorical_crossentropy",
                     optimizer=SGD(0.5), batch_size=4, epochs=2)  # fmt: skip
    grad_int = inf.unrolled(as_int, x, onehot, xv, yv).label_grad
    grad_float = inf.unrolled(as_int, x, onehot.astype(float), xv, yv).label_grad
    assert grad_int is not None and grad_int.shape == onehot.shape
    np.testing.assert_allclose(grad_int, grad_float, rtol=1e-12)
    chk = inf.check_unrolled(as_int, x, onehot, xv, yv, 2, wrt="labels")
    assert chk.ok, chk
    targets = rng.integers(-3, 4, size=(12, 1))
    regression = inf.fit(mlp(4, 1), x, targets, loss="mse", optimizer=SGD(0.05), batch_size=4, epochs=2)
    assert inf.unrolled(regression, x, targets, xv, rng.normal(size=(6, 1))).label_grad.shape == (12, 1)


def test_retrain_reproduces_the_recorded_final_weights(data):
    x, y, _, _ = data
    model = mlp(5, 3, out_activation="softmax")
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=Adam(0.01), batch_size=4, epochs=3)
    replay = inf.retrain(traj, x, y)
    assert all(np.array_equal(a, b) for a, b in zip(replay, traj.final_weights))
    assert all(np.array_equal(v.numpy(), w) for v, w in zip(model.trainable_variables, traj.final_weights))
    assert len(traj.batches) == 12 and traj.learning_rates.shape == (12,)
    assert sorted(np.concatenate(traj.batches[:4]).tolist()) == list(range(13))


def test_one_step_run_equals_one_step(data):
    x, y, xv, yv = data
    model = mlp(5, 3, out_activation="softmax")
    initial = [w.numpy() for w in model.trainable_variables]
    lr = 0.4
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(lr), batch_size=len(x), epochs=1, shuffle=False)
    res = inf.unrolled(traj, x, y, xv, yv)
    for v, w in zip(model.trainable_variables, initial):
        v.assign(w)
    dc = inf.one_step(model, LOSS, x, y, xv, yv, learning_rate=lr, wrt="sample_weights")
    dx = inf.one_step(model, LOSS, x, y, xv, yv, learning_rate=lr, wrt="inputs")
    assert np.allclose(res.removal_effect, -dc, rtol=1e-10, atol=1e-15)
    assert np.allclose(res.input_grad, dx, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("record", [True, False])
def test_every_memory_strategy_gives_the_same_numbers(record, data):
    x, y, xv, yv = data
    traj = inf.fit(
        mlp(5, 3, out_activation="softmax"),
        x,
        y,
        loss=LOSS,
        optimizer=SGD(0.1, momentum=0.9),
        batch_size=3,
        epochs=3,
        record_budget_bytes=2**20 if record else 0,
    )
    assert (traj.weights_history is not None) == record
    results = {
        s: inf.unrolled(traj, x, y, xv, yv, strategy=s)
        for s in ["store_all", "checkpointed", "replay", inf.Checkpointed(every=4)]
    }
    reference = results["store_all"]
    assert reference.strategy == "store_all"
    assert results["checkpointed"].strategy == "checkpointed(every=3)"  # a divisor of 15 near √15: equal segments
    for res in results.values():
        assert np.allclose(res.removal_effect, reference.removal_effect, rtol=1e-12, atol=1e-16)
        assert np.allclose(res.input_grad, reference.input_grad, rtol=1e-12, atol=1e-16)


def test_replay_slices_a_history_already_in_memory_instead_of_recomputing_it(data, monkeypatch):
    from influence.program import Program

    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, batch_size=3, epochs=3)
    assert traj.weights_history is not None
    reference = inf.unrolled(traj, x, y, xv, yv, strategy="store_all")
    forward_steps = []
    real_run = Program.run
    monkeypatch.setattr(
        Program,
        "run",
        lambda self, sch, w, s, a, b, *r, **k: forward_steps.append(b - a) or real_run(self, sch, w, s, a, b, *r, **k),
    )
    replayed = inf.unrolled(traj, x, y, xv, yv, strategy="replay")
    assert forward_steps == []  # was T(T+1)/2 = 120 recomputed steps
    assert replayed.strategy == "replay"
    # the same numbers, summed per one-step segment instead of once
    assert np.allclose(replayed.removal_effect, reference.removal_effect, rtol=1e-12, atol=1e-16)
    assert np.allclose(replayed.input_grad, reference.input_grad, rtol=1e-12, atol=1e-16)


def test_auto_strategy_follows_the_memory_budget(data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, batch_size=1, epochs=4, record_budget_bytes=0)
    per_state = sum(w.size * 8 for w in traj.initial_weights)
    steps = traj.steps  # 52
    per_step_buffer = 1 * (1 + 5) * 8  # batch 1 x (dE/dc + dE/dx), float64
    budget_all = steps * (per_state + 2 * per_step_buffer)
    assert inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=budget_all).strategy == "store_all"
    assert inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=budget_all - 1).strategy != "store_all"
    assert (
        inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=20 * per_state).strategy == "checkpointed(every=4)"
    )  # divides 52
    # Under the divisor's 17 states, ⌈52/6⌉ + 6 = 15 still fit: not replay's 52·53/2 recomputed steps.
    assert inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=int(16.5 * per_state)).strategy == (
        "checkpointed(every=6)"
    )
    assert inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=2 * per_state).strategy == "replay"
    # A long run left with replay is warned about (85k-weight MLP, 705 steps: 40–53 s against 3.7 s).
    with pytest.warns(RuntimeWarning, match=r"leaves only replay, which recomputes 248865 steps .* checkpointed"):
        assert choose_strategy(705, 340_000, 5_000_000, 8320).name == "replay"
    # Under what even replay needs: replay, with a warning instead of silently over budget.
    with pytest.warns(RuntimeWarning, match="no memory strategy fits memory_budget_bytes=100: the leanest") as caught:
        assert inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=100).strategy == "replay"
    assert caught[0].filename == __file__
    assert inf.Checkpointed().states_held(2500) == 100
    assert inf.StoreAll().states_held(2500) == 2500


def test_dropout_masks_are_replayed_exactly(data):
    x, y, xv, yv = data
    keras.utils.set_random_seed(2)
    model = inf.as_float64(
        keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.Dropout(0.4),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    assert traj.training and len(set(traj.seeds.tolist())) == traj.steps
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(traj, x, y), traj.final_weights))
    chk = inf.check_unrolled(traj, x, y, xv, yv, 4, wrt="inputs")
    assert chk.ok, chk
    # The masks matter: a run without dropout ends elsewhere.
    no_dropout = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2, training=False)
    assert not np.allclose(no_dropout.final_weights[0], traj.final_weights[0])


def test_float32_trajectory_is_checked_on_a_float64_replay(data):
    x, y, xv, yv = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    traj = inf.fit(model, x.astype("float32"), y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    assert traj.final_weights[0].dtype == np.float32
    chk = inf.check_unrolled(traj, x.astype("float32"), y, xv, yv, 2)
    assert chk.ok, chk


def test_learning_rate_schedule_is_recorded(data):
    x, y, xv, yv = data
    traj = inf.fit(
        mlp(5, 3, out_activation="softmax"),
        x,
        y,
        loss=LOSS,
        optimizer=SGD(lambda t: 0.5 / (1 + t)),
        batch_size=5,
        epochs=2,
    )
    assert np.allclose(traj.learning_rates, [0.5 / (1 + t) for t in range(6)])
    chk = inf.check_unrolled(traj, x, y, xv, yv, 1, wrt="sample_weights")
    assert chk.ok, chk


def test_actual_removal_effect_is_predicted_to_first_order(data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.05), batch_size=5, epochs=2)
    res = inf.unrolled(traj, x, y, xv, yv)
    actual = inf.actual_removal_effect(traj, x, y, xv, yv, [0, 5, 9], progress=False)
    predicted = res.removal_effect[[0, 5, 9]]
    # Removal is a finite change (c: 1 -> 0): agreement to first order, within 10% of the largest effect.
    assert np.max(np.abs(actual - predicted)) < 0.1 * np.max(np.abs(predicted))
    group = inf.actual_removal_effect(traj, x, y, xv, yv, [[0, 5]], progress=False)
    assert group.shape == (1,)
    assert abs(group[0] - predicted[:2].sum()) < 0.2 * abs(predicted[:2].sum()) + 1e-6


def test_removal_effect_of_a_weighted_sample_removes_its_whole_weight(data):
    x, y, xv, yv = data
    c = np.ones(len(x))
    c[[0, 1]], c[[2, 3]], c[4] = 3.0, 0.5, 0.0
    traj = inf.fit(
        mlp(5, 3, out_activation="softmax"),
        x,
        y,
        loss=LOSS,
        optimizer=SGD(0.05),
        batch_size=5,
        epochs=2,
        sample_weight=c,
    )
    res = inf.unrolled(traj, x, y, xv, yv)
    # Removal takes c_i to 0: to first order −c_i·dE/dc_i, and nothing for a sample already out.
    np.testing.assert_array_equal(res.removal_effect, -c * res.sample_weight_grad)
    assert res.removal_effect[4] == 0.0 and res.sample_weight_grad[4] != 0.0
    actual = inf.actual_removal_effect(traj, x, y, xv, yv, [0, 2, 5], progress=False)
    predicted = res.removal_effect[[0, 2, 5]]
    # First order (13 samples, a finite removal): within 20 % of the largest effect. −dE/dc_i alone,
    # the slope per unit of weight, would predict a third of the c = 3 sample's effect.
    assert np.max(np.abs(actual - predicted)) < 0.2 * np.max(np.abs(predicted))
    assert abs(actual[0] + res.sample_weight_grad[0]) > 0.5 * abs(actual[0])
    table = inf.rank(traj, x, y, xv, yv)
    assert np.allclose(table.sort_values("index")["removal_effect"], res.removal_effect)
    curve = inf.removal_curve(traj, x, y, xv, yv, 0, scales=(0.0,), removal_effect=res.removal_effect)
    assert curve["predicted_change"][0] == pytest.approx(res.removal_effect[0], rel=1e-12)
    # A sample outside the run has input gradient exactly 0, so has every finite difference: refused by name
    # (the check said "inconclusive, try a larger h"); its weight's gradient is checked as any other.
    with pytest.raises(ValueError, match=r"'index' parameter of check_unrolled .* Got 4, of weight 0"):
        inf.check_unrolled(traj, x, y, xv, yv, 4, wrt="inputs")
    assert inf.check_unrolled(traj, x, y, xv, yv, 4, wrt="sample_weights").ok


def test_a_float32_retraining_is_not_rounded_to_the_spacing_of_its_validation_loss():
    """SGD(1e-6): removal changes of ~1e-6 against E ≈ 2.3 (float32 spacing 2.4e-7). The float32 mean
    of the validation losses rounded every change to whole spacings (all five top samples read
    +1.192e-6, 15–17 % off the float64 replay); E is now summed in float64, and the changes that
    stay unresolved are warned about."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data[:300] / 16).astype(np.float32), digits.target[:300]
    xv, yv = (digits.data[1000:1200] / 16).astype(np.float32), digits.target[1000:1200]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(10)])
    traj = inf.fit(model, x, y, loss=LOSS, from_logits=True, optimizer=SGD(1e-6), batch_size=30, epochs=20)
    chosen = [251, 32, 149]
    with pytest.warns(RuntimeWarning, match=r"3 of 3 retrained change\(s\) are below 16 float32 spacings"):
        actual32 = inf.actual_removal_effect(traj, x, y, xv, yv, chosen, progress=False)
    actual64 = inf.actual_removal_effect(inf.as_float64_trajectory(traj, x, y), x.astype(np.float64), y, xv, yv, chosen)
    np.testing.assert_allclose(actual32, actual64, rtol=0.05)
    assert len(set(actual32.tolist())) == 3  # not tied at one rounded value


def test_removal_curve_ends_at_the_actual_removal_effect_and_follows_the_slope_near_one(data):
    x, y, xv, yv = data
    model = inf.as_float64(mlp(5, 3, out_activation="softmax"))
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    res = inf.unrolled(traj, x, y, xv, yv)
    eps = 1e-4
    curve = inf.removal_curve(traj, x, y, xv, yv, 5, scales=(1.0, 1 - eps, 0.5, 0.0))
    assert list(curve.columns) == ["scale", "actual_change", "predicted_change"]
    assert curve.attrs["indices"] == [5]
    # the prediction is the first-order straight line through the recorded weight
    assert np.allclose(curve["predicted_change"], (1 - curve["scale"]) * res.removal_effect[5], rtol=1e-12)
    assert curve["actual_change"][0] == 0.0
    # near the recorded weight the real change follows the slope (float64: to ~eps relative)
    assert abs(curve["actual_change"][1] - curve["predicted_change"][1]) <= 1e-3 * abs(curve["predicted_change"][1])
    # at scale 0 it is the removal retraining
    removed = inf.actual_removal_effect(traj, x, y, xv, yv, [5], progress=False)[0]
    assert curve["actual_change"][3] == pytest.approx(removed, rel=1e-12, abs=1e-15)
    # a group's weights move together; its prediction is the sum of the members' effects
    group = inf.removal_curve(traj, x, y, xv, yv, [0, 5], scales=(0.0,), removal_effect=res.removal_effect)
    with pytest.raises(ValueError, match="'scales' parameter of removal_curve must be multipliers ≥ 0"):
        inf.removal_curve(traj, x, y, xv, yv, 5, scales=(-2.0,), removal_effect=res.removal_effect)
    assert group["predicted_change"][0] == pytest.approx(res.removal_effect[[0, 5]].sum(), rel=1e-12)
    assert group["actual_change"][0] == pytest.approx(
        inf.actual_removal_effect(traj, x, y, xv, yv, [[0, 5]], progress=False)[0], rel=1e-12, abs=1e-15
    )


def test_integer_sample_weights_scale_without_truncation(data):
    x, y, xv, yv = data
    model = mlp(5, 3, out_activation="softmax")
    traj = inf.fit(model, x, y, loss=LOSS, batch_size=5, epochs=1, sample_weight=np.full(len(x), 2))
    assert traj.sample_weight.dtype == np.float64
    curve = inf.removal_curve(traj, x, y, xv, yv, 3, scales=(0.75,), removal_effect=np.zeros(len(x)))
    c = np.full(len(x), 2.0)
    c[3] = 1.5  # 2 × 0.75: an int array had truncated it to 1
    expected = inf.validation_loss(traj, inf.retrain(traj, x, y, sample_weight=c), xv, yv) - inf.validation_loss(
        traj, inf.retrain(traj, x, y), xv, yv
    )
    assert curve["actual_change"][0] == pytest.approx(expected, rel=1e-12)


def test_the_replayed_baseline_is_retrained_once_per_run_and_data(data, monkeypatch):
    import influence.verify as verify

    x, y, xv, yv = data
    traj = inf.fit(inf.as_float64(mlp(5, 3, out_activation="softmax")), x, y, loss=LOSS, batch_size=5, epochs=1)
    replays = []
    real = verify.retrained_val_loss
    monkeypatch.setattr(verify, "retrained_val_loss", lambda *a: replays.append(a[-1]) or real(*a))
    first = inf.removal_curve(traj, x, y, xv, yv, 1, scales=(0.0,), removal_effect=np.zeros(len(x)))
    assert len(replays) == 2  # the baseline and the removal
    inf.removal_curve(traj, x, y, xv, yv, 2, scales=(0.0,), removal_effect=np.zeros(len(x)))
    again = inf.actual_removal_effect(traj, x, y, xv, yv, 1, progress=False)
    assert len(replays) == 4 and again[0] == first["actual_change"][0]
    # other validation data, or a copy of the run (another model, e.g. float64), replay their own baseline
    inf.actual_removal_effect(traj, x, y, xv[:-1], yv[:-1], 1, progress=False)
    assert len(replays) == 6
    copy = dataclasses.replace(traj, _program_cache={})
    inf.actual_removal_effect(copy, x, y, xv, yv, 1, progress=False)
    assert len(replays) == 8


def test_batchnorm_in_training_mode_is_refused_with_a_hint(data):
    x, y, _, _ = data
    model = inf.as_float64(
        keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(4),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    with pytest.raises(
        ValueError,
        match=r"'model' parameter of fit must be a model whose samples do not interact .* bn; "
        r"use training=False",
    ):
        inf.fit(model, x, y, loss=LOSS)
    traj = inf.fit(model, x, y, loss=LOSS, training=False, batch_size=5)
    assert traj.steps == 3


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda t, d: inf.unrolled(t, d[0][:5], d[1][:5], d[2], d[3]),
            ValueError,
            r"'x_train' parameter of unrolled must be the data the trajectory was recorded on \(13 samples of shape \(5,\)\)",
        ),
        (
            lambda t, d: inf.unrolled("traj", *d),
            TypeError,
            "'trajectory' parameter of unrolled must be an influence.Trajectory",
        ),
        (
            lambda t, d: inf.unrolled(t, *d, strategy="fast"),
            ValueError,
            "'strategy' parameter of unrolled must be 'auto'",
        ),
        (
            lambda t, d: inf.unrolled(t, d[0], d[1], d[2][:, :3], d[3]),
            ValueError,
            "'x_val' parameter of unrolled must be samples of shape",
        ),
        (
            lambda t, d: inf.unrolled(t, d[0], d[1], d[2], d[3] + 5),
            ValueError,
            r"'y_val' parameter of unrolled must be class labels in \[0, 2\]",
        ),
        (
            lambda t, d: inf.retrain(t, d[0], d[1], sample_weight=np.ones(3)),
            ValueError,
            "'sample_weight' parameter of retrain must be as long",
        ),
        (
            lambda t, d: inf.check_unrolled(t, *d, 99),
            ValueError,
            r"'index' parameter of check_unrolled must be a sample index in \[0, 12\]",
        ),
        (
            lambda t, d: inf.check_unrolled(t, *d, 0, wrt="labels"),
            ValueError,
            "'wrt' parameter of check_unrolled must be 'inputs' or 'sample_weights'",
        ),
        (
            lambda t, d: inf.actual_removal_effect(t, *d, [20]),
            ValueError,
            r"'indices' parameter of actual_removal_effect must be integer sample indices",
        ),
        (
            lambda t, d: inf.removal_curve(t, *d, 2.5),
            ValueError,
            r"'indices' parameter of removal_curve must be integer sample indices in \[0, 12\]",
        ),
        (
            lambda t, d: inf.removal_curve(t, *d, 1, scales=[0.5, np.nan]),
            ValueError,
            r"'scales' parameter of removal_curve must be finite \(no NaN or Inf\)",
        ),
        (
            lambda t, d: inf.removal_curve(t, *d, 1, scales=[]),
            ValueError,
            "'scales' parameter of removal_curve must be a non-empty array",
        ),
        (
            lambda t, d: inf.removal_curve(t, *d, 1, removal_effect=np.zeros(3)),
            ValueError,
            r"'removal_effect' parameter of removal_curve must be shape \(13,\)",
        ),
    ],
)
def test_unrolled_rejects_bad_input(call, error, match, data):
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), data[0], data[1], loss=LOSS, batch_size=5)
    with pytest.raises(error, match=match):
        call(traj, data)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "'batch_size' parameter of fit must be a positive int. Got 0 instead"),
        ({"epochs": 1.5}, ValueError, "'epochs' parameter of fit must be a positive int"),
        (
            {"optimizer": keras.optimizers.SGD()},
            ValueError,
            r"'optimizer' parameter of fit must be an influence.optimizers optimizer .* Got SGD \(a Keras optimizer\)",
        ),
        ({"optimizer": "lbfgs"}, ValueError, "'optimizer' parameter of fit must be an influence.optimizers optimizer"),
        ({"seed": "zero"}, ValueError, "'seed' parameter of fit must be an int"),
        (
            {"record_budget_bytes": None},
            ValueError,
            "'record_budget_bytes' parameter of fit must be a non-negative int",
        ),
        ({"sample_weight": np.ones(2)}, ValueError, "'sample_weight' parameter of fit must be as long as 'x_train'"),
    ],
)
def test_fit_rejects_bad_input(kwargs, error, match, data):
    with pytest.raises(error, match=match):
        inf.fit(mlp(5, 3, out_activation="softmax"), data[0], data[1], loss=LOSS, **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SGD(-1.0), "'learning_rate' parameter of SGD must be a positive number"),
        (lambda: SGD(0.1, momentum=1.5), r"'momentum' parameter of SGD must be a number in \[0, 1\)"),
        (lambda: Adam(0.1, beta_2=1.0), r"'beta_2' parameter of Adam must be a number in \[0, 1\)"),
        (lambda: RMSprop(0.1, epsilon=0), "'epsilon' parameter of RMSprop must be a positive number"),
        (lambda: SGD(0.1, weight_decay=-1), "'weight_decay' parameter of SGD must be a non-negative number"),
        (lambda: inf.Checkpointed(every=0), "'every' parameter of Checkpointed must be a positive int or None"),
        (lambda: SGD(0.1, weight_decay=True), "'weight_decay' parameter of SGD must be a non-negative number"),
        (lambda: SGD(0.1, momentum=0.9, nesterov="yes"), "'nesterov' parameter of SGD must be True or False"),
        (
            lambda: SGD(lambda t: np.ones(2)).learning_rates(3),
            "'learning_rate' parameter of SGD must be a schedule "
            r"of single numbers \(step -> rate\). Got an array of shape \(2,\) at step 0 instead.",
        ),
    ],
)
def test_optimizers_and_strategies_reject_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_settings_are_accepted_and_a_checkpoint_interval_beyond_the_run_holds_no_more_than_store_all():
    assert inf.Checkpointed(np.int64(3)).interval(10) == 3
    # A schedule may return a one-element array (a tensor of shape (1,)): it is that rate.
    assert np.array_equal(SGD(lambda t: np.array([0.1 * (t + 1)])).learning_rates(2), [0.1, 0.2])
    for steps in (1, 6, 7):
        for every in (steps, steps + 1, 50):
            held = inf.Checkpointed(every).states_held(steps)
            assert held == inf.StoreAll().states_held(steps), (steps, every, held)
            assert inf.Checkpointed(every).segments(steps) == [(0, steps)]


def test_safe_sqrt_has_zero_derivative_at_zero_and_adam_stays_finite_on_dead_inputs():
    import tensorflow as tf

    v = tf.constant([0.0, 4.0], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(v)
        s = inf.optimizers.safe_sqrt(v)
    assert np.allclose(s.numpy(), [0, 2]) and np.allclose(tape.gradient(s, v).numpy(), [0, 0.25])
    # A pixel that is 0 in every sample gives its first-layer weights zero gradients forever.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5))
    x[:, 2] = 0.0
    y = rng.integers(0, 3, 8)
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=Adam(0.01), batch_size=4, epochs=2)
    res = inf.unrolled(traj, x, y, x[:3], y[:3])
    assert np.all(np.isfinite(res.input_grad)) and np.all(np.isfinite(res.removal_effect))


def test_a_non_finite_adjoint_is_reported_with_its_step(data):
    import tensorflow as tf

    from influence.unroll import _check_adjoint

    x, y, _, _ = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    program = traj.program()
    w_hist = [tf.constant(h) for h in traj.weights_history]
    lam_w = [tf.fill(w.shape[1:], tf.constant(np.inf, tf.float64)) for w in w_hist]
    x_t, y_t, c_t = tf.constant(x), tf.constant(y, tf.int32), tf.constant(np.ones(len(x)))
    *_, finite = program.reverse_with_flags(w_hist, [], tf.constant(0), lam_w, [], x_t, y_t, c_t)
    assert not np.asarray(finite).any()
    with pytest.raises(FloatingPointError, match="adjoint became NaN/Inf at step 5 of the reverse pass"):
        _check_adjoint(np.asarray(finite), 0, traj.learning_rates)
    flags = np.array([True, True, False, True])
    with pytest.raises(FloatingPointError, match=r"at step 12 of the reverse pass \(learning rate 0.3\)"):
        _check_adjoint(flags, 10, np.full(20, 0.3))


def test_removal_effect_alone_skips_input_grads_and_the_budget_counts_segment_buffers(data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    full = inf.unrolled(traj, x, y, xv, yv)
    lean = inf.unrolled(traj, x, y, xv, yv, input_grad=False)
    assert lean.input_grad is None
    assert np.allclose(lean.removal_effect, full.removal_effect, rtol=1e-12, atol=1e-16)
    assert lean.memory_bytes < full.memory_bytes
    state = sum(w.size * 8 for w in traj.initial_weights)
    buffer = 5 * (1 + 5) * 8  # batch x (dE/dc + dE/dx) per step, float64
    assert full.memory_bytes == traj.steps * (state + 2 * buffer)
    assert inf.StoreAll().held_bytes(6, state, buffer) == full.memory_bytes
    # A budget that fits the states alone but not the buffers no longer picks store_all.
    assert inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=traj.steps * (state + buffer)).strategy != "store_all"


def test_token_inputs_into_an_embedding_get_removal_effects_and_no_input_grad():
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 20, size=(13, 6)), rng.integers(0, 3, 13)
    xv, yv = rng.integers(0, 20, size=(7, 6)), rng.integers(0, 3, 7)
    keras.utils.set_random_seed(1)
    model = inf.as_float64(
        keras.Sequential(
            [
                keras.Input((6,), dtype="int32"),
                keras.layers.Embedding(20, 4),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    traj = inf.fit(model, x, y, loss=LOSS, optimizer=Adam(0.05), batch_size=5, epochs=2)
    res = inf.unrolled(traj, x, y, xv, yv)  # the Embedding's gradient arrives as IndexedSlices
    assert res.input_grad is None and np.all(np.isfinite(res.removal_effect))
    assert inf.check_unrolled(traj, x, y, xv, yv, 3, wrt="sample_weights").ok
    assert inf.rank(traj, x, y, xv, yv).shape[0] == 13
    with pytest.raises(TypeError, match="floating-point inputs for input_grad=True"):
        inf.unrolled(traj, x, y, xv, yv, input_grad=True)


def test_data_other_than_the_recorded_is_refused_but_the_same_data_in_another_form_is_not(data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    order = np.random.default_rng(0).permutation(len(x))
    for other_x, other_y in [(x[order], y[order]), (x, (y + 1) % 3), (x * 2, y)]:
        with pytest.raises(ValueError, match="must be the data the trajectory was recorded on, in its order"):
            inf.unrolled(traj, other_x, other_y, xv, yv)
    with pytest.raises(ValueError, match="parameter of rank must be the data the trajectory was recorded on"):
        inf.rank(traj, x[order], y[order], xv, yv, method="loss")
    # The same values as float32, a DataFrame, float class labels: accepted.
    same = inf.unrolled(traj, pd.DataFrame(x.astype("float32").astype(float)), y.astype(float), xv, yv)
    assert same.removal_effect.shape == (len(x),)
    # retrain replays the recorded run on whatever data it is given.
    assert not np.allclose(inf.retrain(traj, x * 2, y)[0], traj.final_weights[0])


def test_a_change_to_any_row_of_a_large_data_set_is_refused_and_older_saved_runs_still_match():
    """The fingerprint hashed 256 evenly spaced rows: with 400 samples, a relabelled row 2 passed unseen."""
    from dataclasses import replace

    from influence.trajectory import _sampled_rows_fingerprint

    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(400, 3)), rng.integers(0, 2, 400), rng.normal(size=(5, 3)), rng.integers(0, 2, 5)
    traj = inf.fit(mlp(3, 2, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.1), batch_size=100)
    relabelled = y.copy()
    relabelled[2] = 1 - relabelled[2]
    assert _sampled_rows_fingerprint(x, relabelled) == _sampled_rows_fingerprint(x, y)  # the old blind spot
    with pytest.raises(ValueError, match="must be the data the trajectory was recorded on, in its order"):
        inf.unrolled(traj, x, relabelled, xv, yv)
    saved_before = replace(traj, data_fingerprint=_sampled_rows_fingerprint(x, y))  # no prefix, as saved then
    assert inf.unrolled(saved_before, x, y, xv, yv).removal_effect.shape == (400,)
    with pytest.raises(ValueError, match="must be the data the trajectory was recorded on"):
        inf.unrolled(saved_before, x[::-1], y[::-1], xv, yv)


def test_reprs_summarise_arrays_instead_of_printing_them(data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    res = inf.unrolled(traj, x, y, xv, yv)
    for text in (repr(traj), repr(res)):
        assert len(text) < 1000 and "\n" not in text, text
    assert "loss='sparse_categorical_crossentropy'" in repr(traj) and "final_weights=[4 arrays]" in repr(traj)
    assert "input_grad=array(shape=(13, 5), dtype=float64)" in repr(res)


def test_the_recorded_schedule_replayed_on_modified_data_is_a_run_on_that_data(data):
    x, y, xv, yv = data
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.3), batch_size=5, epochs=2)
    poisoned = x.copy()
    poisoned[[1, 4]] += 0.5
    run = traj.replayed_on(poisoned, y)
    assert all(np.array_equal(a, b) for a, b in zip(run.final_weights, inf.retrain(traj, poisoned, y)))
    assert run.weights_history is None and traj.weights_history is not None
    res = inf.unrolled(run, poisoned, y, xv, yv)  # the recorded trajectory refuses these inputs
    assert res.input_grad.shape == x.shape
    assert inf.check_unrolled(run, poisoned, y, xv, yv, 4).ok
    assert inf.as_float64_trajectory(traj, poisoned, y).data_fingerprint == run.data_fingerprint


def test_sample_weight_of_shape_n_by_1_is_one_weight_per_sample(data):
    # Kept as (n, 1), it broadcast against the (B,) losses into a (B, B) matrix: another run, silently.
    x, y, _, _ = data
    runs = [
        inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, batch_size=5, sample_weight=c)
        for c in (np.linspace(0.5, 1.5, 13), np.linspace(0.5, 1.5, 13)[:, None])
    ]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].final_weights, runs[1].final_weights))
    assert runs[1].sample_weight.shape == (13,)
    with pytest.raises(ValueError, match=r"'sample_weight' parameter of fit must be shape \(13,\)"):
        inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss=LOSS, batch_size=5, sample_weight=np.ones((13, 2)))
    with pytest.raises(ValueError, match=r"'sample_weight' parameter of retrain must be as long as 'x_train'"):
        inf.retrain(runs[0], x, y, sample_weight=np.ones(12))


@pytest.mark.parametrize("constraint", [keras.constraints.NonNeg(), keras.constraints.MaxNorm(0.5)])
def test_models_with_weight_constraints_are_refused_by_fit(constraint, data):
    """Keras projects constrained weights after each update; the recorded updates did not, silently."""
    x, y, _, _ = data
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, bias_constraint=constraint)])
    with pytest.raises(ValueError, match=r"'model' parameter of fit must be a model without weight constraints.*bias"):
        inf.fit(model, x.astype("float32"), y, loss=LOSS, from_logits=True)


@pytest.mark.parametrize("kind", ["kernel_regularizer", "bias_regularizer", "activity_regularizer"])
def test_models_with_regularization_losses_are_refused_by_fit(kind, data):
    # fit trains on the per-sample loss only: Keras's penalty would be dropped silently.
    x, y, _, _ = data
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, activation="softmax", **{kind: keras.regularizers.L2(0.1)})]
    )
    with pytest.raises(ValueError, match=f"'model' parameter of fit must be a model without regularization.*{kind}"):
        inf.fit(model, x, y, loss=LOSS, batch_size=5)
    # The hint must not promise more than holds: decoupled decay equals an L2 term λ‖w‖² only for plain SGD, at 2λ.
    with pytest.raises(ValueError, match=r"SGD\(weight_decay=2·λ\).*only for plain SGD"):
        inf.fit(model, x, y, loss=LOSS, batch_size=5)


def test_shuffle_must_be_a_bool(data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="'shuffle' parameter of fit must be True or False"):
        inf.fit(mlp(5, 3), x, y, loss=LOSS, batch_size=5, shuffle="no")


@keras.saving.register_keras_serializable(package="tests")
class _NoTrainingArgument(keras.Model):
    """A subclassed model whose call takes no ``training`` argument (Keras accepts it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The layers follow the model's dtype, so that as_float64 can rebuild it in float64.
        self.hidden = keras.layers.Dense(4, activation="tanh", dtype=self.dtype_policy)
        self.out = keras.layers.Dense(3, activation="softmax", dtype=self.dtype_policy)

    def call(self, z):
        return self.out(self.hidden(z))


def test_subclassed_model_whose_call_takes_no_training_argument(data):
    x, y, xv, yv = data
    model = _NoTrainingArgument()
    model(x[:1])
    traj = inf.fit(model, x, y, loss=LOSS, batch_size=5, epochs=2)
    chk = inf.check_unrolled(traj, x, y, xv, yv, 2, wrt="sample_weights")
    assert chk.ok and chk.max_rel_error <= 1e-5, chk


class _TwoOutputs(keras.Model):
    def __init__(self):
        super().__init__()
        self.a, self.b = keras.layers.Dense(3, activation="softmax"), keras.layers.Dense(3, activation="softmax")

    def call(self, x, training=False):
        return self.a(x), self.b(x)


def test_a_single_output_in_a_dict_is_the_output_and_several_outputs_are_refused_by_name(data):
    x, y, xv, yv = data

    def model(named):
        keras.utils.set_random_seed(0)
        inp = keras.Input((5,))
        out = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(4, activation="tanh")(inp))
        return keras.Model(inp, {"p": out} if named else out)

    results = [inf.unrolled(inf.fit(model(n), x, y, loss=LOSS, batch_size=5), x, y, xv, yv) for n in (False, True)]
    np.testing.assert_array_equal(results[0].removal_effect, results[1].removal_effect)
    # A subclassed model declares no outputs: its tuple showed as sample coupling or an AttributeError.
    two = _TwoOutputs()
    two(x[:1])
    for training in (True, False):
        with pytest.raises(ValueError, match="'model' parameter of fit must be a model with one input and one output. "
                           "Got a model with 2 outputs"):  # fmt: skip
            inf.fit(two, x, y, loss=LOSS, batch_size=5, training=training)


def test_stateful_recurrent_layers_are_refused_before_training():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5, 3)), rng.integers(0, 3, 8)
    model = keras.Sequential([keras.Input((5, 3), batch_size=8), keras.layers.SimpleRNN(3, stateful=True, name="rnn"),
                              keras.layers.Dense(3, activation="softmax")])  # fmt: skip
    with pytest.raises(ValueError, match=r"'model' parameter of fit must be a model without stateful layers .* rnn"):
        inf.fit(model, x, y, loss=LOSS, batch_size=8)

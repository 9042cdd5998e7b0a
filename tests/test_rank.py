"""rank: every method, cross-method agreement, solvers, group effects and errors."""

import numpy as np
import pandas as pd
import pytest
from conftest import mlp
from scipy import stats

import influence as inf
from influence.optimizers import SGD
from influence.rankers import ConjugateGradient, Exact, LiSSA

LOSS = "sparse_categorical_crossentropy"


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 4)) * 2
    y = rng.integers(0, 3, 40)
    x = centers[y] + rng.normal(size=(40, 4))
    yv = rng.integers(0, 3, 20)
    xv = centers[yv] + rng.normal(size=(20, 4))
    y_noisy = y.copy()
    y_noisy[:4] = (y[:4] + 1) % 3  # four flipped labels
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), x, y_noisy, loss=LOSS, optimizer=SGD(0.3), batch_size=8, epochs=6)
    return traj, x, y_noisy, xv, yv


@pytest.mark.parametrize("method", ["unrolled", "influence_function", "tracin", "self_influence", "loss"])
def test_every_method_returns_the_documented_table(method, run):
    traj, x, y, xv, yv = run
    table = inf.rank(traj, x, y, xv, yv, method=method)
    assert list(table.columns) == ["index", "rank", "score", "removal_effect", "label", "predicted_label", "train_loss"]
    assert len(table) == len(x) and sorted(table["index"]) == list(range(len(x)))
    assert np.all(np.diff(table["score"].to_numpy()) <= 0)  # most harmful first
    assert table.attrs["method"] == method and table.attrs["seconds"] > 0
    assert np.all(table.sort_values("index")["label"].to_numpy() == y)
    has_effect = method in ("unrolled", "influence_function", "tracin")
    assert table["removal_effect"].notna().all() == has_effect
    if has_effect:
        assert np.allclose(table["score"], -table["removal_effect"])


def test_unrolled_ranking_matches_unrolled_and_flags_flipped_labels(run):
    traj, x, y, xv, yv = run
    table = inf.rank(traj, x, y, xv, yv, method="unrolled")
    res = inf.unrolled(traj, x, y, xv, yv)
    assert np.allclose(table.sort_values("index")["removal_effect"], res.removal_effect)
    assert table.attrs["val_loss"] == pytest.approx(res.val_loss)
    # The four flipped labels are among the most harmful by loss (a weak, checkable property).
    assert set(range(4)) <= set(inf.rank(traj, x, y, method="loss")["index"][:8])


def test_influence_function_solvers_agree_and_tracin_correlates_with_unrolled(run):
    traj, x, y, xv, yv = run
    effect = {}
    for name, solver in {"exact": Exact(), "cg": ConjugateGradient(), "lissa": LiSSA(depth=600, batch_size=40)}.items():
        table = inf.rank(traj, x, y, xv, yv, method="influence_function", solver=solver, damping=0.5)
        effect[name] = table.sort_values("index")["removal_effect"].to_numpy()
        assert table.attrs["damping"] == 0.5 and table.attrs["solver"] == name
    assert np.allclose(effect["cg"], effect["exact"], rtol=1e-4, atol=1e-6 * np.abs(effect["exact"]).max())
    assert stats.pearsonr(effect["lissa"], effect["exact"])[0] > 0.95
    auto = inf.rank(traj, x, y, xv, yv, method="influence_function")
    assert auto.attrs["damping"] > 0
    unrolled = inf.rank(traj, x, y, xv, yv).sort_values("index")["removal_effect"].to_numpy()
    tracin = inf.rank(traj, x, y, xv, yv, method="tracin").sort_values("index")["removal_effect"].to_numpy()
    assert stats.pearsonr(unrolled, tracin)[0] > 0.5


def test_auto_damping_makes_the_damped_hessian_positive_definite(run):
    traj, x, y, _, _ = run
    from influence.rankers._samples import SampleOps
    from influence.rankers.inverse_hvp import auto_damping, extreme_eigenvalues

    ops = SampleOps(traj, x, y)
    w = ops.weights(traj.final_weights)
    values = np.linalg.eigvalsh(ops.dense_hessian(w))
    low, high = extreme_eigenvalues(ops, w)
    assert high == pytest.approx(values[-1], rel=1e-6)
    assert low == pytest.approx(values[0], rel=1e-3, abs=1e-6)
    assert values[0] + auto_damping(low, high) > 0


def test_tracin_with_one_checkpoint_per_step_equals_an_explicit_loop_over_visits(run):
    import tensorflow as tf

    from influence.autodiff import gradient

    traj, x, y, xv, yv = run
    table = inf.rank(traj, x, y, xv, yv, method="tracin", checkpoint_every=1)
    assert table.attrs["checkpoints"] == traj.steps
    fn = inf.ModelFunction(traj.model)
    expected = np.zeros(len(x))
    for t, batch in enumerate(traj.batches):
        w = [tf.constant(h[t]) for h in traj.weights_history]
        grad_val = gradient(lambda ww: traj.loss.mean(tf.constant(yv), fn(ww, tf.constant(xv))), w)
        for i in (i for i in batch if i < 6):  # six samples keep the explicit loop cheap
            g_i = gradient(lambda ww, i=i: traj.loss.mean(tf.constant(y[i : i + 1]), fn(ww, tf.constant(x[i : i + 1]))), w)
            dot = sum(float(tf.reduce_sum(a * b)) for a, b in zip(g_i, grad_val))
            expected[i] += traj.learning_rates[t] / len(batch) * dot
    got = table.sort_values("index")["removal_effect"].to_numpy()[:6]
    assert np.allclose(got, expected[:6], rtol=1e-9, atol=1e-14)


def test_group_effect_is_the_sum_of_members_and_is_verified_by_retraining(run):
    traj, x, y, xv, yv = run
    table = inf.rank(traj, x, y, xv, yv)
    groups = [[0, 1], [5, 6, 7]]
    predicted = inf.predicted_group_effect(table, groups)
    effect = table.sort_values("index")["removal_effect"].to_numpy()
    assert np.allclose(predicted, [effect[[0, 1]].sum(), effect[[5, 6, 7]].sum()])
    actual = inf.actual_removal_effect(traj, x, y, xv, yv, groups, progress=False)
    assert np.all(np.sign(actual) == np.sign(predicted))
    with pytest.raises(ValueError, match="'table_or_effect' parameter of predicted_group_effect must be a table with removal effects"):
        inf.predicted_group_effect(inf.rank(traj, x, y, method="loss"), groups)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "shapley"}, "'method' parameter of rank must be one of 'unrolled', 'influence_function'"),
        ({"x_val": None}, "'x_val' parameter of rank must be validation data for method 'unrolled'"),
        ({"damping": -1}, "'damping' parameter of rank must be 'auto' or a non-negative number"),
        ({"y_val": np.zeros((20, 2), int)}, r"'y_val' parameter of rank must be samples of shape \(\) \(the shape of y_train's"),
        ({"method": "influence_function", "solver": "svd"}, "'solver' parameter of rank must be 'exact', 'cg', 'lissa'"),
        ({"method": "tracin", "checkpoint_every": 0}, "'checkpoint_every' parameter of rank must be a positive int or None"),
        ({"method": "influence_function", "solver": Exact(max_parameters=10)}, "'solver' parameter of rank must be 'cg' or 'lissa' for models over 10"),
    ],
)
def test_rank_rejects_bad_input(kwargs, match, run):
    traj, x, y, xv, yv = run
    args = {"x_val": xv, "y_val": yv, **kwargs}
    with pytest.raises(ValueError, match=match):
        inf.rank(traj, x, y, **args)


def test_rank_needs_no_validation_data_for_self_influence_and_loss(run):
    traj, x, y, _, _ = run
    table = inf.rank(traj, x, y, method="self_influence")
    assert isinstance(table, pd.DataFrame) and np.isnan(table.attrs["val_loss"])

"""greedy_removal: rounds of removal, retraining and re-differentiation."""

import numpy as np
import pytest
from conftest import mlp

import influence as inf
from influence.optimizers import SGD

LOSS = "sparse_categorical_crossentropy"


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8)
    y[:4] = (y[:4] + 1) % 3  # a few flipped labels
    xv = rng.normal(size=(30, 4))
    yv = (xv[:, 0] + xv[:, 1] > 0).astype(int) + (xv[:, 2] > 0.8)
    return _fit(x, y), x, y, xv, yv


def _fit(x, y, **kwargs):
    return inf.fit(
        mlp(4, 3, out_activation="softmax"), x, y, loss=LOSS, optimizer=SGD(0.5), batch_size=8, epochs=6, **kwargs
    )


def test_one_round_is_the_one_shot_top_k_and_its_loss_is_verified(run):
    traj, x, y, xv, yv = run
    table = inf.greedy_removal(traj, x, y, xv, yv, 5, per_round=5)
    ranking = inf.rank(traj, x, y, xv, yv, method="unrolled")
    assert list(table["index"]) == list(ranking["index"][:5])
    assert (table["round"] == 0).all()
    c = np.ones(len(x))
    c[table["index"]] = 0.0
    expected = inf.validation_loss(traj, inf.retrain(traj, x, y, sample_weight=c), xv, yv)
    assert table["val_loss_after_round"].iloc[0] == pytest.approx(expected, rel=1e-12)
    assert table.attrs["val_loss_before"] == pytest.approx(
        inf.validation_loss(traj, traj.final_weights, xv, yv), rel=1e-10
    )
    assert table["predicted_round_effect"].iloc[0] == pytest.approx(table["predicted_effect"].sum(), rel=1e-12)


def test_later_rounds_differentiate_the_run_without_earlier_removals(run):
    traj, x, y, xv, yv = run
    table = inf.greedy_removal(traj, x, y, xv, yv, 4, per_round=2)
    assert list(table["round"]) == [0, 0, 1, 1]
    assert table["index"].is_unique
    first = list(table["index"][:2])
    # Round 1 = the top 2 of the run retrained with the first two samples' weight 0, excluding them.
    c = np.ones(len(x))
    c[first] = 0.0
    without = _fit(x, y, sample_weight=c)
    effect = inf.unrolled(without, x, y, xv, yv).removal_effect
    effect[first] = np.inf
    assert list(table["index"][2:]) == list(np.argsort(effect)[:2])
    np.testing.assert_allclose(table["predicted_effect"][2:], np.sort(effect)[:2], rtol=1e-9)


def test_bad_arguments_are_named(run):
    traj, x, y, xv, yv = run
    with pytest.raises(ValueError, match="The 'k' parameter of greedy_removal must be fewer than the 40 training"):
        inf.greedy_removal(traj, x, y, xv, yv, 40)
    c = np.ones(len(x))
    c[:4] = 0.0  # already out of the run: 36 samples can be removed
    with pytest.raises(ValueError, match="must be fewer than the 36 training samples in the run .sample weight > 0."):
        inf.greedy_removal(_fit(x, y, sample_weight=c), x, y, xv, yv, 36)
    with pytest.raises(ValueError, match="The 'per_round' parameter of greedy_removal must be a positive int"):
        inf.greedy_removal(traj, x, y, xv, yv, 3, per_round=0)

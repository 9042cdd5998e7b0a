"""S6 — ranking harmful training samples, and verifying the ranking by retraining.

Digits (scikit-learn's embedded 8×8 images, /16), 500 training and 200 validation
samples, 10 % of the training labels flipped to another class (fixed seed). An MLP
64-32-10 is trained with ``inf.fit`` (recorded SGD steps), then:

- ``inf.rank`` with ``method="unrolled"`` (predicted change of validation loss if a sample
  is removed, differentiated through every recorded step), ``"margin"`` (area under the
  margin over the run; the recommended detector of mislabeled samples) and ``"loss"``:
  the top 10 of each, whether each label was flipped, and found@10% (the share of the
  flipped labels among the 10 % highest-ranked samples).
- ``inf.actual_removal_effect`` retrains the recorded run without each of the 10 most
  harmful samples by ``unrolled``: predicted vs actual change of validation loss (the
  top 5 printed; signs, correlation and sum checked).
- ``inf.predicted_group_effect`` of removing the top 10 together vs the actual effect
  of that group removed by retraining. The first-order group effect is the sum of the
  members' effects; the real removals interact (here the group's actual effect is far
  smaller than the sum of its members' actual effects), so only the sign is asserted.
- ``inf.learn_sample_weights`` learns all 500 training weights c ∈ [0, 1] at once by
  descending the validation loss through the run (30 outer Adam steps, each a retraining
  and an unrolled pass): the flipped labels end with low weights, and the run retrained
  with the learned weights has a lower validation loss.

The command line does the same with an HTML report (image grid, scores, predicted vs
actual plot): ``influence demo`` writes ``reports/demo/index.html`` on the same kind of setting
(1000 training / 400 validation samples, 8 epochs of 50),
and ``influence rank --model model.keras --data data.npz --method unrolled,margin,loss
--verify 15 --out reports/mine`` on your own model and data.

Run: ``python examples/s6_ranking.py`` (about 10 s on 2 CPUs).
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

import influence as inf

N_TRAIN, N_VAL, NOISE = 500, 200, 0.10


def noisy_digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, val = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_VAL]
    x_train, y_train = x[train], y[train].copy()
    flipped = np.zeros(N_TRAIN, bool)
    flipped[rng.choice(N_TRAIN, int(NOISE * N_TRAIN), replace=False)] = True
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, flipped.sum())) % 10  # always another class
    return x_train, y_train, x[val], y[val], flipped


def main() -> None:
    keras.utils.set_random_seed(0)
    x_train, y_train, x_val, y_val, flipped = noisy_digits()
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="tanh"),  # tanh: smooth, so first-order removal estimates hold
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    traj = inf.fit(model, x_train, y_train, optimizer=inf.optimizers.SGD(0.5), batch_size=50, epochs=8, seed=0)
    print(f"digits {N_TRAIN} train ({flipped.sum()} labels flipped), {N_VAL} val, MLP 64-32-10, {traj.steps} steps")

    budget = int(0.1 * N_TRAIN)
    tables, found = {}, {}
    for method in ("unrolled", "margin", "loss"):
        table = inf.rank(traj, x_train, y_train, x_val, y_val, method=method, progress=False)
        tables[method] = table
        top = table["index"].to_numpy()
        found[method] = flipped[top[:budget]].sum() / flipped.sum()
        marks = " ".join(f"{i}{'*' if flipped[i] else ''}" for i in top[:10])
        print(f"  {method:8s} top 10 (* = flipped): {marks:52s} found@10% {found[method]:.0%}")

    # Ground truth for the 10 most harmful by `unrolled`: retrain without each of them (one run each).
    unrolled = tables["unrolled"]
    top10 = unrolled["index"].to_numpy()[:10]
    predicted = unrolled["removal_effect"].to_numpy()[:10]
    actual = inf.actual_removal_effect(traj, x_train, y_train, x_val, y_val, top10.tolist(), progress=False)
    pearson = np.corrcoef(predicted, actual)[0, 1]
    print(f"  removal effect on val loss, predicted vs actual by retraining (top 10: Pearson {pearson:.2f}):")
    for i, p, a in zip(top10[:5], predicted[:5], actual[:5]):
        print(f"    sample {i:3d}{'*' if flipped[i] else ' '}  predicted {p:+.5f}  actual {a:+.5f}")

    # Removing the 10 together: the first-order group prediction is the sum of the members' effects.
    group_predicted = inf.predicted_group_effect(unrolled, [top10.tolist()])[0]
    group_actual = inf.actual_removal_effect(traj, x_train, y_train, x_val, y_val, [top10.tolist()], progress=False)[0]
    print(f"  top 10 removed together: predicted {group_predicted:+.4f}, actual {group_actual:+.4f}")
    # The sum of the members' *actual* single effects shows the gap is interaction between removals,
    # which no sum of first-order effects sees (inf.greedy_removal re-differentiates between removals).
    print(f"  sum of the 10 actual single removals {actual.sum():+.4f}")

    # All weights learned together: each outer step retrains with the current weights, so the
    # interactions a sum of single removals misses are followed as the run responds.
    learned = inf.learn_sample_weights(traj, x_train, y_train, x_val, y_val, progress=False)
    c = learned.sample_weight
    print(
        f"  learned sample weights ({len(learned.history) - 1} outer Adam steps): "
        f"val loss {learned.val_loss[0]:.3f} -> {learned.val_loss[-1]:.3f}; "
        f"mean weight of flipped labels {c[flipped].mean():.2f}, of the others {c[~flipped].mean():.2f}"
    )

    # Tolerances are loose on purpose: first-order estimates on an SGD 0.5 run (see README).
    assert found["margin"] >= 0.6, f"margin found only {found['margin']:.0%} of the flipped labels in its top 10%"
    assert found["unrolled"] > NOISE, f"unrolled found@10% {found['unrolled']:.0%} is no better than chance"
    assert (predicted[:5] < 0).all(), "the top 5 by unrolled should all be predicted harmful (negative effect)"
    agree = int((np.sign(predicted[:5]) == np.sign(actual[:5])).sum())
    assert agree >= 4, f"predicted and actual removal effects agree in sign for only {agree} of the top 5"
    assert pearson > 0.5, "predicted and actual effects of the top 10 do not correlate"
    assert 0.5 < predicted.sum() / actual.sum() < 2, "single-removal predictions off by more than a factor 2 in sum"
    assert group_predicted < 0 and group_actual < 0, "the top 10 removed should lower the val loss"
    assert learned.val_loss[-1] < 0.8 * learned.val_loss[0], "learned weights did not lower the val loss by 20%"
    assert c[flipped].mean() < 0.5 < c[~flipped].mean(), "learned weights do not single out the flipped labels"


if __name__ == "__main__":
    main()

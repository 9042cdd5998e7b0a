"""S5 — optimizers and input-space optimisation on a small digits MLP.

Shows, with the public ``influence`` API only:

(a) Test-time attack: ``inf.adversarial_examples`` raises a frozen model's loss on 50
    validation digits by optimising the pixels (L∞ budget 0.1, pixel box [0, 1]) with
    SGD, SGD + momentum, RMSprop and Adam as the outer optimizer, and prints how many
    outer steps each needs to get within 5 % of the best loss reached.
(b) Training-set attack and repair through training: ``inf.optimize_training_inputs``
    differentiates the validation loss through the whole recorded run (24 SGD steps) and
    moves the pixels of 8 training samples to raise it (``goal="poison"``, 8 clean
    samples) or lower it (``goal="repair"``, 8 samples whose labels were flipped), with
    the four ``inf.optimizers`` as outer optimizers. It prints the validation loss after
    each outer step (convergence curves as numbers) and checks the final poisoned and
    repaired inputs independently: ``traj.replayed_on(x_new, y)`` retrains the same schedule
    on them and ``inf.validation_loss`` evaluates that run.

Plain SGD needs a large outer step size (hypergradients are tiny; see the docstring of
``inf.optimize_training_inputs``); Adam and RMSprop move each pixel by about their rate.

Run: ``python examples/s5_optimizers.py`` (about 10 s on 2 CPUs).
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

import influence as inf

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits(n_train: int = 300, n_val: int = 150):
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")  # pixels in [0, 1]: the default box of the input optimisers
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:n_train], order[n_train : n_train + n_val]
    return x[train], y[train], x[val], y[val]


def curve(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def attack(model, x_val, y_val) -> dict[str, inf.InputOptimization]:
    # The attack ascends the *mean* loss over the 50 inputs, so each pixel's gradient carries a
    # factor 1/50: plain SGD needs a step size that makes up for it (Adam / RMSprop do not care).
    optimizers = {
        "sgd": inf.optimizers.SGD(30.0),
        "momentum": inf.optimizers.SGD(10.0, momentum=0.9),
        "rmsprop": inf.optimizers.RMSprop(0.05),
        "adam": inf.optimizers.Adam(0.05),
    }
    print("(a) adversarial examples, 50 val digits, L∞ budget 0.1: loss per outer step")
    results = {}
    for name, opt in optimizers.items():
        out = inf.adversarial_examples(
            model, LOSS, x_val, y_val, outer_optimizer=opt, steps=8, budget=0.1, progress=False
        )
        results[name] = out
    best = max(out.val_loss.max() for out in results.values())
    for name, out in results.items():
        reached = int(np.argmax(out.val_loss >= 0.95 * best))  # first step within 5 % of the best
        print(
            f"  {name:9s} {curve(out.val_loss)}  error {out.val_error[0]:.0%} -> {out.val_error[-1]:.0%},"
            f" steps to within 5% of best: {reached}"
        )
    return results


def through_training(traj, x_train, y_train, x_val, y_val, indices, goal):
    # Through training, each outer step = one retraining + one unrolled reverse pass.
    optimizers = {
        "sgd": inf.optimizers.SGD(1000.0),
        "momentum": inf.optimizers.SGD(300.0, momentum=0.9),
        "rmsprop": inf.optimizers.RMSprop(0.1),
        "adam": inf.optimizers.Adam(0.1),
    }
    results = {}
    for name, opt in optimizers.items():
        out = inf.optimize_training_inputs(
            traj, x_train, y_train, x_val, y_val, indices, goal=goal, outer_optimizer=opt, steps=6, progress=False
        )
        # Independent check: retrain the recorded schedule on the new inputs and evaluate it.
        run = traj.replayed_on(out.x, y_train)
        replayed = inf.validation_loss(run, run.final_weights, x_val, y_val)
        print(f"  {name:9s} {curve(out.val_loss)}  replayed {replayed:.3f}")
        results[name] = (out, replayed)
    return results


def main() -> None:
    keras.utils.set_random_seed(0)
    x_train, y_train, x_val, y_val = digits()
    rng = np.random.default_rng(1)
    repair_idx, poison_idx = np.arange(0, 8), np.arange(8, 16)
    y_train = y_train.copy()
    y_train[repair_idx] = (y_train[repair_idx] + rng.integers(1, 10, 8)) % 10  # wrong labels to repair

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(10)])
    traj = inf.fit(
        model, x_train, y_train, loss=LOSS, optimizer=inf.optimizers.SGD(0.5), batch_size=50, epochs=4, seed=0
    )
    clean = inf.validation_loss(traj, traj.final_weights, x_val, y_val)
    print(f"digits MLP 64-32-10: {len(x_train)} train, {len(x_val)} val, {traj.steps} SGD steps, val loss {clean:.3f}")

    adversarial = attack(model, x_val[:50], y_val[:50])
    print("(b) poison 8 clean training inputs through training: val loss per outer step")
    poisoned = through_training(traj, x_train, y_train, x_val, y_val, poison_idx, "poison")
    print("    repair 8 mislabeled training inputs through training: val loss per outer step")
    repaired = through_training(traj, x_train, y_train, x_val, y_val, repair_idx, "repair")

    for name, out in adversarial.items():
        assert out.val_loss[-1] > 1.5 * out.val_loss[0], f"{name}: the attack did not raise the loss by 50%"
        assert out.val_error[-1] > out.val_error[0] + 0.2, f"{name}: the attack did not add 20 points of error"
    for name, (out, replayed) in poisoned.items():
        # The replay is the same computation as the optimiser's last retraining (float32: 1e-5).
        assert abs(replayed - out.val_loss[-1]) < 1e-5 * out.val_loss[-1], f"{name}: replay disagrees"
        assert replayed > clean + 0.02, f"{name}: poisoned inputs did not raise the val loss ({clean} -> {replayed})"
        assert out.predicted_change[0] > 0, f"{name}: first poison step predicted to lower the loss"
    for name, (out, replayed) in repaired.items():
        assert abs(replayed - out.val_loss[-1]) < 1e-5 * out.val_loss[-1], f"{name}: replay disagrees"
        assert replayed < clean - 0.02, f"{name}: repaired inputs did not lower the val loss ({clean} -> {replayed})"


if __name__ == "__main__":
    main()

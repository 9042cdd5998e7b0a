"""The pure optimizers take the steps Keras 3's optimizers take."""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam, RMSprop

CASES = {
    "sgd": (SGD(0.1), keras.optimizers.SGD(0.1)),
    "nesterov": (SGD(0.1, momentum=0.8, nesterov=True), keras.optimizers.SGD(0.1, momentum=0.8, nesterov=True)),
    "rmsprop": (RMSprop(0.01), keras.optimizers.RMSprop(0.01)),
    "rmsprop_momentum_centered": (
        RMSprop(0.01, momentum=0.5, centered=True, epsilon=1e-3),
        keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True, epsilon=1e-3),
    ),
    "adam": (Adam(0.02), keras.optimizers.Adam(0.02)),
    "adamw": (Adam(0.02, weight_decay=0.01), keras.optimizers.AdamW(0.02, weight_decay=0.01)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_steps_match_keras(name):
    ours, theirs = CASES[name]
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 4))
    # Small and large gradients: RMSprop's ε placement shows at |g| ≈ 1e-4.
    grads = [rng.normal(size=(3, 4)) * scale for scale in (1.0, 1e-4, 0.3, 2.0, 1e-4)]
    variable = keras.Variable(start, dtype="float64")
    weights = [tf.constant(start)]
    state = ours.init(weights)
    for step, g in enumerate(grads):
        theirs.apply_gradients([(tf.constant(g), variable)])
        weights, state = ours.update(
            weights, [tf.constant(g)], state, tf.constant(ours.learning_rate, tf.float64), step
        )
        # Keras rounds some hyperparameters to float32 (Adam's bias correction casts β₂ = 0.999 through
        # float32: 1 − β₂ off by 1.3e-5 relative, the step by half that): agreement to that rounding.
        # Over 5 steps of 0.02 that is ≤ 1e-6 absolute; RMSprop and SGD agree to 1e-9.
        atol = 1e-6 if name.startswith("adam") else 1e-9
        np.testing.assert_allclose(weights[0].numpy(), variable.numpy(), rtol=1e-6, atol=atol)


def test_a_warm_up_from_zero_is_a_schedule_and_hypergradients_through_it_match_retraining():
    """Rate 0 steps (warm-up from zero, cosine decay to zero) move no weight but still update Adam's moments."""
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(12, 5)), rng.integers(0, 3, 12), rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    warm_up = Adam(lambda t: 0.02 * min(t, 3) / 3)
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, loss="sparse_categorical_crossentropy",
                   optimizer=warm_up, batch_size=4, epochs=2)  # fmt: skip
    assert traj.learning_rates[0] == 0 and traj.learning_rates[3] == 0.02
    for wrt in ("inputs", "sample_weights"):
        chk = inf.check_unrolled(traj, x, y, xv, yv, 2, wrt=wrt)
        assert chk.ok and chk.max_rel_error <= 1e-5, chk


@pytest.mark.parametrize(
    "schedule, message",
    [
        (lambda t: 0.1 if t < 4 else float("nan"), "Got rate nan at step 4 (and 1 more steps) instead."),
        (lambda t: 0.1 - 0.03 * t, "Got rate -0.02 at step 4 (and 1 more steps) instead."),
    ],
)
def test_a_schedule_that_turns_negative_or_nan_names_its_first_bad_step(schedule, message):
    with pytest.raises(ValueError, match="must be a schedule of finite rates ≥ 0 for steps 0 … 5") as info:
        SGD(schedule).learning_rates(6)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "schedule, message",
    [
        # Keras 3's zero-argument callables read the optimizer's own step: a raw TypeError before
        (lambda: 0.01, "must be a schedule taking the step index (step -> rate), or a number. Got a callable of"),
        (lambda t: None, "must be a schedule of single numbers (step -> rate). Got None at step 0"),  # raw TypeError
        (lambda t: "0.1", "Got '0.1' at step 0"),  # was accepted as 0.1
        (lambda t: True, "Got True at step 0"),  # was accepted as rate 1
    ],
)
def test_a_schedule_must_take_the_step_and_return_numbers(schedule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SGD(schedule).learning_rates(3)


@pytest.mark.parametrize(
    "optimizer, decay_time, tolerance",
    [
        (SGD(0.3, weight_decay=0.1), 0, 1e-12),
        (SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.1), 0, 1e-12),
        # RMSprop's steps are sign-like: only a decaying rate brings it to rest.
        (RMSprop(0.01, weight_decay=0.1), 200, 1e-9),
        (RMSprop(0.01, momentum=0.5, centered=True, weight_decay=0.1), 200, 1e-3),
        # Adam at rate 1e-3 is still moving 0.3 % of a step after 20 000 steps: that sets the tolerance.
        (Adam(0.001, weight_decay=0.1), 0, 1e-2),
        (Adam(0.001, weight_decay=0.1, epsilon=1e-3), 0, 1e-2),
    ],
    ids=["sgd", "nesterov", "rmsprop", "rmsprop_centered_momentum", "adam", "adam_eps"],
)
def test_decay_curvature_balances_the_gradient_where_a_run_comes_to_rest(optimizer, decay_time, tolerance):
    """Run each optimizer on a quadratic until it stops: there g + D ⊙ w = 0 for the D it reports."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    a = tf.constant(a @ a.T / 6 + 0.1 * np.eye(6))
    target = tf.constant(rng.normal(size=6) * 3)
    steps = 20_000

    @tf.function
    def run():
        w = [tf.zeros(6, tf.float64)]
        state = optimizer.init(w)
        for t in tf.range(steps):
            rate = tf.constant(optimizer.learning_rate, tf.float64)
            if decay_time:
                rate = rate / (1 + tf.cast(t, tf.float64) / decay_time)
            w, state = optimizer.update(w, [tf.linalg.matvec(a, w[0] - target)], state, rate, t)
        return w, state

    w, state = run()
    gradient = tf.linalg.matvec(a, w[0] - target).numpy()
    (decay,) = optimizer.decay_curvature(w, state, steps)
    residual = np.linalg.norm(gradient + decay.numpy() * w[0].numpy()) / np.linalg.norm(gradient)
    assert residual < tolerance
    assert SGD(0.1).decay_curvature(w, [], steps) is None  # no weight decay, no curvature


def test_a_diverged_but_finite_run_is_warned_about():
    """Full-batch SGD(1.5) on a linear regression: the MSE went 2.3 → 1e13 in 15 steps without a word,
    and unrolled then predicted removals taking the MSE to −1e15."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 1))
    with pytest.warns(RuntimeWarning, match=r"fit: the training loss grew from .* to 1.054e\+13 after .* diverged"):
        inf.fit(mlp(3, 1, hidden=()), x, y, loss="mse", optimizer=SGD(1.5), batch_size=20, epochs=15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converging run of the same model is not warned about
        inf.fit(mlp(3, 1, hidden=()), x, y, loss="mse", optimizer=SGD(0.1), batch_size=20, epochs=15)


@pytest.mark.parametrize("optimizer", [Adam(0.01, epsilon=1e-40), RMSprop(0.01, epsilon=1e-46)])
def test_an_epsilon_the_float_type_flushes_to_zero_is_refused(optimizer):
    """Adam(epsilon=1e-40) on a float32 model with a dead input feature ended in NaN ("lower the
    learning rate"); the same ε trains in float64."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    x[:, 0] = 0.0  # its weights never get a gradient: m = v = 0
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"an epsilon ≥ 1.18e-38, the smallest normal float32"):
        inf.fit(model, x.astype("float32"), y, from_logits=True, optimizer=optimizer, batch_size=10)
    traj = inf.fit(mlp(3, 3), x, y, from_logits=True, optimizer=optimizer, batch_size=10)
    assert all(np.isfinite(w).all() for w in traj.final_weights)

"""check_gradient's verdicts where finite differences cannot judge a gradient: unresolved derivatives,
steps beyond the scale of the data, and quotients that scatter at the step used."""

import keras
import numpy as np
import pytest

import influence as inf

X0 = np.array([0.3, -0.2, 0.5])


@pytest.mark.parametrize("factor", [1.0, 50.0, -1.0, 0.0])
def test_a_derivative_below_the_round_off_of_f_is_inconclusive_not_passed(factor):
    """f ≈ 1 with derivatives of 1e-13: the right, a 50× too large, the negated and a zero gradient all 'passed'."""
    chk = inf.check_gradient(lambda z: 1.0 + 1e-13 * np.sum(np.sin(z)), X0, factor * 1e-13 * np.cos(X0))
    assert not chk.ok and chk.inconclusive
    assert "cannot resolve the derivatives" in chk.explanation and "below its round-off" in chk.explanation
    assert "larger h" in chk.explanation and "float64" in chk.explanation
    assert "f(x) = 1" in chk.explanation and "6.66e-13" in chk.explanation  # the numbers: f and its round-off
    assert "INCONCLUSIVE" in str(chk) and "likely wrong" not in chk.explanation


def test_a_large_constant_in_f_makes_a_zero_gradient_inconclusive():
    chk = inf.check_gradient(lambda z: 1e13 + np.sum(np.sin(z)), X0, np.zeros(3))
    assert not chk.ok and chk.inconclusive and "f(x) = 1e+13" in chk.explanation


def test_resolved_checks_still_pass_next_to_a_large_value_and_at_exactly_zero_derivatives():
    # A validation-loss-like f: |f| = 230, derivatives of moderate size; coordinate 2 does not enter f at all.
    def f(z):
        return 230.3 + 1e-2 * np.sum(np.sin(z[:2]))

    exact = np.r_[1e-2 * np.cos(X0[:2]), 0.0]
    chk = inf.check_gradient(f, X0, exact, tile=np.s_[0:3])
    assert chk.ok and not chk.inconclusive, chk
    # The same f refutes a wrong gradient: resolved derivatives are judged, not called inconclusive.
    wrong = inf.check_gradient(f, X0, exact * 2, tile=np.s_[0:3])
    assert not wrong.ok and not wrong.inconclusive and "likely wrong" in wrong.explanation


def test_default_step_follows_the_data_below_unit_scale_only():
    from influence.checks import default_step

    assert default_step(np.array([0.0, 0.5, -1.0])) == 1e-3  # pixels in [0, 1], standardized data
    assert default_step(np.array([3.0, -40.0])) == 1e-3
    assert default_step(np.array([2e-6, -1e-6])) == pytest.approx(2e-9)
    assert default_step(np.zeros(4)) == 1e-3  # no scale to follow


def _tiny_input_case():
    """A smooth tanh classifier of inputs of scale 1e-6, normalized inside the model."""
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=(40, 4)) * 1e-6).astype("float32"), rng.integers(0, 3, size=40)
    keras.utils.set_random_seed(0)
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((4,)), norm, keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y


def test_inputs_of_scale_1e6_are_checked_with_a_step_of_their_scale_and_no_kink_is_claimed():
    model, loss, x, y = _tiny_input_case()
    # h = 1e-3 failed a right gradient (error 0.996) and blamed a ReLU kink in this tanh model.
    chk = inf.check_input_gradient(model, loss, x[:8], y[:8])
    assert chk.ok and chk.max_rel_error < 1e-9, chk
    assert np.all(chk.steps < 1e-8)  # 1e-3 of the largest |x|, not 1e-3
    coarse = inf.check_input_gradient(model, loss, x[:8], y[:8], h=1e-3)  # an explicit h is kept
    assert not coarse.ok and not coarse.at_kink
    assert "not smaller than the scale of x" in coarse.explanation and "ReLU kink" not in coarse.explanation


def test_check_unrolled_scales_its_step_to_tiny_training_inputs():
    model, _, x, y = _tiny_input_case()
    traj = inf.fit(model, x[:30], y[:30], loss="sparse_categorical_crossentropy", from_logits=True,
                   optimizer=inf.optimizers.SGD(0.5), batch_size=10, epochs=1)  # fmt: skip
    chk = inf.check_unrolled(traj, x[:30], y[:30], x[30:], y[30:], index=0, wrt="inputs", directions=1)
    assert chk.ok and not chk.at_kink, chk


def test_scattered_quotients_are_called_noise_even_next_to_a_huge_gradient():
    """A chaotic run's dE/dc was 5e25: quotients 3202, 5638, −64926 counted as consistent, relative to 1e-8·‖grad‖,
    and the gradient was blamed. Here f wiggles (amplitude 1e-6, period 6e-7) below every step tried."""

    def f(z):
        return np.sum(np.sin(z)) + 1e-6 * np.sum(np.sin(1e7 * z))

    chk = inf.check_gradient(f, X0, np.full(3, 5e25))
    assert not chk.ok and "noisy or unstable at this scale" in chk.explanation
    assert "likely wrong" not in chk.explanation and not chk.at_kink and not chk.inconclusive


def test_a_pass_near_the_round_off_of_f_states_its_coarser_resolution():
    """f ≈ 1 with derivatives of 1e-11: resolved (above 10× round-off), so a 5 % wrong gradient passes: say so."""

    def f(z):
        return 1.0 + 1e-11 * np.sum(np.sin(z))

    wrong = inf.check_gradient(f, X0, 1.05e-11 * np.cos(X0))
    assert wrong.ok and not wrong.inconclusive  # the rules pass it: the error is below f's round-off
    assert wrong.resolution > 0.05 > 100 * wrong.rtol
    assert "passed only to a relative accuracy of 5.3e-02" in wrong.explanation and "larger h" in wrong.explanation
    # The same gradient against a derivative of unit scale: full resolution, no note, and the error is caught.
    sharp = inf.check_gradient(lambda z: 1.0 + np.sum(np.sin(z)), X0, np.cos(X0))
    assert sharp.ok and sharp.resolution == sharp.rtol and sharp.explanation == ""
    assert not inf.check_gradient(lambda z: 1.0 + np.sum(np.sin(z)), X0, 1.05 * np.cos(X0)).ok


def test_a_scalar_point_is_checked_and_its_nan_refused():
    """check_unrolled checks one label of (n,) regression targets at a 0-d point: the data checks
    read arrays in blocks of rows, and a 0-d array has none."""
    check = inf.check_gradient(lambda v: float(np.sum(v) ** 2), np.float64(1.5), np.float64(3.0))
    assert check.ok, check
    with pytest.raises(ValueError, match="finite"):
        inf.check_gradient(lambda v: float(np.sum(v)), np.float64(np.nan), np.float64(1.0))


def test_a_bend_below_the_smallest_step_is_told_apart_from_a_kink_by_a_smaller_h():
    """A smooth f that bends within 1e-6 (a Normalization of a constant pixel divides by a std
    clamped to 1e-7) looks kinked at every default step: the note names a smaller h as the
    remedy next to jitter, and a smaller h passes."""
    width, corner = 1e-6, 0.3

    def f(v):
        return float(np.logaddexp(0.0, (v[0] - corner) / width) * width + 0.1 * v[1])

    x = np.array([corner + 2e-7, 0.5])
    grad = np.array([1 / (1 + np.exp(-0.2)), 0.1])
    check = inf.check_gradient(f, x, grad, directions=2)
    assert not check.ok and check.at_kink, check
    assert "re-check with a smaller h" in check.explanation
    assert inf.check_gradient(f, x, grad, directions=2, h=1e-10).ok


def test_a_float32_value_returned_as_a_python_float_is_told_as_float32_round_off():
    """S1's user returns float(loss) of a float32 model: the quotients are float32 quantised
    (exactly 0 along one direction), and the check blamed a kink or the gradient."""
    weights = np.random.default_rng(0).normal(size=(20, 8))

    def f(v):
        z = np.tanh(v.astype(np.float32) @ weights.astype(np.float32))
        return float(np.mean(z) ** 2 + np.float32(2.0))

    def grad(v):
        z = np.tanh(v @ weights)
        return 2 * np.mean(z) * (weights @ (1 - z**2)) / z.size

    x = np.random.default_rng(1).normal(size=20) * 0.1
    check = inf.check_gradient(f, x, grad(x))
    assert not check.ok and not check.at_kink
    assert "float32" in check.explanation and "kink" not in check.explanation
    assert "gradient itself is likely wrong" not in check.explanation


def test_a_step_that_leaves_the_domain_of_f_is_named():
    """f finite at x but NaN a step away: the error was NaN and the note recommended a larger step."""
    x = np.array([5e-4, 1.0])

    def f(v):
        with np.errstate(invalid="ignore"):
            return float(np.log(v[0]) + v[1] ** 2) if v[0] > 0 else float("nan")

    check = inf.check_gradient(f, x, np.array([1 / x[0], 2.0]), h=1e-3, refinements=0)
    assert not check.ok
    assert "NaN or Inf" in check.explanation and "smaller h" in check.explanation
    assert "larger" not in check.explanation

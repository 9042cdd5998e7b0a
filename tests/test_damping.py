"""Automatic damping of influence functions: the Lanczos spectrum estimate and the damping rule."""

import keras
import numpy as np
import pytest

import influence as inf
from influence.rankers._samples import SampleOps
from influence.rankers.inverse_hvp import auto_damping, extreme_eigenvalues

LOSS = "sparse_categorical_crossentropy"


def _softmax_regression(scale: float = 1.0):
    """A float64 softmax regression without bias, 15 weights: H is PSD with a 5-dimensional null space.

    ``scale`` runs the same run in other units: x → s·x, kernel → kernel/s, rate → rate/s².
    """
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    xv, yv = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,), dtype="float64"), keras.layers.Dense(3, use_bias=False, dtype="float64")]
    )
    model.set_weights([model.get_weights()[0] / scale])
    optimizer = inf.optimizers.SGD(0.5 / scale**2)
    traj = inf.fit(model, x * scale, y, loss=LOSS, from_logits=True, optimizer=optimizer, batch_size=60, epochs=50)
    return traj, (x * scale, y, xv * scale, yv)


def test_lanczos_stays_inside_the_spectrum_after_the_krylov_space_is_exhausted():
    """Past the Krylov space's end the tridiagonal matrix's Ritz values were (−0.68, 1.19) for a
    spectrum [0, 0.52]: cg's damping was 140× exact's, and the scores 77 % off."""
    traj, (x, y, xv, yv) = _softmax_regression()
    ops = SampleOps(traj, x, y, progress=False, samples=np.arange(len(x)))
    w = ops.weights(traj.final_weights)
    dense = np.linalg.eigvalsh(ops.dense_hessian(w))
    lowest, highest = extreme_eigenvalues(ops, w, steps=40)
    assert lowest >= dense[0] - 1e-12 and highest <= dense[-1] + 1e-12
    assert highest == pytest.approx(dense[-1], rel=1e-10)
    tables = {
        solver: inf.rank(traj, x, y, xv, yv, method="influence_function", solver=solver, progress=False)
        for solver in ("exact", "cg")
    }
    assert tables["cg"].attrs["damping"] == pytest.approx(tables["exact"].attrs["damping"], rel=1e-6)
    exact, cg = (tables[s].sort_values("index")["removal_effect"].to_numpy() for s in ("exact", "cg"))
    np.testing.assert_allclose(cg, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_automatic_damping_does_not_depend_on_the_features_units():
    """An absolute 1e-12 floor decided the damping for features of scale 1e-6 (82 % off)."""
    effects = {}
    for scale in (1.0, 1e-6):
        traj, data = _softmax_regression(scale)
        table = inf.rank(traj, *data, method="influence_function", solver="exact", progress=False)
        assert table.attrs["damping"] / scale**2 == pytest.approx(0.005233, rel=1e-3)
        effects[scale] = table.sort_values("index")["removal_effect"].to_numpy()
    np.testing.assert_allclose(effects[1e-6], effects[1.0], rtol=1e-6, atol=1e-9 * np.abs(effects[1.0]).max())


def test_damping_rule():
    assert auto_damping(0.0, 0.0) == 1e-12  # H = 0: any damping; the floor keeps H + λI invertible
    # condition number 100, however small H is
    assert auto_damping(0.0, 1e-14) == pytest.approx(1e-14 / 99, rel=1e-12, abs=0)
    assert auto_damping(-1.0, 5.0) == pytest.approx(1.1)  # the margin over a negative λ_min decides

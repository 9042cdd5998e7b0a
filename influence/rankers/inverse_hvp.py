"""Solvers for (H + λI) s = b with H the Hessian of the mean training loss.

Strategy objects (add a class to add a solver):
- :class:`Exact`: dense Hessian and an eigendecomposition, small models only.
- :class:`ConjugateGradient`: Hessian-vector products only; needs H + λI
  positive definite (raise λ for non-convex models).
- :class:`LiSSA` (Agarwal et al. 2017, as used by Koh & Liang 2017): the
  stochastic Neumann series h ← b + (I − (H + λI)/scale) h on mini-batches,
  result h / scale. ``scale=None`` picks it automatically from the largest
  eigenvalue (Lanczos) of H + λI and of a few mini-batch Hessians, whose spectra
  are wider than the full one's, so that the series converges.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from .. import _tree
from .._progress import progress_bar
from .._validation import describe, param_error
from ._samples import SampleOps

MAX_CONDITION = 100.0


def auto_damping(lowest: float, highest: float) -> float:
    """Damping that makes H + λI positive definite with a condition number ≤ 100.

    (λ_max + λ)/(λ_min + λ) ≤ 100 needs λ ≥ (λ_max − 100·λ_min)/99; non-convex nets have
    λ_min < 0, and λ ≥ 1.1·(−λ_min) keeps a margin where Lanczos' λ_min (a Ritz value, never
    below the true one) is not yet converged. (With λ_max ≤ 8.9·|λ_min| that margin decides,
    and the condition number is then 10·λ_max/|λ_min| + 11 ≤ 100.) The floor, 1e-12 of the
    spectrum's size, is relative: an absolute one decided the damping of features measured
    in small units (scale 1e-6: H's eigenvalues 1e-12 as large) and moved the scores by 82 %.
    """
    needed = (highest - MAX_CONDITION * lowest) / (MAX_CONDITION - 1.0)
    size = max(abs(lowest), abs(highest))
    return max(needed, 1.1 * max(0.0, -lowest), 1e-12 * size if size > 0 else 1e-12)


# Lanczos stops when the new direction's norm is below this fraction of the largest ‖Hq‖ seen:
# the Krylov space is then exhausted (up to H·v round-off).
LANCZOS_BREAKDOWN = 1e-10


def extreme_eigenvalues(
    ops: SampleOps, w: list[tf.Tensor], steps: int = 40, seed: int = 0, indices: np.ndarray | None = None
) -> tuple[float, float]:
    """(λ_min, λ_max) of H (of the samples ``indices``, default all) from a Lanczos run with full
    reorthogonalisation.

    Lanczos' Ritz values converge fastest at both ends of the spectrum, which is
    what damping needs; power iteration on H − μI converges far too slowly there.
    The Ritz values are those of QᵀHQ over the orthonormal basis Q built (Rayleigh–Ritz), not of
    the three-term tridiagonal matrix: once the Krylov space is exhausted (a low-rank H, a model
    with few weights), H·v round-off becomes the next direction and the tridiagonal matrix no
    longer equals QᵀHQ — it gave (−0.68, 1.19) for a convex H with spectrum [0, 0.52], and a
    damping 140× too large. QᵀHQ's eigenvalues always lie inside H's spectrum.
    Memory: 2·``steps`` vectors of |w| numbers.
    """
    size = _tree.size(w)
    steps = min(steps, size)
    rng = np.random.default_rng(seed)
    basis = np.zeros((steps, size))
    products = np.zeros((steps, size))  # H q_k
    q = rng.standard_normal(size)
    q /= np.linalg.norm(q)
    largest = 0.0
    built = 0
    for k in progress_bar(range(steps), progress=ops.progress, desc="damping (Lanczos)", unit="H·v", leave=False):
        basis[k] = q
        v = _tree.unflatten(tf.constant(q, ops.dtype), w)
        hq = _tree.flatten(ops.hvp(w, v, indices=indices)).numpy().astype(np.float64)
        products[k] = hq
        built = k + 1
        largest = max(largest, float(np.linalg.norm(hq)))
        for _ in range(2):  # twice is enough (Kahan–Parlett): one pass loses orthogonality after cancellation
            hq = hq - basis[:built].T @ (basis[:built] @ hq)
        beta = float(np.linalg.norm(hq))
        if beta <= LANCZOS_BREAKDOWN * largest or k == steps - 1:
            break
        q = hq / beta
    projected = basis[:built] @ products[:built].T
    ritz = np.linalg.eigvalsh((projected + projected.T) / 2)
    return float(ritz[0]), float(ritz[-1])


def _indefinite(lowest: float, damping: float) -> ValueError:
    return ValueError(param_error("damping", "rank", f"above {-lowest:.3g} (H has negative eigenvalues)", damping))


# Eigenvalues within this many machine epsilons of the largest |λ| are zero up to rounding (a singular
# but convex H, e.g. softmax regression's shift of all logits, gives −7e-17 next to λ_max ≈ 1 in float64).
ROUNDING_EPS = 1000


def _check_definite(lowest: float, highest: float, damping: float, dtype: tf.DType) -> float:
    """The rounding level of H's spectrum; raises where H + λI has a truly negative eigenvalue."""
    tolerance = ROUNDING_EPS * float(np.finfo(dtype.as_numpy_dtype).eps) * max(abs(lowest), abs(highest))
    if lowest + damping < -tolerance:
        raise _indefinite(lowest, damping)
    return tolerance


def damped_hvp(ops: SampleOps, w: list[tf.Tensor], v: list[tf.Tensor], damping: float) -> list[tf.Tensor]:
    """(H + damping·I)v, H the Hessian of the mean training loss at w."""
    return [h + damping * vi for h, vi in zip(ops.hvp(w, v), v)]


def relative_residual(ops: SampleOps, w: list[tf.Tensor], b: list[tf.Tensor], s: list[tf.Tensor], damping: float):
    """‖(H + λI)s − b‖/‖b‖ with one full-data Hessian-vector product: a check of any solver's answer."""
    size = float(tf.sqrt(_tree.dot(b, b)))
    if size == 0.0:
        return 0.0
    miss = [a - bi for a, bi in zip(damped_hvp(ops, w, s, damping), b)]
    return float(tf.sqrt(_tree.dot(miss, miss))) / size


class InverseHVP(ABC):
    """Solve (H + damping·I) s = b at weights w."""

    name: str = "solver"

    @abstractmethod
    def solve(self, ops: SampleOps, w: list[tf.Tensor], b: list[tf.Tensor], damping: float) -> list[tf.Tensor]:
        """Return s, shaped like w."""

    def auto_damping(self, ops: SampleOps, w: list[tf.Tensor]) -> float:
        """Damping from the estimated spectrum of H (see :func:`auto_damping`)."""
        return auto_damping(*self.spectrum(ops, w))

    def spectrum(self, ops: SampleOps, w: list[tf.Tensor]) -> tuple[float, float]:
        """(λ_min, λ_max) of H from :func:`extreme_eigenvalues`, computed once per (ops, w)."""
        return self._cached("spectrum", ops, w, lambda: extreme_eigenvalues(ops, w))

    def _cached(self, what: str, ops: SampleOps, w: list[tf.Tensor], compute: Callable[[], Any]) -> Any:
        """``compute()`` for these ops and weights, kept until other ones come: ``rank`` asks the
        solver for the damping and then solves, both from the same spectrum or decomposition."""
        key = (id(ops), tuple(float(tf.reduce_sum(t)) for t in w))
        memo = self.__dict__.setdefault("_memo", {})  # a frozen dataclass: kept outside its fields
        if what not in memo or memo[what][0] != key:
            memo[what] = (key, compute())
        return memo[what][1]


@dataclass(frozen=True)
class Exact(InverseHVP):
    """Dense Hessian (P ≤ max_parameters), eigendecomposition, then solve.

    The eigendecomposition costs O(P³) time and P² memory: 63 s at 7,960 parameters on 2 CPU
    cores (against 3 s for CG on the same run), hence the cap.
    """

    max_parameters: int = 10_000
    name = "exact"

    def _eigen(self, ops: SampleOps, w: list[tf.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        count = _tree.size(w)
        if count > self.max_parameters:
            raise ValueError(
                param_error(
                    "solver",
                    "rank",
                    f"'cg' or 'lissa' for models over {self.max_parameters} parameters (the dense "
                    "Hessian's eigendecomposition costs O(P³) time)",
                    f"'exact' with {count} parameters",
                )
            )

        def decompose() -> tuple[np.ndarray, np.ndarray]:
            hessian = ops.dense_hessian(w)
            return np.linalg.eigh((hessian + hessian.T) / 2)

        return self._cached("eigen", ops, w, decompose)  # type: ignore[no-any-return]

    def auto_damping(self, ops, w):
        values, _ = self._eigen(ops, w)
        return auto_damping(float(values[0]), float(values[-1]))

    def solve(self, ops, w, b, damping):
        values, vectors = self._eigen(ops, w)
        shifted = values + damping
        tolerance = _check_definite(float(values[0]), float(values[-1]), damping, ops.dtype)
        # Directions of eigenvalue 0 up to rounding are left out (the pseudo-inverse, the solution CG
        # converges to): per-sample gradients have no component there, b only its rounding.
        kept = shifted > tolerance
        rhs = _tree.flatten(b).numpy()
        solution = vectors[:, kept] @ ((vectors[:, kept].T @ rhs) / shifted[kept])
        return _tree.unflatten(tf.constant(solution, ops.dtype), w)


@dataclass(frozen=True)
class ConjugateGradient(InverseHVP):
    """Conjugate gradient with Hessian-vector products on the full training set."""

    max_iterations: int = 200
    tolerance: float = 1e-6
    name = "cg"

    def solve(self, ops, w, b, damping):
        s = [tf.zeros_like(t) for t in b]
        r = list(b)
        p = list(r)
        rr = float(_tree.dot(r, r))
        target = self.tolerance**2 * rr
        for _ in progress_bar(
            range(self.max_iterations), progress=ops.progress, desc="conjugate gradient", unit="it", leave=False
        ):
            if rr <= target:
                break
            ap = damped_hvp(ops, w, p, damping)
            curvature = float(_tree.dot(p, ap))
            if curvature <= 0:
                raise ValueError(
                    param_error(
                        "damping",
                        "rank",
                        "large enough to make H + damping·I positive definite for CG",
                        f"{damping} (negative curvature found)",
                    )
                )
            alpha = rr / curvature
            s = _tree.axpy(alpha, p, s)
            r = _tree.axpy(-alpha, ap, r)
            rr_new = float(_tree.dot(r, r))
            p = _tree.axpy(rr_new / rr, p, r)
            rr = rr_new
        return s


@dataclass(frozen=True)
class LiSSA(InverseHVP):
    """Stochastic Neumann series on mini-batches; ``scale=None`` chooses it from Lanczos spectra.

    The automatic scale is 1.1 × the largest eigenvalue of H + λI over the full Hessian and
    ``scale_batches`` mini-batch Hessians (20 Lanczos steps each): a mini-batch Hessian's
    spectrum is wider than the full one's, and a scale from the full one alone let the series
    blow up for small batches. The result is still a stochastic estimate: average ``repeats``
    runs, or use ``Exact``/``ConjugateGradient`` where they fit.
    """

    depth: int = 1000
    batch_size: int = 100
    scale: float | None = None
    repeats: int = 1
    seed: int = 0
    scale_batches: int = 5
    name = "lissa"

    def automatic_scale(self, ops: SampleOps, w: list[tf.Tensor], damping: float, highest: float) -> float:
        """1.1 × the largest eigenvalue of H + λI (``highest`` + λ) and of ``scale_batches`` mini-batch H_B + λI."""
        if self.batch_size < ops.n:
            rng = np.random.default_rng(self.seed + 1)  # not the series' own draws
            for k in range(self.scale_batches):
                batch = rng.choice(ops.n, size=self.batch_size, replace=False)
                highest = max(highest, extreme_eigenvalues(ops, w, steps=20, seed=k, indices=batch)[1])
        return 1.1 * (highest + damping)

    def solve(self, ops, w, b, damping):
        # The series converges when the spectrum of (H_B + λI)/scale lies in (0, 2) for the batches drawn:
        # not at all where H + λI has a negative eigenvalue (it would return numbers of any size).
        lowest, highest = self.spectrum(ops, w)  # the one auto damping used, if it did
        _check_definite(lowest, highest, damping, ops.dtype)
        scale = self.scale if self.scale is not None else self.automatic_scale(ops, w, damping, highest)
        rng = np.random.default_rng(self.seed)
        estimates = []
        for _ in range(self.repeats):
            h = list(b)
            for _ in progress_bar(range(self.depth), progress=ops.progress, desc="LiSSA", unit="it", leave=False):
                batch = rng.choice(ops.n, size=min(self.batch_size, ops.n), replace=False)
                hv = ops.hvp(w, h, indices=batch)
                h = [bi + hi - (hvi + damping * hi) / scale for bi, hi, hvi in zip(b, h, hv)]
            estimates.append([t / scale for t in h])
        return [tf.add_n(list(parts)) / len(estimates) for parts in zip(*estimates)]


SOLVERS = {"exact": Exact, "cg": ConjugateGradient, "lissa": LiSSA}


def get_solver(solver: object) -> InverseHVP:
    if isinstance(solver, InverseHVP):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise ValueError(
        param_error("solver", "rank", "'exact', 'cg', 'lissa' or an InverseHVP instance", describe(solver))
    )

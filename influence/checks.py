"""Float64 finite-difference checks of gradients (DESIGN §2, scenario S1).

float32 central differences cannot check these gradients: with h = 1e-3 the
difference quotient is quantized, with h = 1e-4 it is noise. Every check here
runs in float64, uses central differences with Richardson extrapolation
(step h and h/2) along random unit directions (optionally every coordinate
of a small tile), and explains a failure instead of just printing a number:
float32 round-off, randomness, a function that is not smooth at the point
(ReLU kinks, max-pool ties) or, when the differences are consistent, a wrong
gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._inputs import check_samples, declared_input_dtypes, prepare
from ._validation import as_array, check_non_negative, check_positive, describe, param_error
from .model_function import warn_reduced_precision

DEFAULT_RTOL = 1e-6
# One-sided slopes of a smooth f differ by s·f'' (halving with s); across a kink they
# differ by the jump in slope at any small s. A ratio above this at s → s/2 is a kink.
KINK_RATIO = 0.75
# A float32 gradient's round-off (≈1e-7 per element, more after a deep backward pass) explains
# relative errors up to about this; a larger error is diagnosed as if grad were float64.
GRAD_ROUNDING_LIMIT = 1e-3
# A derivative is resolved when the difference quotients stand this far above f's round-off:
# below it a zero, negated or 10×-wrong gradient agrees with them as well as the right one.
RESOLUTION_FACTOR = 10.0
# A pass whose resolution is this many times coarser than rtol gets a note saying so.
COARSE_RESOLUTION = 10.0
# At a kink the central quotients at s and s/2 stay within J·δ/(2s) of each other (J the slope
# jump, δ < s/5 its distance from x), at most a sixth of the one-sided gap; noise keeps no such order.
KINK_CENTRAL_AGREEMENT = 0.25
# The default step of the data checks: 1e-3 for inputs of unit scale or larger, 1e-3 of their scale below it.
DEFAULT_STEP = 1e-3


@dataclass(frozen=True)
class GradientCheck:
    """Outcome of :func:`check_gradient`.

    Attributes:
        ok: True when every direction agrees within ``rtol``.
        max_rel_error: the largest relative error over the directions.
        rel_errors: relative error per direction, shape (D,).
        finite_difference: Richardson-extrapolated directional derivatives, (D,).
        analytic: ⟨grad, d⟩ per direction, (D,).
        steps: the finite-difference step used per direction, (D,).
        rtol: the tolerance used.
        explanation: why the check failed (or a note), empty when clean.
        at_kink: the check failed only along directions that cross a kink at x (ReLU at
            exactly 0, a max-pool tie): finite differences cannot judge grad there.
        inconclusive: ``ok`` is False only because the finite differences cannot resolve
            the derivatives: the change of f along some direction is below about
            RESOLUTION_FACTOR (10) times the round-off of f, so a zero, negated or far too
            large gradient would agree with them as well. grad was not found wrong.
        notes: warnings about the check itself that did not fail it (e.g. f's round-off
            limits the achievable error), one sentence each.
        resolution: the smallest error the check could detect, relative to the largest
            directional derivative it measured: ``rtol`` when f's round-off is negligible,
            larger where a quotient's round-off exceeds ``rtol`` times that derivative (an
            error below this passes unseen). NaN when nothing was resolved.
    """

    ok: bool
    max_rel_error: float
    rel_errors: np.ndarray
    finite_difference: np.ndarray
    analytic: np.ndarray
    steps: np.ndarray
    rtol: float
    explanation: str = ""
    notes: list[str] = field(default_factory=list)
    at_kink: bool = False
    inconclusive: bool = False
    resolution: float = float("nan")

    def __str__(self) -> str:
        verdict = "passed" if self.ok else "INCONCLUSIVE" if self.inconclusive else "FAILED"
        text = (
            f"gradient check {verdict}: max relative error {self.max_rel_error:.3e} "
            f"over {len(self.rel_errors)} direction(s) (tolerance {self.rtol:.0e})"
        )
        return text + (f"\n{self.explanation}" if self.explanation else "")


def _directions(x: np.ndarray, count: int, tile: Any, rng: np.random.Generator) -> np.ndarray:
    """Unit directions, shape (D, *x.shape): random ones, then one per tile coordinate."""
    directions = []
    for _ in range(count):
        d = rng.standard_normal(x.shape)
        directions.append(d / np.linalg.norm(d))
    if tile is not None:
        mask = np.zeros(x.shape, dtype=bool)
        try:
            mask[tile] = True
        except (IndexError, TypeError) as exc:
            raise ValueError(
                param_error(
                    "tile", "check_gradient", f"an index expression valid for x of shape {x.shape}", describe(tile)
                )
            ) from exc
        for flat_index in np.flatnonzero(mask):
            d = np.zeros(x.size)
            d[flat_index] = 1.0
            directions.append(d.reshape(x.shape))
    return np.stack(directions)


def _scalar(f: Callable[[np.ndarray], Any], x: np.ndarray) -> tuple[float, bool]:
    """Evaluate f, returning (value as float64, whether f computed in float32 or lower)."""
    value = f(x)
    dtype = getattr(value, "dtype", None)
    low_precision = dtype is not None and np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).itemsize < 8
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    if array.size != 1:
        raise ValueError(param_error("f", "check_gradient", "a function returning one number", describe(array)))
    return float(array.reshape(())), low_precision


def _one_sided_gap(plus: float, minus: float, base: float, step: float) -> float:
    """Forward minus backward difference quotient at ``step``: (f(x+sd) − 2f(x) + f(x−sd)) / s."""
    return (plus - 2 * base + minus) / step


def _is_kink(gaps: list[tuple[float, float, float]], scale: float, base: float, step: float, rtol: float) -> bool:
    """Whether the one-sided gaps (at s and s/2, per refinement) show a kink at or right next to x.

    ``gaps`` holds (one-sided gap at s, at s/2, |D(s) − D(s/2)|) per refinement. For smooth f
    the gap halves with the step; at a kink (slope jump J) it stays ≈ J while the central
    quotients agree (KINK_CENTRAL_AGREEMENT); a noisy or chaotic f keeps neither order. The gap
    must also stand above the tolerance and the round-off of f (≈ 1e-13·|f| / step).
    """
    noise = 1e-13 * max(abs(base), 1e-300) / step
    return any(
        abs(half) >= KINK_RATIO * abs(full)
        and abs(half) > max(10 * rtol * scale, 100 * noise)
        and central <= KINK_CENTRAL_AGREEMENT * abs(half)
        for full, half, central in gaps
    )


def _quotient_roundoff(base: float, step: float | np.ndarray) -> Any:
    """Round-off of a difference quotient of f at ``step``: 3·ε₆₄·|f(x)| / step (module docstring)."""
    return 3 * np.finfo(np.float64).eps * abs(base) / step


def default_step(values: np.ndarray) -> float:
    """The finite-difference step for data of this scale: 1e-3·min(1, max |value|).

    A step of 1e-3 on inputs of scale 1e-6 probes f a thousand times beyond the data (a
    Normalization layer makes that a step of 1000 units), so below unit scale the step
    shrinks with the data; inputs of unit scale or larger (standardized features, pixels
    in [0, 1]) keep 1e-3. Zero or non-finite data give no scale and keep 1e-3.
    """
    finite = np.abs(values[np.isfinite(values)]) if np.size(values) else np.zeros(0)
    scale = float(np.max(finite)) if finite.size else 0.0
    return DEFAULT_STEP * min(1.0, scale) if scale > 0 else DEFAULT_STEP


def check_gradient(
    f: Callable[[np.ndarray], Any],
    x: Any,
    grad: Any,
    *,
    directions: int = 4,
    tile: Any = None,
    h: float = 1e-3,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    refinements: int = 2,
) -> GradientCheck:
    """Check ``grad`` = ∇f(x) with float64 central differences and Richardson extrapolation.

    Args:
        f: ``np.ndarray (float64, shape of x) -> number``. Must be deterministic
            and should compute in float64 (rebuild Keras models with
            :func:`as_float64`).
        x: the point, any shape; converted to float64.
        grad: the gradient to check, same shape as ``x``.
        directions: number of random unit directions.
        tile: optional index expression (``np.s_[0, 10:14, 10:14, 0]``): every
            coordinate inside it is also checked as its own direction.
        h: finite-difference step along a unit direction.
        rtol: relative error tolerance per direction (1e-6 suits float64).
        seed: seed of the random directions.
        refinements: when a direction fails, retry it with steps h/10, h/100, …
            (this many times) and keep the step whose two quotients agree best.

    The directional derivative along unit d is estimated by
    D(s) = (f(x+sd) − f(x−sd)) / 2s at s = h and h/2, combined as
    (4·D(h/2) − D(h)) / 3 (error O(h⁴)), and compared with ⟨grad, d⟩. The
    relative error divides by max(|fd|, |analytic|, 1e-8·‖grad‖, r/rtol), where
    r = 3·ε₆₄·|f(x)|/s is the round-off of that estimate at the step s used: a
    directional derivative that is tiny next to |f| cannot be judged below the
    round-off of f, and is not blamed for it. D(s) and D(s/2) count as consistent
    (refinement stops) when they agree within rtol of themselves or within r,
    whatever the size of grad.

    The check needs derivatives that f resolves: along a direction where neither
    the finite differences (largest over all directions) nor ⟨grad, d⟩ reach 10·r,
    the change of f is below its round-off and any small gradient, zero or
    negated, would agree. Such a check is *inconclusive*: ``ok`` is False,
    ``inconclusive`` True, and the explanation gives the numbers and the remedies
    (a larger h, f without its large constant part, f in float64).

    A failure is explained. When the forward and backward quotients along a failing
    direction disagree by about as much at s/2 as at s (a smooth f's disagreement
    halves with s), f is not differentiable at x along it (a ReLU kink or max-pool
    tie, e.g. at inputs that are exactly 0), and the explanation says so instead of
    blaming the gradient; the verdict is unchanged. When even the smallest step tried
    is not below the scale of x (its largest |entry|), no kink is claimed: the step
    probes f beyond the point's own scale, and the explanation says to shrink h.
    When D(s) and D(s/2) still disagree after refining, f is noisy or unstable at
    that scale (randomness, a chaotic training run) and the explanation says so.
    """
    func = "check_gradient"
    if not callable(f):
        raise TypeError(param_error("f", func, "a callable", describe(f)))
    x64 = as_array(x, param="x", func=func, min_ndim=0).astype(np.float64)
    g_given = as_array(grad, param="grad", func=func, min_ndim=0)
    grad_low_precision = np.issubdtype(g_given.dtype, np.floating) and g_given.dtype.itemsize < 8
    g64 = g_given.astype(np.float64)
    if g64.shape != x64.shape:
        raise ValueError(param_error("grad", func, f"the shape of x {x64.shape}", f"shape {g64.shape}"))
    if isinstance(directions, bool) or not isinstance(directions, (int, np.integer)) or directions < 0:
        raise ValueError(param_error("directions", func, "a non-negative int", describe(directions)))
    if directions == 0 and tile is None:
        raise ValueError(param_error("directions", func, "positive when no tile is given", directions))
    check_positive(h, param="h", func=func)
    check_positive(rtol, param="rtol", func=func)
    if isinstance(refinements, bool) or not isinstance(refinements, (int, np.integer)) or refinements < 0:
        raise ValueError(param_error("refinements", func, "a non-negative int", describe(refinements)))

    rng = np.random.default_rng(seed)
    dirs = _directions(x64, int(directions), tile, rng)
    base, low_precision = _scalar(f, x64)
    if not np.isfinite(base):  # nothing to difference (and NaN != NaN read as non-determinism)
        raise ValueError(param_error("f", func, "a function with a finite value at x", f"f(x) = {base!r}"))
    again, _ = _scalar(f, x64.copy())
    analytic = np.tensordot(dirs, g64, axes=g64.ndim) if g64.ndim else dirs * g64
    analytic = np.asarray(analytic, dtype=np.float64).reshape(-1)
    floor = max(1e-8 * float(np.linalg.norm(g64)), 1e-300)

    def relative(a: np.ndarray | float, b: np.ndarray | float, least: np.ndarray | float = floor) -> np.ndarray:
        return np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), least)

    fd, spread, steps_used = np.empty(len(dirs)), np.empty(len(dirs)), np.empty(len(dirs))
    quotient_pairs, smallest_steps = np.empty((len(dirs), 2)), np.empty(len(dirs))
    kinked = np.zeros(len(dirs), dtype=bool)
    values = [base]  # every value f returned: float32 values hide behind Python floats
    outside = np.zeros(len(dirs), dtype=bool)  # directions along which f was NaN/Inf at a step
    for i, d in enumerate(dirs):
        # Adaptive step: when a direction fails, shrink the step while the truncation
        # estimate |D(s) - D(s/2)| says curvature, not round-off, dominates.
        candidates = []
        one_sided: list[tuple[float, float, float]] = []
        for level in range(refinements + 1):
            step = h / 10**level
            quotients, sides = [], []
            for s_ in (step, step / 2):
                plus, _ = _scalar(f, x64 + s_ * d)
                minus, _ = _scalar(f, x64 - s_ * d)
                values += [plus, minus]
                outside[i] |= not (np.isfinite(plus) and np.isfinite(minus))
                quotients.append((plus - minus) / (2 * s_))
                sides.append(_one_sided_gap(plus, minus, base, s_))
            one_sided.append((sides[0], sides[1], abs(quotients[0] - quotients[1])))
            estimate = (4 * quotients[1] - quotients[0]) / 3
            # Relative to the quotients themselves, not to grad: a huge (wrong, or chaotic) grad
            # must not make scattered quotients look consistent; below f's round-off they agree.
            least = max(float(_quotient_roundoff(base, step)) / rtol, 1e-300)
            gap = float(relative(quotients[0], quotients[1], least))
            candidates.append((gap, estimate, step, quotients[0], quotients[1]))
            if float(relative(estimate, analytic[i])) <= rtol or gap <= rtol:
                break
        gap, estimate, step, coarse_quotient, fine_quotient = (
            candidates[-1] if len(candidates) == 1 else min(candidates)
        )
        fd[i], spread[i], steps_used[i] = estimate, gap, step
        quotient_pairs[i] = coarse_quotient, fine_quotient
        smallest_steps[i] = h / 10 ** (len(one_sided) - 1)
        scale = max(abs(estimate), abs(float(analytic[i])), floor)
        kinked[i] = _is_kink(one_sided, scale, base, smallest_steps[i], rtol)
    # Round-off of the Richardson estimate at the step each direction used (module docstring).
    roundoff = _quotient_roundoff(base, steps_used)
    rel = relative(fd, analytic, np.maximum(floor, roundoff / rtol))
    max_rel = float(np.max(rel))
    # The largest measured derivative sets the scale a direction is judged at, so a coordinate
    # with an exactly zero derivative is resolved when the others are; grad's own size counts
    # only along its direction (a too-large grad must not make the noise look resolved).
    measured = float(np.max(np.abs(fd)))
    unresolved = np.maximum(measured, np.abs(analytic)) < RESOLUTION_FACTOR * roundoff
    failing = (rel > rtol) & ~unresolved
    inconclusive = bool(np.any(unresolved) and not np.any(failing))
    ok = bool(max_rel <= rtol and not np.any(unresolved))
    # An error passes along direction i when below max(rtol·|derivative|, round-off): near f's
    # round-off floor a pass says less than rtol, which the verdict alone would hide.
    resolution = max(float(rtol), float(np.max(roundoff)) / measured) if measured > 0 else float("nan")

    notes = []
    if again != base:
        notes.append(
            f"f is not deterministic: two calls at the same x gave {base!r} and {again!r} "
            "(dropout in training mode? fix the seed or use training=False)."
        )
    if outside.any():
        notes.append(
            f"f is NaN or Inf a step away from x along {int(outside.sum())} direction(s) ({np.flatnonzero(outside)}"
            f"; steps down to {h / 10**refinements:g}): the steps leave f's domain (a log or sqrt near its edge?), "
            "so the finite differences there mean nothing; re-check with a smaller h."
        )
    # float(loss) of a float32 computation: every value is a float32 number (not only whole ones).
    hidden_float32 = (
        not ok
        and not low_precision
        and len(set(values)) > 2
        and all(np.isfinite(v) and float(np.float32(v)) == v for v in values)
        and any(v != round(v) for v in values)
    )
    if hidden_float32:
        notes.append(
            "every value f returned is exactly a float32 number: f computes in float32 and returns it as a "
            "Python float (or float64)."
        )
    if low_precision or hidden_float32:
        notes.append(
            "f returned a float32 (or lower) value: float32 round-off (~1e-7 relative) divided by a "
            f"step of {h:g} swamps the difference quotient; rebuild the model with as_float64() "
            "and keep the loss in float64."
        )
    # A nondeterministic or low-precision f spoils the finite differences themselves: nothing
    # below can be judged. A low-precision grad does not; it explains small errors only.
    f_unreliable = bool(notes)
    if inconclusive and not f_unreliable:
        worst = int(np.argmax(np.where(unresolved, roundoff, -np.inf)))
        notes.append(
            "inconclusive: the finite differences cannot resolve the derivatives here, as the change of f along "
            f"the directions is below its round-off: the largest directional derivative they measure is "
            f"{measured:.2e} and grad gives up to {float(np.max(np.abs(analytic[unresolved]))):.2e} along the "
            f"unresolved direction(s), while a difference quotient at step {steps_used[worst]:g} carries a "
            f"round-off of {roundoff[worst]:.2e} (3·ε·|f(x)|/step with f(x) = {base:.6g}), so a zero, negated or "
            "far too large gradient would agree as well. Use a larger h, remove the large constant part of f "
            "inside f (before its value is rounded), or compute f in float64."
        )
    if ok and resolution > COARSE_RESOLUTION * rtol:
        worst = int(np.argmax(roundoff))
        notes.append(
            f"passed only to a relative accuracy of {resolution:.1e}, not rtol={rtol:g}: the largest directional "
            f"derivative measured is {measured:.2e}, while a difference quotient at step {steps_used[worst]:g} "
            f"carries a round-off of {roundoff[worst]:.2e} (f(x) = {base:.6g}), so a gradient off by less than "
            "that passes as well. Use a larger h or remove the large constant part of f for a sharper check."
        )
    grad_rounding = not ok and not inconclusive and grad_low_precision and max_rel <= GRAD_ROUNDING_LIMIT
    if grad_rounding:
        notes.append(
            f"grad is {g_given.dtype} (e.g. from a float32 tape): its own round-off, about 1e-7 relative per "
            "element and more after a deep backward pass, exceeds rtol="
            f"{rtol:g}; compute it in float64 (as_float64) or compare with rtol≈1e-3 (max relative error "
            f"here {max_rel:.1e})."
        )
    diagnose = not ok and not f_unreliable and not grad_rounding and not inconclusive
    if diagnose and grad_low_precision:
        notes.append(f"grad is {g_given.dtype}, but its round-off cannot explain a relative error of {max_rel:.1e}:")
    # Every failing direction crosses a kink at x: the finite differences cannot judge grad there.
    kink_pattern = bool(diagnose and np.all(kinked[failing]))
    # A step beyond the point's own scale (inputs of scale 1e-6 with h = 1e-3) crosses the region
    # where f varies: its quotients scatter, or its one-sided slopes differ as at a kink, although
    # f is smooth there. Consistent quotients still judge grad (their truncation error is small).
    x_scale = float(np.max(np.abs(x64))) if x64.size else 0.0
    smallest_failing_step = float(np.min(smallest_steps[failing], initial=np.inf))
    scattered = diagnose and float(np.max(spread[failing], initial=0.0)) > 10 * rtol
    beyond_scale = x_scale > 0 and smallest_failing_step >= x_scale and (kink_pattern or scattered)
    at_kink = kink_pattern and not beyond_scale
    if beyond_scale:
        notes.append(
            f"the finite-difference step (down to {smallest_failing_step:g} after refining) is not smaller than "
            f"the scale of x (largest |entry| {x_scale:.2e}): f is probed beyond the point's own scale, where its "
            "difference quotients can scatter or look kinked although f is smooth, so this is no evidence "
            f"against grad or of a kink; re-check with h ≈ {DEFAULT_STEP * x_scale:.1e} (1e-3 of the scale of x)."
        )
    elif at_kink:
        worst = int(np.argmax(np.where(failing, rel, -np.inf)))
        notes.append(
            f"the function is not smooth at this point: along {int(np.sum(failing))} failing direction(s) the "
            "forward and backward differences disagree and the disagreement does not shrink with the step "
            f"(direction {worst}: finite differences {fd[worst]:.6e}, grad {analytic[worst]:.6e}); a ReLU kink "
            "or max-pool tie is likely (e.g. inputs exactly 0), where the gradient is one of several valid "
            "one-sided slopes; check at a point with a little noise added "
            "(x + 1e-2·noise; check_input_gradient's jitter). Without such a layer, f bends within less than "
            f"the smallest step tried ({float(np.min(smallest_steps[failing])):g}): a steep feature, e.g. a "
            "Normalization of a (near-)constant input, which Keras divides by a standard deviation clamped to "
            "1e-7; re-check with a smaller h."
        )
    # A large gap between the quotients at s and s/2 after refinement points at
    # round-off or non-smoothness rather than at the gradient.
    elif scattered:
        worst = int(np.argmax(np.where(failing, spread, -np.inf)))
        coarse_quotient, fine_quotient = quotient_pairs[worst]
        notes.append(
            "finite differences at step s and s/2 disagree even after refining s (relative spread "
            f"{spread[worst]:.1e}; direction {worst}: {coarse_quotient:.6e} at s = {steps_used[worst]:g}, "
            f"{fine_quotient:.6e} at s/2, grad {analytic[worst]:.6e}): f is noisy or unstable at this scale "
            "(randomness, a chaotic or diverging training run) or not smooth near x (ReLU kinks, max-pooling "
            "ties), so the finite differences cannot judge grad; try another h or check for randomness."
        )
    elif diagnose:
        smooth_failing = failing & ~kinked
        worst = int(np.argmax(np.where(smooth_failing, rel, -np.inf)))
        notes.append(
            f"finite differences are consistent but disagree with grad: direction {worst} gives "
            f"{fd[worst]:.6e} by finite differences and {analytic[worst]:.6e} from grad; "
            "the gradient itself is likely wrong (transposed axes, missing term, wrong sign or scale)."
        )
    return GradientCheck(
        ok=ok,
        max_rel_error=max_rel,
        rel_errors=rel,
        finite_difference=fd,
        analytic=analytic,
        steps=steps_used,
        rtol=float(rtol),
        explanation=" ".join(notes),
        notes=notes,
        at_kink=at_kink,
        inconclusive=inconclusive,
        resolution=resolution,
    )


def _float64_config(config: Any) -> Any:
    """Rewrite every floating dtype in a serialized Keras config to float64."""
    if isinstance(config, dict):
        rewritten = {}
        for key, value in config.items():
            if key == "dtype" and value is not None and _is_float_dtype_config(value):
                rewritten[key] = "float64"
            else:
                rewritten[key] = _float64_config(value)
        return rewritten
    if isinstance(config, list):
        return [_float64_config(c) for c in config]
    return config


def _is_float_dtype_config(value: Any) -> bool:
    if isinstance(value, str):
        return "float" in value or value in ("mixed_float16", "mixed_bfloat16")
    if isinstance(value, dict):
        name = str(value.get("config", {}).get("name", value.get("name", "")))
        return "float" in name
    return False


def as_float64(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with float64 weights and computation, same weight values.

    Works for Sequential and functional models, nested ones included, by
    rewriting every floating dtype in the serialized config. Subclassed
    models without a usable config raise a ValueError.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(param_error("model", "as_float64", "a keras.Model", describe(model)))
    try:
        config = keras.saving.serialize_keras_object(model)
        # Not Keras's safe mode: the model is already in this process (its Lambda code included), and
        # only its own config is rebuilt; safe mode would refuse every model with a Lambda layer.
        # Under a float64 dtype policy too: a subclassed model's sublayers made in __init__ (the Keras
        # guides' pattern) take their dtype from the policy, not from the rewritten config.
        with _float64_policy():
            clone = keras.saving.deserialize_keras_object(_float64_config(config), safe_mode=False)
            if not clone.built and model.built:
                clone.build(model.input_shape)
    except Exception as exc:
        raise ValueError(
            param_error(
                "model",
                "as_float64",
                "a model that Keras can serialize and rebuild (Sequential/functional, or subclassed with get_config)",
                f"{type(model).__name__} ({exc})",
            )
        ) from exc
    clone.set_weights(
        [
            np.asarray(w, dtype=np.float64) if np.issubdtype(np.asarray(w).dtype, np.floating) else w
            for w in model.get_weights()
        ]
    )
    # Layers that derive state from their variables (an adapted Normalization's mean and variance)
    # do so in finalize_state, which Keras calls when loading a file but set_weights does not.
    for layer in clone._flatten_layers(include_self=False, recursive=True):
        finalize = getattr(layer, "finalize_state", None)
        if callable(finalize):
            finalize()
    bad = [v.path for v in clone.trainable_variables if tf.as_dtype(v.dtype) != tf.float64]
    if bad:
        raise ValueError(
            param_error("model", "as_float64", "a model whose weights can all become float64", f"float32 weights {bad}")
        )
    _check_same_function(model, clone)
    return clone


@contextlib.contextmanager
def _float64_policy() -> Iterator[None]:
    """Keras's global dtype policy set to float64 for the block, then restored."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# float32 round-off moves a model's outputs by ~1e-7 relative; a lost state (statistics, a constant)
# moves them by far more. The probe is random: it needs no data and no layer sees it as special.
_COPY_TOLERANCE = 1e-3


def _check_same_function(model: keras.Model, clone: keras.Model) -> None:
    """Refuse a float64 copy that computes another function than ``model`` (a state it did not copy).

    Probed on 4 random inputs where the model declares one floating input of known shape
    (token ids or unknown shapes are not probed).
    """
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1 or not tf.as_dtype(inputs[0].dtype).is_floating:
        return
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        return
    probe = np.random.default_rng(0).normal(size=(4, *shape))

    def outputs(m: keras.Model, x: np.ndarray) -> np.ndarray:  # every output, flattened (a dict of one, too)
        try:
            out = m(x, training=False)
        except tf.errors.UnimplementedError as exc:
            if "NHWC" not in str(exc):
                raise
            # Keras runs a CPU's channels_first convolutions under XLA; the float64 checks call the model
            # outside XLA too (replays, eager probes), where TensorFlow's CPU kernels refuse that layout.
            raise ValueError(
                param_error(
                    "model",
                    "as_float64",
                    "a model whose layers TensorFlow's kernels run on this device outside XLA",
                    "a channels_first convolution, which TensorFlow's CPU kernels run only in NHWC "
                    "(data_format='channels_last'; transpose the inputs) or on a GPU",
                )
            ) from None
        return np.concatenate([np.ravel(np.asarray(o, np.float64)) for o in tf.nest.flatten(out)])

    expected, got = outputs(model, probe.astype(inputs[0].dtype)), outputs(clone, probe)
    gap = float(np.max(np.abs(got - expected))) / max(1.0, float(np.max(np.abs(expected))))
    if not gap <= _COPY_TOLERANCE:
        raise ValueError(
            param_error(
                "model",
                "as_float64",
                "a model whose float64 copy computes the same function",
                f"a copy whose outputs differ by {gap:.2g} (relative) on random inputs: a layer keeps state "
                "outside its weights and config; build the model in float64 (dtype='float64')",
            )
        )


def check_input_gradient(
    model: keras.Model,
    loss: Any,
    x: Any,
    y: Any,
    *,
    grad: Any = None,
    training: bool = False,
    seed: int = 0,
    directions: int = 4,
    tile: Any = None,
    h: float | None = None,
    rtol: float = DEFAULT_RTOL,
    from_logits: bool = False,
    jitter: float = 0.0,
) -> GradientCheck:
    """Check ∂(mean loss)/∂x of a Keras model in float64 (scenario S1).

    The model is rebuilt in float64 (:func:`as_float64`); dropout is off
    (``training=False``) or, with ``training=True``, its masks are fixed by
    ``seed`` so the function is deterministic. When ``grad`` is None the
    gradient is taken with a float64 tape, so the check verifies the model's
    autodiff; pass your own ``grad`` (e.g. from a float32 tape) to check it.
    ``x`` and ``y`` are checked as :func:`influence.fit` checks its data (shapes,
    label range, probabilities for a cross-entropy without ``from_logits``).
    ``directions``, ``tile``, ``h`` and ``rtol`` are :func:`check_gradient`'s, over the entries
    of ``x``; ``from_logits`` as for :func:`influence.fit`. ``h=None`` scales the step to the
    data: 1e-3·min(1, max |x|), so 1e-3 for inputs of unit scale or larger and 1e-3 of their
    scale below it (a fixed 1e-3 on inputs of scale 1e-6 measures f far outside the data).

    ``jitter`` > 0 checks at ``x + jitter·z`` (z standard normal, drawn from ``seed``)
    instead of at ``x``: images with exactly-zero pixels put ReLUs and max-pool windows on
    their kinks, where finite differences cannot judge a gradient (the result then says
    ``at_kink``). ``jitter=1e-2`` moves them off: on a digits CNN with max-pooling it passed
    at 18 of 18 noise seeds (1e-3: 17 of 18; uniform noise in [0, 1e-3): 2 of 6, as the
    small gaps it leaves between pooled values keep near-ties). Only with ``grad=None``
    (a given gradient belongs to ``x``).
    """
    func = "check_input_gradient"
    check_non_negative(jitter, param="jitter", func=func)
    if jitter and grad is not None:
        raise ValueError(
            param_error("jitter", func, "0 when grad is given (grad was taken at x, not at moved inputs)", jitter)
        )
    # Token ids (an integer keras.Input, e.g. into an Embedding) have no input gradient: tape.gradient is None.
    integer = [d.name for d in declared_input_dtypes(model) if not np.issubdtype(d, np.floating)]
    if integer:
        got = f"a model with {integer[0]} inputs (token ids, e.g. into an Embedding, have no input gradient)"
        raise ValueError(param_error("model", func, "a model with floating-point inputs", got))
    # A float64 model is checked as it is (no rebuild: unregistered custom layers cannot be rebuilt).
    variables = list(getattr(model, "trainable_variables", []))
    is_float64 = bool(variables) and all(tf.as_dtype(v.dtype) == tf.float64 for v in variables)
    fn, per_sample = prepare(func, model if is_float64 else as_float64(model), loss, from_logits)
    # Not cast to the model's input dtype: x64 keeps every digit.
    x64 = as_array(x, param="x", func=func).astype(np.float64)
    if h is None:  # before the jitter: the step follows the data, not the noise added to it
        h = default_step(x64)
    if jitter:  # off the kinks (docstring)
        x64 = x64 + jitter * np.random.default_rng(seed).standard_normal(x64.shape)
    y_arr = as_array(y, param="y", func=func)
    check_samples(func, fn, per_sample, x64, y_arr)
    warn_reduced_precision(fn, x64[:1], training=training, func=func)
    weights = fn.weights

    def mean_loss(inputs: tf.Tensor) -> tf.Tensor:
        return per_sample.mean(tf.constant(y_arr), fn(weights, inputs, training=training, seed=seed))

    if grad is None:
        xt = tf.constant(x64)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            value = mean_loss(xt)
        grad = tape.gradient(value, xt)
        if grad is None:  # e.g. float token ids cast to integers for an Embedding
            cast = "one whose loss reaches its inputs only through an integer cast (token ids given as floats?)"
            raise ValueError(param_error("model", func, "a model whose loss is differentiable in its inputs", cast))
        grad = grad.numpy()
    return check_gradient(
        lambda z: mean_loss(tf.constant(z)), x64, grad, directions=directions, tile=tile, h=h, rtol=rtol, seed=seed
    )

"""Figures of the report as PNG bytes (matplotlib's object API, no pyplot state, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import imsave

from .metrics import Verification

HARMFUL, HELPFUL, NEUTRAL, NOISY = "#c0392b", "#2471a3", "#7f8c8d", "#e67e22"
KIND_COLORS = {"most harmful": HARMFUL, "most helpful": HELPFUL, "random": NEUTRAL}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def sample_tile(image: np.ndarray, size: int = 96, value_range: tuple[float, float] | None = None) -> bytes:
    """One sample as a PNG: (H, W) grey or (H, W, 1|3|4) colour, scaled up by whole pixels to about ``size``.

    Other channel counts (2, 5, …: no colour model) are shown as their first channel in grey.
    ``value_range`` (low, high) maps pixel values to black..white (grey) or 0..1 (colour);
    default: the image's own range. Pass the data set's range so tiles are comparable.
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        array = array[..., 0]
    low, high = value_range if value_range is not None else (float(np.min(array)), float(np.max(array)))
    scale = max(1, size // max(array.shape[:2]))
    array = np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    if array.ndim == 2:
        imsave(buffer, array, cmap="gray_r", vmin=low, vmax=high if high > low else low + 1, format="png")
    else:
        imsave(buffer, np.clip((array - low) / (high - low if high > low else 1.0), 0, 1), format="png")
    return buffer.getvalue()


def _few_ticks(axis: Any) -> None:
    """At most 6 ticks, small numbers in powers of ten: scores from −0.015 to 0.006 printed nine
    overlapping labels like '−0.0125'."""
    axis.set_major_locator(ticker.MaxNLocator(nbins=6))
    formatter = ticker.ScalarFormatter(useMathText=True)
    formatter.set_powerlimits((-2, 3))
    axis.set_major_formatter(formatter)


def score_distribution(score: np.ndarray, noise_mask: np.ndarray | None = None, *, method: str = "") -> bytes:
    """Histogram of scores (higher = more harmful); known-noisy samples stacked in their own colour."""
    fig, ax = _figure()
    score = np.asarray(score, dtype=np.float64)
    _noise_stacked_hist(ax, score, list(np.histogram_bin_edges(score, bins=60)), noise_mask)
    _few_ticks(ax.xaxis)
    ax.set_xlabel(f"score ({method}; higher = more harmful)" if method else "score (higher = more harmful)")
    ax.set_ylabel("training samples (log scale)")
    ax.set_title("Score distribution")
    return _png(fig)


def _noise_stacked_hist(ax: Axes, values: np.ndarray, bins: list[float], noise_mask: np.ndarray | None) -> None:
    """Histogram of ``values`` (n,) on a log count axis; known-noisy samples stacked in their own colour."""
    if noise_mask is not None and np.any(noise_mask):
        mask = np.asarray(noise_mask, dtype=bool)
        ax.hist(
            [values[~mask], values[mask]],
            bins=bins,
            stacked=True,
            color=[NEUTRAL, NOISY],
            label=[f"clean ({int((~mask).sum())})", f"known noisy ({int(mask.sum())})"],
        )
        ax.legend(frameon=False)
    else:
        ax.hist(values, bins=bins, color=NEUTRAL)
    ax.set_yscale("log")
    # Counts as plain numbers at 1, 2, 5, 10, …: matplotlib labels minor ticks 2×10⁰, 3×10⁰ … on a short axis.
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def removal_scatter(verification: Verification) -> bytes:
    """Predicted vs actual change of validation loss per removed sample, with the y = x line."""
    fig, ax = _figure(5.6, 4.6)
    for kind in dict.fromkeys(verification.kinds):
        chosen = verification.kinds == kind
        ax.scatter(
            verification.predicted[chosen],
            verification.actual[chosen],
            s=28,
            alpha=0.85,
            color=KIND_COLORS.get(str(kind), HELPFUL),
            label=f"{kind} ({int(chosen.sum())})",
        )
    both = np.concatenate([verification.predicted, verification.actual])
    both = both[np.isfinite(both)]
    if both.size:
        low, high = float(both.min()), float(both.max())
        pad = 0.05 * (high - low or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", lw=0.8, ls="--", label="y = x")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("predicted change of validation loss")
    ax.set_ylabel("actual change (retrained without the sample)")
    ax.set_title(f"Pearson r = {verification.pearson:.3f}, Spearman ρ = {verification.spearman:.3f}")
    ax.legend(frameon=False, fontsize="small")
    return _png(fig)


def found_at_k_plot(curves: Mapping[str, np.ndarray], n_noisy: int) -> bytes:
    """Fraction of known-noisy samples found among the top k, per method, with random and perfect baselines."""
    fig, ax = _figure()
    n = len(next(iter(curves.values())))
    k = np.arange(1, n + 1)
    shown = min(n, max(3 * n_noisy, 10))
    ax.plot(k[:shown], np.minimum(k[:shown] / max(n_noisy, 1), 1), color="black", lw=0.8, ls=":", label="perfect")
    ax.plot(k[:shown], k[:shown] / n, color=NEUTRAL, lw=0.8, ls="--", label="random order")
    for i, (method, curve) in enumerate(curves.items()):
        ax.plot(k[:shown], curve[:shown], lw=2.2 if i == 0 else 1.3, label=method)
    ax.axvline(n_noisy, color="black", lw=0.5, alpha=0.5)
    ax.set_xlabel("k (training samples inspected, most harmful first)")
    ax.set_ylabel("fraction of known-noisy samples found")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"found@k ({n_noisy} known-noisy samples)")
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    return _png(fig)


def convergence_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Validation loss per outer optimizer against outer step (left) and wall time (right).

    ``curves`` maps an optimizer's name to (val_loss, seconds), both of shape (steps + 1,).
    """
    fig = Figure(figsize=(10.0, 3.8))
    by_step, by_time = fig.subplots(1, 2)
    for name, (loss, seconds) in curves.items():
        by_step.plot(np.arange(len(loss)), loss, marker="o", ms=3, label=name)
        by_time.plot(seconds, loss, marker="o", ms=3, label=name)
    by_step.set_xlabel("outer step (one retraining + one unrolled pass each)")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_step, by_time):
        ax.set_ylabel("validation loss of the retrained model")
        ax.grid(alpha=0.3)
    by_step.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return _png(fig)


def learned_weights_plot(
    val_loss: np.ndarray,
    weights: np.ndarray,
    noise_mask: np.ndarray | None = None,
    holdout_loss: np.ndarray | None = None,
    best_step: int | None = None,
) -> bytes:
    """Validation loss per outer step of weight learning (left); histogram of the learned weights (right).

    ``val_loss``: (steps + 1,); ``weights``: (n,) learned per-sample weights; known-noisy samples
    stacked in their own colour. ``holdout_loss`` (steps + 1,) is drawn beside the validation loss,
    and ``best_step`` (the step the weights come from) marked.
    """
    fig = Figure(figsize=(10.0, 3.8))
    by_step, hist = fig.subplots(1, 2)
    steps = np.arange(len(val_loss))
    by_step.plot(steps, val_loss, marker="o", ms=3, color=HELPFUL, label="validation (learned on)")
    if holdout_loss is not None:
        by_step.plot(steps, holdout_loss, marker="s", ms=3, color=HARMFUL, label="held out (selects the step)")
    if best_step is not None:
        by_step.axvline(best_step, color="0.4", ls="--", lw=1, label=f"weights shown (step {best_step})")
    if holdout_loss is not None or best_step is not None:
        by_step.legend(frameon=False, fontsize="small")
    by_step.set_xlabel("outer step (one retraining + one unrolled pass each)")
    by_step.set_ylabel(f"{'' if holdout_loss is not None else 'validation '}loss of the retrained model")
    weights = np.asarray(weights, dtype=np.float64)
    _noise_stacked_hist(
        hist, weights, list(np.linspace(min(0.0, weights.min()), max(1.0, weights.max()), 41)), noise_mask
    )
    hist.set_xlabel("learned weight c_i (1 = as recorded, 0 = dropped)")
    hist.set_ylabel("training samples (log scale)")
    for ax in (by_step, hist):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)

"""Numbers the report shows: verification correlations, found@k and the per-class table.

Everything here works on a :func:`influence.rank` table (one row per training
sample, most harmful first, columns ``index``, ``rank``, ``score``,
``removal_effect``, ``label``, ``predicted_label``, ``train_loss``) and plain
arrays, so it can be tested without training anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .._validation import describe, param_error

TABLE_COLUMNS = ("index", "rank", "score", "removal_effect", "label", "predicted_label", "train_loss")
# Losses whose labels name classes (influence.losses.MARGIN_LOSSES, named here without importing TensorFlow).
CLASSIFICATION_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")


def check_table(table: Any, func: str = "render_report") -> pd.DataFrame:
    """A rank table with the expected columns, rows sorted most harmful first."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(param_error("table", func, "a pandas DataFrame from influence.rank", describe(table)))
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            param_error(
                "table", func, f"a table with columns {', '.join(TABLE_COLUMNS)}", f"one without {', '.join(missing)}"
            )
        )
    if len(table) == 0:
        raise ValueError(param_error("table", func, "a table with at least one row", "an empty table"))
    return table.sort_values("rank", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Verification:
    """Predicted vs actual removal effects for retrained samples.

    Attributes:
        indices: training-sample indices that were removed, one retraining each, shape (k,).
        predicted: predicted change of validation loss (the table's ``removal_effect``), (k,).
        actual: measured change after retraining without the sample, (k,).
        kinds: why each sample was chosen, e.g. ``"most harmful"`` or ``"random"``, (k,).
    """

    indices: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    kinds: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))

    def __post_init__(self) -> None:
        k = len(np.atleast_1d(self.indices))
        kinds = np.asarray(self.kinds if len(self.kinds) else ["sample"] * k, dtype=str)
        object.__setattr__(self, "indices", np.atleast_1d(np.asarray(self.indices, dtype=np.int64)))
        object.__setattr__(self, "predicted", np.atleast_1d(np.asarray(self.predicted, dtype=np.float64)))
        object.__setattr__(self, "actual", np.atleast_1d(np.asarray(self.actual, dtype=np.float64)))
        object.__setattr__(self, "kinds", kinds)
        for name in ("predicted", "actual", "kinds"):
            if len(getattr(self, name)) != k:
                got = f"{len(getattr(self, name))} entries"
                raise ValueError(param_error(name, "Verification", f"an array with one entry per index ({k})", got))

    @property
    def pearson(self) -> float:
        """Pearson correlation of predicted and actual effects (NaN when undefined)."""
        return correlations(self.predicted, self.actual)[0]

    @property
    def spearman(self) -> float:
        """Spearman rank correlation of predicted and actual effects (NaN when undefined)."""
        return correlations(self.predicted, self.actual)[1]

    def frame(self) -> pd.DataFrame:
        """One row per retraining: index, kind, predicted and actual effect."""
        return pd.DataFrame(
            {
                "index": self.indices,
                "kind": self.kinds,
                "predicted_effect": self.predicted,
                "actual_effect": self.actual,
            }
        )


def correlations(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) of two equally long arrays; NaN with fewer than 3 points or a constant array."""
    p, a = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    keep = np.isfinite(p) & np.isfinite(a)
    p, a = p[keep], a[keep]
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(a) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(p, a)[0]), float(stats.spearmanr(p, a)[0])


def found_at_k(table: pd.DataFrame, noise_mask: np.ndarray) -> np.ndarray:
    """Fraction of the known-noisy samples among the k most harmful, for k = 1..n; shape (n,).

    ``noise_mask`` is indexed by training-sample index (``table["index"]``).
    """
    mask = np.asarray(noise_mask, dtype=bool)
    total = int(mask.sum())
    if total == 0:
        return np.zeros(len(table))
    ordered = table.sort_values("rank", kind="stable")["index"].to_numpy()
    return np.cumsum(mask[ordered]) / total


def class_labels(values: pd.Series, loss: str | None = None) -> np.ndarray | None:
    """Integer class labels from a label column: ints, integral floats or one-hot rows; None for real targets.

    ``loss`` (the training loss's name) decides: a regression loss has no classes however integral
    its targets, and for ``categorical_crossentropy`` soft labels name the class of their largest
    entry. Without it the labels' values decide (soft labels: None).
    """
    if loss is not None and loss not in CLASSIFICATION_LOSSES:
        return None
    first = values.iloc[0]
    if isinstance(first, (list, tuple, np.ndarray)):
        rows = np.stack([np.asarray(v, dtype=np.float64) for v in values])
        one_hot = np.all((rows == 0) | (rows == 1)) and np.all(rows.sum(-1) == 1)
        if rows.ndim == 2 and rows.shape[1] > 1 and (one_hot or loss == "categorical_crossentropy"):
            return rows.argmax(axis=1)
        return None
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        return None
    if np.issubdtype(array.dtype, np.integer) or np.all(array == np.round(array)):
        return array.astype(np.int64)
    return None


def top_count(n: int, noise_mask: np.ndarray | None) -> int:
    """How many top-ranked samples the per-class table counts: the number of noisy samples, else 10%."""
    if noise_mask is not None and np.any(noise_mask):
        return int(np.sum(noise_mask))
    return max(1, int(round(0.1 * n)))


def per_class_table(
    table: pd.DataFrame, noise_mask: np.ndarray | None = None, loss: str | None = None
) -> pd.DataFrame | None:
    """Per given label: samples, accuracy, mean and summed removal effect (or score), count in the top k.

    Returns None when the labels are real-valued targets (``loss``, the training loss's name, decides;
    see :func:`class_labels`). With ``noise_mask``, also the known-noisy count and how many of them are
    in the top k.
    """
    labels = class_labels(table["label"], loss)
    if labels is None:
        return None
    k = top_count(len(table), noise_mask)
    predicted = pd.to_numeric(table["predicted_label"], errors="coerce").to_numpy()
    frame = pd.DataFrame(
        {
            "class": labels,
            "correct": predicted == labels,
            "score": table["score"].to_numpy(),
            "removal_effect": table["removal_effect"].to_numpy(dtype=np.float64),
            "in_top": table["rank"].to_numpy() < k,
        }
    )
    if noise_mask is not None:
        frame["noisy"] = np.asarray(noise_mask, dtype=bool)[table["index"].to_numpy()]
    grouped = frame.groupby("class", sort=True)
    has_effect = not frame["removal_effect"].isna().all()
    out = pd.DataFrame(
        {
            "samples": grouped.size(),
            "accuracy (given labels)": grouped["correct"].mean(),
            "mean removal effect" if has_effect else "mean score": grouped[
                "removal_effect" if has_effect else "score"
            ].mean(),
            "sum of removal effects" if has_effect else "sum of scores": grouped[
                "removal_effect" if has_effect else "score"
            ].sum(),
            f"in top {k}": grouped["in_top"].sum(),
        }
    )
    if noise_mask is not None:
        out["noisy"] = grouped["noisy"].sum()
        out[f"noisy in top {k}"] = frame[frame["in_top"]].groupby("class")["noisy"].sum()
        out = out.fillna({f"noisy in top {k}": 0}).astype({f"noisy in top {k}": int})
    if np.all(np.isnan(predicted)):
        out = out.drop(columns="accuracy (given labels)")
    out.index.name = "class"
    return out.reset_index()

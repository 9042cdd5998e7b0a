"""``render_report``: a rank table (and optional verification and known noise) as an HTML page."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._validation import describe, param_error
from ..runs import atomic_write_bytes, atomic_write_text
from . import figures
from .html import Card, Section, esc, fmt, grid, image, key_value, page
from .html import table as html_table
from .metrics import Verification, check_table, class_labels, found_at_k, per_class_table, top_count

FUNC = "render_report"
IMAGE_DIR = "images"
# What the "Δ val loss" of each method's table is (influence.rankers.methods).
EFFECT_NOTES = {
    "unrolled": "Δ val loss = predicted change of validation loss if the sample were removed (negative = harmful), "
    "differentiated through every recorded training step.",
    "influence_function": "Δ val loss = predicted change of validation loss if the sample were removed (negative "
    "= harmful), by an influence function at the final weights.",
    "tracin": "Δ val loss = TracIn's effect of the sample's training steps on the validation loss at the time of "
    "each step (negative = harmful), not carried through the later steps: uncalibrated, use it as a score, not as "
    "a prediction of removal.",
    "loss": "Score = the training loss at the final weights; loss predicts no removal effect (Δ val loss —).",
    "margin": "Score = minus the given label's mean margin over the checkpoints; margin predicts no removal "
    "effect (Δ val loss —).",
    "self_influence": "Score = the sample's self-influence over the checkpoints; self_influence predicts no "
    "removal effect (Δ val loss —).",
}


def save_scores(
    out_dir: str | os.PathLike, table: pd.DataFrame, *, noise_mask: Any = None, name: str = "scores"
) -> list[Path]:
    """Write ``<name>.csv`` and ``<name>.parquet`` (atomically); returns the paths written.

    Columns are the rank table's, plus ``noisy`` when a noise mask is given. Array cells (one-hot
    or soft labels, vector or image targets) are JSON lists in the CSV (``json.loads`` reads them
    back) and (nested) lists in the Parquet file. The Parquet file needs pyarrow (or fastparquet);
    without one only the CSV is written.
    """
    out = Path(out_dir)
    frame = table.copy()
    frame.attrs = {}
    if noise_mask is not None:
        frame["noisy"] = np.asarray(noise_mask, dtype=bool)[frame["index"].to_numpy()]
    paths = [out / f"{name}.csv"]
    csv = frame.copy()
    for column in csv.select_dtypes(include="object").columns:  # numpy's repr of an array spans lines: one JSON list
        csv[column] = [_json_list(v) if isinstance(v, (list, np.ndarray)) else v for v in csv[column]]
    atomic_write_text(paths[0], csv.to_csv(index=False))
    for column in frame.select_dtypes(include="object").columns:  # Parquet takes nested lists, not n-D arrays
        frame[column] = [v.tolist() if isinstance(v, np.ndarray) and v.ndim > 1 else v for v in frame[column]]
    buffer = io.BytesIO()
    try:
        frame.to_parquet(buffer, index=False)
    except ImportError:
        warnings.warn(f"{name}.parquet not written: install pyarrow for Parquet output", stacklevel=2)
        return paths
    paths.append(out / f"{name}.parquet")
    atomic_write_bytes(paths[1], buffer.getvalue())
    return paths


def _json_list(value: Any) -> str:
    """One array cell as a JSON list, float32 entries at their own precision (0.1, not 0.10000000149011612)."""
    array = np.asarray(value)
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        array = array.astype(str).astype(np.float64)  # numpy's shortest text that reads back to the same float32
    return json.dumps(array.tolist())


def _check_per_sample(value: Any, param: str, n: int, min_ndim: int, max_ndim: int, dtype: Any = None):
    if value is None:
        return None
    array = np.asarray(value, dtype=dtype)
    if len(array) != n or not min_ndim <= array.ndim <= max_ndim:
        raise ValueError(
            param_error(
                param,
                FUNC,
                f"an array with one entry per training sample ({n}), {min_ndim}-{max_ndim} dimensions",
                describe(array),
            )
        )
    return array


def _side_by_side(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per training sample (by index): label, then rank, score and removal effect of each method."""
    first = next(iter(tables.values())).sort_values("index")
    frame = first[["index", "label", "predicted_label", "train_loss"]].reset_index(drop=True)
    for name, t in tables.items():
        by_index = t.sort_values("index").reset_index(drop=True)
        for column in ("rank", "score", "removal_effect"):
            frame[f"{column}_{name}"] = by_index[column]
    return frame


def _ties_note(ranked: pd.DataFrame) -> str:
    """A warning when every score is equal: the grid is then the samples in index order."""
    scores = ranked["score"].to_numpy()
    if len(scores) < 2 or not np.all(scores == scores[0]):
        return ""
    return (
        f" <strong>All {len(scores)} scores are equal ({fmt(scores[0], 3)}): this order is the sample index and "
        "ranks nothing</strong> (outputs that saturate, with probabilities clipped at 0 or 1, give every sample a "
        "zero gradient: lower the learning rate)."
    )


def _label_text(label: Any) -> str:
    return fmt(label, 3)


def _cards(rows: pd.DataFrame, images: np.ndarray, out: Path, prefix: str, noise, clean) -> list[Card]:
    """Write one PNG tile per row (on the data set's common value range) and describe its card."""
    value_range = (float(np.min(images)), float(np.max(images)))
    cards = []
    for pos, row in enumerate(rows.itertuples(index=False)):
        i = int(row.index)
        name = f"{IMAGE_DIR}/{prefix}_{pos:02d}.png"
        atomic_write_bytes(out / name, figures.sample_tile(images[i], value_range=value_range))
        given, predicted = _label_text(row.label), _label_text(row.predicted_label)
        # Only a class can be wrong: a regression's prediction is shown next to its target.
        wrong = isinstance(row.predicted_label, (int, np.integer)) and predicted != given
        lines = [
            f'label {esc(given)} → pred <span class="{"harm" if wrong else ""}">{esc(predicted)}</span>',
            f"score {esc(fmt(row.score, 3))}",
            f"Δ val loss {esc(fmt(row.removal_effect, 3))}",
        ]
        if hasattr(row, "learned_weight"):
            lines.append(f"learned weight {esc(fmt(row.learned_weight, 2))}")
        noisy = bool(noise[i]) if noise is not None else False
        note = f"flipped; true {fmt(clean[i])}" if (noisy and clean is not None) else "known noisy"
        cards.append(Card(src=name, index=i, lines=lines, noisy=noisy, note=note))
    return cards


def _rows_table(rows: pd.DataFrame, features: np.ndarray | None, feature_names: Sequence[str] | None) -> str:
    shown = rows[["rank", "index", "label", "predicted_label", "score", "removal_effect", "train_loss"]].copy()
    shown.columns = ["rank", "index", "label", "predicted", "score", "Δ val loss if removed", "train loss"]
    if "learned_weight" in rows:
        shown["learned weight"] = rows["learned_weight"].to_numpy()
    if features is not None:
        flat = features.reshape(len(features), -1)
        names = list(feature_names) if feature_names is not None else [f"x[{j}]" for j in range(flat.shape[1])]
        for j in range(min(flat.shape[1], 8)):
            shown[names[j]] = flat[rows["index"].to_numpy(), j]
    return html_table(shown)


def _samples_body(sid: str, rows: pd.DataFrame, out: Path, *, images, features, feature_names, noise, clean) -> str:
    """``rows`` as an image grid (tiles written under ``out``), or as a table without images."""
    if images is None:
        return _rows_table(rows, features, feature_names)
    # The harmful and helpful grids never share a sample (anchors #sample-<index>); any other grid
    # may repeat one of theirs and gets its own prefix.
    prefix = "sample" if sid in ("harmful", "helpful") else f"{sid}-sample"
    return grid(_cards(rows, images, out, sid, noise, clean), id_prefix=prefix)


def _samples_section(sid: str, title: str, rows: pd.DataFrame, out: Path, *, note: str, **samples: Any) -> Section:
    return Section(sid, title, _samples_body(sid, rows, out, **samples), note)


def _summary(summary: Mapping[str, Any], table_: pd.DataFrame, verification, noise, n_top: int) -> dict[str, Any]:
    """Given facts first, then what the table and verification show; ``time`` and ``shards`` entries last."""
    attrs = table_.attrs
    items: dict[str, Any] = {"training samples": len(table_), "method": attrs.get("method", "—")}
    items.update(summary)
    items.setdefault("validation loss", attrs.get("val_loss"))
    if attrs.get("outside_run"):
        items["not in the run"] = f"{attrs['outside_run']} samples of weight 0, listed last"
    if "seconds" in attrs:
        items.setdefault("time", f"ranking {attrs['seconds']:.2f} s")
    if noise is not None and np.any(noise):
        found = int(np.sum(noise[table_["index"].to_numpy()[:n_top]]))
        items[f"known-noisy in top {n_top}"] = f"{found} of {int(np.sum(noise))} ({found / np.sum(noise):.0%})"
    if verification is not None:
        items["verified by retraining"] = (
            f"{len(verification.indices)} samples: Pearson r = {verification.pearson:.3f}, "
            f"Spearman ρ = {verification.spearman:.3f} (predicted vs actual removal effect)"
        )
    for key in ("time", "shards"):
        if key in items:
            items[key] = items.pop(key)
    return items


def _distribution_section(ranked: pd.DataFrame, noise, method: str, out: Path) -> Section:
    name = f"{IMAGE_DIR}/score_distribution.png"
    score = ranked.sort_values("index")["score"].to_numpy()
    atomic_write_bytes(out / name, figures.score_distribution(score, noise, method=method))
    return Section("distribution", "Score distribution", image(name, "histogram of scores"), half=True)


def _verification_section(verification: Verification | None, out: Path, method: str, has_effect: bool) -> Section:
    title = "Predicted vs actual removal effect"
    if verification is None:
        if has_effect:
            note = (
                "No retraining was run: ask for it (--verify K on the command line, verify_top / verify_random "
                "in RankingJob) to compare predicted with actual effects."
            )
        else:
            note = (
                f"No retraining was run: {esc(method)} predicts no removal effect to compare with. Put unrolled, "
                "influence_function or tracin first in --method to verify its predictions."
            )
        return Section("verification", title, "", note, half=True)
    name = f"{IMAGE_DIR}/removal_scatter.png"
    atomic_write_bytes(out / name, figures.removal_scatter(verification))
    note = (
        "Each point: the model retrained from the same initial weights, batches and learning rates with "
        f"one sample's weight set to 0. Pearson r = {verification.pearson:.3f}, Spearman ρ = "
        f"{verification.spearman:.3f} over {len(verification.indices)} retrainings."
    )
    body = f'<div class="figs">{image(name, "predicted vs actual removal effect")}</div>'
    return Section("verification", title, body, note, half=True)


def _found_at_k_section(tables: Mapping[str, pd.DataFrame], noise, n_top: int, out: Path) -> Section:
    if noise is None or not np.any(noise):
        given = "The known-noisy mask marks no sample" if noise is not None else "No known-noisy samples were given"
        return Section(
            "found-at-k",
            "found@k",
            "",
            f"{given} (a boolean 'noisy' array in the .npz data, or noise_mask in RankingJob / render_report): "
            "there is nothing to find.",
        )
    curves = {name: found_at_k(t, noise) for name, t in tables.items()}
    n = len(noise)
    name = f"{IMAGE_DIR}/found_at_k.png"
    atomic_write_bytes(out / name, figures.found_at_k_plot(curves, int(noise.sum())))
    at = pd.DataFrame(
        {
            "method": list(curves),
            f"found@{n_top}": [c[n_top - 1] for c in curves.values()],
            f"found@{min(2 * n_top, n)}": [c[min(2 * n_top, n) - 1] for c in curves.values()],
        }
    )
    body = f'<div class="figs">{image(name, "found at k curve")}{html_table(at, text_columns=["method"])}</div>'
    return Section("found-at-k", "found@k: known-noisy samples among the top k", body)


def _per_class_section(ranked: pd.DataFrame, noise, n_top: int, loss: str | None) -> Section:
    per_class = per_class_table(ranked, noise, loss)
    if per_class is None:
        return Section("per-class", "Per class", "", "Labels are continuous targets: no classes to tabulate.")
    return Section("per-class", "Per class", html_table(per_class), f"Counted over the {n_top} most harmful samples.")


def _convergence_section(convergence: pd.DataFrame | None, out: Path) -> Section | None:
    if convergence is None:
        return None
    required = {"optimizer", "step", "val_loss", "seconds"}
    if not isinstance(convergence, pd.DataFrame) or not required <= set(convergence.columns):
        raise ValueError(
            param_error("convergence", FUNC, f"a DataFrame with columns {sorted(required)}", describe(convergence))
        )
    by_optimizer = convergence.sort_values("step", kind="stable").groupby("optimizer", sort=False)
    curves = {str(name): (group["val_loss"].to_numpy(), group["seconds"].to_numpy()) for name, group in by_optimizer}
    name = f"{IMAGE_DIR}/convergence.png"
    atomic_write_bytes(out / name, figures.convergence_plot(curves))
    last, first = by_optimizer.tail(1), by_optimizer.head(1)
    summary = pd.DataFrame(
        {
            "optimizer": last["optimizer"].to_numpy(),
            "val loss before": first["val_loss"].to_numpy(),
            "val loss after": last["val_loss"].to_numpy(),
            "outer steps": last["step"].to_numpy(),
            "seconds": last["seconds"].to_numpy(),
        }
    )
    note = convergence.attrs.get(
        "note",
        "Training inputs optimised through the recorded run (influence.optimize_training_inputs): each outer "
        "step retrains with the recorded schedule and follows dE/dx from the unrolled pass. Every point is a "
        "retrained model; the curves against wall time show what each optimizer's progress costs.",
    )
    body = f'<div class="figs">{image(name, "validation loss per outer optimizer")}'
    body += f"{html_table(summary, text_columns=['optimizer'])}</div>"
    return Section("convergence", "Optimising training inputs: outer optimizers", body, esc(note))


def _check_learned_weights(learned: Any, n: int) -> pd.DataFrame | None:
    """``learned_weights`` of render_report: None, or its frame (one weight per sample, with its loss
    curve) with the rows in sample order."""
    if learned is None:
        return None
    ok = isinstance(learned, pd.DataFrame) and {"index", "learned_weight"} <= set(learned.columns)
    ok = ok and len(learned) == n and "val_loss" in learned.attrs
    if ok and "holdout_loss" in learned.attrs:  # a held-out curve as long as the validation one, and the step shown
        best = learned.attrs.get("best_step")
        steps = len(learned.attrs["val_loss"])
        ok = len(learned.attrs["holdout_loss"]) == steps and isinstance(best, int) and 0 <= best < steps
    if ok:
        index = np.sort(learned["index"].to_numpy())
        ok = np.issubdtype(index.dtype, np.integer) and np.array_equal(index, np.arange(n))
    if not ok:
        raise ValueError(
            param_error(
                "learned_weights",
                FUNC,
                f"a DataFrame with columns 'index' and 'learned_weight', one row per training sample ({n}), "
                "and attrs['val_loss'] (one per outer step; with attrs['holdout_loss'] as long, and "
                "attrs['best_step'] an entry of it)",
                describe(learned),
            )
        )
    return learned.sort_values("index", ignore_index=True)  # row i is sample i from here on


def _learned_weights_section(
    learned: pd.DataFrame | None, shown: pd.DataFrame, out: Path, top: int, samples: dict[str, Any]
) -> Section | None:
    """The weights of :func:`influence.learn_sample_weights`: loss curve, histogram, lowest-weight samples."""
    if learned is None:
        return None
    n = len(shown)
    weights = learned["learned_weight"].to_numpy(dtype=np.float64)
    val_loss = np.asarray(learned.attrs["val_loss"], dtype=np.float64)
    noise = samples["noise"]
    lowest = np.argsort(weights, kind="stable")[:top]
    rows = shown.set_index("index", drop=False).loc[lowest].reset_index(drop=True)
    rows["learned_weight"] = weights[lowest]
    below = weights < 0.5
    counted = f"{int(below.sum())} samples learned below 0.5"
    if noise is not None and np.any(noise):
        counted += f", {int(np.sum(below & noise))} of them known noisy (of {int(noise.sum())} known noisy in all)"
    held = learned.attrs.get("holdout_loss")
    if held is None:  # the weights are the last step's
        held_loss, best = None, None
        losses = f"Validation loss {fmt(val_loss[0], 4)} → {fmt(val_loss[-1], 4)}; {counted}. "
        caveat = "The weights fit the validation data they were learned on: check them on held-out data before acting."
    else:
        held_loss, best = np.asarray(held, dtype=np.float64), int(learned.attrs["best_step"])
        fraction = learned.attrs.get("holdout")
        part = f"{fraction:.0%} of the validation samples" if isinstance(fraction, float) else "held-out samples"
        losses = (
            f"Learned on the other validation samples, shown at step {best}, the lowest loss on {part} held out "
            f"of the learning: held-out loss {fmt(held_loss[0], 4)} → {fmt(held_loss[best], 4)}, validation loss "
            f"(learned on) {fmt(val_loss[0], 4)} → {fmt(val_loss[best], 4)}; {counted}. "
        )
        caveat = "The step was chosen on the held-out samples: a test set neither part saw judges it fairly."
    lam = learned.attrs.get("penalty")  # absent from tables saved before the option
    penalty = f", a pull of λ = {fmt(lam, 2)} towards the recorded weights" if lam else ""
    name = f"{IMAGE_DIR}/learned_weights.png"
    atomic_write_bytes(out / name, figures.learned_weights_plot(val_loss, weights, noise, held_loss, best))
    note = (
        f"All {n} training weights learned together by influence.learn_sample_weights "
        f"({esc(str(learned.attrs.get('optimizer', 'Adam')))}, {len(val_loss) - 1} outer steps{penalty}): each "
        "step retrains the recorded run with the current weights and follows dE/dc from the unrolled pass, so "
        f"interactions between samples are taken into account. {losses}{caveat} "
        f"Lowest {len(lowest)} weights first."
    )
    figure = f'<div class="figs">{image(name, "validation loss per outer step and learned weights")}</div>'
    cards = _samples_body("learned", rows, out, **samples)
    return Section("learned-weights", "Learned sample weights", figure + cards, note)


def render_report(
    out_dir: str | os.PathLike,
    table: pd.DataFrame,
    *,
    summary: Mapping[str, Any],
    images: Any = None,
    features: Any = None,
    feature_names: Sequence[str] | None = None,
    verification: Verification | None = None,
    noise_mask: Any = None,
    clean_labels: Any = None,
    comparison: Mapping[str, pd.DataFrame] | None = None,
    convergence: pd.DataFrame | None = None,
    learned_weights: pd.DataFrame | None = None,
    top: int = 24,
    title: str = "influence: data-debugging report",
    loss: str | None = None,
) -> Path:
    """Write ``index.html`` (plus PNGs under ``images/`` and scores as CSV/Parquet) into ``out_dir``.

    Args:
        table: from :func:`influence.rank` (any method); its ``attrs`` fill the summary's
            method, validation loss and time unless ``summary`` gives them.
        summary: ordered facts for the summary table (data, model, training, times...).
        images: (n, H, W) or (n, H, W, C) pixels of the training samples, for image grids;
            without it the most harmful/helpful samples are shown as a table (with up to 8
            columns of ``features``, (n, ...), named by ``feature_names``).
        verification: predicted vs actual removal effects from retraining.
        noise_mask: (n,) bool, the known-noisy (e.g. label-flipped) samples: enables found@k.
        clean_labels: (n,) the labels before flipping, shown on noisy samples' cards.
        comparison: other methods' rank tables, drawn on the found@k plot and saved side by
            side in ``all_methods.csv/.parquet``.
        convergence: curves of :func:`influence.optimize_training_inputs` per outer optimizer,
            columns ``optimizer``, ``step``, ``val_loss``, ``seconds`` (``attrs["note"]`` explains them).
        learned_weights: per-sample weights of :func:`influence.learn_sample_weights`, columns
            ``index`` and ``learned_weight`` (one row per sample), ``attrs["val_loss"]`` per outer
            step (and ``attrs["optimizer"]``); with a holdout also ``attrs["holdout_loss"]`` per
            outer step, ``attrs["best_step"]`` (the step the weights are) and ``attrs["holdout"]``
            (the fraction held out); saved as ``learned_weights.csv``.
        top: samples per grid.
        loss: name of the training loss: only a cross-entropy's labels are classes (a per-class
            table; soft labels of ``categorical_crossentropy`` shown as the class of their largest
            entry); None: decided from the labels (integral values and one-hot rows are classes).

    Returns the path of ``index.html``. Every file is written atomically.
    """
    ranked = check_table(table, FUNC)
    ranked.attrs = dict(table.attrs)
    shown = ranked.copy()
    labels = class_labels(ranked["label"], loss)
    if labels is not None:  # one-hot rows, soft labels and integral floats shown as class numbers
        shown["label"] = labels
    n = len(ranked)
    images = _check_per_sample(images, "images", n, 3, 4)
    channels_note = ""
    if images is not None and images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        # No colour model for 2 or 5+ channels: grey tiles of the first, on its own value range.
        channels_note = f" Images have {images.shape[-1]} channels: the tiles show channel 0 in grey."
        images = images[..., 0]
    features = _check_per_sample(features, "features", n, 1, 8)
    noise = _check_per_sample(noise_mask, "noise_mask", n, 1, 1, dtype=bool)
    clean = _check_per_sample(clean_labels, "clean_labels", n, 1, 2)
    learned = _check_learned_weights(learned_weights, n)
    if verification is not None and not isinstance(verification, Verification):
        raise TypeError(param_error("verification", FUNC, "an influence.report.Verification", describe(verification)))
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(param_error("top", FUNC, "a positive int", describe(top)))
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    method = str(ranked.attrs.get("method", "score"))
    n_top = top_count(n, noise)
    top = min(top, n)
    # Disjoint grids: with fewer than 2·top samples each gets its half (the harmful one the middle sample).
    n_harmful = min(top, (n + 1) // 2)
    n_helpful = min(top, n - n_harmful)

    files = save_scores(out, ranked, noise_mask=noise)
    others = {name: check_table(t, FUNC) for name, t in (comparison or {}).items() if name != method}
    if others:
        files += save_scores(out, _side_by_side({method: ranked} | others), noise_mask=noise, name="all_methods")
    if verification is not None:
        atomic_write_text(out / "verification.csv", verification.frame().to_csv(index=False))
        files.append(out / "verification.csv")

    if learned is not None:
        frame = learned[["index", "learned_weight"]].copy()
        if noise is not None:
            frame["noisy"] = noise[frame["index"].to_numpy()]
        atomic_write_text(out / "learned_weights.csv", frame.to_csv(index=False))
        files.append(out / "learned_weights.csv")

    samples = {"images": images, "features": features, "feature_names": feature_names, "noise": noise, "clean": clean}
    has_effect = not ranked["removal_effect"].isna().all()
    generic = "Δ val loss = predicted change of validation loss if the sample were removed (negative = harmful)."
    effect_note = EFFECT_NOTES.get(method, generic if has_effect else "")
    predicts_removal = has_effect and method != "tracin"
    sections = [
        Section("summary", "Summary", key_value(_summary(summary, ranked, verification, noise, n_top))),
        _samples_section(
            "harmful",
            f"Most harmful {n_harmful} training samples",
            shown.head(n_harmful),
            out,
            note=f"Highest {esc(method)} scores first. {effect_note}{channels_note}{_ties_note(ranked)}",
            **samples,
        ),
        _samples_section(
            "helpful",
            f"Most helpful {n_helpful} training samples",
            shown.tail(n_helpful).iloc[::-1],
            out,
            note=f"Lowest {esc(method)} scores first"
            + (": removing these would raise the validation loss most." if predicts_removal else "."),
            **samples,
        ),
        _distribution_section(ranked, noise, method, out),
        _verification_section(verification, out, method, has_effect),
        _found_at_k_section({method: ranked} | others, noise, n_top, out),
        _per_class_section(ranked, noise, n_top, loss),
        *[s for s in [_convergence_section(convergence, out)] if s is not None],
        *[s for s in [_learned_weights_section(learned, shown, out, top, samples)] if s is not None],
        Section(
            "files",
            "Files",
            "<ul>" + "".join(f'<li><a href="{esc(p.name)}">{esc(p.name)}</a></li>' for p in files) + "</ul>",
            "All scores, one row per training sample.",
        ),
    ]
    subtitle = f"{n} training samples ranked by {method}"
    path = out / "index.html"
    atomic_write_text(path, page(title, subtitle, sections))
    return path

"""How much issue 4's fidelity figures depend on the seed: ``benchmarks/unrolled.py``'s protocol
repeated over ten seeds.

Setup
    The main fidelity rows of ``benchmarks/unrolled.py`` (imported from it): digits / 16, 1000 train
    (10 % of the labels flipped) / 400 validation, MLP 64-32-10 (tanh, softmax), float32, batch 50,
    8 epochs (T = 160), SGD 0.5 and Adam 0.01 (Keras's ε = 1e-7), and a diagnostic row with Adam's
    ε = 1e-5. One seed s sets everything that unrolled.py fixes
    with seed 0: the shuffle and the flipped labels, the initial weights, the batch order and the
    draw of the 25 random samples. Seed 0 is unrolled.py's run (same numbers).

Measured, per seed and optimizer
    Pearson, Spearman and Kendall τ of ``removal_effect`` against the actual change of validation
    loss when each of the 50 samples (the 25 most negative removal effects + 25 random others) is
    removed by retraining (``inf.actual_removal_effect``), as in unrolled.py; and, as a diagnostic
    (not a method of the package), the same with the second-order term added: each sample's
    curvature κ_i = d²E/dc_i² from a central second difference through a float64 replay of the run
    (``inf.as_float64_trajectory``, ε = 0.01), prediction removal_effect_i + κ_i/2.
    The targets of issue 4 (Pearson ≥ 0.97, Spearman ≥ 0.98) are judged in unrolled.py on seed 0;
    this script reports how many of the ten seeds reach them.

Outputs
    ``reports/benchmarks/fidelity_seeds.{json,md}``; ``--quick`` (seeds 0–1, 5 + 5 samples, Adam only)
    writes under ``reports/_scratch/benchmarks/``.

Usage (from the repository root)::

    python benchmarks/fidelity_seeds.py          # about 4 minutes on 2 cores (252 s)
    python benchmarks/fidelity_seeds.py --quick
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import statistics
import time
from typing import Any

import numpy as np
from _common import benchmark_parser, output_dir, report_header, write_report
from scipy import stats
from unrolled import (
    ADAM_LR,
    BATCH,
    EPOCHS,
    LOSS,
    N_HARMFUL,
    N_RANDOM,
    PEARSON_TARGET,
    SGD_LR,
    SPEARMAN_TARGET,
    build_mlp,
    load_data,
)

import influence as inf
from influence.verify import validation_loss

NAME = "fidelity_seeds"
SEEDS = tuple(range(10))
CURVATURE_EPS = 1e-2  # a smooth response gives the same curvature at 1e-3 (unrolled.py's float64 rows)
ADAM_EPSILON = 1e-5  # diagnostic row: Adam's ε raised from Keras's 1e-7 (see the notes)
OPTIMIZERS = {
    f"SGD {SGD_LR}": lambda: inf.optimizers.SGD(SGD_LR),
    f"Adam {ADAM_LR}": lambda: inf.optimizers.Adam(ADAM_LR),
    f"Adam {ADAM_LR}, ε = {ADAM_EPSILON:g}": lambda: inf.optimizers.Adam(ADAM_LR, epsilon=ADAM_EPSILON),
}


def correlations(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    return {
        "pearson": float(stats.pearsonr(predicted, actual)[0]),
        "spearman": float(stats.spearmanr(predicted, actual)[0]),
        "kendall_tau": float(stats.kendalltau(predicted, actual)[0]),
    }


def fit_seed(seed: int, optimizer: str) -> tuple[inf.Trajectory, Any]:
    """unrolled.py's data, MLP and fit with every seed set to ``seed``."""
    data = load_data(seed)
    trajectory = inf.fit(
        build_mlp(seed), data.x_train, data.y_train, loss=LOSS, optimizer=OPTIMIZERS[optimizer](),
        batch_size=BATCH, epochs=EPOCHS, seed=seed,
    )  # fmt: skip
    return trajectory, data


def run_seed(seed: int, optimizer: str, n_harmful: int, n_random: int) -> dict[str, Any]:
    """unrolled.py's fidelity measurement with every seed set to ``seed``."""
    trajectory, data = fit_seed(seed, optimizer)
    x, y, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    effect = inf.unrolled(trajectory, x, y, xv, yv, input_grad=False, progress=False).removal_effect
    harmful = np.argsort(effect)[:n_harmful]
    others = np.random.default_rng(seed).choice(np.setdiff1d(np.arange(len(x)), harmful), n_random, replace=False)
    chosen = [int(i) for i in np.concatenate([harmful, others])]
    actual = inf.actual_removal_effect(trajectory, x, y, xv, yv, chosen, progress=False)
    predicted = effect[chosen]

    # Diagnostic: curvature through a float64 replay (float32 cannot resolve κ ε² ≈ 1e-7).
    run64 = inf.as_float64_trajectory(trajectory, x, y)
    x64 = x.astype(np.float64)
    eps = CURVATURE_EPS
    kappa = np.array(
        [
            inf.removal_curve(run64, x64, y, xv, yv, i, scales=(1 - eps, 1 + eps), removal_effect=effect)[
                "actual_change"
            ].sum()
            / eps**2
            for i in chosen
        ]
    )
    return {
        "seed": seed,
        "optimizer": optimizer,
        "val_loss": validation_loss(trajectory, trajectory.final_weights, xv, yv),
        "flipped_among_most_harmful": int(np.isin(harmful, data.flipped).sum()),
        "first_order": correlations(predicted, actual),
        "second_order": correlations(predicted + 0.5 * kappa, actual),
        "samples": {"index": chosen, "predicted": predicted, "actual": actual, "curvature": kappa},
    }


LINEAR_RANGE_SCALES = (1 - 1e-6, 1 - 1e-4, 1 - 1e-3, 0.99, 0.9, 0.5, 0.0)


def linear_range(seed: int, optimizer: str, index: int) -> dict[str, Any]:
    """Float64 validation-loss change with sample ``index``'s weight at each of LINEAR_RANGE_SCALES,
    against the straight line of its removal effect: how far from c_i = 1 first order holds."""
    trajectory, data = fit_seed(seed, optimizer)
    x, y, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    run64 = inf.as_float64_trajectory(trajectory, x, y)
    x64 = x.astype(np.float64)
    effect64 = inf.unrolled(run64, x64, y, xv, yv, input_grad=False, progress=False).removal_effect
    table = inf.removal_curve(run64, x64, y, xv, yv, index, scales=LINEAR_RANGE_SCALES, removal_effect=effect64)
    return {
        "seed": seed,
        "optimizer": optimizer,
        "index": index,
        "removal_effect_float64": float(effect64[index]),
        "scale": table["scale"].tolist(),
        "actual_change": table["actual_change"].tolist(),
        "predicted_change": table["predicted_change"].tolist(),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over seeds, and how many seeds meet issue 4's targets."""
    out: dict[str, Any] = {}
    for order in ("first_order", "second_order"):
        for metric in ("pearson", "spearman", "kendall_tau"):
            values = [r[order][metric] for r in rows]
            out[f"{order}_{metric}"] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
        out[f"{order}_seeds_meeting_targets"] = sum(
            r[order]["pearson"] >= PEARSON_TARGET and r[order]["spearman"] >= SPEARMAN_TARGET for r in rows
        )
    out["seeds"] = len(rows)
    return out


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        "# Fidelity of `removal_effect` over seeds (issue 4's protocol)",
        "",
        f"{s['description']} Seeds {s['seeds'][0]}–{s['seeds'][-1]}; {s['n_harmful']} most harmful + "
        f"{s['n_random']} random samples per run. Machine: {m['cpu_count']} CPUs, Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}. Command: `{report['command']}` ({report['total_s']:.0f} s).",
        "",
        "First order = `removal_effect` (what the package predicts). +2nd order = diagnostic, not a method: "
        f"removal_effect + κ_i/2 with κ_i = d²E/dc_i² from a central second difference (ε = {CURVATURE_EPS:g}) "
        "through a float64 replay — it costs two retrainings per sample, more than the retraining it predicts.",
        "",
    ]
    for optimizer, rows in report["runs"].items():
        summ = report["summary"][optimizer]
        lines += [
            f"## MLP 64-32-10, {optimizer}",
            "",
            "| seed | val loss | flipped in top | Pearson | Spearman | Kendall τ | +2nd order: Pearson | Spearman |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            f, q = r["first_order"], r["second_order"]
            lines.append(
                f"| {r['seed']} | {r['val_loss']:.3f} | {r['flipped_among_most_harmful']}/{s['n_harmful']} | "
                f"{f['pearson']:.3f} | {f['spearman']:.3f} | {f['kendall_tau']:.3f} | {q['pearson']:.4f} | "
                f"{q['spearman']:.4f} |"
            )
        for stat in ("median", "min", "max"):
            lines.append(
                f"| **{stat}** | | | {summ['first_order_pearson'][stat]:.3f} | "
                f"{summ['first_order_spearman'][stat]:.3f} | {summ['first_order_kendall_tau'][stat]:.3f} | "
                f"{summ['second_order_pearson'][stat]:.4f} | {summ['second_order_spearman'][stat]:.4f} |"
            )
        lines += [
            "",
            f"- Seeds meeting both targets (Pearson ≥ {PEARSON_TARGET:g}, Spearman ≥ {SPEARMAN_TARGET:g}): first order "
            f"{summ['first_order_seeds_meeting_targets']} of {summ['seeds']}; with the second-order term "
            f"{summ['second_order_seeds_meeting_targets']} of {summ['seeds']}.",
            "",
        ]
    curve = report.get("linear_range")
    if curve:
        lines += [
            f"## How far first order holds: {curve['optimizer']}, seed {curve['seed']}, sample {curve['index']}",
            "",
            "The compared sample with the largest |predicted − actual| in the seed with the lowest Pearson; "
            "float64 replay of the run, validation-loss change with the sample's weight at c_i (1 = as recorded) "
            f"against the straight line of its removal effect ({curve['removal_effect_float64']:+.5f}).",
            "",
            "| c_i | actual change | first-order prediction | actual ÷ predicted |",
            "|---:|---:|---:|---:|",
        ]
        for c, a, p in zip(curve["scale"], curve["actual_change"], curve["predicted_change"]):
            lines.append(f"| {c:.6g} | {a:+.3e} | {p:+.3e} | {a / p:.3f} |")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def notes(report: dict[str, Any]) -> list[str]:
    """Findings read off this run's numbers."""
    out = []
    summ, runs = report["summary"], report["runs"]
    for optimizer, rows in runs.items():
        first = summ[optimizer]
        out.append(
            f"{optimizer}: first-order Spearman median {first['first_order_spearman']['median']:.3f} "
            f"(range {first['first_order_spearman']['min']:.3f}–{first['first_order_spearman']['max']:.3f}); seed 0, "
            f"the run benchmarks/unrolled.py judges, gives {rows[0]['first_order']['spearman']:.3f}."
        )
    default, raised = f"Adam {ADAM_LR}", f"Adam {ADAM_LR}, ε = {ADAM_EPSILON:g}"
    if default in runs and raised in runs:
        bad = [r["seed"] for r in runs[default] if r["first_order"]["pearson"] < 0.9]
        if bad:
            pairs = ", ".join(
                f"seed {s}: {runs[default][s]['first_order']['pearson']:.3f} → "
                f"{runs[raised][s]['first_order']['pearson']:.3f}"
                for s in bad
            )
            val_gap = max(abs(runs[default][s]["val_loss"] - runs[raised][s]["val_loss"]) for s in bad)
            out.append(
                f"Adam with Keras's ε = 1e-7: Pearson below 0.9 in {len(bad)} of {len(runs[default])} seeds; with "
                f"ε = {ADAM_EPSILON:g} the same seeds give ({pairs}), at the same validation loss (largest difference "
                f"{val_gap:.3f}), and the flipped labels among the 25 most harmful rise as well (table). The "
                "hypergradient itself is exact (in the table below, the change at c_i = 1 − 1e-6 equals the slope's "
                "prediction); what fails is its extrapolation: with ε = 1e-7 the response of the validation loss to "
                "a sample's weight stays linear only over tiny changes of that weight, and the slope at c_i = 1 "
                "overstates a whole removal. The second-order term does not help there: the response is not "
                "smooth at the scale of a removal."
            )
    return out


def main() -> None:
    parser = benchmark_parser(__doc__, "smoke run: seeds 0-1, 5 + 5 samples, Adam only", f"{NAME}.{{json,md}}")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = SEEDS[:2] if args.quick else SEEDS
    n_harmful, n_random = (5, 5) if args.quick else (N_HARMFUL, N_RANDOM)
    optimizers = list(OPTIMIZERS)[1:2] if args.quick else list(OPTIMIZERS)
    runs: dict[str, list[dict[str, Any]]] = {}
    for optimizer in optimizers:
        runs[optimizer] = []
        for seed in seeds:
            row = run_seed(seed, optimizer, n_harmful, n_random)
            runs[optimizer].append(row)
            f, q = row["first_order"], row["second_order"]
            print(
                f"{optimizer:<9} seed {seed}: Pearson {f['pearson']:.3f} Spearman {f['spearman']:.3f} "
                f"(+2nd order {q['pearson']:.4f} / {q['spearman']:.4f})",
                flush=True,
            )
    report = {
        **report_header("removal_effect vs retraining over seeds (benchmarks/unrolled.py's fidelity protocol)"),
        "setup": {
            "description": "Digits / 16: 1000 train (10 % labels flipped) / 400 val; MLP 64-32-10 tanh, float32, "
            f"batch {BATCH}, {EPOCHS} epochs (T = 160).",
            "seeds": list(seeds),
            "n_harmful": n_harmful,
            "n_random": n_random,
            "curvature_eps": CURVATURE_EPS,
            "quick": args.quick,
        },
        "runs": runs,
        "summary": {optimizer: summary(rows) for optimizer, rows in runs.items()},
    }
    default = f"Adam {ADAM_LR}"
    if default in runs:  # where first order holds, for the worst Adam run
        worst = min(runs[default], key=lambda r: r["first_order"]["pearson"])
        samples = worst["samples"]
        miss = np.abs(np.asarray(samples["predicted"]) - np.asarray(samples["actual"]))
        report["linear_range"] = linear_range(worst["seed"], default, int(samples["index"][int(np.argmax(miss))]))
    report["notes"] = notes(report)
    report["total_s"] = time.perf_counter() - started
    json_path, md_path = write_report(output_dir(args), NAME, report, markdown(report))
    print(f"wrote {json_path} and {md_path} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()

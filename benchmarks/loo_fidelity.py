"""Leave-one-out fidelity of every ranking method: how well does each method's predicted removal
effect match the real change of validation loss when one training sample is removed and the
recorded run is retrained? Ground truth for *every* training sample, not a selection.

Setup
    The four cases of ``benchmarks/data_debugging.py`` (digits and breast cancer, 10 % and 20 % of
    the training labels flipped; same models and SGD settings, imported from it; digits 10 % is
    issue 4's setup), in two groups: ``split 0``, its split and flips with its five training seeds;
    ``own splits``, seeds 1–4 each drawing its own split, flips and run.

Measured, per run
    * actual: for every training sample i, val_loss(retrain with c_i = 0) − val_loss(retrain with
      c = 1) on the *recorded* run (same batches and learning rates; ``influence.retrain``), so the
      replay's round-off cancels. n retrainings per run (1000 on digits, 284 on breast cancer).
    * predicted: ``removal_effect`` of ``rank(method=...)`` for
        - ``unrolled`` (exact first-order effect through the recorded run),
        - ``influence_function`` with ``solver="auto"`` and ``damping="auto"`` (the default), with
          ``solver="lissa"``, and with fixed damping λ = 0.01, 0.3 and 3 (solver auto; "auto" picks
          about 0.1–0.4 here): is its fidelity a matter of tuning? CG refuses a λ that leaves
          H + λI indefinite; such runs are counted as refused.
        - ``tracin`` (one checkpoint per epoch, the default) and ``tracin/every step``
          (``checkpoint_every=1``);
      and, marked score-based, −score of ``self_influence``, ``margin`` and ``loss``, which give no
      removal effect (the sign makes "more harmful" mean "removal lowers the validation loss").
    * agreement of predicted with actual over all n samples: Pearson r, Spearman ρ, Kendall τ, and
      top-5 % overlap: the share of the 5 % of samples whose removal lowers the validation loss most
      that are also among the method's 5 % most negative predictions (chance: 0.05).

Reported
    Per group and case: mean ± std over the seeds of a group; over all 36 runs: median and range per
    method. Time per ``rank`` call.

Outputs
    ``reports/benchmarks/loo_fidelity.{json,md}``; ``--quick`` (digits 10 %, one seed per group)
    writes under ``reports/_scratch/benchmarks/``.

Usage (from the repository root)::

    python benchmarks/loo_fidelity.py           # about 5 minutes on 2 cores
    python benchmarks/loo_fidelity.py --quick
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import math
import time
from typing import Any

import numpy as np
from _common import benchmark_parser, output_dir, report_header, write_report
from data_debugging import SPECS, Evaluator, load_split, run_split_groups
from scipy import stats

import influence as inf

NAME = "loo_fidelity"
TOP_FRACTION = 0.05
# name → rank() keyword arguments; the first three are rank's own defaults for those methods
VARIANTS: dict[str, dict[str, Any]] = {
    "unrolled": {"method": "unrolled"},
    "influence_function": {"method": "influence_function"},
    "tracin": {"method": "tracin"},
    "influence_function/lissa": {"method": "influence_function", "solver": "lissa"},
    "influence_function/λ=0.01": {"method": "influence_function", "damping": 0.01},
    "influence_function/λ=0.3": {"method": "influence_function", "damping": 0.3},
    "influence_function/λ=3": {"method": "influence_function", "damping": 3.0},
    "tracin/every step": {"method": "tracin", "checkpoint_every": 1},
    "self_influence": {"method": "self_influence"},
    "margin": {"method": "margin"},
    "loss": {"method": "loss"},
}
SCORE_BASED = ("self_influence", "margin", "loss")  # no removal effect: −score is compared
METRICS = ("pearson", "spearman", "kendall", "top_overlap")


def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman, Kendall and the top-5 % overlap of the most negative predicted and actual changes."""
    top = max(1, math.ceil(TOP_FRACTION * len(actual)))
    most_harmful = set(np.argsort(actual, kind="stable")[:top].tolist())
    predicted_harmful = set(np.argsort(predicted, kind="stable")[:top].tolist())
    return {
        "pearson": float(stats.pearsonr(predicted, actual).statistic),
        "spearman": float(stats.spearmanr(predicted, actual).statistic),
        "kendall": float(stats.kendalltau(predicted, actual).statistic),
        "top_overlap": len(most_harmful & predicted_harmful) / top,
    }


def run_seed(spec_name: str, noise: float, seed: int, own_split: bool = False) -> dict[str, Any]:
    spec = SPECS[spec_name]
    data = load_split(spec_name, noise, seed, own_split)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    trajectory = spec.fit(x, y, seed)

    evaluator = Evaluator(trajectory, data)

    def val_loss(sample_weight: np.ndarray | None = None) -> float:
        return evaluator.loss(inf.retrain(trajectory, x, y, sample_weight=sample_weight), "val")

    start = time.perf_counter()
    baseline = val_loss()
    actual = np.empty(n)
    for i in range(n):
        c = np.ones(n, dtype=np.float32)
        c[i] = 0.0
        actual[i] = val_loss(c) - baseline
    loo_s = time.perf_counter() - start

    # kept for reanalysis to 6 significant digits: a difference of two float32 losses carries fewer
    kept = [float(f"{value:.6g}") for value in actual]
    out: dict[str, Any] = {"n": n, "loo_retrain_s": loo_s, "actual": kept, "methods": {}}
    for name, kwargs in VARIANTS.items():
        start = time.perf_counter()
        try:
            table = inf.rank(trajectory, x, y, data.x_val, data.y_val, progress=False, **kwargs)
        except ValueError as error:  # e.g. a fixed damping below the most negative Hessian eigenvalue (CG refuses)
            out["methods"][name] = {"refused": str(error)}
            continue
        table = table.sort_values("index")
        wall = time.perf_counter() - start
        predicted = -table["score"].to_numpy() if name in SCORE_BASED else table["removal_effect"].to_numpy()
        entry = {"wall_s": wall, **agreement(predicted, actual)}
        if "damping" in table.attrs:
            entry["damping"] = float(table.attrs["damping"])
            entry["relative_residual"] = float(table.attrs.get("relative_residual", math.nan))
        out["methods"][name] = entry
    return out


def stat(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def answered(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The entries of variant ``name`` in ``runs`` that gave a result (not refused)."""
    return [r["methods"][name] for r in runs if "refused" not in r["methods"][name]]


def summarize(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per group and case: mean ± std over seeds; over all runs: median, min and max per method.

    Statistics are over the runs where a variant gave a result; ``refused`` counts the others.
    """
    per_case: dict[str, Any] = {}
    for group, g in groups.items():
        per_case[group] = {
            case: {
                name: {m: stat([e[m] for e in entries]) for m in METRICS} | {"answered": len(entries)}
                if (entries := answered(runs, name))
                else {"answered": 0}
                for name in VARIANTS
            }
            for case, runs in g["runs"].items()
        }
    every = [r for g in groups.values() for runs in g["runs"].values() for r in runs]
    overall: dict[str, Any] = {}
    for name in VARIANTS:
        entries = answered(every, name)
        overall[name] = {"answered": len(entries), "refused": len(every) - len(entries)}
        if entries:
            overall[name] |= {
                m: {
                    "median": float(np.median([e[m] for e in entries])),
                    "min": float(np.min([e[m] for e in entries])),
                    "max": float(np.max([e[m] for e in entries])),
                }
                for m in METRICS
            } | {"mean_wall_s": float(np.mean([e["wall_s"] for e in entries]))}
    wins = {name: 0 for name in VARIANTS}
    for r in every:
        wins[max(VARIANTS, key=lambda name, r=r: r["methods"][name].get("spearman", -math.inf))] += 1
    return {"per_case": per_case, "overall": overall, "highest_spearman_in_runs": wins, "runs": len(every)}


def markdown(report: dict[str, Any]) -> str:
    m, summary = report["machine"], report["summary"]
    overall, n_runs = summary["overall"], summary["runs"]
    lines = [
        "# Leave-one-out fidelity of the ranking methods",
        "",
        f"Generated by `{report['command']}` in {report['total_s'] / 60:.1f} min on {m['cpu_count']} CPUs "
        f"(TensorFlow {m['tensorflow']}, Keras {m['keras']}). Cases, models and seeds: "
        "`benchmarks/data_debugging.py` (digits 10 % is issue 4's setup). Protocol: module docstring of "
        "`benchmarks/loo_fidelity.py`.",
        "",
        "Ground truth: the change of validation loss when one training sample is removed and the recorded run "
        "is retrained, for **every** training sample (n retrainings per run). Predicted: each method's "
        "`removal_effect` (score-based rows: −score). Top-5 % overlap: share of the 5 % of samples whose removal "
        "lowers the validation loss most that the method also puts in its 5 % most negative (chance 0.05).",
        "",
        f"## All {n_runs} runs: median (min – max)",
        "",
        "| method | Pearson | Spearman | Kendall τ | top-5 % overlap | highest Spearman in | time per call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in overall.items():
        label = f"{name} (score-based)" if name in SCORE_BASED else name
        if row["refused"]:
            label += f" — refused in {row['refused']} runs, figures over {row['answered']}"
        if not row["answered"]:
            lines.append(f"| {label} |" + " — |" * 6)
            continue
        cells = [f"{row[k]['median']:+.3f} ({row[k]['min']:+.2f} – {row[k]['max']:+.2f})" for k in METRICS[:3]]
        top = row["top_overlap"]
        cells.append(f"{top['median']:.2f} ({top['min']:.2f} – {top['max']:.2f})")
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {summary['highest_spearman_in_runs'][name]}/{n_runs} | "
            f"{row['mean_wall_s']:.2f} |"
        )
    for group, cases in summary["per_case"].items():
        seeds = report["groups"][group]["seeds"]
        lines += [
            "",
            f"## {group} (seeds {', '.join(map(str, seeds))}): mean ± std over seeds",
            "",
            "| case | method | Pearson | Spearman | Kendall τ | top-5 % overlap |",
            "|---|---|---|---|---|---|",
        ]
        for case, methods in cases.items():
            for name, row in methods.items():
                if not row["answered"]:
                    lines.append(f"| {case} | {name} | refused in every seed | | | |")
                    continue
                lines.append(
                    f"| {case} | {name}"
                    + (f" ({row['answered']} of {len(seeds)} seeds)" if row["answered"] < len(seeds) else "")
                    + " | "
                    + " | ".join(
                        f"{row[k]['mean']:{'.3f' if k == 'top_overlap' else '+.3f'}} ± {row[k]['std']:.3f}"
                        for k in METRICS
                    )
                    + " |"
                )
    every = [r for g in report["groups"].values() for rs in g["runs"].values() for r in rs]
    notes = []
    for name in VARIANTS:
        entries = answered(every, name)
        refusals = [r["methods"][name]["refused"] for r in every if "refused" in r["methods"][name]]
        if entries and "damping" in entries[0]:
            notes.append(
                f"`{name}`: damping median {np.median([e['damping'] for e in entries]):.3g}, relative residual of "
                f"the solve median {np.median([e['relative_residual'] for e in entries]):.2g} "
                f"(max {np.max([e['relative_residual'] for e in entries]):.2g})"
            )
        if refusals:
            notes.append(f"`{name}` refused in {len(refusals)} of {len(every)} runs, e.g.: “{refusals[0]}”")
    loo = [r["loo_retrain_s"] / r["n"] for r in every]
    lines += ["", "Influence-function settings and refusals:", "", *[f"- {note}" for note in notes]]
    lines += ["", f"One leave-one-out retraining took {1000 * float(np.mean(loo)):.1f} ms on average.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "smoke run: digits 10 %% only, one seed per group", "loo_fidelity.{json,md}")
    args = parser.parse_args()
    started = time.perf_counter()
    groups = run_split_groups(
        args.quick,
        run_seed,
        lambda run: ", ".join(
            f"{name} {v.get('spearman', math.nan):+.3f}" for name, v in list(run["methods"].items())[:3]
        ),
    )
    report = {**report_header(NAME), "variants": VARIANTS, "top_fraction": TOP_FRACTION, "groups": groups}
    report["summary"] = summarize(groups)
    report["total_s"] = time.perf_counter() - started
    paths = write_report(output_dir(args), NAME, report, markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()

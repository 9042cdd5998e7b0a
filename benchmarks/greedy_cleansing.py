"""Benchmark of ``influence.greedy_removal`` against one-shot top-k removal (data cleansing).

Setup
    The four cases of ``benchmarks/data_debugging.py`` (digits and breast cancer, 10 % and 20 % of
    the training labels flipped; same splits, flips, models and SGD settings, imported from it),
    each with its five training seeds (model initialisation and batch order).

Measured
    For k = 10 and 20: held-out test loss of the recorded run retrained without the chosen k
    samples, for
      * ``unrolled``: the one-shot top-k of ``rank(method="unrolled")`` (data_debugging's row);
      * ``greedy/5`` and ``greedy/1``: ``greedy_removal(k, per_round=5 or 1)``, re-differentiating the
        run after every 5 (or every single) removal;
      * ``loss`` and ``tracin``: the one-shot top-k of those rankings (the baselines of issue 5's
        cleansing target); ``random``: mean of 5 random draws.
    The greedy choices for k = 10 are the first 10 of the k = 20 run (the same rounds).
    Reported: mean test loss over the five seeds; per method, in how many seeds it has the lowest
    test loss of {unrolled, greedy/5, greedy/1, loss, tracin}; and the seed-0 rows in the form of
    data_debugging's target 2 (greedy/1 below loss, TracIn and random at k = 10, 20).

Outputs
    ``reports/benchmarks/greedy_cleansing.{json,md}``; ``--quick`` (seed 0, digits 10 % only) writes
    under ``reports/_scratch/benchmarks/``.

Usage (from the repository root)::

    python benchmarks/greedy_cleansing.py          # about 3 minutes on 2 cores
    python benchmarks/greedy_cleansing.py --quick
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO_ROOT, machine_info, write_report
from data_debugging import LOSS, NOISES, QUICK_TRAINING_SEEDS, SPECS, TRAINING_SEEDS, Evaluator, load

import influence as inf

NAME = "greedy_cleansing"
DEFAULT_OUT_DIR = REPO_ROOT / "reports" / "benchmarks"
QUICK_OUT_DIR = REPO_ROOT / "reports" / "_scratch" / "benchmarks"
KS = (10, 20)
RANDOM_DRAWS, RANDOM_SEED = 5, 2
ONE_SHOT = ("unrolled", "loss", "tracin")
GREEDY = {"greedy/5": 5, "greedy/1": 1}
COMPARED = ("unrolled", "greedy/5", "greedy/1", "loss", "tracin")


def run_seed(spec_name: str, noise: float, seed: int) -> dict[str, Any]:
    spec = SPECS[spec_name]
    data = load(spec_name, noise)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    trajectory = inf.fit(
        spec.build(seed), x, y, loss=LOSS, optimizer=inf.optimizers.SGD(spec.learning_rate),
        batch_size=spec.batch_size, epochs=spec.epochs, seed=seed,
    )  # fmt: skip
    evaluator = Evaluator(trajectory, data)

    def test_loss(removed: np.ndarray) -> float:
        c = np.ones(n)
        c[removed] = 0.0
        return evaluator.loss(inf.retrain(trajectory, x, y, sample_weight=c), "test")

    orders: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for method in ONE_SHOT:
        table = inf.rank(trajectory, x, y, data.x_val, data.y_val, method=method)
        orders[method], seconds[method] = table["index"].to_numpy(), float(table.attrs["seconds"])
    for name, per_round in GREEDY.items():
        table = inf.greedy_removal(
            trajectory, x, y, data.x_val, data.y_val, max(KS), per_round=per_round, progress=False
        )
        orders[name], seconds[name] = table["index"].to_numpy(), float(table.attrs["seconds"])
    rng = np.random.default_rng(RANDOM_SEED)
    out: dict[str, Any] = {"seconds": seconds, "test_loss": {}, "flipped_removed": {}}
    for k in KS:
        losses = {name: test_loss(order[:k]) for name, order in orders.items()}
        losses["random"] = float(np.mean([test_loss(rng.choice(n, k, replace=False)) for _ in range(RANDOM_DRAWS)]))
        out["test_loss"][str(k)] = losses
        out["flipped_removed"][str(k)] = {
            name: int(np.isin(order[:k], data.flipped).sum()) for name, order in orders.items()
        }
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case, seeds in runs.items():
        per_k = {}
        for k in KS:
            rows = [s["test_loss"][str(k)] for s in seeds]
            mean = {name: float(np.mean([r[name] for r in rows])) for name in [*COMPARED, "random"]}
            wins = {name: 0 for name in COMPARED}
            for r in rows:
                wins[min(COMPARED, key=lambda m, r=r: r[m])] += 1
            seed0 = rows[0]
            target = {rival: seed0["greedy/1"] < seed0[rival] for rival in ("loss", "tracin", "random")}
            per_k[str(k)] = {"mean_test_loss": mean, "lowest_in_seeds": wins, "seed0": seed0, "seed0_beats": target}
        summary[case] = per_k
    return summary


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Greedy removal against one-shot top-k (data cleansing)",
        "",
        f"Generated by `{report['command']}` in {report['total_s'] / 60:.1f} min on {m['cpu_count']} CPUs "
        f"(TensorFlow {m['tensorflow']}, Keras {m['keras']}). Cases, splits, models and seeds: "
        "`benchmarks/data_debugging.py`. Protocol: module docstring of `benchmarks/greedy_cleansing.py`.",
        "",
        "`greedy/r`: `greedy_removal(k, per_round=r)` re-differentiates the run after every r removals. "
        f"Test loss after retraining without the k chosen samples; mean over {report['seeds']} training seeds; "
        "[w] = seeds where the method has the lowest test loss of the five compared.",
        "",
        "| case | k | unrolled (one-shot) | greedy/5 | greedy/1 | loss | tracin | random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, per_k in report["summary"].items():
        for k, row in per_k.items():
            mean, wins = row["mean_test_loss"], row["lowest_in_seeds"]
            cells = [f"{mean[name]:.4f} [{wins[name]}]" for name in COMPARED]
            lines.append(f"| {case} | {k} | " + " | ".join(cells) + f" | {mean['random']:.4f} |")
    lines += [
        "",
        "## Seed 0 (the data-debugging benchmark's main run): greedy/1 against issue 5's cleansing rivals",
        "",
        "| case | k | greedy/1 | loss | tracin | random | greedy/1 lowest? |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    met_all = True
    for case, per_k in report["summary"].items():
        for k, row in per_k.items():
            s, beats = row["seed0"], row["seed0_beats"]
            ok = all(beats.values())
            met_all &= ok
            lost = ", ".join(rival for rival, b in beats.items() if not b)
            lines.append(
                f"| {case} | {k} | {s['greedy/1']:.4f} | {s['loss']:.4f} | {s['tracin']:.4f} | {s['random']:.4f} | "
                + ("yes" if ok else f"no ({lost})")
                + " |"
            )
    lines += [
        "",
        f"Greedy/1 below loss, TracIn and random in every seed-0 cell: **{'met' if met_all else 'missed'}**.",
        "",
        "Time per call (mean over all runs, s): "
        + ", ".join(f"{name} {t:.2f}" for name, t in report["mean_seconds"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = QUICK_TRAINING_SEEDS if args.quick else TRAINING_SEEDS
    cases = [("digits", 0.1)] if args.quick else [(name, noise) for name in SPECS for noise in NOISES]
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, noise in cases:
        key = f"{name} {noise:.0%}"
        runs[key] = []
        for seed in seeds:
            run = run_seed(name, noise, seed)
            runs[key].append(run)
            print(f"{key} seed {seed}: " + ", ".join(f"{m} {v:.4f}" for m, v in run["test_loss"]["20"].items()))
    all_seconds = [r["seconds"] for rs in runs.values() for r in rs]
    report = {
        "benchmark": NAME,
        "command": "python benchmarks/greedy_cleansing.py" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
        "seeds": len(seeds),
        "ks": KS,
        "runs": runs,
        "summary": summarize(runs),
        "mean_seconds": {name: float(np.mean([s[name] for s in all_seconds])) for name in all_seconds[0]},
        "total_s": time.perf_counter() - started,
    }
    out_dir = Path(args.out_dir) if args.out_dir else (QUICK_OUT_DIR if args.quick else DEFAULT_OUT_DIR)
    paths = write_report(out_dir, NAME, report, markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()

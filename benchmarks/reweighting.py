"""Benchmark of ``influence.learn_sample_weights`` (meta-learning of data) against removing top-k samples.

Setup
    The four cases of ``benchmarks/data_debugging.py`` (digits and breast cancer, 10 % and 20 % of
    the training labels flipped; same models and SGD settings, imported from it), in two groups:

    * ``split 0``: its split and flips (seeds 0 and 1), with its five training seeds (model
      initialisation and batch order);
    * ``own splits``: seeds 1–4, each drawing its own train/validation/test split, flips and
      training run (split seed = flip seed = training seed). A variant that only suits one
      validation split shows here.

Compared (every variant retrains the *recorded* run: same batches, |B_t| and learning rates)
    * ``recorded``: all weights 1 (the replayed run);
    * ``learned``: ``learn_sample_weights`` with its defaults: outer optimizer ``Adam(0.1)``, 30 outer
      steps, weights in [0, 1], ``penalty=0.1`` (a pull towards the recorded weights), learned on the
      validation split;
    * ``learned/no penalty``: the same with ``penalty=0``;
    * ``learned/SGD``: plain SGD as outer optimizer, step size 30 (moves weights in proportion to dE/dc);
    * ``learned/holdout``: ``holdout=0.3`` (30 % of the validation split held out of E and used to pick
      the step), up to 30 outer steps, ``patience=5``;
    * ``drop learned``: the ``learned`` weights rounded: the samples learned below 0.5 removed, the rest
      kept at 1 (m samples);
    * ``unrolled top-m`` and ``loss top-m``: the one-shot top-m of ``rank(method="unrolled")`` and
      ``rank(method="loss")`` removed, with the same m as ``drop learned`` (m = 0 keeps everything);
    * ``oracle``: exactly the flipped samples removed (not a method: it knows the flips).

Diagnostic (knows the flips): the *clean* samples the ``learned`` weights fall below 0.5 (set D). Are they
    harmful on the test split too, or do the weights fit the validation split? Test loss of
    ``oracle`` with D removed as well, against ``oracle`` with |D| random clean samples removed (mean of
    3 draws); how often the oracle-trained model misclassifies D, against all clean samples.

Measured
    Validation loss (the outer objective), held-out test loss and accuracy; ROC AUC of 1 − c (learned
    weights) against the flipped mask (``sklearn.metrics.roc_auc_score``), for comparison with the
    mislabel-detection AUCs of data_debugging.md; m and how many of the m are flipped; test loss of the
    ``learned`` weights after 0, 10, 20 and 30 outer steps (does the outer loop overfit the validation split?);
    wall time of ``learn_sample_weights`` (30 retrainings + 30 unrolled passes + 31 evaluations; the
    ``learned`` call is the first on each seed's model, so it includes tracing); for each variant of
    the outer loop, the seeds where it ends with a lower test loss than the defaults. Means over the seeds
    of each group, and the seed-0 rows.

Outputs
    ``reports/benchmarks/reweighting.{json,md}``; ``--quick`` (digits 10 % only, one seed per group)
    writes under ``reports/_scratch/benchmarks/``.

Usage (from the repository root)::

    python benchmarks/reweighting.py          # about 5 minutes on 2 cores
    python benchmarks/reweighting.py --quick
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import time
from typing import Any

import numpy as np
import tensorflow as tf
from _common import benchmark_parser, output_dir, report_header, write_report
from data_debugging import SPECS, Evaluator, load_split, run_split_groups
from sklearn.metrics import roc_auc_score

import influence as inf

NAME = "reweighting"
OUTER_STEPS = 30
CURVE_EVERY = 10  # test loss of the learned weights every CURVE_EVERY outer steps
HOLDOUT = {"holdout": 0.3, "steps": OUTER_STEPS, "patience": 5}
OUTER = {  # learned (the defaults) first: its call traces each seed's new model
    "learned": (lambda: None, {"steps": OUTER_STEPS}),
    "learned/no penalty": (lambda: inf.optimizers.Adam(0.1), {"steps": OUTER_STEPS, "penalty": 0.0}),
    "learned/SGD": (lambda: inf.optimizers.SGD(30.0), {"steps": OUTER_STEPS}),
    "learned/holdout": (lambda: None, HOLDOUT),
}
DROP_BELOW = 0.5
RANDOM_CLEAN_DRAWS = 3  # oracle − |D| random clean samples, averaged
VARIANTS = (
    "recorded", "learned", "learned/no penalty", "learned/SGD", "learned/holdout", "drop learned",
    "unrolled top-m", "loss top-m", "oracle",
)  # fmt: skip
METRIC_KEYS = ("val_loss", "test_loss", "test_accuracy")
REMOVALS = ("drop learned", "unrolled top-m", "loss top-m")


def run_seed(spec_name: str, noise: float, seed: int, own_split: bool = False) -> dict[str, Any]:
    spec = SPECS[spec_name]
    data = load_split(spec_name, noise, seed, own_split)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    trajectory = spec.fit(x, y, seed)
    evaluator = Evaluator(trajectory, data)

    def removing(indices: np.ndarray) -> np.ndarray:
        c = np.ones(n)
        c[indices] = 0.0
        return c

    weights: dict[str, np.ndarray] = {"recorded": np.ones(n)}
    seconds: dict[str, float] = {}
    steps_run: dict[str, int] = {}
    best_step: dict[str, int] = {}
    histories: dict[str, np.ndarray] = {}
    for name, (make, options) in OUTER.items():
        started = time.perf_counter()
        learned = inf.learn_sample_weights(
            trajectory, x, y, data.x_val, data.y_val, outer_optimizer=make(), progress=False, **options
        )
        seconds[name] = time.perf_counter() - started
        weights[name] = learned.sample_weight
        steps_run[name] = len(learned.history) - 1
        best_step[name] = learned.best_step
        histories[name] = learned.history
    dropped = np.flatnonzero(weights["learned"] < DROP_BELOW)
    m = len(dropped)
    weights["drop learned"] = removing(dropped)
    for method in ("unrolled", "loss"):
        table = inf.rank(trajectory, x, y, data.x_val, data.y_val, method=method)
        weights[f"{method} top-m"] = removing(table["index"].to_numpy()[:m])
    weights["oracle"] = removing(data.flipped)

    retrained = {name: inf.retrain(trajectory, x, y, sample_weight=c) for name, c in weights.items()}
    return {
        "metrics": {name: evaluator.metrics(w) for name, w in retrained.items()},
        "clean_dropped": clean_dropped(trajectory, data, evaluator, weights["learned"], retrained["oracle"], seed),
        "m": m,
        "flipped": len(data.flipped),
        "flipped_in_m": {name: int(np.sum(weights[name][data.flipped] == 0)) for name in REMOVALS},
        "auc": {name: float(roc_auc_score(data.flipped_mask, 1 - weights[name])) for name in OUTER},
        "mean_weight": {
            name: {
                "flipped": float(weights[name][data.flipped].mean()),
                "clean": float(np.delete(weights[name], data.flipped).mean()),
            }
            for name in OUTER
        },
        "seconds": seconds,
        "steps_run": steps_run,
        "best_step": best_step,
        "learned_test_loss_by_step": {
            step: evaluator.metrics(inf.retrain(trajectory, x, y, sample_weight=c))["test_loss"]
            for step, c in zip(range(0, OUTER_STEPS + 1, CURVE_EVERY), histories["learned"][::CURVE_EVERY])
        },
    }  # fmt: skip


def clean_dropped(
    trajectory: inf.Trajectory,
    data: Any,
    evaluator: Evaluator,
    learned: np.ndarray,
    oracle_weights: list[np.ndarray],
    seed: int,
) -> dict[str, Any]:
    """Diagnostic: the clean samples D learned below DROP_BELOW, removed on top of the oracle's removal.

    ``oracle_weights``: the run retrained without the flipped samples (already computed by the caller).
    """
    x, y, flipped = data.x_train, data.y_train, data.flipped_mask
    clean = np.flatnonzero(~flipped)
    dropped = np.flatnonzero((learned < DROP_BELOW) & ~flipped)
    oracle = np.where(flipped, 0.0, 1.0)

    def without(indices: np.ndarray) -> dict[str, float]:
        c = oracle.copy()
        c[indices] = 0.0
        return evaluator.metrics(inf.retrain(trajectory, x, y, sample_weight=c))

    rng = np.random.default_rng(seed)
    draws = [without(rng.choice(clean, len(dropped), replace=False)) for _ in range(RANDOM_CLEAN_DRAWS)]
    out = evaluator.fn(
        [tf.constant(w, dtype=evaluator.fn.dtype) for w in oracle_weights], tf.constant(x, dtype=evaluator.fn.dtype)
    )
    wrong = np.argmax(np.asarray(out), axis=-1) != y
    return {
        "count": len(dropped),
        "oracle_model_misclassifies": {
            "dropped": float(wrong[dropped].mean()) if len(dropped) else float("nan"),
            "all_clean": float(wrong[clean].mean()),
        },
        "metrics": {
            "oracle − D": without(dropped),
            "oracle − random": {key: float(np.mean([d[key] for d in draws])) for key in draws[0]},
        },
    }


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(get) -> float:
        return float(np.mean([get(s) for s in seeds]))

    return {
        "metrics": {
            name: {key: mean(lambda s, n=name, k=key: s["metrics"][n][k]) for key in seeds[0]["metrics"][name]}
            for name in VARIANTS
        },
        "lowest_test_loss_in_seeds": {
            name: sum(min(VARIANTS[:-1], key=lambda v, s=s: s["metrics"][v]["test_loss"]) == name for s in seeds)
            for name in VARIANTS[:-1]
        },
        "lower_test_loss_than_learned_in_seeds": {
            name: sum(s["metrics"][name]["test_loss"] < s["metrics"]["learned"]["test_loss"] for s in seeds)
            for name in OUTER
            if name != "learned"
        },
        "m": mean(lambda s: s["m"]),
        "clean_dropped": {
            "count": mean(lambda s: s["clean_dropped"]["count"]),
            "misclassified": {
                key: mean(lambda s, k=key: s["clean_dropped"]["oracle_model_misclassifies"][k])
                for key in ("dropped", "all_clean")
            },
            "metrics": {
                name: {key: mean(lambda s, n=name, k=key: s["clean_dropped"]["metrics"][n][k]) for key in METRIC_KEYS}
                for name in ("oracle − D", "oracle − random")
            },
            "lower_test_loss_than_oracle_in_seeds": sum(
                s["clean_dropped"]["metrics"]["oracle − D"]["test_loss"] < s["metrics"]["oracle"]["test_loss"]
                for s in seeds
            ),
        },
        "auc": {name: mean(lambda s, n=name: s["auc"][n]) for name in OUTER},
        "seconds": {name: mean(lambda s, n=name: s["seconds"][n]) for name in OUTER},
        "steps_run": {name: mean(lambda s, n=name: s["steps_run"][n]) for name in OUTER},
        "best_step": {name: mean(lambda s, n=name: s["best_step"][n]) for name in OUTER},
        "learned_test_loss_by_step": {
            step: mean(lambda s, k=step: s["learned_test_loss_by_step"][k])
            for step in seeds[0]["learned_test_loss_by_step"]
        },
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    # One row per (group, case); the first seed of a group stands for it where a table shows one run.
    rows = [
        (f"{case} · {group}", summary, group_report["runs"][case][0])
        for group, group_report in report["groups"].items()
        for case, summary in group_report["summary"].items()
    ]
    lines = [
        "# Learned sample weights (`learn_sample_weights`) against removing the top-k",
        "",
        f"Generated by `{report['command']}` in {report['total_s'] / 60:.1f} min on {m['cpu_count']} CPUs "
        f"(TensorFlow {m['tensorflow']}, Keras {m['keras']}). Cases, models and SGD settings: "
        "`benchmarks/data_debugging.py`; protocol: module docstring of `benchmarks/reweighting.py`.",
        "",
        f"Weights learned on the validation split, {OUTER_STEPS} outer steps, box [0, 1]; *learned*: the defaults "
        "of `learn_sample_weights` (Adam(0.1), `penalty=0.1`, a pull towards the recorded weights); *no penalty*: "
        "`penalty=0`; *SGD*: `SGD(30.0)` as outer optimizer; *learned/holdout* learns on "
        f"{1 - HOLDOUT['holdout']:.0%} of the validation split and keeps the step with the lowest loss on the other "
        f"{HOLDOUT['holdout']:.0%} (at most {HOLDOUT['steps']} steps, patience {HOLDOUT['patience']}). "
        f"*drop learned*: the m samples learned below {DROP_BELOW} removed; *top-m*: the same number removed "
        "from a one-shot ranking; *oracle* removes exactly the flipped samples (it knows them). "
        "Two groups of runs: *split 0* keeps data_debugging's split and flips and varies the training seed; in "
        "*own splits* each seed draws its own split, flips and training run. Means over the seeds of a group; "
        "[w] = seeds where the variant has the lowest test loss (oracle excluded).",
        "",
        "## Test loss (test accuracy) [w]",
    ]
    for group, group_report in report["groups"].items():
        lines += [
            "",
            f"### {group} (seed{'s' * (len(group_report['seeds']) > 1)} {', '.join(map(str, group_report['seeds']))})",
            "",
            "| case | " + " | ".join(VARIANTS) + " | m (flipped in data) |",
            "|---|" + "---:|" * (len(VARIANTS) + 1),
        ]
        for case, s in group_report["summary"].items():
            cells = []
            for name in VARIANTS:
                row = s["metrics"][name]
                wins = s["lowest_test_loss_in_seeds"].get(name)
                won = "" if wins is None else f" [{wins}]"
                cells.append(f"{row['test_loss']:.4f} ({row['test_accuracy']:.3f}){won}")
            flipped = group_report["runs"][case][0]["flipped"]
            lines.append(f"| {case} | " + " | ".join(cells) + f" | {s['m']:.0f} ({flipped}) |")
    challengers = [name for name in OUTER if name != "learned"]
    lines += [
        "",
        "## Variants of the outer loop against the defaults",
        "",
        "Mean test loss of the variant and of *learned*; [k/n] = seeds where the variant's is lower.",
        "",
        "| case · group | " + " | ".join(challengers) + " |",
        "|---|" + "---|" * len(challengers),
    ]
    for label, s, _ in rows:
        default = s["metrics"]["learned"]["test_loss"]
        seeds = sum(s["lowest_test_loss_in_seeds"].values())
        cells = [
            f"{s['metrics'][n]['test_loss']:.4f} vs {default:.4f} "
            f"[{s['lower_test_loss_than_learned_in_seeds'][n]}/{seeds}]"
            for n in challengers
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Validation loss (what the weights were learned on)",
        "",
        "| case · group | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---:|" * len(VARIANTS),
    ]
    for label, s, _ in rows:
        lines.append(f"| {label} | " + " | ".join(f"{s['metrics'][n]['val_loss']:.4f}" for n in VARIANTS) + " |")
    curve_steps = list(rows[0][1]["learned_test_loss_by_step"])
    lines += [
        "",
        "## Test loss of the learned weights along the outer steps (mean over seeds)",
        "",
        "| case · group | " + " | ".join(f"step {k}" for k in curve_steps) + " |",
        "|---|" + "---:|" * len(curve_steps),
    ]
    for label, s, _ in rows:
        curve = s["learned_test_loss_by_step"]
        lines.append(f"| {label} | " + " | ".join(f"{curve[k]:.4f}" for k in curve_steps) + " |")
    lines += [
        "",
        "## Clean samples the learned weights drop (diagnostic: knows the flips)",
        "",
        f"D = the clean samples learned below {DROP_BELOW}. *oracle − D* removes the flipped samples and D; "
        f"*oracle − random* removes the flipped samples and |D| random clean ones (mean of {RANDOM_CLEAN_DRAWS} "
        "draws). If D only fitted the validation split, removing it would lower the validation loss but not "
        "the test loss. Misclassified: by the model retrained without the flipped samples. Means over the seeds; "
        "[s] = seeds where oracle − D has a lower test loss than oracle.",
        "",
        "| case · group | size of D | misclassified: D / all clean | val loss: oracle / oracle − D / oracle − random "
        "| test loss: oracle / oracle − D / oracle − random [s] |",
        "|---|---:|---|---|---|",
    ]
    for label, s, _ in rows:
        d = s["clean_dropped"]
        metrics = (s["metrics"]["oracle"], d["metrics"]["oracle − D"], d["metrics"]["oracle − random"])
        wrong = d["misclassified"]
        lines.append(
            f"| {label} | {d['count']:.0f} | {wrong['dropped']:.3f} / {wrong['all_clean']:.3f} | "
            + " / ".join(f"{r['val_loss']:.4f}" for r in metrics)
            + " | "
            + " / ".join(f"{r['test_loss']:.4f}" for r in metrics)
            + f" [{d['lower_test_loss_than_oracle_in_seeds']}] |"
        )
    names = " / ".join(name.removeprefix("learned/") for name in OUTER)
    lines += [
        "",
        "## Learned weights as a mislabel detector, and time",
        "",
        f"| case · group | AUC of 1 − c: {names} | mean weight flipped / clean (learned, first seed) "
        "| flipped among m (drop learned / unrolled / loss, first seed) | holdout: steps run / best step "
        f"| seconds: {names} |",
        "|---|---|---|---|---|---|",
    ]
    for label, s, first in rows:
        w = first["mean_weight"]["learned"]
        f = first["flipped_in_m"]
        aucs = " / ".join(f"{s['auc'][n]:.3f}" for n in OUTER)
        seconds = " / ".join(f"{s['seconds'][n]:.2f}" for n in OUTER)
        lines.append(
            f"| {label} | {aucs} | "
            f"{w['flipped']:.2f} / {w['clean']:.2f} | {f['drop learned']} / {f['unrolled top-m']} / {f['loss top-m']}"
            f" of {first['m']} | {s['steps_run']['learned/holdout']:.1f} / {s['best_step']['learned/holdout']:.1f} | "
            f"{seconds} |"
        )
    lines += [
        "",
        "Seconds: each seed builds a new model, and the *learned* call is the first on it (tracing and compiling its "
        "programs included); the other calls reuse them (the per-step cost: a retraining + an unrolled pass; "
        "holdout runs its steps until the held-out loss has not improved for 5). Steps run and best step: means over "
        "the seeds.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "smoke run: digits 10 %% only, one seed per group", "reweighting.{json,md}")
    args = parser.parse_args()
    started = time.perf_counter()
    groups = run_split_groups(
        args.quick, run_seed, lambda run: ", ".join(f"{v} {r['test_loss']:.4f}" for v, r in run["metrics"].items())
    )
    for group in groups.values():
        group["summary"] = {case: summarize(seed_runs) for case, seed_runs in group["runs"].items()}
    report = {
        **report_header(NAME),
        "outer_steps": OUTER_STEPS,
        "groups": groups,
        "total_s": time.perf_counter() - started,
    }
    paths = write_report(output_dir(args), NAME, report, markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()

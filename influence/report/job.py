"""The resumable ranking job behind ``influence rank`` and ``influence demo``.

train (:func:`influence.fit`) → rank with each method (:func:`influence.rank`) →
verify by retraining without single samples → :func:`render_report`.

Each result is a shard (:class:`influence.runs.ShardStore`) keyed by a hash
of the data, the model (architecture and initial weights), the training
settings and the stage's own parameters, so rerunning the same command
reuses everything already computed. The trained run is needed only when some
shard is missing; it is saved (:func:`influence.save_trajectory`) beside the
shards with a ``fit`` shard holding the fingerprint of its final weights, so a
resumed run loads it instead of training again. A run that must train again
and gets other weights stops instead of mixing the results of two trainings.

The report is published by :mod:`influence.report.publish`: a rerun with other
settings replaces the previous report's files without touching anything else.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._validation import param_error
from ..runs import ShardStore, fingerprint, log_to_stderr, model_fingerprint
from .metrics import Verification
from .publish import previous_report_files, publish_report
from .render import render_report


@dataclass
class RankingJob:
    """Everything that determines a ranking run (and so its shards), plus how to present it.

    ``model`` holds the *initial* weights; it is trained by :func:`influence.fit`
    with the settings below. ``methods[0]`` is the report's method, the others are
    compared on the found@k plot. ``x_val``/``y_val`` may be None when every method
    ranks without validation data (``loss``, ``margin``, ``self_influence``) and there is
    no verification or repair. ``verify_top`` most harmful and ``verify_random``
    random other samples are each retrained without (0 and 0: no verification).
    ``repair_top`` > 0 optimises the inputs of that many most harmful samples to lower the
    validation loss, once per outer optimizer, for the report's convergence section.
    ``learn_weights_steps`` > 0 learns all training weights in [0, 1] with
    :func:`influence.learn_sample_weights` (``Adam(0.1)``, that many outer steps) for the
    report's learned-weights section; ``learn_weights_holdout`` in (0, 1) keeps that fraction of
    the validation samples out of the learning, returns the weights of the step with the lowest
    loss on them and stops after ``LEARN_WEIGHTS_PATIENCE`` steps without improvement (0: off);
    ``learn_weights_penalty`` is its ``penalty`` (None: its default). ``training`` is
    :func:`influence.fit`'s (False: dropout off, BatchNormalization on its moving statistics),
    and so is ``jit_compile`` (``"auto"``, True: XLA, False: plain TensorFlow graphs).
    The remaining fields go to :func:`render_report`.
    """

    out_dir: Path
    model: Any
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    optimizer: Any
    loss: str = "sparse_categorical_crossentropy"
    from_logits: bool = False
    batch_size: int = 32
    epochs: int = 1
    seed: int = 0
    input_gradient_penalty: float = 0.0
    training: bool = True
    jit_compile: bool | str = "auto"
    methods: Sequence[str] = ("unrolled",)
    verify_top: int = 0
    verify_random: int = 0
    repair_top: int = 0
    repair_steps: int = 5
    learn_weights_steps: int = 0
    learn_weights_holdout: float = 0.0
    learn_weights_penalty: float | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    images: np.ndarray | None = None
    features: np.ndarray | None = None
    feature_names: Sequence[str] | None = None
    noise_mask: np.ndarray | None = None
    clean_labels: np.ndarray | None = None
    progress: bool = True
    restart: bool = False
    log: Callable[[str], None] = log_to_stderr

    def fingerprint(self) -> str:
        """Hash of what determines the results: data, model and training settings."""
        from .. import __version__

        settings = {
            "loss": self.loss,
            "from_logits": self.from_logits,
            "optimizer": repr(self.optimizer),
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "seed": self.seed,
            "influence": __version__,
        }
        if self.input_gradient_penalty:  # absent at 0, so fingerprints of earlier jobs still match
            settings["input_gradient_penalty"] = float(self.input_gradient_penalty)
        if not self.training:  # likewise absent in the default training mode
            settings["training"] = False
        if not self.resolved_jit_compile():  # absent for XLA, with which every earlier job trained
            settings["jit_compile"] = False
        data = [self.x_train, self.y_train, self.x_val, self.y_val]
        return fingerprint(data, model_fingerprint(self.model), settings)

    def resolved_jit_compile(self) -> bool:
        """``jit_compile`` as :func:`influence.fit` resolves it for this model on this machine."""
        from ..trajectory import resolve_jit_compile

        return resolve_jit_compile(self.model, self.jit_compile, func="RankingJob")


class TrainingNotReproducible(RuntimeError):
    """A resumed run trained to other weights than the run whose shards it found."""


@dataclass
class RankingOutcome:
    """What a finished job produced."""

    report: Path
    table: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    verification: Verification | None
    store: ShardStore
    seconds: float


class LazyTraining:
    """The recorded training run, made (or loaded from the shard folder) on first use.

    A finished run that is rerun never needs it. The first training saves the run
    with :func:`influence.save_trajectory` and a ``fit`` shard with the fingerprint
    of its final weights; a resumed run loads that run instead of training again
    (and trains again when the saved run is missing or does not match its fingerprint).
    """

    def __init__(self, job: RankingJob, store: ShardStore, run: str) -> None:
        self.job, self.store, self.run = job, store, run
        self.seconds: float | None = None
        self.loaded = False
        self.path = store.directory / f"trajectory-{run[:24]}"
        self.key = store.key("fit", run=run)  # the shard that records the trained weights' fingerprint
        self._trajectory: Any = None

    def _load(self, weights: str) -> Any:
        from ..persist import load_trajectory

        try:
            trajectory = load_trajectory(self.path)
        except Exception as exc:  # a missing or damaged folder: train again
            self.job.log(f"[train] could not load the saved run ({type(exc).__name__}); training again")
            return None
        if fingerprint(trajectory.final_weights) != weights:
            self.job.log("[train] the saved run does not match its fingerprint; training again")
            return None
        return trajectory

    def __call__(self) -> Any:
        if self._trajectory is not None:
            return self._trajectory
        from ..persist import save_trajectory
        from ..trajectory import fit

        job, start = self.job, time.perf_counter()
        recorded = self.store.stored_arrays(self.key)
        weights = None if recorded is None else str(recorded["weights"])
        trajectory = None if weights is None else self._load(weights)
        if trajectory is not None:
            job.log(f"[train] loaded the recorded run from {self.path}")
            self.loaded = True
        else:
            steps = "XLA-compiled" if job.resolved_jit_compile() else "plain TensorFlow graphs"
            job.log(f"[train] {job.epochs} epoch(s), batch {job.batch_size}, {len(job.x_train)} samples, {steps}")
            trajectory = fit(
                job.model,
                job.x_train,
                job.y_train,
                loss=job.loss,
                optimizer=job.optimizer,
                batch_size=job.batch_size,
                epochs=job.epochs,
                seed=job.seed,
                from_logits=job.from_logits,
                input_gradient_penalty=job.input_gradient_penalty,
                training=job.training,
                jit_compile=job.jit_compile,
                progress=job.progress,
            )
            # fit leaves the final weights in the model; the job's model stays at the initial weights
            # it documents, so running the same job again finds its shards (and trains the same run).
            for variable, value in zip(job.model.trainable_variables, trajectory.initial_weights):
                variable.assign(value)
            trained = fingerprint(trajectory.final_weights)
            if weights is not None and trained != weights:
                raise TrainingNotReproducible(
                    "training gave other final weights than the interrupted run whose results are on record "
                    f"in {self.store.directory}; rerun with --restart"
                )
            # Without the weights history (up to 256 MiB): a resumed job recomputes it when needed.
            save_trajectory(trajectory, self.path, history=False)
            if weights is None:
                self.store.arrays(self.key, lambda: {"weights": np.array(trained)})
        self.seconds = time.perf_counter() - start
        self._trajectory = trajectory
        return trajectory


def verification_indices(table: pd.DataFrame, top: int, random: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` most harmful sample indices, then ``random`` others drawn with ``seed``; and their kinds.

    A top-ranked sample whose predicted removal effect is positive (removing it would raise the
    validation loss: on small data sets the top k reach the helpful samples) is of kind "top-ranked (helpful)".
    """
    ranked = table.sort_values("rank", kind="stable")
    order = ranked["index"].to_numpy()
    top = min(top, len(order))
    rest = order[top:]
    drawn = np.sort(np.random.default_rng(seed).choice(rest, size=min(random, len(rest)), replace=False))
    effect = ranked["removal_effect"].to_numpy()[:top] if "removal_effect" in ranked else np.zeros(top)
    helpful = effect > 0
    kinds = np.concatenate([np.where(helpful, "top-ranked (helpful)", "most harmful"), ["random"] * len(drawn)])
    return np.concatenate([order[:top], drawn]).astype(np.int64), kinds


def removal_effects(
    store: ShardStore, trajectory: Callable[[], Any], job: RankingJob, run: str, indices: np.ndarray
) -> np.ndarray:
    """Actual change of validation loss without each sample: one retraining, and one shard, per index.

    The same computation as :func:`influence.actual_removal_effect` (c_i = 0 in the
    replayed run, minus the replayed baseline), split so that each retraining is saved.
    ``trajectory`` returns the recorded run; it is called only for missing shards.
    """
    from tqdm.auto import tqdm

    from ..verify import retrained_val_loss

    def val_loss(remove: int | None) -> dict[str, float]:
        traj = trajectory()
        c = None
        if remove is not None:
            c = traj.sample_weight.copy()
            c[remove] = 0.0
        return {"val_loss": retrained_val_loss(traj, job.x_train, job.y_train, job.x_val, job.y_val, c)}

    baseline = float(store.arrays(store.key("baseline", run=run), lambda: val_loss(None))["val_loss"])
    effects = []
    for i in tqdm(indices, desc="verifying by retraining", unit="retrain", disable=not job.progress):
        after = store.arrays(store.key("removal", run=run, index=int(i)), partial(val_loss, int(i)))
        effects.append(float(after["val_loss"]) - baseline)
    return np.asarray(effects)


# Outer steps without a better held-out loss before weight learning with a holdout stops
# (reports/benchmarks/reweighting.md: the best step came 12-24 steps in, patience 5).
LEARN_WEIGHTS_PATIENCE = 5

# Outer step sizes from reports/benchmarks/poisoning.md (tuned there for digits pixels in [0, 1]).
REPAIR_OPTIMIZERS = {
    "SGD (300)": ("SGD", {"learning_rate": 300.0}),
    "momentum 0.9 (100)": ("SGD", {"learning_rate": 100.0, "momentum": 0.9}),
    "RMSprop (0.1)": ("RMSprop", {"learning_rate": 0.1}),
    "Adam (0.3)": ("Adam", {"learning_rate": 0.3}),
}


def repair_curves(trajectory: Any, job: RankingJob, indices: np.ndarray) -> pd.DataFrame:
    """Validation loss per outer step of :func:`influence.optimize_training_inputs` (goal 'repair'), per optimizer."""
    from .. import optimizers
    from ..input_optimization import optimize_training_inputs

    low, high = float(np.min(job.x_train)), float(np.max(job.x_train))

    def repair(outer_optimizer: Any, steps: int) -> Any:
        data = (trajectory, job.x_train, job.y_train, job.x_val, job.y_val, indices)
        return optimize_training_inputs(
            *data,
            goal="repair",
            outer_optimizer=outer_optimizer,
            steps=steps,
            bounds=(low, high),
            progress=job.progress,
        )

    # One untimed step first: it compiles the replay and reverse pass all optimizers share, which
    # the first timed one would otherwise pay alone (its curve then looked ~10× slower).
    repair(optimizers.SGD(lambda step: 0.0), 1)  # a rate of 0: the inputs stay as they are
    rows = []
    for name, (cls, kwargs) in REPAIR_OPTIMIZERS.items():
        result = repair(getattr(optimizers, cls)(**kwargs), job.repair_steps)
        for step, (loss, seconds) in enumerate(zip(result.val_loss, result.seconds)):
            rows.append({"optimizer": name, "step": step, "val_loss": float(loss), "seconds": float(seconds)})
    return pd.DataFrame(rows)


def learned_weights_table(trajectory: Any, job: RankingJob) -> pd.DataFrame:
    """Columns ``index``, ``learned_weight`` (n rows) from :func:`influence.learn_sample_weights`.

    ``attrs``: ``val_loss`` and ``seconds`` per outer step, ``optimizer``, ``penalty``; with a holdout also
    ``holdout_loss`` per outer step and ``best_step`` (the step whose weights the table holds).
    """
    from ..reweighting import learn_sample_weights

    holdout = job.learn_weights_holdout or None
    penalty = weight_penalty(job)
    result = learn_sample_weights(
        trajectory,
        job.x_train,
        job.y_train,
        job.x_val,
        job.y_val,
        steps=job.learn_weights_steps,
        holdout=holdout,
        patience=LEARN_WEIGHTS_PATIENCE if holdout else None,
        penalty=penalty,
        progress=job.progress,
    )
    table = pd.DataFrame({"index": np.arange(len(result.sample_weight)), "learned_weight": result.sample_weight})
    table.attrs.update(
        val_loss=result.val_loss.tolist(),
        seconds=result.seconds.tolist(),
        optimizer=result.optimizer,
        penalty=penalty,
    )
    if result.holdout_loss is not None:
        table.attrs.update(holdout_loss=result.holdout_loss.tolist(), best_step=result.best_step, holdout=holdout)
    return table


def weight_penalty(job: RankingJob) -> float:
    """The ``penalty`` the job's weights are learned with: its own, or learn_sample_weights' default."""
    from ..reweighting import DEFAULT_PENALTY

    return DEFAULT_PENALTY if job.learn_weights_penalty is None else float(job.learn_weights_penalty)


def _check_before_training(job: RankingJob) -> None:
    """What would fail only after training (minutes on real data) is checked first: the data, as
    :func:`influence.rank` will check it, and a report folder that can be created."""
    from .._inputs import prepare, validate_data
    from ..rank import check_margin_loss

    _check_validation_data(job)
    _, loss = prepare("rank", job.model, job.loss, job.from_logits)
    if "margin" in job.methods:
        check_margin_loss(loss, job.model, "rank")
    if job.x_val is not None and job.y_val is not None:
        validate_data("rank", job.model, loss, job.x_train, job.y_train, job.x_val, job.y_val)
        _check_holdout(job)
    try:
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            param_error("out_dir", "RankingJob", "a folder that can be created", f"{str(job.out_dir)!r} ({exc})")
        ) from exc


def _check_holdout(job: RankingJob) -> None:
    """A holdout fraction must leave validation samples on both sides (learn_sample_weights refuses it after
    training, with advice for the Python API)."""
    n_val = len(job.x_val) if job.x_val is not None else 0
    fraction = job.learn_weights_holdout
    if not (job.learn_weights_steps and fraction):
        return
    held = int(round(float(fraction) * n_val))  # as learn_sample_weights splits
    if not 1 <= held < n_val:
        raise ValueError(
            param_error(
                "learn_weights_holdout",
                "RankingJob",
                f"a fraction that holds out at least one of the {n_val} validation samples and keeps at least one "
                f"(holdout {fraction:g} holds out {held}); give more validation samples or another fraction",
                fraction,
            )
        )


def _check_validation_data(job: RankingJob) -> None:
    """Without validation data only the methods that need none can run, with no verification, repair
    or learned weights."""
    from .._methods import NEEDS_VALIDATION

    if job.x_val is not None and job.y_val is not None:
        return
    needs = [f"method '{m}'" for m in job.methods if m in NEEDS_VALIDATION]
    needs += ["verification"] if job.verify_top or job.verify_random else []
    needs += ["repair"] if job.repair_top else []
    needs += ["learned weights"] if job.learn_weights_steps else []
    if needs:
        raise ValueError(param_error("x_val", "RankingJob", f"validation data for {', '.join(needs)}", "None"))


def run_ranking(job: RankingJob) -> RankingOutcome:
    """Train, rank with each method, verify by retraining and write the report; resumes from ``out_dir/shards``.

    Warnings raised on the way (e.g. :class:`influence.GradientOverrideWarning`) are shown as usual and
    listed in the report's summary.
    """
    notes: list[str] = []
    with warnings.catch_warnings():  # restores the display below on the way out
        shown = warnings.showwarning

        def note(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            text = f"{category.__name__}: {' '.join(str(message).split())}"
            if text not in notes:
                notes.append(text)
            shown(message, category, *args, **kwargs)

        warnings.showwarning = note
        return _run_ranking(job, notes)


def _run_ranking(job: RankingJob, warned: list[str]) -> RankingOutcome:
    from ..losses import get_loss
    from ..rank import rank

    _check_before_training(job)
    start = time.perf_counter()
    previous = previous_report_files(Path(job.out_dir))
    shards = Path(job.out_dir) / "shards"
    run = job.fingerprint()
    store = ShardStore(shards, log=job.log, run=run)
    if job.restart:  # only what this package wrote: a user's file in the folder stays
        store.clear()
    if store.entry_count:
        job.log(f"resuming: {store.entry_count} shard(s) on record in {shards}; those matching this run are reused")
    verify = bool(job.verify_top or job.verify_random)
    trajectory = LazyTraining(job, store, run)
    times: dict[str, str] = {}

    job.log(f"[rank] {', '.join(job.methods)}")
    tables: dict[str, pd.DataFrame] = {}
    for method in job.methods:
        reused = store.reused

        def compute(method: str = method) -> pd.DataFrame:
            return rank(
                trajectory(), job.x_train, job.y_train, job.x_val, job.y_val, method=method, progress=job.progress
            )

        tables[method] = store.table(store.key("rank", run=run, method=method), compute)
        note = " (reused)" if store.reused > reused else ""
        times[method] = f"{tables[method].attrs.get('seconds', float('nan')):.1f} s{note}"
    main = tables[job.methods[0]]

    verification = None
    if verify and main["removal_effect"].isna().all():
        job.log(f"[verify] skipped: '{job.methods[0]}' predicts no removal effect")
    elif verify:
        indices, kinds = verification_indices(main, job.verify_top, job.verify_random, job.seed)
        job.log(f"[verify] retraining without each of {len(indices)} samples")
        t = time.perf_counter()
        actual = removal_effects(store, trajectory, job, run, indices)
        predicted = main.set_index("index").loc[indices, "removal_effect"].to_numpy()
        verification = Verification(indices=indices, predicted=predicted, actual=actual, kinds=kinds)
        times["verification"] = f"{time.perf_counter() - t:.1f} s"
    convergence = None
    if job.repair_top:
        job.log(f"[repair] optimising the inputs of the {job.repair_top} most harmful samples, 4 outer optimizers")
        t = time.perf_counter()
        harmful = main["index"].to_numpy()[: job.repair_top]
        convergence = store.table(
            store.key("repair", run=run, indices=harmful.tolist(), steps=job.repair_steps),
            lambda: repair_curves(trajectory(), job, harmful),
        )
        times["repair"] = f"{time.perf_counter() - t:.1f} s"
    learned = None
    if job.learn_weights_steps:
        held = (
            f", {job.learn_weights_holdout:.0%} of the validation samples held out" if job.learn_weights_holdout else ""
        )
        penalty = weight_penalty(job)
        job.log(
            f"[weights] learning all {len(job.x_train)} sample weights, {job.learn_weights_steps} outer steps"
            f"{held}, penalty {penalty:g}"
        )
        t = time.perf_counter()
        options = {"holdout": job.learn_weights_holdout, "penalty": penalty}
        # Options at 0 (their former defaults) stay out of the key, so that results saved before them still match.
        learned = store.table(
            store.key("weights", run=run, steps=job.learn_weights_steps, **{k: v for k, v in options.items() if v}),
            lambda: learned_weights_table(trajectory(), job),
        )
        times["weights"] = f"{time.perf_counter() - t:.1f} s"
    if trajectory.seconds is None:
        job.log("[train] skipped: every result is on record")
    store.keep(trajectory.key)  # the recorded run stays, to serve a rerun with other methods
    pruned = store.prune(keep_folders=[trajectory.path.name])
    if pruned:
        job.log(f"[shards] removed {pruned} shard(s) of other training settings from {shards}")
    training = "skipped" if trajectory.seconds is None else f"{trajectory.seconds:.1f} s"
    times = {"training": training + (" (loaded)" if trajectory.loaded else "")} | times

    job.log("[report] writing")
    t = time.perf_counter()
    summary = dict(job.summary)
    summary["methods"] = ", ".join(job.methods)
    summary["validation loss"] = main.attrs.get("val_loss") if job.x_val is not None else "— (no validation data)"
    stage_times = ", ".join(f"{k} {v}" for k, v in times.items())
    summary["time"] = f"{time.perf_counter() - start:.1f} s before the report ({stage_times})"
    summary["shards"] = f"{store.summary()} in {store.directory}"
    if warned:
        summary["warnings"] = " · ".join(warned)
    report = publish_report(
        Path(job.out_dir),
        lambda folder: render_report(
            folder,
            main,
            summary=summary,
            images=job.images,
            features=job.features,
            feature_names=job.feature_names,
            verification=verification,
            noise_mask=job.noise_mask,
            clean_labels=job.clean_labels,
            comparison=tables,
            convergence=convergence,
            learned_weights=learned,
            loss=get_loss(job.loss, func="RankingJob", from_logits=job.from_logits).name,
        ),
        previous,
    )
    job.log(f"[report] {report} written in {time.perf_counter() - t:.1f} s (shards: {store.summary()})")
    return RankingOutcome(report, main, tables, verification, store, time.perf_counter() - start)

"""``fit``: training with explicit, recorded steps, and exact retraining from the record."""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import _progress
from ._inputs import as_model_inputs, check_labels_for_loss, check_model_input, check_probability_outputs, prepare
from ._summary import compact_repr
from ._validation import as_array, check_positive, check_same_length, describe, param_error, row_blocks
from .losses import Loss
from .model_function import ModelFunction, require_independent_samples, seed_state_slots, warn_gradient_overrides
from .objective import check_input_gradient_penalty
from .optimizers import Optimizer, get_optimizer
from .program import BoundProgram, Program, Schedule, chunks, shared_program

# Keep every step's weights when they fit in this many bytes (DESIGN §1 "keep all").
DEFAULT_RECORD_BUDGET = 256 * 2**20

# The layers that make XLA slow on CPU (fit's jit_compile="auto"): on 2 CPU cores a Conv16-Conv32 CNN on
# 28×28 inputs trained 4.5–25× and unrolled 8–24× slower XLA-compiled than in plain graphs.
_CONVOLUTIONS: tuple[type[keras.layers.Layer], ...] = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
        "ConvLSTM1D",
        "ConvLSTM2D",
        "ConvLSTM3D",
    )
    if hasattr(keras.layers, name)
)


@dataclass
class Trajectory:
    """A recorded training run (DESIGN §3).

    Attributes:
        model: the Keras model; after :func:`fit` its weights equal ``final_weights``. Runs
            derived from this one (:meth:`replayed_on`, learned sample weights) share the model
            object and leave its weights alone: :meth:`final_model` assigns theirs.
        loss: the per-sample loss used for training.
        optimizer: the pure optimizer (:mod:`influence.optimizers`).
        initial_weights: trainable weights before step 0, ``model.trainable_variables``
            order (= ``model.get_weights()`` order for models without non-trainable weights).
        final_weights: trainable weights after the last step.
        batches: one index array into x_train per step.
        learning_rates: η_t per step, shape (T,).
        seeds: dropout seed per step, shape (T,).
        training: whether steps ran the model in training mode (dropout on).
        sample_weight: c_j used in training, shape (n,).
        n_train: n, the number of training samples; ``input_shape``: the shape of one input.
        steps: T, the number of recorded steps (a property: ``len(batches)``).
        weights_history / state_history: stacked weights and optimizer state before
            each step, lists of (T, *shape) arrays, when they fit the record budget
            (else None and the reverse pass recomputes them).
        seconds: wall time of the recorded training.
        distribute: the ``tf.distribute`` strategy its steps run under (None: one device).
            Set it to another strategy (or None) to replay or unroll the same run elsewhere
            (with random layers in training mode: on one device or as many replicas, see
            ``mask_shards``).
        streamed: inputs stream from a host array (e.g. ``np.memmap``) through ``tf.data``
            instead of living in memory as one tensor.
        jit_compile: its steps are XLA-compiled (see :mod:`influence.program`); replays and
            reverse passes use the same setting, so they reproduce the recorded numbers exactly.
        data_fingerprint: :func:`data_fingerprint` of the recorded (x_train, y_train), so the
            functions that analyse this run refuse other data (None: not checked).
        input_gradient_penalty: ρ of the training objective ℓ + ρ‖∂ℓ/∂x‖² (0: the loss alone;
            :mod:`influence.objective`).
        mask_shards: the slices of each batch its dropout and noise masks were drawn for: the
            replica count of a distributed run whose model draws random numbers in training mode
            (each replica drew its slice's masks), else 1. Replays on one device draw them slice
            by slice too, so such a run replays and unrolls exactly without its strategy (after
            ``load_trajectory``, in ``rank_in_processes``' workers).
    """

    model: keras.Model
    loss: Loss
    optimizer: Optimizer
    initial_weights: list[np.ndarray]
    final_weights: list[np.ndarray]
    batches: list[np.ndarray]
    learning_rates: np.ndarray
    seeds: np.ndarray
    training: bool
    sample_weight: np.ndarray
    n_train: int
    input_shape: tuple[int, ...]
    weights_history: list[np.ndarray] | None = None
    state_history: list[np.ndarray] | None = None
    seconds: float = 0.0
    distribute: tf.distribute.Strategy | None = None
    streamed: bool = False
    jit_compile: bool = True
    data_fingerprint: str | None = None
    input_gradient_penalty: float = 0.0
    mask_shards: int = 1
    _program_cache: dict = field(default_factory=dict, repr=False, compare=False)
    # Validation losses of replays (influence.verify), by exact hashes of the data: not carried
    # over by dataclasses.replace, whose copies may replay another model or schedule.
    _replay_losses: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __repr__(self) -> str:  # arrays as shape and dtype, not every number
        return compact_repr(self)

    @property
    def steps(self) -> int:
        """Number of recorded steps T."""
        return len(self.batches)

    @property
    def dtype(self) -> tf.DType:
        """The float type the run computes in: its model's trainable weights'."""
        return tf.as_dtype(self.model.trainable_variables[0].dtype)

    def program(self, *, label_grad: bool = False, input_grad: bool = True) -> BoundProgram:
        """The compiled forward/reverse program of this run, with its schedule bound.

        Tracing and compiling are the main cost for small models, so the compiled
        :class:`Program` is shared by every run of the same model object, loss,
        optimizer and flags (a refit, the runs of an outer optimisation loop), except
        streamed runs, whose program reads this run's host array.
        """
        key = (bool(label_grad), bool(input_grad), id(self.distribute), self.streamed, self.jit_compile)
        require_recorded_variables(self, "Trajectory.program")
        if key not in self._program_cache:
            replicas = 1 if self.distribute is None else int(self.distribute.num_replicas_in_sync)
            self._require_mask_layout(replicas)

            def make() -> Program:
                return Program(
                    ModelFunction(self.model, func="Trajectory"),
                    self.loss,
                    self.optimizer,
                    training=self.training,
                    n_train=self.n_train,
                    label_grad=bool(label_grad),
                    input_grad=bool(input_grad),
                    distribute=self.distribute,
                    stream_shape=self.input_shape if self.streamed else None,
                    jit_compile=self.jit_compile,
                    input_gradient_penalty=self.input_gradient_penalty,
                    mask_shards=self.mask_shards,
                )

            shared_key = (
                self.loss,
                self.optimizer,
                self.training,
                self.n_train,
                self.input_gradient_penalty,
                self.mask_shards,
                *key,
            )
            program = make() if self.streamed else shared_program(self.model, make, shared_key)
            # Padded as when recorded: the mask slices must fall where the replicas' did.
            width_multiple = max(replicas, self.mask_shards)
            schedule = Schedule.build(self.batches, self.learning_rates, self.seeds, self.dtype, width_multiple)
            self._program_cache[key] = program.bind(schedule)
        return self._program_cache[key]

    def _require_mask_layout(self, replicas: int) -> None:
        """Random layers draw one mask per replica slice: replay on one device or as many replicas as recorded."""
        if replicas in (1, self.mask_shards) or not self.training:
            return
        if self.mask_shards == 1 and not seed_state_slots(self.model):  # no dropout or noise layer
            return
        recorded = "one device" if self.mask_shards == 1 else f"{self.mask_shards} replicas"
        allowed = "distribute=None" if self.mask_shards == 1 else f"distribute=None or a strategy of {recorded}"
        raise ValueError(
            param_error(
                "distribute",
                "Trajectory",
                f"{allowed}: this run was recorded on {recorded} and its model draws dropout or noise masks, "
                "one per replica's slice of each batch, so another replica count would replay other masks",
                f"a strategy of {replicas} replicas",
            )
        )

    def initial_tensors(self) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """(w_0, s_0): the trainable weights and the optimizer state before step 0, as tensors."""
        w0 = [tf.constant(w, dtype=self.dtype) for w in self.initial_weights]
        return w0, self.optimizer.init(w0)

    def initial_state(self) -> list[tf.Tensor]:
        """Optimizer state before step 0."""
        return self.initial_tensors()[1]

    def final_state(self, x_train: Any, y_train: Any) -> list[tf.Tensor]:
        """Optimizer state after the last step: one step from the stored history, else a replay of the run.

        ``x_train``, ``y_train``: the data the run was recorded on (the state is not stored).
        """
        x, y = check_trajectory_data(self, x_train, y_train, "Trajectory.final_state")
        return self._final_state(x, y)

    def _final_state(self, x: np.ndarray, y: np.ndarray) -> list[tf.Tensor]:
        """:meth:`final_state` for data already checked (the rankers': no second fingerprint of every row)."""
        program = self.program()
        x_t, y_t, c_t = _data_tensors(program, x, y, self.sample_weight)
        last = self.steps - 1
        if self.weights_history is not None and self.state_history is not None and last >= 0:
            dtype = program.fn.dtype
            w = [tf.constant(h[last], dtype=dtype) for h in self.weights_history]
            s = [tf.constant(h[last], dtype=dtype) for h in self.state_history]
            return list(program.run(w, s, last, self.steps, x_t, y_t, c_t)[1])
        return list(program.run(*self.initial_tensors(), 0, self.steps, x_t, y_t, c_t)[1])

    def final_model(self) -> keras.Model:
        """The Keras model with this run's ``final_weights`` assigned to its trainable weights.

        The model object is shared with the runs derived from the same fit (replays, learned
        sample weights), so this assigns them now: call it on the run you mean to predict with.
        """
        require_recorded_variables(self, "Trajectory.final_model")
        for variable, value in zip(self.model.trainable_variables, self.final_weights):
            variable.assign(value)
        return self.model

    def replayed_on(self, x_train: Any, y_train: Any, *, sample_weight: Any = None) -> Trajectory:
        """This run's schedule (initial weights, batches, rates, seeds, sample weights) replayed on other data.

        The result is the run that training on ``x_train``/``y_train`` would have been:
        its final weights are :func:`retrain`'s, its data fingerprint that data's, and it
        keeps no weight history (the reverse pass recomputes it). Its ``model`` is this run's
        object, still at this run's weights: predict with ``replayed.final_model()``. Use it to ask
        :func:`influence.unrolled` about modified data (poisoned inputs, repaired labels,
        other sample weights: ``sample_weight`` (n,) replaces the recorded c);
        the recorded trajectory itself refuses data other than its own.
        """
        func = "Trajectory.replayed_on"
        x, y = check_trajectory_data(self, x_train, y_train, func, recorded=False)
        c = self.sample_weight if sample_weight is None else per_sample_weights(sample_weight, x, func)
        return replace(
            self,
            sample_weight=c,
            final_weights=retrain(self, x, y, sample_weight=c),
            weights_history=None,
            state_history=None,
            data_fingerprint=data_fingerprint(x, y),
        )


def _data_tensors(program: BoundProgram, x: np.ndarray, y: np.ndarray, c: np.ndarray):
    dtype = program.fn.dtype
    if program.stream_shape is not None:
        # The inputs stay on the host; the program's tf.data pipeline gathers each batch.
        program.source = x
        x_t = tf.zeros([1, *program.stream_shape], dtype)
    else:
        x_t = tf.constant(x, dtype=dtype if np.issubdtype(x.dtype, np.floating) else None)
    y_t = tf.constant(y, dtype=dtype if program.loss.continuous_labels else tf.int32)
    return x_t, y_t, tf.constant(c, dtype=dtype)


# Rows converted to float32 at a time: memory stays bounded for memory-mapped data sets.
# Fingerprints written before every row counted hashed 256 evenly spaced rows and have no prefix.
_ALL_ROWS = "rows:"
_SAMPLED_ROWS = 256


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A hash of every row of (x, y), as float32 values.

    float32 so that the same data in another precision or container (float64 copies, pandas,
    integer pixels, boolean one-hot labels) has the same fingerprint, while shuffled rows or
    a changed value anywhere get another one. Read in blocks of 16 MiB (:func:`row_blocks`).
    """
    digest = hashlib.sha256()
    for array in (x, y):
        for block in row_blocks(array, value_bytes=4):
            digest.update(block.astype(np.float32).reshape(-1).tobytes())
    return _ALL_ROWS + digest.hexdigest()[:16]


def _sampled_rows_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """The fingerprint of runs saved before every row counted: 256 evenly spaced rows."""
    rows = np.unique(np.linspace(0, len(x) - 1, min(len(x), _SAMPLED_ROWS)).astype(np.int64))
    digest = hashlib.sha256()
    for array in (x, y):
        part = np.asarray(array[rows]).astype(np.float32).reshape(len(rows), -1)
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def is_recorded_data(fingerprint: str | None, x: np.ndarray, y: np.ndarray) -> bool:
    """Whether (x, y) has the recorded ``fingerprint`` (True when none was recorded)."""
    if fingerprint is None:
        return True
    if fingerprint.startswith(_ALL_ROWS):
        return data_fingerprint(x, y) == fingerprint
    return _sampled_rows_fingerprint(x, y) == fingerprint  # a run saved by an earlier version


def make_batches(n: int, batch_size: int, epochs: int, rng: np.random.Generator, shuffle: bool) -> list[np.ndarray]:
    """Index arrays, one per step: each epoch a permutation split into batches (last may be short)."""
    batches = []
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        batches += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches


def fit(
    model: keras.Model,
    x_train: Any,
    y_train: Any,
    *,
    loss: Any = "sparse_categorical_crossentropy",
    optimizer: Any = "sgd",
    batch_size: int = 32,
    epochs: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    sample_weight: Any = None,
    training: bool | None = None,
    from_logits: bool = False,
    record_budget_bytes: int = DEFAULT_RECORD_BUDGET,
    distribute: tf.distribute.Strategy | None = None,
    stream: bool | None = None,
    jit_compile: bool | str = "auto",
    input_gradient_penalty: float = 0.0,
    progress: bool | None = None,
) -> Trajectory:
    """Train ``model`` with explicit recorded steps and return the :class:`Trajectory`.

    Args:
        model: built Keras 3 model; trained in its own dtype (use
            :func:`influence.as_float64` for float64 checks).
        x_train: (n, ...) inputs. y_train: (n,) class labels or (n, ...) targets.
        loss: loss name, Keras loss object, per-sample callable or :class:`influence.losses.Loss`
            (see :func:`influence.losses.get_loss`).
        optimizer: :class:`influence.optimizers.SGD` / ``RMSprop`` / ``Adam``
            (learning-rate schedules allowed) or a name: "sgd", "momentum", "nesterov", "rmsprop",
            "adam", "adamw" (Adam with weight_decay=0.004, Keras's AdamW default).
        batch_size, epochs: each epoch visits a permutation of the data in
            batches of ``batch_size`` (the last one may be shorter).
        seed: seeds the batch order and the per-step dropout seeds.
        shuffle: a new permutation every epoch (default); False visits the
            samples in their order every epoch.
        sample_weight: c_j per training sample, shape (n,); ones by default.
        training: run the model in training mode (dropout on, masks replayable
            from recorded seeds). Default: True. Models that mix samples in
            training mode (BatchNorm) are refused; pass ``training=False`` to
            use their moving statistics instead.
        from_logits: for loss names, whether the model outputs logits (unnormalised scores)
            rather than probabilities; a probability loss on outputs outside [0, 1] is refused.
        record_budget_bytes: keep every step's weights in the trajectory when
            they fit (so the reverse pass need not recompute them).
        distribute: optional ``tf.distribute`` strategy (e.g. ``MirroredStrategy``):
            every step's batch is split across its replicas (DESIGN §1 math unchanged).
        stream: stream each step's inputs from the host array through ``tf.data``
            instead of holding x_train as one tensor (default: when x_train is a
            ``np.memmap``, e.g. ``np.load(path, mmap_mode="r")``). Memory then stays
            bounded by the batch and the reverse pass's segment length.
        jit_compile: XLA-compile the training and reverse steps (True) or run them as
            plain TensorFlow graphs (False). ``"auto"`` (default): plain graphs for models
            with a convolution layer (nested ones included) when TensorFlow sees no GPU,
            XLA otherwise (:func:`resolve_jit_compile`); the trajectory stores the choice
            as a bool. Measured on 2 CPU cores, ratios within one process: XLA ran
            warm calls of the digits MLPs (64-32-10, 64-256-256-10) 1.8–4× faster in
            training and 1.6–6× faster in reverse (the compiled loops alone of the
            64-32-10: 6.5× and 4.3×, ``benchmarks/unrolled.py``; first calls compile: ``fit`` about even,
            ``unrolled`` 2.5–3.7× slower), but a Conv16-Conv32-Dense64 CNN on 28×28 inputs
            trained 4.5–25× and unrolled 8–24× slower, first calls and warm ones alike
            (the 1-channel Conv8 of ``benchmarks/unrolled.py`` on 8×8 digits: 2–2.5×
            faster warm, 2.5× slower in its first ``unrolled``). Models with an op XLA
            cannot compile fall back to plain graphs with a warning. Ignored (off) for
            streamed and distributed runs.
        input_gradient_penalty: ρ ≥ 0: train on ℓ_j + ρ‖∂ℓ_j/∂x_j‖² per sample (double
            backpropagation, S4) instead of ℓ_j; unrolled hypergradients, retraining and
            the rankers then follow that objective (:mod:`influence.objective`).
            Floating-point inputs only.
        progress: a bar over the training steps: ``None`` (default) for runs of more than
            256 steps, shown once training has run 2 s; ``True`` at once; ``False`` never.
            With a bar the compiled loop runs in equal chunks of steps (about 20), the bar
            moving after each; the numbers are bit-identical to one call's.
    """
    func = "fit"
    fn, per_sample = prepare(func, model, loss, from_logits)
    opt = get_optimizer(optimizer, func=func)
    _check_epsilon(opt, fn.dtype, func)
    x = as_model_inputs(model, as_array(x_train, param="x_train", func=func))
    y = as_array(y_train, param="y_train", func=func)
    check_same_length(func, x_train=x, y_train=y)
    check_positive(batch_size, param="batch_size", func=func, kind=int)
    check_positive(epochs, param="epochs", func=func, kind=int)
    if (
        isinstance(record_budget_bytes, bool)
        or not isinstance(record_budget_bytes, (int, np.integer))
        or (record_budget_bytes < 0)
    ):
        raise ValueError(param_error("record_budget_bytes", func, "a non-negative int", describe(record_budget_bytes)))
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(param_error("seed", func, "an int", describe(seed)))
    if not isinstance(shuffle, (bool, np.bool_)):
        raise ValueError(param_error("shuffle", func, "True or False", describe(shuffle)))
    if not (training is None or isinstance(training, (bool, np.bool_))):  # bool("False") would turn dropout on
        raise ValueError(param_error("training", func, "True, False or None", describe(training)))
    if not (progress is None or isinstance(progress, (bool, np.bool_))):
        raise ValueError(param_error("progress", func, "True, False or None", describe(progress)))
    jit = resolve_jit_compile(model, jit_compile, func=func)
    _check_no_regularization(model, func)
    _check_no_constraints(model, func)
    check_model_input(func, model, x)
    check_labels_for_loss(func, "y_train", y, per_sample, model)
    penalty = check_input_gradient_penalty(input_gradient_penalty, x, func)
    c = np.ones(len(x)) if sample_weight is None else per_sample_weights(sample_weight, x, func)
    check_probability_outputs(func, fn, per_sample, x)  # after the cheap checks: it runs the model
    training = True if training is None else bool(training)
    if distribute is not None and not isinstance(distribute, tf.distribute.Strategy):
        raise TypeError(param_error("distribute", func, "a tf.distribute.Strategy or None", describe(distribute)))
    x_probe = tf.constant(x[: min(len(x), 4)], dtype=fn.dtype if np.issubdtype(x.dtype, np.floating) else None)
    require_independent_samples(fn, x_probe, training=training, func=func, why="per-sample hypergradients")
    warn_gradient_overrides(fn, x_probe, training=training, func=func)

    rng = np.random.default_rng(seed)
    batches = make_batches(len(x), int(batch_size), int(epochs), rng, shuffle)
    steps = len(batches)
    learning_rates = opt.learning_rates(steps)
    seeds = rng.integers(0, 2**31 - 1, size=steps)
    trajectory = Trajectory(
        model=model,
        loss=per_sample,
        optimizer=opt,
        initial_weights=[np.asarray(w) for w in fn.weights],
        final_weights=[],
        batches=batches,
        learning_rates=learning_rates,
        seeds=seeds,
        training=training,
        sample_weight=c,
        n_train=len(x),
        input_shape=tuple(x.shape[1:]),
        distribute=distribute,
        streamed=isinstance(x_train, np.memmap) if stream is None else bool(stream),
        jit_compile=jit,
        data_fingerprint=data_fingerprint(x, y),
        input_gradient_penalty=penalty,
        mask_shards=(1 if distribute is None else int(distribute.num_replicas_in_sync)) if fn.draws_random else 1,
    )
    start = time.perf_counter()
    program = trajectory.program()
    w0, s0 = trajectory.initial_tensors()
    per_step_bytes = sum(int(np.prod(t.shape)) * t.dtype.size for t in w0 + s0)
    record = steps * per_step_bytes <= record_budget_bytes
    x_t, y_t, c_t = _data_tensors(program, x, y, c)
    w_final, w_hist, s_hist = _training_loop(program, w0, s0, steps, x_t, y_t, c_t, record=record, progress=progress)
    final = [np.asarray(w) for w in w_final]
    # XLA refused the model: replays must use plain graphs too, to reproduce these numbers.
    trajectory.jit_compile = trajectory.jit_compile and program.jit_compile
    _check_finite_weights(final, func)
    if record:
        trajectory.weights_history, trajectory.state_history = w_hist, s_hist
    trajectory.final_weights = final
    trajectory.seconds = time.perf_counter() - start
    # After the timing: Trajectory.seconds is the training loop's (the benchmarks' denominator).
    _warn_if_diverged(fn, per_sample, x, y, c, trajectory.initial_weights, final, func)
    trajectory.final_model()
    return trajectory


def resolve_jit_compile(model: keras.Model, jit_compile: Any, *, func: str = "fit") -> bool:
    """:func:`fit`'s ``jit_compile`` as a bool: True and False as given, ``"auto"`` by the rule below.

    ``"auto"``: plain TensorFlow graphs (False) when the model has a convolution layer
    (:func:`convolution_layers`) and TensorFlow sees no GPU, XLA (True) otherwise. On 2 CPU
    cores XLA's convolutions made a small CNN's training 4.5–25× and its reverse pass
    8–24× slower (and compiled for 2–11 s), while XLA runs dense models' warm loops
    1.6–6× faster (see :func:`fit`). Small convolutions that XLA runs faster warm lose
    little (milliseconds per call) and compile less; large ones lose minutes. Streamed and
    distributed runs use plain graphs whatever this says.
    """
    if isinstance(jit_compile, (bool, np.bool_)):
        return bool(jit_compile)
    if isinstance(jit_compile, str) and jit_compile == "auto":
        return not (convolution_layers(model) and not tf.config.list_physical_devices("GPU"))
    raise ValueError(param_error("jit_compile", func, "'auto', True or False", describe(jit_compile)))


def convolution_layers(model: keras.Model) -> list[str]:
    """Names of the model's convolution layers (Keras's Conv*, DepthwiseConv*, SeparableConv*, ConvLSTM*;
    subclasses and layers of nested models included)."""
    layers: list[keras.layers.Layer] = list(model._flatten_layers(include_self=False, recursive=True))
    return [layer.name for layer in layers if isinstance(layer, _CONVOLUTIONS)]


# fit's progress: a long run goes through the compiled loop in about _CHUNKS equal chunks of steps, one
# bar update after each. A call costs ~0.1 ms beside the steps, and a recording call compiles once per
# chunk length under XLA, so chunks are equal (program.chunks: a divisor of the run when one is near; else a recording
# run's last chunk starts early, see _training_loop). The rule depends on the run alone, not on timings:
# a refit takes the calls, and so the compiled functions, of the fit before it. Runs of up to
# _LONG_RUN_STEPS steps (the digits benchmark's 160) stay one call unless progress=True.
_CHUNKS = 20
_MIN_CHUNK = 8
_LONG_RUN_STEPS = 256


def _training_loop(
    program: BoundProgram,
    w: list[tf.Tensor],
    s: list[tf.Tensor],
    steps: int,
    x: Any,
    y: Any,
    c: Any,
    *,
    record: bool,
    progress: bool | None,
) -> tuple[list[tf.Tensor], list[np.ndarray] | None, list[np.ndarray] | None]:
    """Steps 0 … steps−1 from (w, s): the final weights and, when ``record``, the weights and state
    histories (numpy, (steps, *shape)). Chunked as the comment above says; bit-identical to one call."""
    long_run = steps > _LONG_RUN_STEPS if progress is None else bool(progress)
    chunked = long_run and steps >= 2 * _MIN_CHUNK
    parts = chunks(0, steps, max(_MIN_CHUNK, math.ceil(steps / _CHUNKS))) if chunked else [(0, steps)]
    chunk = parts[0][1]  # the length of every part but perhaps the last
    bar = _progress.progress_counter(steps, progress=progress, desc="training", unit="step") if long_run else None
    w_hist: list[np.ndarray] | None = None
    s_hist: list[np.ndarray] | None = None
    try:
        for done, stop in parts:
            start = done
            if record and stop - start < chunk and w_hist is not None and s_hist is not None:
                # The remainder: a recording call of another length would compile once more, so the last
                # chunk is a whole one, from the recorded state `chunk` steps before the end (those steps
                # come out the same as recorded: the same compiled call on the same numbers).
                start = steps - chunk
                w = [tf.constant(h[start], dtype=v.dtype) for h, v in zip(w_hist, w)]
                s = [tf.constant(h[start], dtype=v.dtype) for h, v in zip(s_hist, s)]
            outputs = program.run(w, s, start, stop, x, y, c, record=record)
            w, s = list(outputs[0]), list(outputs[1])
            if record and chunk == steps:
                w_hist, s_hist = [np.asarray(h) for h in outputs[2]], [np.asarray(h) for h in outputs[3]]
            elif record:  # into one array per variable: the chunk's tensors go as soon as they are copied
                if w_hist is None or s_hist is None:
                    w_hist = [np.empty((steps, *h.shape[1:]), h.dtype.as_numpy_dtype) for h in outputs[2]]
                    s_hist = [np.empty((steps, *h.shape[1:]), h.dtype.as_numpy_dtype) for h in outputs[3]]
                for held, h in zip(w_hist + s_hist, list(outputs[2]) + list(outputs[3])):
                    held[start:stop] = h
            del outputs
            if bar is not None:
                bar.update(stop - done)
    finally:
        if bar is not None:
            bar.close()
    return w, w_hist, s_hist


def _check_finite_weights(weights: list[np.ndarray], func: str) -> None:
    if not all(np.all(np.isfinite(w)) for w in weights):
        raise FloatingPointError(
            f"{func}: training diverged (NaN/Inf weights); lower the learning rate or check the data."
        )


def mean_loss(
    fn: ModelFunction, loss: Loss, weights: Any, x: np.ndarray, y: np.ndarray, *, batch: int | None = None
) -> float:
    """Mean per-sample loss of the model at ``weights`` on (x, y), dropout off, summed in float64.

    A float32 mean rounds the result to its float32 spacing, and verification takes differences
    of such means that are often only a few spacings. ``batch``: rows per model call (None: one).
    """
    w = [tf.constant(wi, dtype=fn.dtype) for wi in weights]
    floating = np.issubdtype(x.dtype, np.floating)
    rows = np.array_split(np.arange(len(x)), max(1, len(x) // batch)) if batch else [slice(None)]
    total = 0.0
    for part in rows:
        xb = tf.constant(x[part], dtype=fn.dtype if floating else None)
        yb = tf.constant(y[part], dtype=fn.dtype if loss.continuous_labels else tf.int32)
        total += float(np.sum(np.asarray(loss(yb, fn(w, xb, training=False)), dtype=np.float64)))
    return total / len(x)


# Training loss growth, from before training to after, that fit calls divergence.
DIVERGED_GROWTH = 10.0
DIVERGENCE_PROBE = 4096  # samples on which the training loss is compared


def _warn_if_diverged(
    fn: Any,
    loss: Loss,
    x: np.ndarray,
    y: np.ndarray,
    c: np.ndarray,
    initial: list[np.ndarray],
    final: list[np.ndarray],
    func: str,
) -> None:
    """Warn when the mean training loss ended ≥ 10× where it started: a diverged run stays finite for
    a while (MSE 8 → 2e14 in 15 steps), and its hypergradients then predict impossible changes
    (a removal taking the MSE to −1e15). Evaluated without dropout on at most 4096 trained samples.
    """
    trained = np.flatnonzero(c != 0)
    if len(trained) == 0:
        return
    probe = trained[np.linspace(0, len(trained) - 1, min(len(trained), DIVERGENCE_PROBE)).astype(int)]
    xp, yp = np.asarray(x[probe]), y[probe]
    before, after = (mean_loss(fn, loss, weights, xp, yp, batch=512) for weights in (initial, final))
    if not np.isfinite(after) or (after > DIVERGED_GROWTH * before and after - before > 1e-3 * max(1.0, before)):
        warnings.warn(
            f"{func}: the training loss grew from {before:.4g} before training to {after:.4g} after "
            f"(mean over {len(probe)} samples, dropout off): the run diverged. Hypergradients of a diverged "
            "run describe its blow-up, not learning; lower the learning rate.",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_epsilon(opt: Optimizer, dtype: tf.DType, func: str) -> None:
    """Refuse an ε that the model's float type flushes to 0: m/(√v + ε) is then 0/0 for a weight
    that has had no gradient yet (a dead input feature), and the run ends in NaN."""
    epsilon = getattr(opt, "epsilon", None)
    tiny = float(np.finfo(dtype.as_numpy_dtype).tiny)
    if epsilon is not None and epsilon < tiny:
        raise ValueError(
            param_error(
                "optimizer",
                func,
                f"an epsilon ≥ {tiny:.3g}, the smallest normal {dtype.name} (smaller ones are flushed to 0, and "
                "a weight without gradient divides 0 by 0)",
                f"{type(opt).__name__}(epsilon={epsilon:g})",
            )
        )


def _check_no_regularization(model: keras.Model, func: str) -> None:
    """Refuse models whose Keras training loss has terms beyond the per-sample loss.

    kernel/bias/activity regularizers and ``add_loss`` terms are part of Keras's training loss,
    not of the per-sample losses fit trains on and differentiates: the run would silently not be
    the one the model describes.
    """
    regularized = [
        f"{layer.name}.{kind}"
        for layer in model._flatten_layers(include_self=True, recursive=True)
        for kind in ("kernel_regularizer", "bias_regularizer", "activity_regularizer")
        if getattr(layer, kind, None) is not None
    ]
    if regularized or model.losses:
        raise ValueError(
            param_error(
                "model",
                func,
                "a model without regularization losses (fit trains on the per-sample loss only). An L2 term "
                "λ‖w‖² equals SGD(weight_decay=2·λ) only for plain SGD; the optimizers' weight_decay is "
                "decoupled, so with momentum, RMSprop or Adam it is a different method (AdamW-style)",
                "regularizers on " + ", ".join(regularized) if regularized else "a model with add_loss terms",
            )
        )


def _check_no_constraints(model: keras.Model, func: str) -> None:
    """Refuse trainable weights with constraints (``kernel_constraint=NonNeg()``, ``MaxNorm``, …).

    Keras projects such a weight after every update; the recorded updates do not, so the run
    would silently leave the constraint (a NonNeg kernel ending at −0.52).
    """
    constrained = [v.path for v in model.trainable_variables if getattr(v, "constraint", None) is not None]
    if constrained:
        raise ValueError(
            param_error(
                "model",
                func,
                "a model without weight constraints (the recorded updates do not project weights onto them)",
                "constraints on " + ", ".join(constrained) + "; remove them, or reparametrize (e.g. a kernel "
                "passed through softplus for non-negativity)",
            )
        )


def per_sample_weights(sample_weight: Any, x: np.ndarray, func: str) -> np.ndarray:
    """c as an (n,) float64 array for the n samples of ``x``: (n,) or Keras's (n, 1) accepted, other shapes refused.

    An (n, 1) array kept as it is would broadcast against the (B,) per-sample losses into a
    (B, B) matrix and train another run silently.
    """
    c = as_array(sample_weight, param="sample_weight", func=func)
    check_same_length(func, x_train=x, sample_weight=c)
    n = len(x)
    if c.shape not in ((n,), (n, 1)):
        raise ValueError(
            param_error("sample_weight", func, f"shape ({n},) (one weight per sample)", f"shape {c.shape}")
        )
    # As floats: integer weights stored as they are were truncated when scaled (c·0.75 of 2 became 1).
    return c.reshape(n).astype(np.float64)


def retrain(trajectory: Trajectory, x_train: Any, y_train: Any, *, sample_weight: Any = None) -> list[np.ndarray]:
    """Replay the recorded run (same batches, learning rates, dropout seeds) with other data or sample weights.

    Removing sample i exactly means ``sample_weight[i] = 0``: batch order and
    |B_t| are unchanged (DESIGN §1). Returns the final trainable weights; with
    the original data and weights this reproduces ``trajectory.final_weights``.
    """
    func = "retrain"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func, recorded=False)
    c = trajectory.sample_weight if sample_weight is None else per_sample_weights(sample_weight, x, func)
    program = trajectory.program()
    w0, s0 = trajectory.initial_tensors()
    x_t, y_t, c_t = _data_tensors(program, x, y, c)
    w, _ = program.run(w0, s0, 0, trajectory.steps, x_t, y_t, c_t)
    return [np.asarray(wi) for wi in w]


def require_recorded_variables(trajectory: Trajectory, func: str) -> None:
    """The model's trainable variables must still be the ones the run recorded, in number and shape.

    A layer frozen or unfrozen after ``fit`` (a second fine-tuning stage) changes which
    variables are trainable; the recorded weights would then be fed to other variables
    (Keras: "trainable_variables must be 1:1"), or silently to the wrong ones.
    """
    now = [tuple(v.shape) for v in trajectory.model.trainable_variables]
    recorded = [tuple(np.shape(w)) for w in trajectory.initial_weights]
    if now != recorded:
        raise ValueError(
            param_error(
                "trajectory",
                func,
                f"a run whose model still has the {len(recorded)} trainable variable(s) it recorded",
                f"a model whose trainable variables changed since fit ({len(recorded)} recorded, {len(now)} now"
                f"{'' if len(now) != len(recorded) else ', of other shapes'}; was a layer's `trainable` flag "
                "changed after fit?). Restore the flags as they were during fit, or fit again to record "
                "the new set-up",
            )
        )


def check_trajectory_data(
    trajectory: Any, x_train: Any, y_train: Any, func: str, *, recorded: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The training data must match what the trajectory was recorded on.

    Always its sample count and shape; with ``recorded`` also its values (the fingerprint),
    so shuffled or relabelled data is not analysed as if it were the recorded run.
    ``retrain`` passes ``recorded=False``: replaying the run on other data is what it is for.
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            param_error("trajectory", func, "an influence.Trajectory (from influence.fit)", describe(trajectory))
        )
    require_recorded_variables(trajectory, func)
    x = as_array(x_train, param="x_train", func=func)
    y = as_array(y_train, param="y_train", func=func)
    check_same_length(func, x_train=x, y_train=y)
    if len(x) != trajectory.n_train or tuple(x.shape[1:]) != trajectory.input_shape:
        raise ValueError(
            param_error(
                "x_train",
                func,
                "the data the trajectory was recorded on "
                f"({trajectory.n_train} samples of shape {trajectory.input_shape})",
                f"{len(x)} samples of shape {tuple(x.shape[1:])}",
            )
        )
    if not recorded:  # other data: labels as fit checks them (retrain dropped a class label 12 of 10 classes)
        check_labels_for_loss(func, "y_train", y, trajectory.loss, trajectory.model)
    if recorded and not is_recorded_data(trajectory.data_fingerprint, x, y):
        raise ValueError(
            param_error(
                "x_train",
                func,
                "the data the trajectory was recorded on, in its order",
                "other values (rows or labels differ from the recorded ones: shuffled, relabelled or "
                "preprocessed differently?). For the recorded schedule on other data use trajectory.replayed_on(x, y)",
            )
        )
    return as_model_inputs(trajectory.model, x), y

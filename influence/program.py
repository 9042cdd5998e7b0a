"""A recorded training run as graph functions: forward steps and their adjoints.

Step t (DESIGN §1): L_t(w) = (1/|B_t|) Σ_{j∈B_t} c_j ℓ(f(x_j; w), y_j),
(w, s) ← U(w, ∇L_t(w), s, η_t, t).

The reverse step receives the adjoints (λ_w, λ_s) of the state after step t
and returns those before it, plus dE/dc_j, dE/dx_j, dE/dy_j for j ∈ B_t:

  1. VJP of the update U (first order, autodiff of the pure optimizer):
     gives λ_w^direct, λ_s and ḡ, the adjoint of the gradient g = ∇L_t.
  2. ONE reverse-over-reverse call on s = ∇_w L_t(w; x, y, c) · ḡ gives
     H_t ḡ (w.r.t. w), the mixed input term (w.r.t. x), the label term
     (w.r.t. y) and the per-sample dots ∇ℓ_j·ḡ/|B_t| (w.r.t. c).
  3. λ_w ← λ_w^direct + H_t ḡ.

For plain SGD this is exactly v_t = v_{t+1} − η H v_{t+1},
dE/dc_j += −(η/|B|) ∇ℓ_j·v_{t+1}. Steps run inside ``tf.while_loop``s over
pre-gathered, padded batch indices; per-sample results are accumulated per
segment with ``unsorted_segment_sum``, never with a Python loop over samples.

Compilation. A :class:`Program` holds the graph functions of one model, loss
and optimizer; the recorded schedule (batches, learning rates, seeds) is an
argument, so every run of the same set-up (a refit, the runs of an outer
optimisation loop) reuses one trace (:func:`shared_program`). The functions are
XLA-compiled (``jit_compile``) when the run allows it: XLA fuses the many small
ops of a step, which is where time goes for small dense models (on 2 CPU cores the
digits MLPs' warm training and reverse loops ran 1.6–6× faster than plain graphs;
the first call compiles). Its CPU convolutions are slow (a small CNN 4.5–25×
slower), so :func:`influence.fit`'s ``jit_compile="auto"`` runs models with
convolution layers as plain graphs when no GPU is visible. A model
with an op XLA cannot compile falls back to plain graphs, with a one-line warning
(XLA's native log of the refusal, dozens of lines of C++ logging, is held back).
Streamed and distributed runs use plain graphs (``tf.data`` iterators and
replica calls do not compile).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from . import _tree
from ._graphs import graph_function
from .autodiff import dense_gradients
from .losses import Loss
from .model_function import ModelFunction, integer_casts, layers_key
from .objective import Objective
from .optimizers import Optimizer


class Schedule(NamedTuple):
    """Per-step recorded data as tensors: padded batch indices, masks, sizes, lrs, seeds.

    A graph-function argument (a nest of tensors), not a captured constant, so
    runs with different schedules share compiled functions.
    """

    batches: tf.Tensor  # (T, Bmax) int32, padded with 0
    masks: tf.Tensor  # (T, Bmax) 1 for real entries, 0 for padding (model dtype)
    counts: tf.Tensor  # (T,) |B_t| (model dtype)
    learning_rates: tf.Tensor  # (T,)
    seeds: tf.Tensor  # (T,) int64

    @staticmethod
    def build(
        batches: list[np.ndarray], learning_rates: np.ndarray, seeds: np.ndarray, dtype: tf.DType, replicas: int = 1
    ) -> Schedule:
        # Padding (mask 0) makes every batch the same width, divisible by the replica count.
        width = -(-max(len(b) for b in batches) // replicas) * replicas
        padded = np.zeros((len(batches), width), dtype=np.int32)
        masks = np.zeros((len(batches), width))
        for t, b in enumerate(batches):
            padded[t, : len(b)] = b
            masks[t, : len(b)] = 1.0
        return Schedule(
            batches=tf.constant(padded),
            masks=tf.constant(masks, dtype=dtype),
            counts=tf.constant([float(len(b)) for b in batches], dtype=dtype),
            learning_rates=tf.constant(learning_rates, dtype=dtype),
            seeds=tf.constant(seeds, dtype=tf.int64),
        )


_XLA_REFUSALS_SAID: set[tuple[str, str]] = set()


def chunks(start: int, stop: int, limit: int) -> list[tuple[int, int]]:
    """Steps [start, stop) in chunks of at most ``limit`` steps, in forward order: the calls of a
    training loop or reverse pass run in pieces (for progress, or to bound what one call holds).

    Of one length when a divisor of the range lies in (limit/2, limit]: XLA compiles the
    recording and reverse functions once per chunk length. Else ``limit`` steps and a
    shorter last chunk (two lengths).
    """
    length = stop - start
    if length <= limit:
        return [(start, stop)]
    size = next((d for d in range(limit, limit // 2, -1) if length % d == 0), limit)
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


class _GraphFunction:
    """A traced function, XLA-compiled while its program allows it.

    If XLA refuses a forward function (an op without an XLA kernel, e.g.
    ``tf.numpy_function`` in a model), the whole program switches to plain graphs for
    good: the recorded run is then a plain-graph run, and replays reproduce it. If XLA
    refuses only the reverse functions (float64 max-pooling has no XLA kernel for its
    second derivative), those alone run plain: the forward steps stay compiled, so replays
    and the reverse pass's recomputed states keep reproducing the recorded run bit for bit.
    """

    def __init__(self, program: Program, python_function: Callable[..., Any], *, group: str) -> None:
        compile_ = partial(graph_function, reduce_retracing=True, autograph=False)
        self.program, self.group = program, group
        self.plain = compile_(python_function)
        self.xla = compile_(python_function, jit_compile=True)
        self.compiled = False  # whether an XLA call has succeeded: the first one compiles

    def __call__(self, *args: Any) -> Any:
        if self.program.jit_compile and self.group not in self.program.xla_refused:
            try:
                if self.compiled:
                    return self.xla(*args)
                # XLA's C++ logging prints dozens of lines when it refuses an op; the warning below says it
                # in one. What it logs on a successful compile is passed on.
                with _native_log_held() as held:
                    result = self.xla(*args)
                    held.pass_on = True
                self.compiled = True
                return result
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.InternalError) as error:
                if not _xla_refused(error):
                    raise
                # Only a refusal if plain graphs run it: an error of the arguments themselves (labels of
                # another shape given to retrain) fails there too, is raised as it is, and leaves XLA on.
                try:
                    result = self._plain(*args)
                except Exception as plain_error:
                    raise plain_error from None
                reason = str(error).splitlines()[0][:300]
                # Once per process and reason: each float64 check builds a new program of the same model,
                # and its refusal differs only in numbered graph and node names.
                said = (self.group, re.sub(r"\d+", "#", re.sub(r"\{\{node [^}]*\}\}", "", reason)))
                if said not in _XLA_REFUSALS_SAID:
                    _XLA_REFUSALS_SAID.add(said)
                    warnings.warn(
                        f"influence: XLA cannot compile this model's {self.group} steps; using plain TensorFlow "
                        f"graphs for them (slower for small models; said once per process). XLA said: {reason}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                self.program.xla_refused.add(self.group)
                if self.group == "forward":
                    self.program.jit_compile = False
                return result
        return self._plain(*args)

    def _plain(self, *args: Any) -> Any:
        if self.group == "forward":  # the rewrite speeds the training loop up 1.8× and does not break it
            return self.plain(*args)
        with _without_add_rewrite():
            return self.plain(*args)


@contextlib.contextmanager
def _without_add_rewrite() -> Iterator[None]:
    """Grappler's arithmetic optimizer off while a plain reverse-pass graph is instantiated and run.

    Its AddOpsRewrite turns the reverse pass's sums inside the step loop into accumulations through
    temporary variables named by loop frame and iteration; with a few hundred steps the second call of
    the same graph found the first call's variables still there and failed (AlreadyExistsError,
    85k-weight MLP, 235+ steps). XLA-compiled functions are not affected. The process's own setting is
    restored afterwards.
    """
    before = tf.config.optimizer.get_experimental_options()
    if before.get("arithmetic_optimization") is False:
        yield
        return
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": True})


# absl's INFO prefix, e.g. "I0000 00:00:1795503993.007541   26574 service.cc:153] "
_ABSL_INFO = re.compile(rb"I\d{4} [\d:.]+ +\d+ \S+:\d+\] ")


class _HeldLog:
    pass_on = False


@contextlib.contextmanager
def _native_log_held() -> Iterator[_HeldLog]:
    """Hold what native code writes to file descriptor 2 during the block; pass it on if ``pass_on`` is set.

    Python's own ``sys.stderr`` is flushed first and is not affected when it is not fd 2 (pytest, notebooks).
    """
    held = _HeldLog()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (an embedded interpreter): hold nothing
        held.pass_on = True
        yield held
        return
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if held.pass_on:
                log.seek(0)
                text = log.read()
                if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
                    # XLA's INFO lines of a first compile ("XLA service … initialized", "Compiled cluster
                    # using XLA!"): noise to a user who did not ask for TensorFlow's log.
                    text = b"".join(line for line in text.splitlines(keepends=True) if not _ABSL_INFO.match(line))
                if text:
                    os.write(2, text)


def _xla_refused(error: Exception) -> bool:
    text = str(error)
    # The last: XLA's verifier on a float64 graph holding a float32 op (TensorFlow's image resizing).
    return "XLA" in text or "compil" in text.lower() or "floating point types of different precisions" in text


class Program:
    """Forward and reverse steps of one model, loss and optimizer, compiled once.

    Every method taking a ``schedule`` works on any recorded run of this set-up;
    :meth:`bind` fixes one (what :meth:`Trajectory.program` returns).

    Args:
        fn: the model as a pure function.
        loss: per-sample loss.
        optimizer: pure optimizer.
        training: forward pass in training mode (dropout masks from the seeds).
        n_train: number of training samples (size of per-sample outputs).
        label_grad: whether to compute dE/dy (continuous labels only).
        input_grad: whether to compute dE/dx (skip it when only removal effects are wanted).
        distribute: optional ``tf.distribute`` strategy. Each batch is split into
            contiguous shards, one per replica; gradients and H·ḡ are all-reduced
            and per-sample terms gathered in order, so the numbers equal one
            device's up to summation order. (With dropout, masks depend on the
            shard layout: see ``mask_shards``.)
        stream_shape: per-sample input shape when inputs are streamed from the
            host array in :attr:`source` instead of passed as a tensor; the
            reverse pass then returns per-step input terms for host-side
            accumulation, so memory stays bounded by batch × segment length.
        jit_compile: XLA-compile the graph functions (ignored, i.e. off, for
            streamed and distributed runs).
        input_gradient_penalty: ρ of the training objective ℓ + ρ‖∂ℓ/∂x‖²
            (:mod:`influence.objective`); 0 trains on the loss alone.
        mask_shards: slices of each batch that draw their own dropout and noise masks (the
            replica count the run was recorded on; 1 on one device). Without a strategy the
            forward pass runs slice by slice with the step's seed, as the replicas did, so a
            distributed run with dropout replays on one device exactly.
    """

    def __init__(
        self,
        fn: ModelFunction,
        loss: Loss,
        optimizer: Optimizer,
        *,
        training: bool,
        n_train: int,
        label_grad: bool,
        input_grad: bool = True,
        distribute: tf.distribute.Strategy | None = None,
        stream_shape: tuple[int, ...] | None = None,
        jit_compile: bool = True,
        input_gradient_penalty: float = 0.0,
        mask_shards: int = 1,
    ) -> None:
        # The recorded run keeps the non-trainable values (moving statistics) it was trained with.
        self.fn, self.loss, self.optimizer = fn.pin_state(), loss, optimizer
        self.objective = Objective(fn, loss, input_gradient_penalty)
        self.training, self.n_train, self.label_grad = training, n_train, label_grad
        self.input_grad = input_grad
        self.distribute = distribute
        self.replicas = 1 if distribute is None else int(distribute.num_replicas_in_sync)
        self.mask_shards = int(mask_shards)
        # Streaming: x stays on the host (e.g. a np.memmap); each step's batch comes through a
        # tf.data pipeline (gather + prefetch) whose iterator the graph loop advances.
        self.stream_shape = stream_shape
        self.source: Any = None
        self.jit_compile = bool(jit_compile) and distribute is None and stream_shape is None
        self.xla_refused: set[str] = set()  # "forward" / "reverse": groups XLA could not compile
        self._run_plain = _GraphFunction(self, self._run, group="forward")
        self._run_recording = _GraphFunction(self, self._run_and_record, group="forward")
        self._reverse_unflagged = _GraphFunction(self, lambda *a: self._reverse(*a, flags=False), group="reverse")
        # Traced only when a segment's adjoint is not finite, to name the step where it broke.
        self._reverse_flags = _GraphFunction(self, lambda *a: self._reverse(*a, flags=True), group="reverse")
        # Called once per reverse pass: XLA's compilation (≈0.4 s for the digits MLP) would
        # cost far more than it saves.
        self.validation = graph_function(self._validation, reduce_retracing=True, autograph=False)
        self._integer_casts: dict[tuple, list[str]] = {}

    def integer_casts(self, x: np.ndarray) -> list[str]:
        """:func:`~influence.model_function.integer_casts` of this program's model for inputs like ``x``.

        Inspected once per input signature: the program keeps the graphs it traced, so a later
        edit of the model does not change what it runs. (Inspecting on every ``unrolled`` call
        serialized every layer's configuration for the cache key: 0.4 ms of a 5 ms call.)
        """
        key = (np.dtype(x.dtype).str, tuple(x.shape[1:]))
        if key not in self._integer_casts:
            self._integer_casts[key] = integer_casts(self.fn, x[:1], training=self.training)
        return self._integer_casts[key]

    def bind(self, schedule: Schedule) -> BoundProgram:
        """This program with one run's schedule fixed."""
        return BoundProgram(self, schedule)

    def _validation(self, w, x_val, y_val):
        """E(w) = mean validation loss (inference mode) and ∇E(w): the adjoint at the end of the run."""
        with tf.GradientTape() as tape:
            tape.watch(w)
            value = self.loss.mean(y_val, self.fn(w, x_val, training=False))
        return value, dense_gradients(tape.gradient(value, w), w)

    # ------------------------------------------------------------------ forward

    def _batch(self, schedule: Schedule, t, x, y, c, xb=None):
        idx = tf.gather(schedule.batches, t)
        mask = tf.gather(schedule.masks, t)
        xb = tf.gather(x, idx) if xb is None else xb
        return xb, tf.gather(y, idx), tf.gather(c, idx) * mask, mask

    def _fetch(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.source[np.asarray(idx)], dtype=self.fn.dtype.as_numpy_dtype)

    def _streamed_batches(self, schedule: Schedule, steps: tf.Tensor):
        """Iterator over the inputs of ``steps`` (in that order), or None when not streaming."""
        if self.stream_shape is None:
            return None
        shape = [int(schedule.batches.shape[1]), *self.stream_shape]

        def fetch(t: tf.Tensor) -> tf.Tensor:
            rows = tf.numpy_function(self._fetch, [tf.gather(schedule.batches, t)], self.fn.dtype)
            return tf.ensure_shape(rows, shape)

        return iter(tf.data.Dataset.from_tensor_slices(steps).map(fetch).prefetch(2))

    def batch_loss(self, schedule: Schedule, w, t, xb, yb, cb) -> tf.Tensor:
        """L_t: weighted mean of the training objective over the real entries of batch t (padding has c = 0)."""
        seed = tf.gather(schedule.seeds, t)
        if self.distribute is None and self.mask_shards > 1 and self.training:
            # Masks of a run recorded on k replicas: each replica drew its slice's with this seed.
            slices = zip(tf.split(xb, self.mask_shards), tf.split(yb, self.mask_shards))
            losses = tf.concat([self.objective(w, xs, ys, training=True, seed=seed) for xs, ys in slices], 0)
        else:
            losses = self.objective(w, xb, yb, training=self.training, seed=seed)
        return tf.reduce_sum(cb * losses) / tf.gather(schedule.counts, t)

    def gradient(self, schedule: Schedule, w, t, xb, yb, cb) -> list[tf.Tensor]:
        """∇L_t; under a strategy, the sum of the replicas' shard gradients (L_t is a sum over samples)."""

        def shard_gradient(w, xb, yb, cb):
            with tf.GradientTape() as tape:
                tape.watch(w)
                value = self.batch_loss(schedule, w, t, xb, yb, cb)
            return dense_gradients(tape.gradient(value, w), w)

        if self.distribute is None:
            return shard_gradient(w, xb, yb, cb)

        def replica(w, xb, yb, cb):
            g = shard_gradient(w, *self._shard(xb, yb, cb))
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, g)

        return self.distribute.experimental_local_results(self.distribute.run(replica, args=(w, xb, yb, cb)))[0]

    def _shard(self, *tensors: tf.Tensor) -> list[tf.Tensor]:
        """This replica's contiguous slice of each batch tensor."""
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        size = tf.shape(tensors[0])[0] // self.replicas
        return [t[r * size : (r + 1) * size] for t in tensors]

    def step(self, schedule: Schedule, w, s, t, x, y, c, xb=None):
        """One recorded training step: (w_t, s_t) -> (w_{t+1}, s_{t+1})."""
        xb, yb, cb, _ = self._batch(schedule, t, x, y, c, xb)
        g = self.gradient(schedule, w, t, xb, yb, cb)
        return self.optimizer.update(w, g, s, tf.gather(schedule.learning_rates, t), t)

    def _run(self, schedule: Schedule, w, s, start, stop, x, y, c):
        # An explicit tf.while_loop (the functions are compiled without autograph: its source
        # conversion dominated tracing time). start/stop are run-time values: one compilation
        # serves every segment.
        # (The range exists only when streaming: a range from values would make XLA compile per value.)
        streamed = None if self.stream_shape is None else self._streamed_batches(schedule, tf.range(start, stop))

        def body(t, w, s):
            w, s = self.step(schedule, w, s, t, x, y, c, None if streamed is None else next(streamed))
            return t + 1, w, s

        _, w, s = tf.while_loop(lambda t, *_: t < stop, body, (start, list(w), list(s)))
        return w, s

    def _run_and_record(self, schedule: Schedule, w, s, steps, x, y, c):
        # The segment's length comes from the shape of ``steps`` (not from values), so XLA
        # compiles once per length rather than once per segment.
        length = tf.shape(steps)[0]
        w_hist = [tf.TensorArray(wi.dtype, size=length) for wi in w]
        s_hist = [tf.TensorArray(si.dtype, size=length) for si in s]
        streamed = self._streamed_batches(schedule, steps)

        def body(i, w, s, w_hist, s_hist):
            w_hist = [h.write(i, wi) for h, wi in zip(w_hist, w)]
            s_hist = [h.write(i, si) for h, si in zip(s_hist, s)]
            t = tf.gather(steps, i)
            w, s = self.step(schedule, w, s, t, x, y, c, None if streamed is None else next(streamed))
            return i + 1, w, s, w_hist, s_hist

        _, w, s, w_hist, s_hist = tf.while_loop(
            lambda i, *_: i < length, body, (tf.constant(0), list(w), list(s), w_hist, s_hist)
        )
        return w, s, [h.stack() for h in w_hist], [h.stack() for h in s_hist]

    def run(self, schedule: Schedule, w, s, start: int, stop: int, x, y, c, *, record: bool = False):
        """Steps start … stop−1 from state (w, s) = (w_start, s_start).

        Returns (w_stop, s_stop), plus when ``record`` the stacked states
        before each step: lists of (stop−start, *shape) tensors.
        """
        if record:
            steps = tf.range(start, stop, dtype=tf.int32)
            return self._run_recording(schedule, list(w), list(s), steps, x, y, c)
        return self._run_plain(schedule, list(w), list(s), tf.constant(start), tf.constant(stop), x, y, c)

    def states_at(self, schedule: Schedule, w, s, steps: list[int], x, y, c):
        """(weights, optimizer state) before each of ``steps`` (increasing), replaying from step 0's (w, s).

        Runs forward only as far as the last requested step.
        """
        return list(self.iter_states_at(schedule, w, s, steps, x, y, c))

    def iter_states_at(self, schedule: Schedule, w, s, steps: list[int], x, y, c):
        """:meth:`states_at` one state at a time: memory for one (weights, state), not one per step."""
        position = 0
        for t in steps:
            if t > position:
                w, s = self.run(schedule, w, s, position, t, x, y, c)
                position = t
            yield list(w), list(s)

    # ------------------------------------------------------------------ reverse

    def reverse(self, schedule: Schedule, w_hist, s_hist, start: int, lam_w, lam_s, x, y, c, *, flags: bool = False):
        """Adjoints through steps start … start+L−1 (L = len of the stacked states ``w_hist``).

        Returns (λ_w, λ_s) before step ``start``, the segment's dE/dc (n,), dE/dx
        (n, ...) or its per-step terms (L, Bmax, ...) when streaming, dE/dy, and
        whether λ_w stayed finite (per step when ``flags``).
        """
        function = self._reverse_flags if flags else self._reverse_unflagged
        return function(schedule, list(w_hist), list(s_hist), tf.constant(start), list(lam_w), list(lam_s), x, y, c)

    def _reverse(self, schedule: Schedule, w_hist, s_hist, start, lam_w, lam_s, x, y, c, *, flags: bool):
        length = tf.shape(w_hist[0])[0]
        steps = start + tf.range(length)
        dc_hist = tf.TensorArray(c.dtype, size=length)  # c: the model's dtype, also for integer inputs
        dx_hist = tf.TensorArray(x.dtype, size=length)
        dy_hist = tf.TensorArray(c.dtype if self.label_grad else tf.float32, size=length)
        finite_hist = tf.TensorArray(tf.bool, size=length)
        streamed = self._streamed_batches(schedule, tf.reverse(steps, [0]))

        def body(i, lam_w, lam_s, dc_hist, dx_hist, dy_hist, finite_hist):
            t = start + i
            w = [tf.gather(h, i) for h in w_hist]
            s = [tf.gather(h, i) for h in s_hist]
            xb = None if streamed is None else next(streamed)
            lam_w, lam_s, dc, dx, dy = self._reverse_step(schedule, w, s, t, lam_w, lam_s, x, y, c, xb)
            if flags:  # one flag per step, so a blow-up is reported with its step number
                finite_hist = finite_hist.write(i, tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in lam_w]))
            dc_hist = dc_hist.write(i, dc)
            if self.input_grad:
                dx_hist = dx_hist.write(i, dx)
            if self.label_grad:
                dy_hist = dy_hist.write(i, dy)
            return i - 1, lam_w, lam_s, dc_hist, dx_hist, dy_hist, finite_hist

        _, lam_w, lam_s, dc_hist, dx_hist, dy_hist, finite_hist = tf.while_loop(
            lambda i, *_: i >= 0,
            body,
            (length - 1, list(lam_w), list(lam_s), dc_hist, dx_hist, dy_hist, finite_hist),
        )
        idx = tf.reshape(tf.gather(schedule.batches, steps), [-1])
        n = self.n_train
        dc_total = tf.math.unsorted_segment_sum(tf.reshape(dc_hist.stack(), [-1]), idx, n)
        if not self.input_grad:
            dx_total = tf.zeros([0], x.dtype)
        elif self.stream_shape is None:
            dx_flat = tf.reshape(dx_hist.stack(), tf.concat([[-1], tf.shape(x)[1:]], 0))
            dx_total = tf.math.unsorted_segment_sum(dx_flat, idx, n)
        else:  # per-step terms (length, Bmax, ...): the host adds them into its (possibly on-disk) array
            dx_total = dx_hist.stack()
        if self.label_grad:
            dy_flat = tf.reshape(dy_hist.stack(), tf.concat([[-1], tf.shape(y)[1:]], 0))
            dy_total = tf.math.unsorted_segment_sum(dy_flat, idx, n)
        else:
            dy_total = tf.zeros([0])
        finite = finite_hist.stack() if flags else tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in lam_w])
        return lam_w, lam_s, dc_total, dx_total, dy_total, finite

    def _reverse_step(self, schedule: Schedule, w, s, t, lam_w, lam_s, x, y, c, xb=None):
        if self.distribute is not None:
            return self._reverse_step_distributed(schedule, w, s, t, lam_w, lam_s, x, y, c, xb)
        xb, yb, cb, mask = self._batch(schedule, t, x, y, c, xb)
        adjoints = {}

        def g_bar_of(g):
            # ḡ from the update's VJP at this very g: one forward/backward serves both.
            adjoints["w"], g_bar, adjoints["s"] = self._update_vjp(schedule, w, g, s, t, lam_w, lam_s)
            return g_bar

        hess_g_bar, target_grads = self._second_order(schedule, w, t, xb, yb, cb, g_bar_of)
        lam_w_prev = [a + b for a, b in zip(adjoints["w"], hess_g_bar)]
        dcb, dx, dy = self._unpack(target_grads)
        # cb = c[idx] * mask: padded entries get no credit.
        return lam_w_prev, adjoints["s"], dcb * mask, dx, dy

    def _targets(self, xb, yb, cb) -> list[tf.Tensor]:
        """What the second-order call differentiates besides w: c always, x and y when asked."""
        return [cb] + ([xb] if self.input_grad else []) + ([yb] if self.label_grad else [])

    def _unpack(self, grads: list[tf.Tensor]):
        """(dE/dc, dE/dx, dE/dy) from :meth:`_targets`' gradients; empty tensors for skipped ones."""
        rest = list(grads[1:])
        dx = rest.pop(0) if self.input_grad else tf.zeros([0], grads[0].dtype)
        dy = rest.pop(0) if self.label_grad else tf.zeros([0])
        return grads[0], dx, dy

    def _second_order(self, schedule: Schedule, w, t, xb, yb, cb, g_bar_of):
        """H_t ḡ and the per-sample terms (c, x, y) of a batch (or shard): ∇(∇L_t·ḡ) with ḡ held fixed.

        ``g_bar_of(g)`` returns ḡ given this batch's gradient g; it runs outside the
        outer tape's recording, so ḡ is a constant to it.
        """
        targets = self._targets(xb, yb, cb)
        with tf.GradientTape() as outer:
            outer.watch(w)
            outer.watch(targets)
            with tf.GradientTape() as inner:
                inner.watch(w)
                value = self.batch_loss(schedule, w, t, xb, yb, cb)
            g = dense_gradients(inner.gradient(value, w), w)
            with outer.stop_recording():
                g_bar = g_bar_of(g)
            # Every reduction the outer tape differentiates happens inside it (DESIGN §4).
            contracted = _tree.dot(g, g_bar)
        hess_g_bar, target_grads = outer.gradient(contracted, [w, targets])
        return dense_gradients(hess_g_bar, w), dense_gradients(target_grads, targets)

    def _reverse_step_distributed(self, schedule: Schedule, w, s, t, lam_w, lam_s, x, y, c, xb=None):
        # ḡ needs the full-batch gradient first (Adam/RMSprop adjoints depend on it), so the
        # distributed step takes one all-reduced gradient, then one second-order call per shard.
        xb, yb, cb, mask = self._batch(schedule, t, x, y, c, xb)
        g = self.gradient(schedule, w, t, xb, yb, cb)
        lam_w_direct, g_bar, lam_s_prev = self._update_vjp(schedule, w, g, s, t, lam_w, lam_s)

        def replica(w, g_bar, xb, yb, cb):
            shard = self._shard(xb, yb, cb)
            hess_g_bar, target_grads = self._second_order(schedule, w, t, *shard, lambda _: g_bar)
            hess_g_bar = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, hess_g_bar)
            return hess_g_bar, target_grads

        results = self.distribute.experimental_local_results(  # type: ignore[union-attr]
            self.distribute.run(replica, args=(w, g_bar, xb, yb, cb))  # type: ignore[union-attr]
        )
        hess_g_bar = results[0][0]
        per_sample = [tf.concat([r[1][k] for r in results], axis=0) for k in range(len(results[0][1]))]
        lam_w_prev = [a + b for a, b in zip(lam_w_direct, hess_g_bar)]
        dcb, dx, dy = self._unpack(per_sample)
        return lam_w_prev, lam_s_prev, dcb * mask, dx, dy

    def _update_vjp(self, schedule: Schedule, w, g, s, t, lam_w, lam_s):
        """Adjoints of (w, g, s) from those of U's outputs (first-order VJP)."""
        with tf.GradientTape() as tape:
            tape.watch([w, g, s])
            w_next, s_next = self.optimizer.update(w, g, s, tf.gather(schedule.learning_rates, t), t)
        grads = tape.gradient(
            w_next + s_next,
            [w, g, s],
            output_gradients=list(lam_w) + list(lam_s),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return dense_gradients(grads[0], w), dense_gradients(grads[1], g), dense_gradients(grads[2], s)


class BoundProgram:
    """A :class:`Program` with one recorded run's :class:`Schedule` fixed."""

    def __init__(self, program: Program, schedule: Schedule) -> None:
        self.program, self.schedule = program, schedule

    def __getattr__(self, name: str) -> Any:  # fn, loss, replicas, stream_shape, jit_compile, …
        return getattr(self.program, name)

    @property
    def source(self) -> Any:
        return self.program.source

    @source.setter
    def source(self, value: Any) -> None:
        self.program.source = value

    def run(self, w, s, start: int, stop: int, x, y, c, *, record: bool = False):
        """See :meth:`Program.run`."""
        return self.program.run(self.schedule, w, s, start, stop, x, y, c, record=record)

    def states_at(self, w, s, steps: list[int], x, y, c):
        """See :meth:`Program.states_at`."""
        return self.program.states_at(self.schedule, w, s, steps, x, y, c)

    def iter_states_at(self, w, s, steps: list[int], x, y, c):
        """See :meth:`Program.iter_states_at`."""
        return self.program.iter_states_at(self.schedule, w, s, steps, x, y, c)

    def reverse(self, w_hist, s_hist, start: int, lam_w, lam_s, x, y, c):
        """See :meth:`Program.reverse`."""
        return self.program.reverse(self.schedule, w_hist, s_hist, start, lam_w, lam_s, x, y, c)

    def reverse_with_flags(self, w_hist, s_hist, start: int, lam_w, lam_s, x, y, c):
        """:meth:`Program.reverse` with one finiteness flag per step."""
        return self.program.reverse(self.schedule, w_hist, s_hist, start, lam_w, lam_s, x, y, c, flags=True)

    def validation(self, w, x_val, y_val):
        """See :meth:`Program._validation`."""
        return self.program.validation(list(w), x_val, y_val)


class _Programs:
    """Programs of one model object, keyed by set-up (stored on the model: no strong cache outside it).

    A plain object rather than a dict: Keras's saving walks dict and list attributes as containers.
    """

    def __init__(self) -> None:
        self.by_key: dict[tuple, Program] = {}


def shared_program(model: Any, make: Callable[[], Program], key: tuple) -> Program:
    """The program for ``model`` and ``key`` (loss, optimizer, flags…), built by ``make`` once.

    Kept in the model's ``__dict__`` (bypassing Keras attribute tracking), so it
    lives and dies with the model. The key also fingerprints the model's
    non-trainable values, which a :class:`ModelFunction` captures as constants,
    and its layers' configuration (:func:`layers_key`): change either and a new
    program is built.
    """
    fingerprint = hashlib.blake2b(digest_size=16)
    for variable in model.non_trainable_variables:
        fingerprint.update(np.ascontiguousarray(np.asarray(variable.value)).tobytes())
    full_key = (*key, fingerprint.hexdigest(), layers_key(model))
    programs = model.__dict__.setdefault("_influence_programs", _Programs()).by_key
    try:
        if full_key not in programs:
            programs[full_key] = make()
        return programs[full_key]
    except TypeError:  # an unhashable part of the key (e.g. an optimizer field): no sharing
        return make()

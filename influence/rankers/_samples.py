"""Per-sample quantities over a whole training set, vectorized and compiled.

All functions evaluate the trajectory's model in inference mode (dropout off,
moving statistics) at given weights, in chunks of ``chunk`` samples, each
chunk one compiled call: per-sample losses, predictions, assigned-label
margins, ∇ℓ_i·v for a fixed v (one forward-mode pass per chunk), squared
per-sample gradient norms, and the Hessian-vector product of the mean training loss.
Where forward mode or pfor cannot go (TensorFlow's forward mode does not pass the
TensorList loops of Keras's recurrent layers), the same quantities come from nested
reverse-mode tapes instead (:class:`_FirstThatTraces`).
Gradients and Hessians are those of the run's training objective ℓ_i (with its
input-gradient penalty, if any: :mod:`influence.objective`); losses, outputs and
margins are the plain loss's.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .. import _tree
from .._graphs import graph_function
from .._progress import progress_bar, progress_counter
from ..autodiff import dense_gradients, hessian
from ..losses import label_margin
from ..trajectory import Trajectory

DEFAULT_CHUNK = 512
_NOT_YET = object()  # a cached value not computed yet (None is a value)
# Per-sample gradients held at once by squared_gradient_norms: chunks shrink to keep
# chunk × |w| at most this many numbers (256 MiB in float32).
PER_SAMPLE_GRADIENT_NUMBERS = 2**26
# What pfor logs (once per traced conv layer, at WARNING) where it vectorizes a convolution's weight
# gradient with a loop: a TODO of TensorFlow's, not something a user can act on.
PFOR_LOOP_NOTICE = "uses a while_loop. Fix that!"


class _DropPforLoopNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return PFOR_LOOP_NOTICE not in record.getMessage()


@contextlib.contextmanager
def quiet_pfor_loop_notices() -> Iterator[None]:
    """Drops pfor's "Conv2DBackpropFilter uses a while_loop. Fix that!" from the ``tensorflow``
    logger while vectorizing (tracing) per-sample gradients; every other message still goes through.

    A CNN's self-influence printed it four times (once per conv layer and traced chunk shape),
    even with ``TF_CPP_MIN_LOG_LEVEL=3`` (it is a Python log record, not C++ output).
    """
    logger = tf.get_logger()
    quiet = _DropPforLoopNotices()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _Bodies:
    """The compiled per-chunk bodies of one model, loss and objective.

    Kept per :class:`~influence.program.Program`, which every run of the same set-up
    shares: ranking one run several ways (one ``rank`` call per method) or several runs
    of one model traces each body once, instead of once per call.
    """

    def __init__(self, fn, loss, objective) -> None:
        self.fn, self.loss, self.objective = fn, loss, objective
        self.losses = graph_function(self._losses_impl, reduce_retracing=True)
        self.margins = graph_function(self._margins_impl, reduce_retracing=True)
        # Forward mode and pfor first (faster); reverse tapes and loops where they cannot trace.
        loops = _has_recurrent_layers(fn.model)  # known not to trace: skip the failed attempt and its logs

        def first_that_traces(fast, general) -> _FirstThatTraces:
            candidates = (general,) if loops else (fast, general)
            return _FirstThatTraces(*(graph_function(f, reduce_retracing=True) for f in candidates))

        self.dots = first_that_traces(self._dots_impl, self._dots_reverse_impl)
        self.sq_norms = first_that_traces(self._sq_norms_impl, self._sq_norms_loop_impl)
        self.hvp = first_that_traces(self._hvp_impl, self._hvp_reverse_impl)
        self.hessian = first_that_traces(self._hessian_impl, self._hessian_loop_impl)

    def _losses_impl(self, w, xb, yb):
        out = self.fn(w, xb, training=False)
        return self.loss(yb, out), out

    def _margins_impl(self, w, xb, yb):
        return label_margin(self.loss, yb, self.fn(w, xb, training=False))

    def _dots_impl(self, w, v, xb, yb):
        with tf.autodiff.ForwardAccumulator(w, v) as acc:
            losses = self.objective(w, xb, yb, training=False)
        return acc.jvp(losses, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _dots_reverse_impl(self, w, v, xb, yb):
        # J·v by reverse over reverse: u ↦ Jᵀu is linear, so ∂(Jᵀu · v)/∂u = J·v (u = 0 will do).
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(w)
                losses = self.objective(w, xb, yb, training=False)
                u = tf.zeros_like(losses)
                outer.watch(u)
                weighted = tf.reduce_sum(u * losses)
            dot = _tree.dot(dense_gradients(inner.gradient(weighted, w), w), v)
        dots = outer.gradient(dot, u)
        return tf.zeros_like(losses) if dots is None else dots

    def _sq_norms_impl(self, w, xb, yb):
        # Each sample's gradient from its own one-sample forward and backward pass, vectorized
        # over the chunk (pfor): work linear in the chunk, memory chunk × |w|. (tape.jacobian of
        # the chunk's loss vector back-propagated every output through the whole chunk: work
        # and memory grew with the chunk squared, 481 s and 17 GiB for a 4000-sample CNN.)
        with quiet_pfor_loop_notices():  # pfor's own TODO note on conv layers, logged while tracing
            return tf.vectorized_map(lambda sample: self._sq_norm(w, *sample), (xb, yb))

    def _sq_norms_loop_impl(self, w, xb, yb):
        # The same one-sample passes in a loop, where pfor cannot vectorize them (recurrent layers).
        return tf.map_fn(lambda sample: self._sq_norm(w, *sample), (xb, yb), fn_output_signature=self.fn.dtype)

    def _sq_norm(self, w, xi, yi):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = self.objective(w, xi[None], yi[None], training=False)[0]
        grads = dense_gradients(tape.gradient(loss, w), w)
        return tf.add_n([tf.reduce_sum(g * g) for g in grads])

    def _grad_impl(self, w, xb, yb, cb):
        with tf.GradientTape() as tape:
            tape.watch(w)
            total = tf.reduce_sum(cb * self.objective(w, xb, yb, training=False))
        return dense_gradients(tape.gradient(total, w), w)

    def _hessian_impl(self, w, xb, yb, cb, count, vectorized=True):
        # Compiled: the eager pfor of autodiff.hessian retraced on every chunk (and TF warned about it).
        def chunk_loss(weights):
            return tf.reduce_sum(cb * self.objective(weights, xb, yb, training=False)) / count

        with quiet_pfor_loop_notices():
            return hessian(chunk_loss, w, vectorized=vectorized)

    def _hvp_impl(self, w, v, xb, yb, cb):
        with tf.autodiff.ForwardAccumulator(w, v) as acc:
            g = self._grad_impl(w, xb, yb, cb)
        return dense_gradients(acc.jvp(g), w)  # an Embedding's tangent comes as IndexedSlices too

    def _hvp_reverse_impl(self, w, v, xb, yb, cb):
        with tf.GradientTape() as outer:
            outer.watch(w)
            dot = _tree.dot(self._grad_impl(w, xb, yb, cb), v)
        return dense_gradients(outer.gradient(dot, w), w)

    def _hessian_loop_impl(self, w, xb, yb, cb, count):
        # The same Hessian row by row, where pfor cannot vectorize it (recurrent layers).
        return self._hessian_impl(w, xb, yb, cb, count, vectorized=False)


def _has_recurrent_layers(model: Any) -> bool:
    """Whether the model holds Keras recurrent layers, whose loops forward mode and pfor cannot trace."""
    return any(isinstance(layer, keras.layers.RNN) for layer in model._flatten_layers(include_self=False))


class _FirstThatTraces:
    """Calls the first of several compiled equivalents that can be traced, and keeps to it.

    A candidate that fails while being traced (TypeError / ValueError / NotImplementedError, as
    forward mode and pfor do on loops they cannot differentiate) is dropped for good; the last
    candidate's error is raised as it is. Runtime errors of TensorFlow ops are not caught.
    """

    def __init__(self, *candidates: Any) -> None:
        self.candidates = list(candidates)

    def __call__(self, *args: Any) -> Any:
        while len(self.candidates) > 1:
            try:
                return self.candidates[0](*args)
            except (TypeError, ValueError, NotImplementedError):
                self.candidates.pop(0)
        return self.candidates[0](*args)

    def __getattr__(self, name: str) -> Any:  # the chosen function's own (experimental_get_tracing_count, …)
        return getattr(self.candidates[0], name)


_bodies_by_program: weakref.WeakKeyDictionary[Any, _Bodies] = weakref.WeakKeyDictionary()


def _compiled_bodies(program: Any) -> _Bodies:
    if program not in _bodies_by_program:
        _bodies_by_program[program] = _Bodies(program.fn, program.loss, program.objective)
    return _bodies_by_program[program]


class SampleOps:
    """Compiled per-sample computations for one trajectory and data set.

    Args:
        trajectory: the recorded run (its model and loss are used).
        x, y: training data (n, ...), already validated.
        chunk: samples per compiled call.
        progress: progress bars on long loops over it (solvers), by the rule of ``influence._progress``.
        samples: training indices whose per-sample quantities are wanted (default: all).
    """

    def __init__(
        self,
        trajectory: Trajectory,
        x: np.ndarray,
        y: np.ndarray,
        chunk: int = DEFAULT_CHUNK,
        progress: bool | None = None,
        samples: np.ndarray | None = None,
    ) -> None:
        self.progress = progress
        # Per-sample quantities are computed for ``samples`` only (a shard); the
        # Hessian and mean gradients always use the whole training set.
        self.samples = np.arange(len(x)) if samples is None else np.asarray(samples)
        program = trajectory.program()
        self.fn, self.loss = program.fn, program.loss
        self.objective = program.objective  # ℓ_i plus any input-gradient penalty (module docstring)
        self.dtype = self.fn.dtype
        self.x = tf.constant(x, dtype=self.dtype if np.issubdtype(x.dtype, np.floating) else None)
        self.y = tf.constant(y, dtype=self.dtype if self.loss.continuous_labels else tf.int32)
        self.c = tf.constant(trajectory.sample_weight, dtype=self.dtype)
        self.n = len(x)
        self.xs = tf.gather(self.x, self.samples)
        self.ys = tf.gather(self.y, self.samples)
        self.chunk = chunk
        self._bar: Any = None  # the open progress bar of :meth:`counting`, if any
        self._run = (trajectory, x, y)  # for the weight-decay curvature, computed on first use
        self._decay: Any = _NOT_YET
        compiled = _compiled_bodies(program.program)
        self._losses, self._margins, self._dots = compiled.losses, compiled.margins, compiled.dots
        self._sq_norms, self._hvp, self._hessian = compiled.sq_norms, compiled.hvp, compiled.hessian

    def chunks(self, count: int | None = None, chunk: int | None = None) -> Iterator[slice]:
        """Slices of ``chunk`` (default ``self.chunk``) samples over ``count`` rows (default: the selected samples)."""
        total = len(self.samples) if count is None else count
        step = chunk or self.chunk
        for start in range(0, total, step):
            yield slice(start, min(start + step, total))

    def weights(self, values: list[np.ndarray]) -> list[tf.Tensor]:
        return [tf.constant(v, dtype=self.dtype) for v in values]

    # ---------------------------------------------------------------- public helpers

    @contextlib.contextmanager
    def counting(self, passes: int, desc: str) -> Iterator[None]:
        """One progress bar over ``passes`` passes through the selected samples (e.g. one per checkpoint).

        The per-sample methods below advance it chunk by chunk, so a single long pass (one
        checkpoint of a large run) reports as it goes, by the rule of ``influence._progress``.
        """
        bar = progress_counter(passes * len(self.samples), progress=self.progress, desc=desc, unit="sample")
        self._bar = bar
        try:
            yield
        finally:
            self._bar = None
            bar.close()

    def _per_chunk(self, body, chunk: int | None = None) -> list[Any]:
        """``body(slice)`` for every chunk of the selected samples, advancing the progress bar if one is open."""
        results = []
        for s in self.chunks(chunk=chunk):
            results.append(body(s))
            if self._bar is not None:
                self._bar.update(s.stop - s.start)
        return results

    def losses_and_outputs(self, w: list[tf.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample training losses and model outputs of the selected samples, (m,) and (m, ...)."""
        parts = self._per_chunk(lambda s: [t.numpy() for t in self._losses(w, self.xs[s], self.ys[s])])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def margins(self, w: list[tf.Tensor]) -> np.ndarray:
        """Assigned-label margin (:func:`influence.losses.label_margin`) of every selected sample, shape (m,)."""
        return np.concatenate(self._per_chunk(lambda s: self._margins(w, self.xs[s], self.ys[s]).numpy()))

    def gradient_dots(self, w: list[tf.Tensor], v: list[tf.Tensor]) -> np.ndarray:
        """∇ℓ_i(w)·v for every selected sample, shape (m,)."""
        return np.concatenate(self._per_chunk(lambda s: self._dots(w, v, self.xs[s], self.ys[s]).numpy()))

    def squared_gradient_norms(self, w: list[tf.Tensor]) -> np.ndarray:
        """‖∇ℓ_i(w)‖² for every selected sample, shape (m,); chunks hold at most
        :data:`PER_SAMPLE_GRADIENT_NUMBERS` gradient numbers at once."""
        size = sum(int(np.prod(v.shape)) for v in w)
        chunk = max(1, min(self.chunk, PER_SAMPLE_GRADIENT_NUMBERS // max(1, size)))
        return np.concatenate(self._per_chunk(lambda s: self._sq_norms(w, self.xs[s], self.ys[s]).numpy(), chunk))

    def decay_curvature(self) -> list[tf.Tensor] | None:
        """D of the L2 penalty the run's weight decay amounts to at its end (None without decay).

        See :meth:`influence.optimizers.Optimizer.decay_curvature`; RMSprop's and Adam's read the
        final optimizer state, which costs one step (or a replay of the run without stored history).
        """
        if self._decay is _NOT_YET:
            trajectory, x, y = self._run
            optimizer = trajectory.optimizer
            reads_state = optimizer.weight_decay and optimizer.decay_reads_state
            state = trajectory._final_state(x, y) if reads_state else []  # x, y: checked by rank
            self._decay = optimizer.decay_curvature(self.weights(trajectory.final_weights), state, trajectory.steps)
        return self._decay

    def hvp(self, w: list[tf.Tensor], v: list[tf.Tensor], indices: np.ndarray | None = None) -> list[tf.Tensor]:
        """H·v, H the Hessian of the training objective at the run's end: the weighted mean training
        loss (over ``indices`` or all samples) plus weight decay's penalty (:meth:`decay_curvature`)."""
        hv = self._accumulate(lambda xb, yb, cb: self._hvp(w, v, xb, yb, cb), indices)
        decay = self.decay_curvature()
        return hv if decay is None else [h + d * vi for h, d, vi in zip(hv, decay, v)]

    def dense_hessian(self, w: list[tf.Tensor]) -> np.ndarray:
        """Dense Hessian (P, P) of the training objective (as in :meth:`hvp`); small models only."""
        total = None
        count = tf.constant(self.n, self.dtype)
        chunks = list(self.chunks(self.n))
        for s in progress_bar(chunks, progress=self.progress, desc="dense Hessian", unit="chunk", leave=False):
            part = self._hessian(w, self.x[s], self.y[s], self.c[s], count).numpy()
            total = part if total is None else total + part
        assert total is not None
        decay = self.decay_curvature()
        if decay is not None:
            total = total if total.flags.writeable else total.copy()
            total[np.diag_indices_from(total)] += _tree.flatten(decay).numpy()
        return total

    def _accumulate(self, body, indices: np.ndarray | None) -> list[tf.Tensor]:
        if indices is None:
            parts = [body(self.x[s], self.y[s], self.c[s]) for s in self.chunks(self.n)]
            count = self.n
        else:
            idx = tf.constant(indices)
            parts = [body(tf.gather(self.x, idx), tf.gather(self.y, idx), tf.gather(self.c, idx))]
            count = len(indices)
        total = parts[0] if len(parts) == 1 else [tf.add_n(list(p)) for p in zip(*parts)]
        return [t / count for t in total]

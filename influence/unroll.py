"""Unrolled hypergradients through a whole recorded training run (DESIGN §1).

The reverse pass needs the weights and optimizer state before every step, in
reverse order. Where they come from is a memory strategy (equinox-style
strategy objects; add a class to add a strategy):

- :class:`StoreAll`: every step's state held at once, T·|w| memory.
- :class:`Checkpointed` (every=k): state kept at every k-th step, each segment
  recomputed forward inside the reverse pass, ≈(T/k + k)·|w| memory, one
  extra forward pass. k ≈ √T by default.
- :class:`Replay`: only w_0 kept; each step's state recomputed from w_0,
  O(|w|) memory and O(T²) steps: for tiny budgets.

A weights history that :func:`influence.fit` recorded is already in memory:
every strategy then slices it instead of recomputing steps.

Whatever the strategy, the reverse pass takes a segment's states in chunks of at
most :data:`CHUNK_BYTES` and :data:`CHUNK_STEPS` (:func:`chunk_limit`), one
compiled call each, newest first, and lets each chunk go once it is reversed: a
slice of a history is copied one chunk at a time, plain graphs' recording loop
holds its per-step states twice for one chunk only, and the progress bar moves
after every chunk.

``strategy="auto"`` picks the cheapest one that fits ``memory_budget_bytes``.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import tensorflow as tf

from ._inputs import check_model_input, validate_validation_data
from ._progress import progress_counter
from ._summary import compact_repr
from ._validation import check_positive, describe, param_error
from .model_function import discretized_note
from .program import chunks
from .trajectory import Trajectory, _data_tensors, check_trajectory_data

DEFAULT_MEMORY_BUDGET = 1 << 30  # 1 GiB for what the reverse pass holds beyond the trajectory

#: Most bytes of states (weights + optimizer state) one reverse call takes. With a history of an
#: 85k-weight MLP (T = 1410, 457 MB), reversing it in one call grew the process by 925–999 MB
#: (its copy into TensorFlow, and a process's first conversion of that size leaves as much again
#: behind); in chunks of 47 steps (16 MB) by 67–83 MB, nearly all of it the first call's tracing
#: and compiling, and as fast warm (0.66 s against 0.63 s, one process). 16 MiB of states is at
#: least ~10^8 multiply-adds of reverse work, beside which the ~1.5 ms a call costs is small.
CHUNK_BYTES = 16 * 2**20

#: Most steps one reverse call takes, so that a long pass reports progress (a CNN's 470 steps ran
#: 43 s as one call, its bar silent until the end). A run of up to this many steps (the digits
#: benchmark's 160) stays one call: its pass takes milliseconds, and a 2560-step pass of that
#: MLP took 11 % longer in 10 calls than in one.
CHUNK_STEPS = 256


def chunk_limit(state_bytes: int) -> int:
    """Most steps one reverse call takes for states of ``state_bytes``: :data:`CHUNK_BYTES` and :data:`CHUNK_STEPS`."""
    return max(1, min(CHUNK_STEPS, CHUNK_BYTES // max(1, state_bytes)))


class MemoryStrategy(ABC):
    """Where the reverse pass gets the state before each step."""

    name: str = "strategy"

    @abstractmethod
    def segments(self, steps: int) -> list[tuple[int, int]]:
        """Reverse-pass segments [a, b) in forward order; each is recomputed as a block."""

    @abstractmethod
    def states_held(self, steps: int) -> int:
        """How many (weights + optimizer state) copies are held at once."""

    def stores_segment_starts(self) -> bool:
        """Whether segment start states are kept from one forward pass (else recomputed from w_0)."""
        return True

    def describe(self, steps: int) -> str:
        return self.name

    def longest_segment(self, steps: int) -> int:
        return max(b - a for a, b in self.segments(steps))

    def longest_chunk(self, steps: int, state_bytes: int) -> int:
        """Most steps one reverse call takes: a segment, or a chunk of it (:func:`chunks`)."""
        return min(self.longest_segment(steps), chunk_limit(state_bytes))

    def held_bytes(
        self, steps: int, state_bytes: int, step_buffer_bytes: int, *, history: bool = False, jit_compile: bool = True
    ) -> int:
        """Peak bytes the reverse pass holds beyond the trajectory: states, a chunk's copy, buffers.

        - The held states (:meth:`states_held`); none with a ``history``: the trajectory holds
          every state already, and the pass copies one chunk's slice of it at a time.
        - Without ``jit_compile`` (plain graphs: streamed and distributed runs too) one chunk's
          states more: the recording loop's per-step states and their stacked copy coexist
          until the chunk is recorded (XLA writes into the stacked buffer).
        - ``step_buffer_bytes`` is what one reverse step keeps until its call ends: the
          per-sample dE/dc, dE/dx (and dE/dy) of its batch, B·(1 + |x_i| + |y_i|) numbers.
          They are counted twice for the longest chunk: the per-step buffers and their
          stacked copy coexist at the end of a call (measured in reports/benchmarks/scaling.md).
        """
        chunk = self.longest_chunk(steps, state_bytes)
        if history:
            states = chunk
        else:
            states = self.states_held(steps) + (0 if jit_compile else chunk)
        return states * state_bytes + 2 * chunk * step_buffer_bytes


@dataclass(frozen=True)
class StoreAll(MemoryStrategy):
    """Hold every step's weights: T·|w| memory, no recomputation."""

    name = "store_all"

    def segments(self, steps: int) -> list[tuple[int, int]]:
        return [(0, steps)]

    def states_held(self, steps: int) -> int:
        return steps


@dataclass(frozen=True)
class Checkpointed(MemoryStrategy):
    """Keep every k-th step's state; recompute each segment forward.

    k ≈ √T when None: ⌈√T⌉, or a nearby divisor of T (equal segments compile once).
    """

    every: int | None = None
    name = "checkpointed"

    def __post_init__(self) -> None:
        if self.every is not None and (
            not isinstance(self.every, (int, np.integer)) or isinstance(self.every, bool) or self.every < 1
        ):
            raise ValueError(param_error("every", "Checkpointed", "a positive int or None", describe(self.every)))
        if self.every is not None:
            object.__setattr__(self, "every", int(self.every))  # np.int64 → int (frozen dataclass)

    def interval(self, steps: int) -> int:
        if self.every:
            return min(self.every, max(1, steps))  # a longer interval is one segment: the whole run
        k = max(1, math.ceil(math.sqrt(steps)))
        # Prefer a divisor of T that holds at most 25 % more states: equal segments share one
        # compiled reverse function (XLA compiles once per segment length).
        cost = math.ceil(steps / k) + k
        divisors = [d for d in range(max(1, k // 2), 2 * k + 1) if steps % d == 0 and steps // d + d <= 1.25 * cost]
        return min(divisors, key=lambda d: (steps // d + d, abs(d - k))) if divisors else k

    def segments(self, steps: int) -> list[tuple[int, int]]:
        k = self.interval(steps)
        return [(a, min(a + k, steps)) for a in range(0, steps, k)]

    def longest_segment(self, steps: int) -> int:
        return self.interval(steps)  # the first segment's length, without listing them all

    def states_held(self, steps: int) -> int:
        k = self.interval(steps)
        if k >= steps:  # one segment from w_0: what store_all holds
            return steps
        return math.ceil(steps / k) + k

    def describe(self, steps: int) -> str:
        return f"checkpointed(every={self.interval(steps)})"


@dataclass(frozen=True)
class Replay(MemoryStrategy):
    """Keep only w_0; recompute each step's state from it (O(T²) steps, O(|w|) memory)."""

    name = "replay"

    def segments(self, steps: int) -> list[tuple[int, int]]:
        return [(t, t + 1) for t in range(steps)]

    def states_held(self, steps: int) -> int:
        return 1

    def stores_segment_starts(self) -> bool:
        return False


def choose_strategy(
    steps: int,
    state_bytes: int,
    budget: int,
    step_buffer_bytes: int = 0,
    *,
    history: bool = False,
    jit_compile: bool = True,
) -> MemoryStrategy:
    """The cheapest strategy whose held states and buffers (:meth:`MemoryStrategy.held_bytes`) fit ``budget`` bytes.

    In order: store all; checkpoints every ≈√T steps (a divisor of T when one is near); the
    checkpoint interval that holds the least; replay. Replay recomputes O(T²) steps: a budget just
    under the first checkpointed estimate went straight to it (T = 705: 40–53 s instead of 3.7 s
    with a slightly longer interval), so the leanest interval is tried first, and a long replay is
    warned about. When nothing fits, :class:`Replay` (the leanest) with a warning.

    With a ``history`` in the trajectory no strategy recomputes a step: each slices the history,
    and they differ only in how many steps one call copies out of it. Store all (in chunks of
    :func:`chunk_limit`) when that fits, else segments as long as the budget allows.
    """

    def held(strategy: MemoryStrategy) -> int:
        return strategy.held_bytes(steps, state_bytes, step_buffer_bytes, history=history, jit_compile=jit_compile)

    if held(StoreAll()) <= budget:
        return StoreAll()
    if history:
        longest = budget // (state_bytes + 2 * step_buffer_bytes)  # a segment's copy and buffers, step by step
        if longest >= 1:
            return Checkpointed(every=longest)
    elif held(Checkpointed()) <= budget:
        return Checkpointed()
    # ⌈T/k⌉ + k states exceed those at k ≈ √T once k > 2√T + 2, and the segment buffers grow with k.
    intervals = [] if history else [Checkpointed(every=k) for k in range(2, min(steps, 2 * math.isqrt(steps) + 3))]
    leanest = min(intervals, key=held, default=None)
    if leanest is not None and held(leanest) <= budget:
        return leanest
    replay = Replay()
    needed = held(replay)
    if needed > budget:
        warnings.warn(
            f"unrolled: no memory strategy fits memory_budget_bytes={budget}: the leanest, replay, holds about "
            f"{needed} bytes (one state and one step's buffers); it runs with that",
            RuntimeWarning,
            stacklevel=4,  # the caller of unrolled
        )
    elif steps > REPLAY_WARNING_STEPS and leanest is not None:
        warnings.warn(
            f"unrolled: memory_budget_bytes={budget} ({budget / 2**20:.1f} MiB) leaves only replay, which recomputes "
            f"{steps * (steps + 1) // 2} "
            f"steps for a run of {steps}; {leanest.describe(steps)} would need about "
            f"{held(leanest) / 2**20:.1f} MiB and recompute {steps}",
            RuntimeWarning,
            stacklevel=4,
        )
    return replay


# Replay of a longer run than this is warned about (its recomputation grows as T²/2).
REPLAY_WARNING_STEPS = 200


@dataclass(frozen=True)
class UnrolledResult:
    """Hypergradients of the validation loss through the recorded run.

    Attributes:
        removal_effect: (n,) predicted change of validation loss if sample i
            were removed, i.e. its weight taken from c_i to 0: first order,
            −c_i·dE/dc_i (−dE/dc_i for the default c_i = 1). Negative = harmful.
            Less accurate where one removal moves the run more: a sample of a short
            batch (the last of an epoch when n is not a multiple of batch_size) weighs
            c_i/|B_t| in its step (one of 4 samples: 8× one of 32);
            :func:`influence.removal_curve` measures such a sample's actual response.
        sample_weight_grad: (n,) dE/dc_i.
        input_grad: (n, ...) dE/dx_i through the whole run (None when not requested).
        label_grad: dE/dy_i (shaped like y_train) where the loss reads labels as numbers
            (regression targets, one-hot or soft labels, whatever their dtype); None for
            class indices (and for integer labels of a callable loss).
        val_loss: E at the end of the recorded run.
        strategy: the memory strategy used (e.g. ``"checkpointed(every=13)"``).
        seconds: wall time of the reverse pass (including recomputation).
        memory_bytes: what the pass holds beyond the trajectory, as
            :meth:`MemoryStrategy.held_bytes` counts it: held states (one chunk's more on
            plain graphs) and the longest call's per-step buffers, twice (they and their
            stacked copy coexist); what the memory budget bounds. A weights
            history the trajectory holds already (``fit`` records one when it fits its
            ``record_budget_bytes``) is not counted: every strategy then slices it one chunk at
            a time instead of recomputing states, and only that chunk's copy is. The results
            themselves (n·(1 + |x_i| + |y_i|) numbers, and while chunks are summed up to three
            such arrays) come on top, and so does a process's first call's tracing and
            compiling (60–90 MB measured on CPU for MLPs of 2k to 1.1M weights).
    """

    removal_effect: np.ndarray
    sample_weight_grad: np.ndarray
    input_grad: np.ndarray | None
    label_grad: np.ndarray | None
    val_loss: float
    strategy: str
    seconds: float
    memory_bytes: int = 0

    def __repr__(self) -> str:  # arrays as shape and dtype, not every number
        return compact_repr(self)


def unrolled(
    trajectory: Trajectory,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    *,
    strategy: MemoryStrategy | str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
    input_grad_path: str | None = None,
    input_grad: bool | None = None,
) -> UnrolledResult:
    """Differentiate the validation loss through every recorded step (DESIGN §1).

    Args:
        trajectory: from :func:`influence.fit`.
        x_train, y_train: the training data the trajectory was recorded on.
        x_val, y_val: validation data; E = mean loss of the final model on it.
        strategy: ``"auto"``, ``"store_all"``, ``"checkpointed"``, ``"replay"``
            or a :class:`MemoryStrategy` instance.
        memory_budget_bytes: budget under ``"auto"`` for what the pass holds beyond the
            trajectory (``UnrolledResult.memory_bytes``).
        progress: a progress bar over the reverse steps, moving after each chunk of
            them (at most :data:`CHUNK_STEPS`): ``None`` (default) once the pass has run 2 s,
            ``True`` at once, ``False`` never.
        input_grad_path: write ``input_grad`` to this ``.npy`` file as a memory map
            instead of holding it in memory (for streamed, larger-than-memory data).
        input_grad: compute dE/dx_i. Default (None): when the inputs are
            floating-point (integer inputs, e.g. token ids into an Embedding, have
            none). ``False`` skips it when only removal effects are wanted: less
            time and B·|x_i| less memory per step.
    """
    func = "unrolled"
    x, y = check_trajectory_data(trajectory, x_train, y_train, func)
    check_model_input(func, trajectory.model, x)
    xv, yv = validate_validation_data(func, trajectory.model, trajectory.loss, x, y, x_val, y_val)
    if input_grad is None:
        input_grad = bool(np.issubdtype(x.dtype, np.floating))
    elif input_grad and not np.issubdtype(x.dtype, np.floating):
        raise TypeError(param_error("x_train", func, "floating-point inputs for input_grad=True", f"{x.dtype} inputs"))

    start_time = time.perf_counter()
    label_grad = trajectory.loss.has_label_grad(y)
    program = trajectory.program(label_grad=label_grad, input_grad=input_grad)
    if input_grad and (casts := program.integer_casts(x)):
        warnings.warn(f"{func}: {discretized_note(casts)}.", RuntimeWarning, stacklevel=2)
    dtype = program.fn.dtype
    steps = trajectory.steps
    initial = _InitialState(trajectory)
    state_shapes = initial.state_shapes()
    state_bytes = dtype.size * sum(
        int(np.prod(shape)) for shape in [w.shape for w in trajectory.initial_weights] + state_shapes
    )
    per_sample = 1 + (int(np.prod(x.shape[1:])) if input_grad else 0) + (int(np.prod(y.shape[1:])) if label_grad else 0)
    step_buffer_bytes = int(program.schedule.batches.shape[1]) * per_sample * dtype.size
    history, jit_compile = trajectory.weights_history is not None, program.jit_compile
    plan = _resolve_strategy(
        strategy, steps, state_bytes, step_buffer_bytes, memory_budget_bytes, func, history, jit_compile
    )
    x_t, y_t, c_t = _data_tensors(program, x, y, trajectory.sample_weight)

    # Adjoint at the end of the run: λ_w = ∇E(w_T), λ_s = 0.
    w_final = [tf.constant(w, dtype=dtype) for w in trajectory.final_weights]
    xv_t = tf.constant(xv, dtype=dtype)
    yv_t = tf.constant(yv, dtype=dtype if trajectory.loss.continuous_labels else tf.int32)
    val_value, lam_w = program.validation(w_final, xv_t, yv_t)
    lam_s = [tf.zeros(shape, dtype=dtype) for shape in state_shapes]
    val = float(val_value)

    segments = plan.segments(steps)
    starts = _segment_starts(program, plan, segments, trajectory, initial, x_t, y_t, c_t)
    limit = chunk_limit(state_bytes)
    dc: Any = None  # per-chunk sums; the first chunk's are taken as they are
    host_dx = input_grad and (program.stream_shape is not None or input_grad_path is not None)
    dx: Any = _input_grad_array(input_grad_path, (trajectory.n_train, *x.shape[1:]), dtype) if host_dx else None
    dy: Any = None
    bar = progress_counter(steps, progress=progress, desc="reverse pass", unit="step")
    try:
        for index in range(len(segments) - 1, -1, -1):
            for a, b, w_hist, s_hist in _segment_chunks(
                program, trajectory, starts, index, segments[index], limit, initial, x_t, y_t, c_t
            ):
                args = (w_hist, s_hist, tf.constant(a), lam_w, lam_s, x_t, y_t, c_t)
                lam_w, lam_s, seg_dc, seg_dx, seg_dy, finite = program.reverse(*args)
                if not bool(finite):  # rerun the chunk with per-step flags to name the step
                    _check_adjoint(np.asarray(program.reverse_with_flags(*args)[-1]), a, trajectory.learning_rates)
                # This chunk's states go before the next chunk is sliced or the next segment recorded.
                del w_hist, s_hist, args
                dc = seg_dc if dc is None else dc + seg_dc
                if not input_grad:
                    pass
                elif not host_dx:
                    dx = seg_dx if dx is None else dx + seg_dx
                elif program.stream_shape is not None:  # per-step terms of this chunk, added on the host
                    rows = np.asarray(program.schedule.batches[a:b]).reshape(-1)
                    np.add.at(dx, rows, np.asarray(seg_dx).reshape(len(rows), *x.shape[1:]))
                else:
                    dx += np.asarray(seg_dx)
                if label_grad:
                    dy = seg_dy if dy is None else dy + seg_dy
                bar.update(b - a)
    finally:
        bar.close()
    sample_weight_grad = np.asarray(dc)
    return UnrolledResult(
        removal_effect=-trajectory.sample_weight.astype(sample_weight_grad.dtype) * sample_weight_grad,
        sample_weight_grad=sample_weight_grad,
        input_grad=None if not input_grad else dx if host_dx else np.asarray(dx),
        label_grad=np.asarray(dy) if label_grad else None,
        val_loss=val,
        strategy=plan.describe(steps),
        seconds=time.perf_counter() - start_time,
        memory_bytes=plan.held_bytes(steps, state_bytes, step_buffer_bytes, history=history, jit_compile=jit_compile),
    )


class _InitialState:
    """(w_0, s_0) as tensors, converted on first use: a pass over a stored history needs neither."""

    def __init__(self, trajectory: Trajectory) -> None:
        self.trajectory = trajectory

    @cached_property
    def tensors(self) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        return self.trajectory.initial_tensors()

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the optimizer-state tensors (empty for plain SGD)."""
        if self.trajectory.state_history is not None:
            return [tuple(h.shape[1:]) for h in self.trajectory.state_history]
        return [tuple(s.shape) for s in self.tensors[1]]


def _input_grad_array(path: str | None, shape: tuple[int, ...], dtype: tf.DType) -> np.ndarray:
    if path is None:
        return np.zeros(shape, dtype.as_numpy_dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype.as_numpy_dtype, shape=shape)


def _resolve_strategy(
    strategy: Any,
    steps: int,
    state_bytes: int,
    step_buffer_bytes: int,
    budget: int,
    func: str,
    history: bool,
    jit_compile: bool,
) -> MemoryStrategy:
    if isinstance(strategy, MemoryStrategy):
        return strategy
    check_positive(budget, param="memory_budget_bytes", func=func, kind=int)
    named = {"store_all": StoreAll(), "checkpointed": Checkpointed(), "replay": Replay()}
    if strategy == "auto":
        return choose_strategy(steps, state_bytes, budget, step_buffer_bytes, history=history, jit_compile=jit_compile)
    if isinstance(strategy, str) and strategy in named:
        return named[strategy]
    raise ValueError(
        param_error(
            "strategy", func, "'auto', 'store_all', 'checkpointed', 'replay' or a MemoryStrategy", describe(strategy)
        )
    )


def _segment_starts(program, plan, segments, trajectory, initial, x_t, y_t, c_t):
    """State at the start of each segment: from the stored history, or one forward pass."""
    if not plan.stores_segment_starts() or trajectory.weights_history is not None:
        return None
    return program.states_at(*initial.tensors, [a for a, _ in segments], x_t, y_t, c_t)


def _segment_chunks(program, trajectory, starts, index, segment, limit, initial, x_t, y_t, c_t):
    """(a, b, states before steps a … b−1) for each chunk of a segment (:func:`chunks`), last chunk first.

    A history recorded by :func:`influence.fit` is already in memory, so every strategy
    (Replay included) slices it rather than recomputing steps it holds, one chunk at a time:
    a slice is copied into TensorFlow, and the whole history at once would be a second copy
    of it. Otherwise the segment is recorded forward chunk by chunk, each chunk's recording
    starting where the previous one ended, and each chunk is let go once yielded (the caller
    drops it after its reverse call).
    """
    parts = chunks(*segment, limit)
    if trajectory.weights_history is not None:
        dtype = program.fn.dtype
        for a, b in reversed(parts):
            w_hist = [tf.constant(h[a:b], dtype=dtype) for h in trajectory.weights_history]
            s_hist = [tf.constant(h[a:b], dtype=dtype) for h in trajectory.state_history or []]
            yield a, b, w_hist, s_hist
            del w_hist, s_hist
        return
    a = segment[0]
    if starts is not None:
        w, s = starts[index]
        starts[index] = None  # no other segment needs it: let it go with this one's chunks
    else:  # Replay: from w_0 every time.
        w0, s0 = initial.tensors
        w, s = program.run(w0, s0, 0, a, x_t, y_t, c_t) if a > 0 else (w0, s0)
    recorded = []
    for a, b in parts:
        w, s, w_hist, s_hist = program.run(w, s, a, b, x_t, y_t, c_t, record=True)
        recorded.append((a, b, w_hist, s_hist))
    del w, s, w_hist, s_hist
    while recorded:
        yield recorded.pop()


def _check_adjoint(finite: np.ndarray, start: int, learning_rates: np.ndarray) -> None:
    """Stop at the first step (in reverse order) whose adjoint is NaN/Inf, naming it."""
    if finite.all():
        return
    step = start + int(np.flatnonzero(~finite).max())
    raise FloatingPointError(
        f"unrolled: the adjoint became NaN/Inf at step {step} of the reverse pass "
        f"(learning rate {learning_rates[step]:g}). Hint: the recorded run may be unstable (lower the learning "
        "rate), the loss may have hit log(0) (check for saturated probabilities), or a layer is not twice "
        "differentiable at this point."
    )

"""Scoring shards across processes.

Per-sample scores (influence functions, TracIn, self-influence, margin, loss) are
independent across training samples once the part they share is known, so that part
is computed once, in the calling process, and the samples are split into contiguous
shards, each scored in its own process from a saved trajectory and the shared part
(:func:`influence.rank.shared_part`: NumPy arrays, pickled to the workers), and the
tables are merged. Shared: the damping estimate and the solve s = (H + λI)⁻¹∇E for
``"influence_function"``; ∇E at each checkpoint for ``"tracin"``; for the checkpoint
methods, the checkpoint weights where the run has no stored history (a worker would
replay the run to find them). Processes are started with ``spawn`` (TensorFlow does
not survive ``fork``); each one limits TensorFlow to ``threads_per_process`` threads
so shards do not fight over cores.

``"unrolled"`` has no per-sample part to split (one reverse pass yields every sample's
effect): it is ranked once in the calling process, without workers.

Each worker still starts Python and TensorFlow, loads the run and traces the per-sample
functions (10-20 s on a shared 2-core machine), so sharding can pay only where the
per-sample part is large (self-influence, TracIn or influence functions on many samples
of a big model) and there are cores that :func:`influence.rank` would leave idle. On a
shared 2-core machine plain :func:`influence.rank` was faster for every method measured
(see :func:`rank_in_processes`).
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from ._validation import check_positive, describe, param_error


def _score_shard(
    path: str,
    data: tuple,
    method: str,
    shard: np.ndarray,
    options: dict,
    threads: int,
    loading: dict,
    shared: Any,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from .persist import load_trajectory
    from .rank import rank

    trajectory = load_trajectory(path, **loading)
    table = rank(trajectory, *data, method=method, samples=shard, shared=shared, **options)
    return pd.DataFrame(table), dict(table.attrs)  # a DataFrame's attrs do not survive pickling


def _check_rank_arguments(
    path: str,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    method: str,
    options: dict[str, Any],
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
) -> Any:
    """What each worker's :func:`influence.rank` would refuse, checked once here and named as this function's.

    Returns the loaded run.
    """
    from .persist import load_trajectory
    from .rank import check_rank_arguments, rank

    func = "rank_in_processes"
    if "samples" in options:
        raise ValueError(param_error("options", func, "no 'samples' (shards are chosen here)", describe(options)))
    allowed = [
        name
        for name, p in inspect.signature(rank).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("method", "samples")
    ]
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise TypeError(
            param_error(
                "options", func, f"options of influence.rank ({', '.join(allowed)})", ", ".join(map(repr, unknown))
            )
        )
    trajectory = load_trajectory(path, custom_objects=custom_objects, safe_mode=safe_mode)
    settings = {k: v for k, v in options.items() if k in ("solver", "damping", "checkpoint_every")}
    check_rank_arguments(trajectory, x_train, y_train, x_val, y_val, method=method, func=func, **settings)
    return trajectory


def rank_in_processes(
    trajectory_path: str | os.PathLike,
    x_train: Any,
    y_train: Any,
    x_val: Any = None,
    y_val: Any = None,
    *,
    method: str = "influence_function",
    processes: int | None = None,
    threads_per_process: int = 1,
    custom_objects: dict[str, Any] | None = None,
    safe_mode: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """:func:`influence.rank` with the training samples split over ``processes`` worker processes.

    Args:
        trajectory_path: folder written by :func:`influence.save_trajectory`.
        x_train, y_train, x_val, y_val, **options: as for :func:`influence.rank`.
        method: as for :func:`influence.rank`, but the default is ``"influence_function"``, not
            rank's ``"unrolled"``: unrolled has nothing per sample to split, so ``method="unrolled"``
            ranks once in this process, without workers (asking for ``processes`` above 1 then warns).
        processes: number of worker processes (shards); default ``min(2, os.cpu_count())``. More
            threads in all (processes × threads_per_process) than CPU cores warn: each worker imports
            TensorFlow and they take turns on the cores.
        threads_per_process: TensorFlow intra/inter-op threads per worker.
        custom_objects, safe_mode: as for :func:`influence.load_trajectory`, which each worker
            calls: a model with custom layers needs their classes (registered, or given here),
            one with ``Lambda`` layers ``safe_mode=False``.

    Returns the same table as :func:`influence.rank` (most harmful first), with the
    same ``attrs``; ``seconds`` is the wall time of the whole call, ``shared_seconds``
    that of the shared part (computed here, with this process's threads), and ``processes``
    the number of shards (1 for ``"unrolled"``, ranked here).

    The part of the scores that every sample shares is computed once, here, and sent to
    the workers, which do only the per-sample part (see :mod:`influence.sharding`). That
    part is held here and pickled to each worker: one weight-sized vector for
    influence_function; for TracIn ∇E at every checkpoint, and for TracIn, self-influence and
    margin the checkpoint weights of a run saved without its history (checkpoints × |w|
    numbers each).

    Speed: every worker first starts Python and TensorFlow, loads the run and traces the
    per-sample functions (10-20 s of wall time on a shared 2-core machine), and gets
    ``threads_per_process`` threads where :func:`influence.rank` uses every core. On that
    machine (digits, MLP 64-1024-1024-10 with 1.1M weights, 5 epochs, 1500 samples, no stored
    history) rank's time over this function's with ``processes=2`` was, in 4 runs: 0.58-0.77
    for influence_function (0.29-0.63 when each worker repeated the damping estimate and the
    solve: twice the CPU time), 0.04-0.07 for TracIn and 0.23-0.37 for self-influence (before:
    0.03-0.04 and 0.33-0.40; all of rank took 0.4-1.5 s and 5-10 s there, so the start-up
    dominates), and 0.9 for unrolled (0.14-0.23 when each worker repeated the reverse pass).
    Use it where the per-sample part is long and there are more cores than one rank uses.

    The workers are started with ``spawn``: they import the calling script, so a script
    must call this under ``if __name__ == "__main__":`` (else each worker runs the
    script again and TensorFlow refuses to set its thread counts).

    The run is loaded here once first, to check the arguments before any worker starts
    (a mistake found by a worker came only after 5–15 s of starting processes).
    """
    func = "rank_in_processes"
    cpus = os.cpu_count() or 1
    requested = processes
    if processes is None:
        processes = min(2, cpus)
    check_positive(processes, param="processes", func=func, kind=int)
    check_positive(threads_per_process, param="threads_per_process", func=func, kind=int)
    path = os.fspath(trajectory_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(param_error("trajectory_path", func, "a folder written by save_trajectory", repr(path)))
    trajectory = _check_rank_arguments(path, x_train, y_train, x_val, y_val, method, options, custom_objects, safe_mode)
    if method == "unrolled":  # one reverse pass yields every sample's effect: nothing per sample to split
        if requested is not None and requested > 1:
            warnings.warn(
                f"rank_in_processes: method 'unrolled' has no per-sample part to split over {requested} processes "
                "(one reverse pass yields every sample's effect); it is ranked once in this process, without "
                "workers, as influence.rank would.",
                RuntimeWarning,
                stacklevel=2,
            )
        from .rank import rank

        start = time.perf_counter()
        table = rank(trajectory, x_train, y_train, x_val, y_val, method=method, **options)
        table.attrs.update(seconds=time.perf_counter() - start, shared_seconds=table.attrs["seconds"], processes=1)
        return table
    n = len(x_train)
    shards = [s for s in np.array_split(np.arange(n), processes) if len(s)]
    threads = len(shards) * threads_per_process
    if threads > cpus:
        suggested = max(1, cpus // threads_per_process)
        warnings.warn(
            f"rank_in_processes starts {len(shards)} worker processes × {threads_per_process} threads on {cpus} "
            f"CPU cores (os.cpu_count()): each imports TensorFlow and they take turns on the cores, which is "
            f"slower than processes={suggested} with threads_per_process={min(threads_per_process, cpus)}.",
            RuntimeWarning,
            stacklevel=2,
        )
    data = (
        np.asarray(x_train),
        np.asarray(y_train),
        None if x_val is None else np.asarray(x_val),
        None if y_val is None else np.asarray(y_val),
    )
    loading = {"custom_objects": custom_objects, "safe_mode": bool(safe_mode)}
    from .rank import shared_part

    start = time.perf_counter()
    settings = {k: v for k, v in options.items() if k in ("solver", "damping", "checkpoint_every", "progress")}
    shared = shared_part(trajectory, *data, method=method, **settings)  # once, not once per worker
    shared_seconds = time.perf_counter() - start
    del trajectory  # the workers load their own
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(shards), mp_context=context) as pool:
        futures = [
            pool.submit(_score_shard, path, data, method, shard, options, threads_per_process, loading, shared)
            for shard in shards
        ]
        parts = [f.result() for f in futures]
    from .rank import order_by_harm

    table = order_by_harm(pd.concat([part for part, _ in parts], ignore_index=True))
    # rank's attrs (val_loss, damping, solver, strategy, checkpoints) are the same in every shard: they
    # describe the run and the method, not the samples. Time and shard count are the whole call's.
    shard_attrs = {k: v for k, v in parts[0][1].items() if k not in ("seconds", "outside_run")}
    seconds = time.perf_counter() - start
    table.attrs.update(
        shard_attrs, method=method, seconds=seconds, shared_seconds=shared_seconds, processes=len(shards)
    )
    return table

"""Scoring in shards (in one process and across processes) gives the single-run numbers."""

import os
import pickle
from concurrent.futures import Future

import keras
import numpy as np
import pytest
from conftest import mlp

import influence as inf
from influence import sharding
from influence.optimizers import SGD
from influence.program import BoundProgram
from influence.rankers import Exact
from influence.rankers import methods as ranker_methods


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    xv, yv = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    traj = inf.fit(
        mlp(4, 3, out_activation="softmax"),
        x,
        y,
        loss="sparse_categorical_crossentropy",
        optimizer=SGD(0.3),
        batch_size=6,
        epochs=3,
    )
    path = tmp_path_factory.mktemp("runs") / "run"
    inf.save_trajectory(traj, path)
    return traj, path, (x, y, xv, yv)


@pytest.fixture(scope="module")
def saved_without_history(saved, tmp_path_factory):
    """The same run saved without its weights history: checkpoint weights come from a replay of the run."""
    traj, _, data = saved
    path = tmp_path_factory.mktemp("runs") / "run"
    inf.save_trajectory(traj, path, history=False)
    return traj, path, data


@pytest.mark.parametrize("method", ["influence_function", "tracin", "self_influence", "loss", "unrolled"])
def test_shards_in_one_process_reassemble_the_full_ranking(saved, method):
    traj, _, data = saved
    options = {"damping": 0.5} if method == "influence_function" else {}
    full = inf.rank(traj, *data, method=method, **options).sort_values("index")
    parts = [inf.rank(traj, *data, method=method, **options, samples=s) for s in np.array_split(np.arange(30), 3)]
    merged = np.concatenate([p.sort_values("index")["score"].to_numpy() for p in parts])
    assert np.allclose(merged, full["score"].to_numpy(), rtol=1e-10, atol=1e-15)
    assert sorted(parts[1]["index"]) == list(range(10, 20))


def test_two_processes_give_the_same_table_as_one(saved, monkeypatch):
    traj, path, data = saved
    single = inf.rank(traj, *data, method="influence_function", damping=0.5)
    # More processes than cores are slow (12 on 2 cores: 48.7 s instead of 8.8 s), said here, but not overridden.
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.warns(
        RuntimeWarning, match=r"starts 2 worker processes × 1 threads on 1 CPU cores \(os.cpu_count\(\)\)"
    ):
        sharded = inf.rank_in_processes(path, *data, method="influence_function", processes=2, damping=0.5)
    assert sharded.attrs["processes"] == 2
    # rank's attrs came back without val_loss, damping and solver (a DataFrame's attrs do not pickle).
    assert set(single.attrs) <= set(sharded.attrs)
    for key in ("method", "val_loss", "damping", "solver", "outside_run"):
        assert sharded.attrs[key] == single.attrs[key], key
    assert list(sharded["index"]) == list(single["index"])
    assert np.allclose(sharded["score"], single["score"], rtol=1e-10, atol=1e-15)
    assert list(sharded["rank"]) == list(range(30))


def test_sharding_rejects_bad_input(saved, tmp_path):
    traj, path, data = saved
    with pytest.raises(ValueError, match=r"'samples' parameter of rank must be training indices in \[0, 29\]"):
        inf.rank(traj, *data, samples=[40])
    with pytest.raises(ValueError, match="'processes' parameter of rank_in_processes must be a positive int"):
        inf.rank_in_processes(path, *data, processes=0)
    with pytest.raises(FileNotFoundError, match="'trajectory_path' parameter of rank_in_processes must be a folder"):
        inf.rank_in_processes(tmp_path / "missing", *data)


def test_arguments_are_checked_before_any_worker_starts(saved, monkeypatch):
    """A bad method, a misspelled option, missing validation data or other data were refused by each
    worker's rank, 5-15 s later and in rank's name."""
    traj, path, (x, y, xv, yv) = saved

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(sharding, "ProcessPoolExecutor", no_workers)
    cases = {
        "'method' parameter of rank_in_processes must be one of": dict(args=(x, y, xv, yv), method="bogus"),
        r"'options' parameter of rank_in_processes must be options of influence.rank \(solver, damping, .*'dampng'": (
            dict(args=(x, y, xv, yv), method="loss", dampng=0.1)
        ),
        "'x_val' parameter of rank_in_processes must be validation data for method 'unrolled'": dict(
            args=(x, y), method="unrolled"
        ),
        "'x_train' parameter of rank_in_processes must be the data the trajectory was recorded on": dict(
            args=(x[::-1], y, xv, yv), method="loss"
        ),
    }
    for message, case in cases.items():
        with pytest.raises((ValueError, TypeError), match=message):
            inf.rank_in_processes(path, *case.pop("args"), **case)


def test_threads_per_process_count_towards_the_cores(saved, monkeypatch):
    """Two processes of 2 threads on 2 cores are 4 threads on 2 cores: the warning counted processes only."""
    traj, path, data = saved

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(sharding, "ProcessPoolExecutor", no_workers)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    expected = r"starts 2 worker processes × 2 threads on 2 CPU cores .* processes=1 with threads_per_process=2"
    with pytest.warns(RuntimeWarning, match=expected), pytest.raises(AssertionError, match="a worker was started"):
        inf.rank_in_processes(path, *data, method="loss", processes=2, threads_per_process=2)


def test_workers_load_a_lambda_model_with_safe_mode_off(tmp_path, monkeypatch):
    """Each worker loads the saved run; a Lambda layer needs safe_mode=False there as in load_trajectory."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)), rng.integers(0, 2, 12)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: 2.0 * t), keras.layers.Dense(2)])
    traj = inf.fit(model, x, y, from_logits=True, batch_size=4)
    inf.save_trajectory(traj, tmp_path / "run")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the default number of processes is at most one per core
    sharded = inf.rank_in_processes(tmp_path / "run", x, y, x, y, method="loss", safe_mode=False)
    assert sharded.attrs["processes"] == 1
    assert list(sharded["index"]) == list(inf.rank(traj, x, y, x, y, method="loss")["index"])


class _InProcess:
    """Stands in for the process pool: runs each shard here, at once, on pickled arguments (as a worker gets them)."""

    def __init__(self, max_workers, mp_context):
        self.shards = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*pickle.loads(pickle.dumps(args))))
        return future


def _count_calls(monkeypatch, owner, name, counts):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize(
    ("method", "history"),
    [("influence_function", True), ("tracin", False), ("tracin", True), ("self_influence", False), ("margin", False)],
)
def test_the_shared_part_is_computed_once_not_once_per_worker(
    saved, saved_without_history, monkeypatch, method, history
):
    """Each worker ran the whole rank on its shard: the damping estimate and inverse-Hessian solve, TracIn's ∇E at
    every checkpoint, the replay to the checkpoints: 3-20x slower than rank. Now the workers get it from here."""
    import tensorflow as tf

    traj, path, data = saved if history else saved_without_history
    options = {"damping": "auto"} if method == "influence_function" else {}
    single = inf.rank(traj, *data, method=method, **options)
    counts: dict[str, int] = {}
    _count_calls(monkeypatch, Exact, "solve", counts)
    _count_calls(monkeypatch, Exact, "auto_damping", counts)
    _count_calls(monkeypatch, ranker_methods, "val_gradient", counts)
    _count_calls(monkeypatch, BoundProgram, "iter_states_at", counts)  # a replay of the run to the checkpoints
    monkeypatch.setattr(sharding, "ProcessPoolExecutor", _InProcess)
    for setter in ("set_intra_op_parallelism_threads", "set_inter_op_parallelism_threads"):
        monkeypatch.setattr(tf.config.threading, setter, lambda threads: None)  # this process's TF has started
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    sharded = inf.rank_in_processes(path, *data, method=method, processes=2, **options)
    expected = {
        "influence_function": {"solve": 1, "auto_damping": 1, "val_gradient": 1},
        "tracin": {"val_gradient": single.attrs.get("checkpoints"), **({} if history else {"iter_states_at": 1})},
        "self_influence": {"iter_states_at": 1},
        "margin": {"iter_states_at": 1},
    }[method]
    assert counts == expected
    assert sharded.attrs["processes"] == 2 and sharded.attrs["shared_seconds"] <= sharded.attrs["seconds"]
    for key in set(single.attrs) - {"seconds"}:
        assert sharded.attrs[key] == single.attrs[key], key
    assert list(sharded["index"]) == list(single["index"])
    np.testing.assert_allclose(sharded["score"], single["score"], rtol=1e-10, atol=1e-15)


def test_unrolled_is_ranked_once_here_without_workers(saved, monkeypatch):
    """One reverse pass gives every sample's effect; each worker repeated the whole pass for its shard."""
    traj, path, data = saved

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(sharding, "ProcessPoolExecutor", no_workers)
    single = inf.rank(traj, *data, method="unrolled")
    with pytest.warns(RuntimeWarning, match="'unrolled' has no per-sample part to split over 2 processes"):
        sharded = inf.rank_in_processes(path, *data, method="unrolled", processes=2)
    assert sharded.attrs["processes"] == 1 and sharded.attrs["strategy"] == single.attrs["strategy"]
    assert list(sharded["index"]) == list(single["index"])
    np.testing.assert_allclose(sharded["score"], single["score"], rtol=1e-10, atol=1e-15)


def test_a_cut_short_solve_is_told_once_at_the_call_of_rank_in_processes(saved, monkeypatch):
    """The shared solve runs here, once: its residual warning names this file, as rank's names its caller."""
    import tensorflow as tf

    from influence.rankers.inverse_hvp import ConjugateGradient

    _, path, data = saved
    monkeypatch.setattr(sharding, "ProcessPoolExecutor", _InProcess)
    for setter in ("set_intra_op_parallelism_threads", "set_inter_op_parallelism_threads"):
        monkeypatch.setattr(tf.config.threading, setter, lambda threads: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(RuntimeWarning, match=r"the cg solve of .* is off by") as said:
        inf.rank_in_processes(
            path, *data, method="influence_function", solver=ConjugateGradient(max_iterations=1), damping=0.5
        )
    assert len(said) == 1 and said[0].filename == __file__

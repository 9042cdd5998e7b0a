"""Atomic writes, fingerprints, the checksummed shard store and the resumable verification stage."""

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest

import influence as inf
from influence import runs
from influence.report import job
from influence.runs import RunInterrupted, ShardStore, atomic_write_bytes, fingerprint


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "file.txt"
    runs.atomic_write_text(path, "old")

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write_text(path, "new, half written")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_atomic_write_respects_umask(tmp_path):
    path = tmp_path / "file.txt"
    runs.atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_fingerprint_is_canonical_and_sensitive():
    x = np.arange(6.0).reshape(2, 3)
    assert fingerprint({"a": 1, "b": x}) == fingerprint({"b": x.copy(), "a": 1})
    assert fingerprint(x) != fingerprint(x.astype(np.float32))  # dtype matters
    assert fingerprint(x) != fingerprint(x.reshape(3, 2))  # shape matters
    assert fingerprint([1, 2]) != fingerprint([12])
    assert fingerprint(1) != fingerprint(1.0) != fingerprint("1")
    with pytest.raises(TypeError, match="cannot hash"):
        fingerprint(object())


def test_model_fingerprint_sees_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = runs.model_fingerprint(model)
    assert runs.model_fingerprint(model) == before
    model.layers[0].kernel.assign(np.zeros((3, 2)))
    assert runs.model_fingerprint(model) != before


def test_model_fingerprint_ignores_session_numbered_names_but_not_architecture():
    """The same model built twice in a session (dense, dense_1, …) had two fingerprints."""

    def build(units=2, functional=False, activation=None):
        keras.utils.set_random_seed(0)
        if functional:
            inputs = keras.Input((3,))
            hidden = keras.layers.Dense(4, activation="tanh")(inputs)
            return keras.Model(inputs, keras.layers.Dense(units, activation=activation)(hidden))
        layers = [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(units)]
        return keras.Sequential(layers)

    for functional in (False, True):
        a, b = build(functional=functional), build(functional=functional)
        assert a.layers[-1].name != b.layers[-1].name
        assert runs.model_fingerprint(a) == runs.model_fingerprint(b)
    assert runs.model_fingerprint(build()) != runs.model_fingerprint(build(functional=True))
    assert runs.model_fingerprint(build(functional=True)) != runs.model_fingerprint(
        build(functional=True, activation="softmax")
    )
    keras.utils.set_random_seed(0)
    three = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    keras.utils.set_random_seed(0)
    two = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    assert runs.model_fingerprint(three) != runs.model_fingerprint(two)


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return {"value": np.asarray(value)}

    return compute, calls


def test_store_reuses_shards_across_instances(tmp_path):
    compute, calls = _counting([1.5, 2.5])
    first = ShardStore(tmp_path).arrays("stage-a", compute)
    store = ShardStore(tmp_path)
    again = store.arrays("stage-a", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["value"], first["value"])
    assert (store.reused, store.computed, store.corrupted) == (1, 0, 0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"]["stage-a"]["file"] == "stage-a.npz"


def test_clearing_the_store_leaves_files_it_did_not_write(tmp_path):
    """--restart removed the whole shards/ folder, a user's own files in it too."""
    compute, calls = _counting([1.5])
    ShardStore(tmp_path).arrays("stage-a", compute)
    (tmp_path / "trajectory-abc").mkdir()
    (tmp_path / ".x.tmp").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    store = ShardStore(tmp_path)
    assert store.clear() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    ShardStore(tmp_path).arrays("stage-a", compute)  # nothing on record: computed again
    assert len(calls) == 2


def test_store_recomputes_corrupted_shard(tmp_path):
    compute, calls = _counting([1.0, 2.0, 3.0])
    ShardStore(tmp_path).arrays("k", compute)
    shard = tmp_path / "k.npz"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same length, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    messages = []
    store = ShardStore(tmp_path, log=messages.append)
    result = store.arrays("k", compute)
    assert len(calls) == 2 and store.corrupted == 1
    assert any("corrupted" in m for m in messages)
    np.testing.assert_array_equal(result["value"], [1.0, 2.0, 3.0])
    assert ShardStore(tmp_path).load("k") is not None  # rewritten, valid again


def test_store_recomputes_a_shard_it_cannot_parse(tmp_path):
    store = ShardStore(tmp_path)
    store.save("k", b"valid checksum, not an npz", suffix=".npz")
    messages = []
    result = ShardStore(tmp_path, log=messages.append).arrays("k", lambda: {"v": np.arange(3)})
    np.testing.assert_array_equal(result["v"], np.arange(3))
    assert any("unreadable" in m for m in messages)
    store.save("k", b"another format", suffix=".bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin", "manifest.json"]  # the old file is gone


def test_store_survives_unreadable_manifest(tmp_path):
    compute, calls = _counting(3.0)
    ShardStore(tmp_path).arrays("k", compute)
    (tmp_path / "manifest.json").write_text("{ torn")
    messages = []
    store = ShardStore(tmp_path, log=messages.append)
    store.arrays("k", compute)
    assert len(calls) == 2 and store.computed == 1
    assert any("unreadable" in m for m in messages)


def test_table_shard_round_trip_keeps_values_and_attrs(tmp_path):
    table = pd.DataFrame({"index": [2, 0, 1], "score": [0.5, 0.25, -1.0], "label": [1, 0, 1]})
    table.attrs.update(method="loss", seconds=np.float64(0.5), val_loss=float("nan"))
    ShardStore(tmp_path).table("rank-x", lambda: table)
    loaded = ShardStore(tmp_path).table("rank-x", lambda: pytest.fail("should reuse the shard"))
    pd.testing.assert_frame_equal(loaded, table)
    assert loaded.attrs["method"] == "loss" and loaded.attrs["seconds"] == 0.5
    assert np.isnan(loaded.attrs["val_loss"])


def test_table_shard_keeps_one_hot_labels_and_text(tmp_path):
    one_hot = [np.eye(3)[i] for i in (2, 0, 1)]
    table = pd.DataFrame({"index": [0, 1, 2], "label": one_hot, "kind": ["a", "bb", "c"], "flag": [True, False, True]})
    ShardStore(tmp_path).table("t", lambda: table)
    loaded = ShardStore(tmp_path).table("t", lambda: pytest.fail("should reuse the shard"))
    assert list(loaded.columns) == ["index", "label", "kind", "flag"]
    np.testing.assert_array_equal(np.stack(loaded["label"]), np.stack(one_hot))
    assert loaded["kind"].tolist() == ["a", "bb", "c"] and loaded["flag"].dtype == bool


def test_stop_after_env_interrupts_after_n_shards(tmp_path, monkeypatch):
    monkeypatch.setenv(runs.STOP_AFTER_ENV, "2")
    store = ShardStore(tmp_path)
    store.arrays("a", lambda: {"v": np.ones(1)})
    with pytest.raises(RunInterrupted, match="2 shard"):
        store.arrays("b", lambda: {"v": np.ones(2)})
    assert (tmp_path / "b.npz").exists()  # written before stopping
    monkeypatch.setenv(runs.STOP_AFTER_ENV, "two")
    with pytest.raises(ValueError, match="INFLUENCE_STOP_AFTER_SHARDS"):
        ShardStore(tmp_path)


def test_verification_indices_are_top_then_distinct_random():
    table = pd.DataFrame({"index": [7, 3, 5, 0, 1, 2, 4, 6], "rank": np.arange(8)})
    indices, kinds = job.verification_indices(table, top=2, random=3, seed=0)
    assert list(indices[:2]) == [7, 3]
    assert len(set(indices)) == 5 and not set(indices[2:]) & {7, 3}
    assert list(kinds) == ["most harmful"] * 2 + ["random"] * 3
    again, _ = job.verification_indices(table, top=2, random=3, seed=0)
    np.testing.assert_array_equal(indices, again)


@pytest.fixture
def tiny_run():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 3)).astype(np.float32), rng.integers(0, 2, 24)
    xv, yv = rng.normal(size=(10, 3)).astype(np.float32), rng.integers(0, 2, 10)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")]
    )
    traj = inf.fit(model, x, y, optimizer=inf.optimizers.SGD(0.3), batch_size=8, epochs=2, seed=0)
    return traj, x, y, xv, yv


def test_sharded_removal_effects_equal_actual_removal_effect(tiny_run, tmp_path):
    traj, x, y, xv, yv = tiny_run
    settings = job.RankingJob(
        out_dir=tmp_path,
        model=traj.model,
        x_train=x,
        y_train=y,
        x_val=xv,
        y_val=yv,
        optimizer=traj.optimizer,
        progress=False,
    )
    indices = np.array([3, 0, 17])
    store = ShardStore(tmp_path)
    effects = job.removal_effects(store, lambda: traj, settings, "run-1", indices)
    expected = inf.actual_removal_effect(traj, x, y, xv, yv, list(indices), progress=False)
    np.testing.assert_array_equal(effects, expected)
    assert store.computed == 4  # the baseline and one retraining per index
    resumed = ShardStore(tmp_path)
    np.testing.assert_array_equal(job.removal_effects(resumed, lambda: traj, settings, "run-1", indices), effects)
    assert (resumed.reused, resumed.computed) == (4, 0)


def test_running_a_job_twice_keeps_its_model_at_the_initial_weights_and_reuses_every_shard(tiny_run, tmp_path):
    """run_ranking used to leave the trained weights in job.model: the rerun was another job (0 shards reused)."""
    _, x, y, xv, yv = tiny_run
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")]
    )
    initial = [np.array(v) for v in model.trainable_variables]
    settings = job.RankingJob(out_dir=tmp_path, model=model, x_train=x, y_train=y, x_val=xv, y_val=yv,
                              optimizer=inf.optimizers.SGD(0.3), methods=("loss",), progress=False)  # fmt: skip
    first = job.run_ranking(settings)
    assert all(np.array_equal(np.array(v), w) for v, w in zip(model.trainable_variables, initial))
    # The stored run leaves out fit's weights history (230 MB for an 85k-weight MLP): resuming recomputes it.
    (saved,) = (tmp_path / "shards").glob("trajectory-*")
    assert json.loads((saved / "meta.json").read_text())["history"] is False
    second = job.run_ranking(settings)
    assert second.store.computed == 0 and second.store.reused >= 1
    pd.testing.assert_frame_equal(first.table, second.table)


def test_a_completed_run_prunes_the_shards_of_earlier_settings(tiny_run, tmp_path):
    """OUT/shards grew with every setting ever run in it: after a complete run it holds that run's shards."""
    _, x, y, xv, yv = tiny_run

    def settings(epochs, methods=("loss",)):
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")]
        )
        return job.RankingJob(out_dir=tmp_path, model=model, x_train=x, y_train=y, x_val=xv, y_val=yv,
                              optimizer=inf.optimizers.SGD(0.3), methods=methods, epochs=epochs,
                              verify_top=2, verify_random=1, progress=False, log=lambda _: None)  # fmt: skip

    shards = tmp_path / "shards"
    first = job.run_ranking(settings(2))
    first_files = {p.name for p in shards.iterdir()}
    (shards / ".rank-abc.npz.x1y2.tmp").write_bytes(b"torn")  # a write killed before its rename
    (shards / "notes.txt").write_text("mine")  # not ours: kept
    second = job.run_ranking(settings(3))
    names = {p.name for p in shards.iterdir()}
    assert second.store.computed >= 1 and first.store.computed == second.store.computed
    assert not (names & first_files - {"manifest.json"}), names & first_files
    assert "notes.txt" in names and not any(n.endswith(".tmp") for n in names)
    assert len([n for n in names if n.startswith("trajectory-")]) == 1
    manifest = json.loads((shards / "manifest.json").read_text())["shards"]
    assert {entry["file"] for entry in manifest.values()} == {n for n in names if n.endswith(".npz")}
    # Another method on the same run adds its shard; switching back reuses everything, and both stay.
    assert job.run_ranking(settings(3, methods=("margin",))).store.computed == 1
    fourth = job.run_ranking(settings(3))
    assert fourth.store.computed == 0 and len({p.name for p in shards.iterdir()} - names) == 1

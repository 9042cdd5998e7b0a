"""A saved trajectory reloads into the same run: same replay, same hypergradients."""

import json
import shutil

import keras
import numpy as np
import pytest
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam, RecordedRates


@pytest.mark.parametrize("record", [True, False])
def test_saved_trajectory_reloads_with_identical_results(tmp_path, record):
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(11, 5)), rng.integers(0, 3, 11), rng.normal(size=(5, 5)), rng.integers(0, 3, 5)
    traj = inf.fit(
        mlp(5, 3, out_activation="softmax"),
        x,
        y,
        loss="sparse_categorical_crossentropy",
        optimizer=Adam(lambda t: 0.02 / (1 + t)),
        batch_size=4,
        epochs=2,
        record_budget_bytes=2**20 if record else 0,
    )
    inf.save_trajectory(traj, tmp_path / "run")
    loaded = inf.load_trajectory(tmp_path / "run")
    assert [len(b) for b in loaded.batches] == [4, 4, 3] * 2
    assert np.array_equal(loaded.learning_rates, traj.learning_rates)
    assert (loaded.weights_history is not None) == record
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(loaded, x, y), traj.final_weights))
    before, after = inf.unrolled(traj, x, y, xv, yv), inf.unrolled(loaded, x, y, xv, yv)
    assert np.array_equal(before.removal_effect, after.removal_effect)
    assert np.array_equal(before.input_grad, after.input_grad)
    # The schedule object is not saved; the loaded optimizer replays the recorded rates, not the first one.
    assert isinstance(loaded.optimizer.learning_rate, RecordedRates)
    np.testing.assert_array_equal(loaded.optimizer.learning_rates(6), traj.learning_rates)
    assert "6 steps, 0.02 … 0.00333333" in repr(loaded.optimizer)
    with pytest.raises(ValueError, match=r"'step' parameter of RecordedRates must be a recorded step in \[0, 5\]"):
        loaded.optimizer.learning_rates(7)


def test_a_run_saved_without_its_history_recomputes_it(tmp_path):
    """The command line saved fit's whole weights history with each job (230 MB for a 0.5 MB data set)."""
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(11, 5)), rng.integers(0, 3, 11), rng.normal(size=(5, 5)), rng.integers(0, 3, 5)
    traj = inf.fit(mlp(5, 3), x, y, from_logits=True, optimizer=Adam(0.02), batch_size=4, epochs=2)
    assert traj.weights_history is not None
    inf.save_trajectory(traj, tmp_path / "full")
    inf.save_trajectory(traj, tmp_path / "short", history=False)
    assert traj.weights_history is not None  # the run in memory keeps it
    full, short = ((tmp_path / name / "arrays.npz").stat().st_size for name in ("full", "short"))
    assert short < full / 2
    loaded = inf.load_trajectory(tmp_path / "short")
    assert loaded.weights_history is None and loaded.state_history is None
    before, after = inf.unrolled(traj, x, y, xv, yv), inf.unrolled(loaded, x, y, xv, yv)
    np.testing.assert_allclose(after.removal_effect, before.removal_effect, rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match="'history' parameter of save_trajectory must be True or False"):
        inf.save_trajectory(traj, tmp_path / "bad", history="no")


def test_models_with_non_trainable_weights_reload(tmp_path):
    """BatchNorm statistics (training=False), a frozen layer and an adapted Normalization live in model.keras."""
    rng = np.random.default_rng(0)
    x, y, xv, yv = rng.normal(size=(11, 5)), rng.integers(0, 3, 11), rng.normal(size=(5, 5)), rng.integers(0, 3, 5)
    norm = keras.layers.Normalization(dtype="float64")
    norm.adapt(x)
    frozen = keras.layers.Dense(4, activation="tanh", dtype="float64")
    model = keras.Sequential([keras.Input((5,), dtype="float64"), norm, frozen, keras.layers.BatchNormalization(
        dtype="float64"), keras.layers.Dense(3, activation="softmax", dtype="float64")])  # fmt: skip
    frozen.trainable = False
    traj = inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=SGD(0.3), batch_size=4,
                   training=False)  # fmt: skip
    inf.save_trajectory(traj, tmp_path / "run")
    loaded = inf.load_trajectory(tmp_path / "run")
    assert len(loaded.initial_weights) == 4  # BatchNorm's γ and β, the last Dense's kernel and bias
    before, after = inf.unrolled(traj, x, y, xv, yv), inf.unrolled(loaded, x, y, xv, yv)
    assert np.array_equal(before.removal_effect, after.removal_effect)
    assert np.array_equal(before.input_grad, after.input_grad)


def test_a_constant_rate_reloads_as_that_rate(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.1, momentum=0.9, nesterov=True), batch_size=3)
    inf.save_trajectory(traj, tmp_path / "run")
    assert inf.load_trajectory(tmp_path / "run").optimizer == traj.optimizer


def test_saving_replaces_atomically_and_errors_are_clear(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.1), batch_size=3)
    inf.save_trajectory(traj, tmp_path / "run")
    inf.save_trajectory(traj, tmp_path / "run")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["arrays.npz", "meta.json", "model.keras"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trajectory-")]
    with pytest.raises(FileNotFoundError, match="'path' parameter of load_trajectory must be a folder written by"):
        inf.load_trajectory(tmp_path / "nowhere")
    custom = inf.fit(mlp(4, 2), x, y, loss=lambda a, b: ((a - b) ** 2)[:, 0], batch_size=3)
    with pytest.raises(
        ValueError, match="'trajectory' parameter of save_trajectory must be a run with a built-in loss"
    ):
        inf.save_trajectory(custom, tmp_path / "custom")
    # Saving replaces its folder: a file, or a folder holding anything but a saved run, is refused, untouched.
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="must be a folder to write .created or replaced.. Got .*an existing file"):
        inf.save_trajectory(traj, tmp_path / "notes.txt")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.npz").write_bytes(b"keep")
    with pytest.raises(ValueError, match="a non-empty folder that is not a saved trajectory"):
        inf.save_trajectory(traj, tmp_path / "work")
    assert (tmp_path / "notes.txt").read_text() == "keep" and (tmp_path / "work" / "data.npz").exists()


def _as_format_1(folder) -> None:
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 1
    meta_path.write_text(json.dumps(meta))


def test_format_1_runs_load_unless_their_random_numbers_changed(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), rng.integers(0, 3, 8)
    plain = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, optimizer=SGD(0.1), batch_size=4)
    inf.save_trajectory(plain, tmp_path / "plain")
    _as_format_1(tmp_path / "plain")
    assert inf.load_trajectory(tmp_path / "plain").steps == plain.steps

    keras.utils.set_random_seed(0)
    dropout = inf.as_float64(
        keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.2), keras.layers.Dense(3, activation="softmax")])
    )
    inf.save_trajectory(inf.fit(dropout, x, y, optimizer=SGD(0.1), batch_size=4), tmp_path / "dropout")
    _as_format_1(tmp_path / "dropout")
    with pytest.raises(ValueError, match="format-1 run with dropout or noise layers"):
        inf.load_trajectory(tmp_path / "dropout")


def test_warm_up_from_zero_numpy_rates_and_streamed_runs_survive_saving(tmp_path):
    """A schedule starting at rate 0 saved but did not load; SGD(np.float32(...)) did not save; a memmap
    run came back as an in-memory one (its memory bound lost)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 2))
    np.save(tmp_path / "x.npy", x)
    x_map = np.load(tmp_path / "x.npy", mmap_mode="r")
    cases = {
        "warm_up": (x, SGD(lambda t: 0.05 * min(t, 2))),
        "numpy_rate": (x, SGD(np.float32(0.1))),
        "streamed": (x_map, Adam(0.01)),
    }
    for name, (inputs, optimizer) in cases.items():
        traj = inf.fit(mlp(4, 2), inputs, y, loss="mse", optimizer=optimizer, batch_size=4, epochs=2)
        inf.save_trajectory(traj, tmp_path / name)
        loaded = inf.load_trajectory(tmp_path / name)
        assert loaded.streamed == traj.streamed == (name == "streamed")
        np.testing.assert_array_equal(loaded.learning_rates, traj.learning_rates)
        for a, b in zip(inf.retrain(loaded, inputs, y), traj.final_weights):
            np.testing.assert_array_equal(a, b)


def _flip_middle(path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def test_damaged_or_mixed_folders_are_named_not_raw_errors(tmp_path):
    """A truncated meta.json gave a raw JSONDecodeError, a broken arrays.npz (or model.keras: "Bad CRC-32") a
    BadZipFile, and a folder whose model.keras came from another run loaded and then failed deep in Keras."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.1), batch_size=3)
    other = inf.fit(mlp(4, 2, hidden=(5,)), x, y, loss="mse", optimizer=SGD(0.1), batch_size=3)

    def damaged(name, damage):
        folder = tmp_path / name
        inf.save_trajectory(traj, folder)
        damage(folder)
        return folder

    cases = {
        "meta.json is not valid JSON": lambda f: (f / "meta.json").write_text('{"format": 2, "loss": '),
        "meta.json lacks 'optimizer'": lambda f: (f / "meta.json").write_text(
            json.dumps({k: v for k, v in json.loads((f / "meta.json").read_text()).items() if k != "optimizer"})
        ),
        "arrays.npz cannot be read": lambda f: (f / "arrays.npz").write_bytes(b"not a zip"),
        "arrays.npz lacks final_0": lambda f: np.savez(
            f / "arrays.npz", **{k: v for k, v in np.load(f / "arrays.npz").items() if k != "final_0"}
        ),
        "model.keras is not a Keras archive": lambda f: (f / "model.keras").write_bytes(b"garbage"),
        r"model.keras cannot be read \(BadZipFile: Bad CRC-32": lambda f: _flip_middle(f / "model.keras"),
        r"model.keras has trainable weights of shapes .* \(files from different runs\)": lambda f: shutil.copy(
            tmp_path / "other" / "model.keras", f / "model.keras"
        ),
    }
    # Same shapes, another run: a model.keras of the same architecture trained another way.
    same_shapes = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.3), batch_size=3)
    inf.save_trajectory(same_shapes, tmp_path / "same_shapes")
    cases[r"model.keras holds weights other than the run's final weights .*files from different runs"] = lambda f: (
        shutil.copy(tmp_path / "same_shapes" / "model.keras", f / "model.keras")
    )
    inf.save_trajectory(other, tmp_path / "other")
    for i, (message, damage) in enumerate(cases.items()):
        folder = damaged(f"run{i}", damage)
        with pytest.raises(
            ValueError,
            match=f"'path' parameter of load_trajectory must be a folder written by save_trajectory. Got .*{message}",
        ):
            inf.load_trajectory(folder)


def test_records_that_contradict_the_run_are_refused_at_load(tmp_path):
    """An arrays.npz or meta.json at odds with the run loaded: batch indices past n_train were clamped by
    gather (removal effects 2.3 off), short rates or seeds read past the schedule, an Adam run read as SGD
    disagreed with its recorded state; a wrong input shape, a short sample_weight or an unknown optimizer
    setting failed later with raw TensorFlow, numpy or TypeError messages."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=Adam(0.02), batch_size=4)  # 2 steps, states recorded
    inf.save_trajectory(traj, tmp_path / "base")

    def arrays(**changes):
        def change(folder):
            stored = dict(np.load(folder / "arrays.npz"))
            np.savez(folder / "arrays.npz", **{**stored, **changes})

        return change

    def meta(**changes):
        def change(folder):
            (folder / "meta.json").write_text(json.dumps({**json.loads((folder / "meta.json").read_text()), **changes}))

        return change

    cases = {
        r"batches hold indices outside \[0, 7\]": arrays(batches=np.arange(8) + 3),
        r"offsets do not split its 8 batch indices into steps": arrays(offsets=np.array([0, 4, 20])),
        r"learning_rates of shape \(1,\) for 2 steps": arrays(learning_rates=np.array([0.02])),
        r"seeds of shape \(1,\) for 2 steps": arrays(seeds=np.array([1])),
        r"sample_weight of shape \(3,\) for 8 samples": arrays(sample_weight=np.ones(3)),
        r"records 8 optimizer state array\(s\) per step but meta.json's SGD keeps 0": meta(
            optimizer="SGD", optimizer_config={"learning_rate": 0.02}
        ),
        r"input_shape \(9,\), not model.keras's input \(4,\)": meta(input_shape=[9]),
        "gives Adam the unknown setting.s. 'bogus'": meta(optimizer_config={"learning_rate": 0.02, "bogus": 1}),
    }
    for i, (message, change) in enumerate(cases.items()):
        folder = tmp_path / f"run{i}"
        shutil.copytree(tmp_path / "base", folder)
        change(folder)
        with pytest.raises(
            ValueError, match=f"'path' parameter of load_trajectory must be a folder written by .*{message}"
        ):
            inf.load_trajectory(folder)
    assert inf.load_trajectory(tmp_path / "base").steps == 2


def test_saving_checks_the_path_and_the_model_before_any_work(tmp_path, monkeypatch):
    """An empty path failed moving a staging folder the user never named; a layer frozen after fit was
    refused in the name of Trajectory.final_model."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    model = mlp(4, 2)
    traj = inf.fit(model, x, y, loss="mse", optimizer=SGD(0.1), batch_size=3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'path' parameter of save_trajectory must be a folder to write .* Got ''"):
        inf.save_trajectory(traj, "")
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind
    model.layers[0].trainable = False
    with pytest.raises(ValueError, match="'trajectory' parameter of save_trajectory must be a run whose model still"):
        inf.save_trajectory(traj, tmp_path / "run")


def test_a_lambda_model_loads_with_safe_mode_off(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(2)])
    traj = inf.fit(model, x, y, loss="mse", optimizer=SGD(0.05), batch_size=3)
    inf.save_trajectory(traj, tmp_path / "run")
    with pytest.raises(ValueError, match="safe_mode"):
        inf.load_trajectory(tmp_path / "run")
    loaded = inf.load_trajectory(tmp_path / "run", safe_mode=False)
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(loaded, x, y), traj.final_weights))


def test_a_replayed_run_saves_and_predicts_with_its_own_weights(tmp_path):
    """A replay shares its model object with the fit it came from, which holds the fit's weights:
    saving it wrote the fit's weights to model.keras, and predicting with it scored the fit."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    traj = inf.fit(mlp(4, 2), x, y, loss="mse", optimizer=SGD(0.1), batch_size=4)
    replay = traj.replayed_on(x, y + 1.0)
    assert not np.allclose(replay.final_weights[0], traj.final_weights[0])
    inf.save_trajectory(replay, tmp_path / "replay")
    np.testing.assert_array_equal(traj.model.trainable_variables[0], traj.final_weights[0])  # saving changed nothing
    loaded = inf.load_trajectory(tmp_path / "replay")
    for got, expected in zip(loaded.model.trainable_variables, replay.final_weights):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(replay.final_model().predict(x, verbose=0), loaded.model.predict(x, verbose=0))
    np.testing.assert_array_equal(traj.model.trainable_variables[0], replay.final_weights[0])

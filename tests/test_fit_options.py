"""``fit``'s jit_compile="auto" (plain graphs for convolutions on CPU) and its progress bar over chunked steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import influence as inf
from influence import _progress, program, trajectory
from influence.optimizers import SGD, Adam


def dense(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )


def nested_conv(seed=0):
    """A convolution inside a nested model: the rule walks into it."""
    keras.utils.set_random_seed(seed)
    features = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3, activation="tanh")])
    return keras.Sequential(
        [keras.Input((4, 4, 1)), features, keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(94, 6)).astype("float32"), rng.integers(0, 3, 94)


def test_auto_runs_convolutions_as_plain_graphs_on_cpu_and_dense_models_under_xla(monkeypatch, tmp_path):
    """XLA made a Conv16-Conv32 CNN 5-25x slower on CPU and the default was XLA, with no way off on the CLI."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4, 4, 1)).astype("float32"), rng.integers(0, 3, 12)
    kwargs = {"optimizer": SGD(0.1), "batch_size": 4, "epochs": 1}
    assert not tf.config.list_physical_devices("GPU")  # the test machine's CPU
    conv = inf.fit(nested_conv(), x, y, **kwargs)
    assert conv.jit_compile is False and not conv.program().jit_compile
    assert inf.fit(nested_conv(), x, y, jit_compile=True, **kwargs).jit_compile is True
    assert len(trajectory.convolution_layers(nested_conv())) == 1 and not trajectory.convolution_layers(dense())
    assert inf.fit(dense(), rng.normal(size=(12, 6)), y, **kwargs).jit_compile is True
    assert inf.fit(dense(), rng.normal(size=(12, 6)), y, jit_compile=False, **kwargs).jit_compile is False
    # The trajectory keeps the resolved bool, which save/load and replays use.
    inf.save_trajectory(conv, tmp_path / "run")
    assert inf.load_trajectory(tmp_path / "run").jit_compile is False
    # With a GPU visible, convolutions stay under XLA.
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert trajectory.resolve_jit_compile(nested_conv(), "auto") is True


@pytest.mark.parametrize("value", ["yes", "on", 1, None])
def test_jit_compile_takes_auto_true_or_false(data, value):
    """jit_compile="yes" was taken as True (bool of any string), jit_compile="off" too."""
    x, y = data
    with pytest.raises(ValueError, match=r"The 'jit_compile' parameter of fit must be 'auto', True or False\. Got"):
        inf.fit(dense(), x, y, jit_compile=value)


def test_progress_takes_true_false_or_none(data):
    x, y = data
    with pytest.raises(ValueError, match=r"The 'progress' parameter of fit must be True, False or None\. Got 'yes'"):
        inf.fit(dense(), x, y, progress="yes")


def count_runs(monkeypatch):
    """The number of compiled-loop calls fit makes (Program.run)."""
    calls = []
    run = program.Program.run

    def counted(self, *args, **kwargs):
        calls.append(args[3:5])  # (start, stop)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(program.Program, "run", counted)
    return calls


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("record", [True, False])
def test_training_in_chunks_is_bit_identical_to_one_call(data, jit, record, monkeypatch, capsys):
    """47 steps (a prime: equal chunks of 8 and a remainder of 7), Adam (optimizer state), XLA and plain graphs,
    with and without the recorded history. A recording call compiles once per length under XLA, so its remainder
    is a whole chunk that starts early; a plain call takes the remainder as it is."""
    x, y = data
    kwargs = {
        "optimizer": Adam(0.05),
        "batch_size": 2,
        "jit_compile": jit,
        "record_budget_bytes": trajectory.DEFAULT_RECORD_BUDGET if record else 0,
    }
    one = inf.fit(dense(), x, y, progress=False, **kwargs)
    assert capsys.readouterr().err == ""
    calls = count_runs(monkeypatch)
    chunked = inf.fit(dense(), x, y, progress=True, **kwargs)
    # Equal chunks: the recording run's last one starts at 39 (from the recorded step 39), not a 7-step call.
    last = (39, 47) if record else (40, 47)
    assert chunked.steps == 47 and calls == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), last]
    err = capsys.readouterr().err
    assert "training: 100%" in err and "47/47" in err
    assert all(np.array_equal(a, b) for a, b in zip(one.final_weights, chunked.final_weights))
    if record:
        assert chunked.weights_history is not None and chunked.state_history is not None
        assert len(chunked.state_history) == len(one.state_history) == 2 * len(one.weights_history)  # Adam's m, v
        for a, b in zip(one.weights_history + one.state_history, chunked.weights_history + chunked.state_history):
            assert np.array_equal(a, b)
    else:
        assert chunked.weights_history is None
    np.testing.assert_array_equal(inf.retrain(chunked, x, y)[0], chunked.final_weights[0])


def test_short_runs_stay_one_call_and_long_ones_show_progress(data, monkeypatch, capsys):
    """fit ran every step in one compiled call and printed nothing for 17 s of CNN training. Under the default,
    runs of more than 256 steps go in chunks with a bar; shorter ones stay one call (no extra XLA compile)."""
    x, y = data
    model = dense()
    kwargs = {"optimizer": SGD(0.1), "batch_size": 2}
    calls = count_runs(monkeypatch)
    inf.fit(model, x, y, **kwargs)  # 47 steps
    assert calls == [(0, 47)] and capsys.readouterr().err == ""
    # A run of 282 steps (6 epochs): chunks of 15 (no divisor of 282 is near; 282 = 15·18 + 12: the last one, a
    # whole chunk, starts early), and its bar (here with a delay of 0 s) moves after each.
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    calls.clear()
    long = inf.fit(dense(), x, y, epochs=6, **kwargs)
    assert long.steps == 282 and len(calls) == 19 and calls[0] == (0, 15) and calls[-1] == (267, 282)
    err = capsys.readouterr().err
    assert "training: 100%" in err and "282/282" in err
    calls.clear()
    inf.fit(dense(), x, y, epochs=6, progress=False, **kwargs)
    assert calls == [(0, 282)] and capsys.readouterr().err == ""


def test_fit_shares_the_progress_default():
    import inspect

    assert inspect.signature(inf.fit).parameters["progress"].default is None
    assert inspect.signature(inf.fit).parameters["jit_compile"].default == "auto"

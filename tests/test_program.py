"""Compiled programs: XLA by default, shared across runs of one model, plain-graph fallback."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence.optimizers import SGD, Adam
from influence.unroll import Checkpointed

FIT = {"loss": "sparse_categorical_crossentropy", "batch_size": 6, "epochs": 2, "seed": 0}


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(24, 4)), rng.integers(0, 3, 24), rng.normal(size=(8, 4)), rng.integers(0, 3, 8)


def test_xla_and_plain_graphs_give_the_same_hypergradients(data):
    x, y, xv, yv = data
    compiled = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, optimizer=Adam(0.05), **FIT)
    plain = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, optimizer=Adam(0.05), jit_compile=False, **FIT)
    assert compiled.program().jit_compile and not plain.program().jit_compile
    a, b = (inf.unrolled(t, x, y, xv, yv) for t in (compiled, plain))
    np.testing.assert_allclose(a.removal_effect, b.removal_effect, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(a.input_grad, b.input_grad, rtol=1e-9, atol=1e-14)
    # Replays use the run's own compiled steps: bit for bit.
    assert all(np.array_equal(w, v) for w, v in zip(inf.retrain(compiled, x, y), compiled.final_weights))


def test_a_refit_of_the_same_model_reuses_its_compiled_program(data):
    x, y, xv, yv = data
    model = mlp(4, 3, out_activation="softmax")
    initial = model.get_weights()
    first = inf.fit(model, x, y, optimizer=SGD(0.3), **FIT)
    model.set_weights(initial)
    second = inf.fit(model, x, y, optimizer=SGD(0.3), **FIT)
    assert second.program().program is first.program().program
    assert all(np.array_equal(a, b) for a, b in zip(first.final_weights, second.final_weights))
    model.set_weights(initial)
    other = inf.fit(model, x, y, optimizer=SGD(0.3, weight_decay=0.01), **FIT)
    assert other.program().program is not first.program().program
    # Another schedule (batch size, epochs) runs through the same compiled functions.
    model.set_weights(initial)
    longer = inf.fit(model, x, y, optimizer=SGD(0.3), **{**FIT, "epochs": 3, "batch_size": 5})
    assert longer.program().program is first.program().program
    fresh = mlp(4, 3, out_activation="softmax")
    fresh.set_weights(initial)
    expected = inf.fit(fresh, x, y, optimizer=SGD(0.3), **{**FIT, "epochs": 3, "batch_size": 5})
    np.testing.assert_array_equal(
        inf.unrolled(longer, x, y, xv, yv).removal_effect, inf.unrolled(expected, x, y, xv, yv).removal_effect
    )


def test_changed_frozen_weights_get_a_new_program(data):
    x, y, xv, yv = data
    keras.utils.set_random_seed(1)
    frozen = keras.layers.Dense(5, activation="tanh", trainable=False, dtype="float64")
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), frozen, keras.layers.Dense(3, activation="softmax", dtype="float64")]
    )
    initial = model.get_weights()
    first = inf.fit(model, x, y, **FIT)
    model.set_weights(initial)
    frozen.kernel.assign(2.0 * frozen.kernel)
    second = inf.fit(model, x, y, **FIT)
    assert second.program().program is not first.program().program
    clone = keras.models.clone_model(model)  # the doubled frozen kernel, the other weights as before the first fit
    clone.set_weights([*model.get_weights()[:2], *initial[2:]])
    expected = inf.fit(clone, x, y, **FIT)
    assert all(np.array_equal(a, b) for a, b in zip(second.final_weights, expected.final_weights))


def test_a_changed_layer_setting_gets_a_new_program(data):
    """A refit after Dropout's rate went from 0.1 to 0.6 reused the program traced with 0.1: its weights
    equalled the 0.1 run's and missed a fresh 0.6 model's by 0.34."""
    x, y, _, _ = data

    def model_with_dropout(rate):
        keras.utils.set_random_seed(0)
        return inf.as_float64(
            keras.Sequential(
                [
                    keras.Input((4,)),
                    keras.layers.Dense(6, activation="tanh"),
                    keras.layers.Dropout(rate),
                    keras.layers.Dense(3, activation="softmax"),
                ]
            )
        )

    model = model_with_dropout(0.1)
    initial = model.get_weights()
    first = inf.fit(model, x, y, optimizer=SGD(0.3), **FIT)
    model.layers[1].rate = 0.6
    model.set_weights(initial)
    second = inf.fit(model, x, y, optimizer=SGD(0.3), **FIT)
    assert second.program().program is not first.program().program
    expected = inf.fit(model_with_dropout(0.6), x, y, optimizer=SGD(0.3), **FIT)
    for a, b in zip(second.final_weights, expected.final_weights):
        np.testing.assert_array_equal(a, b)


class HostIdentity(keras.layers.Layer):
    """Identity plus 0 × a string op's result: differentiable (twice), but XLA has no string kernels."""

    def call(self, z):
        lengths = tf.strings.length(tf.strings.as_string(z))
        return z + 0.0 * tf.stop_gradient(tf.cast(lengths, z.dtype))


def test_a_model_xla_cannot_compile_falls_back_to_plain_graphs(data):
    x, y, xv, yv = data

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,), dtype="float64"),
                keras.layers.Dense(5, activation="tanh", dtype="float64"),
                HostIdentity(dtype="float64"),
                keras.layers.Dense(3, activation="softmax", dtype="float64"),
            ]
        )

    with pytest.warns(RuntimeWarning, match="XLA cannot compile this model's forward steps; using plain TensorFlow"):
        traj = inf.fit(build(), x, y, **FIT)
    assert not traj.jit_compile
    plain = inf.fit(build(), x, y, jit_compile=False, **FIT)
    assert all(np.array_equal(a, b) for a, b in zip(traj.final_weights, plain.final_weights))
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(traj, x, y), traj.final_weights))
    np.testing.assert_array_equal(
        inf.unrolled(traj, x, y, xv, yv).removal_effect, inf.unrolled(plain, x, y, xv, yv).removal_effect
    )


def test_when_xla_refuses_only_the_reverse_pass_replays_stay_exact():
    """float64 max-pooling: XLA on CPU has no kernel for its second derivative, but runs its forward pass."""
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(12, 6, 6, 1)), rng.normal(size=(6, 6, 6, 1))
    y, yv = rng.integers(0, 3, 12), rng.integers(0, 3, 6)

    def fit(**kwargs):
        keras.utils.set_random_seed(1)
        model = inf.as_float64(keras.Sequential([
            keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="tanh"), keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax"),
        ]))  # fmt: skip
        return inf.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=Adam(0.02), batch_size=5,
                       epochs=4, **kwargs)  # fmt: skip

    traj = fit(jit_compile=True)  # "auto" runs convolutions as plain graphs on CPU
    with pytest.warns(RuntimeWarning, match="XLA cannot compile this model's reverse steps"):
        res = inf.unrolled(traj, x, y, xv, yv)
    assert traj.jit_compile and traj.program().xla_refused == {"reverse"}
    with warnings.catch_warnings():  # the same refusal by another model's program: said once per process
        warnings.simplefilter("error", RuntimeWarning)
        inf.unrolled(fit(jit_compile=True), x, y, xv, yv)
    # The forward steps stayed compiled: retraining reproduces the recorded run bit for bit.
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(traj, x, y), traj.final_weights))
    plain = fit(jit_compile=False)
    np.testing.assert_allclose(res.removal_effect, inf.unrolled(plain, x, y, xv, yv).removal_effect, rtol=1e-9)


def test_xlas_native_log_of_a_refusal_is_held_back_for_the_one_line_warning(tmp_path):
    """XLA's C++ logging printed ~40 lines (OP_REQUIRES failed …, stack traces) before the warning."""
    import os
    import subprocess
    import sys

    script = tmp_path / "refused.py"
    script.write_text(
        "import keras, numpy as np, influence as inf\n"
        "keras.utils.set_random_seed(0)\n"
        "m = inf.as_float64(keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),\n"
        "    keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(3, activation='softmax')]))\n"
        "rng = np.random.default_rng(0); x, y = rng.normal(size=(8, 6, 6, 1)), rng.integers(0, 3, 8)\n"
        "t = inf.fit(m, x, y, optimizer=inf.optimizers.SGD(0.1), batch_size=4, jit_compile=True)\n"
        "inf.unrolled(t, x, y, x, y)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "XLA cannot compile this model's reverse steps" in run.stderr
    assert "OP_REQUIRES failed" not in run.stderr and "The op is created at" not in run.stderr
    # The forward steps compiled: XLA's INFO lines of that compile are not passed on either.
    assert "XLA service" not in run.stderr and "Compiled cluster using XLA" not in run.stderr


def test_native_log_held_during_a_first_compile_is_passed_on_unless_dropped(capfd, monkeypatch):
    import os

    from influence.program import _native_log_held

    info = b"I0000 00:00:1795503993.007541   26574 service.cc:153] XLA service 0x56 initialized\n"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with _native_log_held() as held:
        os.write(2, b"kept\n" + info + b"W0000 00:00:1.5  12 op_kernel.cc:1858] a warning\n")
        held.pass_on = True
    with _native_log_held():
        os.write(2, b"dropped\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nW0000 00:00:1.5  12 op_kernel.cc:1858] a warning\nafter\n"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # asked for TensorFlow's log: INFO lines too
    with _native_log_held() as held:
        os.write(2, info)
        held.pass_on = True
    assert capfd.readouterr().err == info.decode()


@pytest.mark.parametrize("steps", [160, 640, 2560, 997])
def test_checkpoint_interval_prefers_equal_segments_at_little_extra_memory(steps):
    strategy = Checkpointed()
    lengths = {b - a for a, b in strategy.segments(steps)}
    root = int(np.ceil(np.sqrt(steps)))
    assert strategy.states_held(steps) <= 1.25 * (int(np.ceil(steps / root)) + root)
    assert len(lengths) == (2 if steps == 997 else 1)  # 997 is prime: ⌈√T⌉ and a shorter last segment
    assert sum(b - a for a, b in strategy.segments(steps)) == steps


def test_fresh_models_in_one_process_raise_no_retracing_warnings(data):
    """Each new model's program traces once by design; TensorFlow counted those traces per code object
    across models and logged 'triggered tf.function retracing' (three lines) from the fifth fit on."""
    import logging

    x, y, xv, yv = data
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for seed in range(6):
            model = mlp(4, 3, out_activation="softmax", seed=seed)
            traj = inf.fit(model, x, y, **FIT)
            inf.unrolled(traj, x, y, xv, yv)
            inf.rank(traj, x, y, xv, yv, method="tracin")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "retracing" in r.getMessage()]


def test_an_error_of_the_arguments_is_raised_and_leaves_xla_on():
    """A shape error raised while XLA compiled (one-hot labels given to retrain) was taken for XLA refusing the
    model: the shared program switched to plain graphs for good, and replays left the recorded run by 4e-7."""
    from types import SimpleNamespace

    from influence.program import _GraphFunction

    def broken(x):
        raise tf.errors.InvalidArgumentError(None, None, "while compiling: dimensions must be equal, 10 and 100")

    program = SimpleNamespace(jit_compile=True, xla_refused=set())
    with pytest.raises(tf.errors.InvalidArgumentError, match="dimensions must be equal"):
        _GraphFunction(program, broken, group="forward")(tf.constant(1.0))
    assert program.jit_compile and not program.xla_refused

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)), rng.integers(0, 3, 12)
    traj = inf.fit(mlp(4, 3, out_activation="softmax"), x, y, optimizer=SGD(0.3), **FIT)
    with pytest.raises(ValueError, match="'y_train' parameter of retrain must be class indices"):
        inf.retrain(traj, x, np.eye(3)[y])
    with pytest.raises(
        ValueError, match=r"'y_train' parameter of Trajectory.replayed_on must be class labels in \[0, 2\]"
    ):
        traj.replayed_on(x, np.where(np.arange(12) == 0, 5, y))
    assert traj.program().jit_compile
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(traj, x, y), traj.final_weights))


def test_a_plain_graph_reverse_pass_runs_twice():
    """Grappler's AddOpsRewrite left temporary variables behind in the step loop: with 235 steps of an
    85k-weight MLP the second unrolled call on a plain-graph run (jit_compile=False; streamed and
    distributed runs always) raised AlreadyExistsError."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1500, 64)).astype("float32"), rng.integers(0, 10, 1500)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="tanh"),
            keras.layers.Dense(256, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )
    traj = inf.fit(
        model,
        x,
        y,
        from_logits=True,
        optimizer=SGD(0.1),
        batch_size=32,
        epochs=5,
        record_budget_bytes=0,
        jit_compile=False,
    )
    before = tf.config.optimizer.get_experimental_options().get("arithmetic_optimization", True)
    runs = [
        inf.unrolled(traj, x, y, x[:100], y[:100], strategy="store_all", input_grad=False, progress=False)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].removal_effect, runs[1].removal_effect)
    assert tf.config.optimizer.get_experimental_options().get("arithmetic_optimization", True) == before

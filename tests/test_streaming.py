"""Inputs streamed from a memory-mapped file through tf.data give the in-memory numbers."""

import numpy as np
import pytest
from conftest import mlp

import influence as inf
from influence.optimizers import Adam


@pytest.fixture
def on_disk(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)), rng.integers(0, 3, 23)
    xv, yv = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    np.save(tmp_path / "x.npy", x)
    return np.load(tmp_path / "x.npy", mmap_mode="r"), x, y, xv, yv


@pytest.mark.parametrize("strategy", ["store_all", "checkpointed"])
def test_streamed_run_equals_the_in_memory_run(on_disk, tmp_path, strategy):
    x_map, x, y, xv, yv = on_disk
    kwargs = {
        "loss": "sparse_categorical_crossentropy",
        "optimizer": Adam(0.02),
        "batch_size": 5,
        "epochs": 3,
        "record_budget_bytes": 0,
    }
    # Streamed runs use plain graphs (a tf.data iterator does not XLA-compile): the same graphs in
    # memory give the same bits; the default XLA-compiled run agrees to round-off.
    memory = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, jit_compile=False, **kwargs)
    streamed = inf.fit(mlp(5, 3, out_activation="softmax"), x_map, y, **kwargs)
    assert streamed.streamed and not memory.streamed and not streamed.program().jit_compile
    assert all(np.array_equal(a, b) for a, b in zip(memory.final_weights, streamed.final_weights))
    compiled = inf.fit(mlp(5, 3, out_activation="softmax"), x, y, **kwargs)
    assert compiled.program().jit_compile
    assert all(np.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(compiled.final_weights, memory.final_weights))
    expected = inf.unrolled(memory, x, y, xv, yv, strategy=strategy)
    path = str(tmp_path / "input_grad.npy")
    got = inf.unrolled(streamed, x_map, y, xv, yv, strategy=strategy, input_grad_path=path)
    assert np.allclose(got.removal_effect, expected.removal_effect, rtol=1e-12, atol=1e-16)
    assert np.allclose(got.input_grad, expected.input_grad, rtol=1e-12, atol=1e-16)
    assert isinstance(got.input_grad, np.memmap)
    assert np.allclose(np.load(path), expected.input_grad, rtol=1e-12, atol=1e-16)


def test_streamed_retrain_and_a_nan_on_disk_is_reported(on_disk, tmp_path):
    x_map, x, y, _, _ = on_disk
    traj = inf.fit(mlp(5, 3, out_activation="softmax"), x_map, y, loss="sparse_categorical_crossentropy", batch_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(inf.retrain(traj, x_map, y), traj.final_weights))
    bad = x.copy()
    bad[7, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="'x_train' parameter of fit must be finite .* Got 1 non-finite"):
        inf.fit(
            mlp(5, 3, out_activation="softmax"),
            np.load(tmp_path / "bad.npy", mmap_mode="r"),
            y,
            loss="sparse_categorical_crossentropy",
        )


def test_the_finiteness_check_reads_a_large_input_in_blocks(tmp_path):
    """Checking a memory-mapped input for NaN/Inf must not allocate an n × d temporary: for data
    larger than memory (the reason to stream) that alone would not fit. The check reads blocks
    of rows, so its peak allocation stays at one block's booleans, whatever n is."""
    import tracemalloc

    from influence._validation import ROW_BLOCK_BYTES, as_array

    n, d = 1 << 17, 256  # 128 MiB of float32: the unchunked check allocated 32 MiB of booleans
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, d))
    x[-1, -1] = np.inf  # in the last block: every block is read
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="Got 1 non-finite"):
            as_array(x, param="x_train", func="fit")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One block of float32 rows has ROW_BLOCK_BYTES / 4 values, so as many bytes of booleans.
    assert peak <= ROW_BLOCK_BYTES // 4 + (1 << 20), f"peak {peak / 2**20:.1f} MiB"

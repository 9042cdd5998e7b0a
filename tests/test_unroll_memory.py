"""What the reverse pass holds at once and how it reports progress: chunks of steps, one call each."""

import weakref

import numpy as np
import pytest
from conftest import mlp

import influence as inf
from influence import unroll
from influence.optimizers import SGD
from influence.program import Program
from influence.unroll import chunk_limit, chunks

LOSS = "sparse_categorical_crossentropy"


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    # 13 samples, batch 5: 3 steps per epoch.
    return rng.normal(size=(13, 5)), rng.integers(0, 3, 13), rng.normal(size=(7, 5)), rng.integers(0, 3, 7)


def _fit(data, *, record: bool, epochs: int = 4, jit_compile: bool = True):
    x, y, _, _ = data
    return inf.fit(
        mlp(5, 3, out_activation="softmax"),
        x,
        y,
        loss=LOSS,
        optimizer=SGD(0.1, momentum=0.9),
        batch_size=5,
        epochs=epochs,
        record_budget_bytes=2**20 if record else 0,
        jit_compile=jit_compile,
        progress=False,
    )


def _state_bytes(traj) -> int:
    return sum(w.size * 8 for w in traj.initial_weights) * 2  # weights + momentum, float64


def _reverse_lengths(monkeypatch) -> list[int]:
    """Steps each reverse call takes, in call order."""
    lengths: list[int] = []
    real = Program.reverse

    def reverse(self, schedule, w_hist, *rest, **kwargs):
        lengths.append(int(w_hist[0].shape[0]))
        return real(self, schedule, w_hist, *rest, **kwargs)

    monkeypatch.setattr(Program, "reverse", reverse)
    return lengths


def test_chunks_are_of_one_length_when_a_divisor_is_near_and_short_runs_stay_one_call():
    assert chunks(0, 160, 256) == [(0, 160)]  # the digits benchmark's run: one call, as before
    assert chunks(0, 470, 73) == [(a, a + 47) for a in range(0, 470, 47)]  # one length: XLA compiles once
    assert chunks(10, 17, 3) == [(10, 13), (13, 16), (16, 17)]  # no divisor of 7 in (1, 3]: a shorter last one
    assert chunk_limit(9640) == unroll.CHUNK_STEPS  # digits MLP 64-32-10: the step limit
    assert chunk_limit(340_000) == 49  # 85k-weight MLP: 16 MiB of states
    assert chunk_limit(10**9) == 1


def test_a_recorded_history_is_reversed_a_chunk_at_a_time_not_copied_whole(data, monkeypatch):
    # An 85k-weight MLP's 457 MB history was copied whole into TensorFlow: +925 MB for the pass.
    x, y, xv, yv = data
    traj = _fit(data, record=True)
    assert traj.weights_history is not None and traj.steps == 12
    whole = inf.unrolled(traj, x, y, xv, yv, progress=False)  # 12 steps of states fit one chunk
    state, buffer = _state_bytes(traj), 5 * (1 + 5) * 8
    assert whole.strategy == "store_all"
    assert whole.memory_bytes == 12 * state + 2 * 12 * buffer  # the history itself is not counted
    monkeypatch.setattr(unroll, "CHUNK_BYTES", 4 * state)  # as if each state were large
    lengths = _reverse_lengths(monkeypatch)
    chunked = inf.unrolled(traj, x, y, xv, yv, progress=False)
    assert chunked.strategy == "store_all"  # nothing recomputed: the history is sliced
    assert lengths == [4, 4, 4]
    assert chunked.memory_bytes == 4 * state + 2 * 4 * buffer  # one chunk's copy and buffers
    assert np.allclose(chunked.removal_effect, whole.removal_effect, rtol=1e-12, atol=1e-16)
    assert np.allclose(chunked.input_grad, whole.input_grad, rtol=1e-12, atol=1e-16)
    # A budget under one chunk's copy shortens the slices instead of ignoring it.
    small = inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=2 * (state + 2 * buffer), progress=False)
    assert small.strategy == "checkpointed(every=2)" and small.memory_bytes <= 2 * (state + 2 * buffer)
    assert np.allclose(small.removal_effect, whole.removal_effect, rtol=1e-12, atol=1e-16)


def test_plain_graphs_count_the_recording_copy_and_the_budget_follows(data):
    # Without XLA the recording loop's per-step states and their stacked copy coexist: the 85k MLP's
    # store_all pass grew by 955 MB under a 500 MB budget whose estimate said 458 MB.
    x, y, xv, yv = data
    traj = _fit(data, record=False, jit_compile=False)
    state, buffer = _state_bytes(traj), 5 * (1 + 5) * 8
    res = inf.unrolled(traj, x, y, xv, yv, strategy="store_all", progress=False)
    assert res.memory_bytes == (12 + 12) * state + 2 * 12 * buffer
    assert inf.StoreAll().held_bytes(12, state, buffer) == 12 * state + 2 * 12 * buffer  # XLA: no second copy
    assert inf.StoreAll().held_bytes(12, state, buffer, jit_compile=False) == res.memory_bytes
    # A budget for the states alone no longer picks store_all on plain graphs.
    lean = inf.unrolled(traj, x, y, xv, yv, memory_budget_bytes=12 * (state + 2 * buffer), progress=False)
    assert lean.strategy != "store_all" and lean.memory_bytes <= 12 * (state + 2 * buffer)
    assert np.allclose(lean.removal_effect, res.removal_effect, rtol=1e-12, atol=1e-16)


def test_a_chunks_states_are_gone_before_the_next_are_recorded(data, monkeypatch):
    # Checkpointed held the previous segment's states while recording the next one: a segment more
    # than its estimate (1.1M-weight MLP: 431 MB measured under a 300 MB budget).
    x, y, xv, yv = data
    traj = _fit(data, record=False, jit_compile=False, epochs=6)  # 18 steps
    monkeypatch.setattr(unroll, "CHUNK_BYTES", 2 * _state_bytes(traj))
    recorded: list[tuple[int, weakref.ref]] = []  # (first step, a weak reference to its states)
    alive_at_recording: list[list[int]] = []
    real = Program.run

    def run(self, schedule, w, s, start, stop, *rest, record=False):
        if record:
            alive_at_recording.append([a for a, ref in recorded if ref() is not None and a >= stop])
        out = real(self, schedule, w, s, start, stop, *rest, record=record)
        if record:
            recorded.append((start, weakref.ref(out[2][0])))
        return out

    monkeypatch.setattr(Program, "run", run)
    lengths = _reverse_lengths(monkeypatch)
    res = inf.unrolled(traj, x, y, xv, yv, strategy=inf.Checkpointed(every=6), progress=False)
    assert lengths == [2] * 9  # segments of 6 steps, recorded and reversed 2 steps at a time
    # When a segment is recorded, the later segments' states (reversed already) are gone.
    assert alive_at_recording and all(alive == [] for alive in alive_at_recording)
    reference = inf.unrolled(traj, x, y, xv, yv, strategy="store_all", progress=False)
    assert np.allclose(res.removal_effect, reference.removal_effect, rtol=1e-12, atol=1e-16)


def test_the_progress_bar_counts_steps_and_moves_during_a_single_segment(data, monkeypatch, capsys):
    # store_all is one segment: the bar counted segments and showed 1/1 only at the end of a 43 s pass.
    from tqdm import tqdm

    x, y, xv, yv = data
    traj = _fit(data, record=True)
    monkeypatch.setattr(unroll, "CHUNK_STEPS", 4)
    seen = []  # (steps done, total) of the reverse pass's bar when each reverse call starts
    real = Program.reverse

    def reverse(self, schedule, w_hist, *rest, **kwargs):
        seen.extend((bar.n, bar.total) for bar in list(tqdm._instances) if bar.desc.startswith("reverse pass"))
        return real(self, schedule, w_hist, *rest, **kwargs)

    monkeypatch.setattr(Program, "reverse", reverse)
    res = inf.unrolled(traj, x, y, xv, yv, progress=True)
    assert res.strategy == "store_all"
    assert seen == [(0, 12), (4, 12), (8, 12)]
    assert "12/12" in capsys.readouterr().err
    inf.unrolled(traj, x, y, xv, yv, progress=False)
    assert capsys.readouterr().err == ""

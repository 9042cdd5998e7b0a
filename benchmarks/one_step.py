"""Benchmark of ``influence.one_step``: the nested-tape route (``method="hvp"``) against the
dense reference (``method="jacobian"``).

What is measured
    dE/dX after one SGD step (learning rate 0.1) for an MLP d-64-64-10 (tanh, tanh, softmax;
    float32) with sparse categorical cross-entropy, a training batch of B = 64 samples and a
    validation set of 256 samples, for input features d in {64, 256, 784}. Data are synthetic
    (``numpy.random.default_rng(seed)``, standard normal inputs, uniform labels); weights come
    from ``keras.utils.set_random_seed(seed)``.

How
    Every (method, d) pair runs in its own worker subprocess
    (``python benchmarks/one_step.py --worker --method hvp --features 784``) so that its memory
    figures are clean and an out-of-memory failure cannot take the parent down. The worker
    builds model and data, records its RSS as the baseline, resets the kernel's peak-RSS mark
    (``/proc/self/clear_refs``; a thread polling ``/proc/self/statm`` every 5 ms is the fallback)
    and then times

    * cold: the first call (includes eager first-call overhead and any tracing),
    * warm: the median of ``--repeats`` (3) further calls,

    with ``time.perf_counter``. Peak memory is the peak RSS over all calls minus the baseline,
    in MB (MiB, 2**20 bytes). Workers print one JSON line per stage, so a worker that dies
    during its warm calls still reports its cold time.

    The parent polls each worker's RSS (``/proc/<pid>/status``) and kills it above
    ``--mem-limit-gib`` (16 GiB) or after ``--timeout`` (300 s). The dense Jacobian
    ∂(∇_w L)/∂X has P·B·d float32 entries (P = number of weights); its size is reported for
    every d, and with any failure of the jacobian route.

Outputs
    ``reports/benchmarks/one_step.json`` (all figures, machine and threading information,
    targets met or missed) and ``reports/benchmarks/one_step.md`` (summary table). ``--quick``
    runs d = 64 only and writes to ``reports/_scratch/benchmarks/`` unless ``--out-dir`` is given.

Targets (from the issue)
    hvp at least 100x faster than jacobian at d = 256 (warm times); hvp at d = 784 under 1 s
    (warm time); hvp peak memory under 1 GB (1024 MB) over the baseline at every d.

Usage (from the repository root)::

    python benchmarks/one_step.py            # full run, about 4-6 minutes on 2 idle cores
    python benchmarks/one_step.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, benchmark_parser, output_dir, proc_status_kb, write_report

FEATURES = (64, 256, 784)
METHODS = ("hvp", "jacobian")
HIDDEN = (64, 64)
CLASSES = 10
BATCH = 64
N_VAL = 256
LEARNING_RATE = 0.1
LOSS = "sparse_categorical_crossentropy"

SPEEDUP_TARGET = 100.0  # jacobian / hvp, warm, at d = 256
SPEEDUP_AT = 256
HVP_TIME_TARGET_S = 1.0  # hvp warm at d = 784
HVP_TIME_AT = 784
HVP_MEMORY_TARGET_MB = 1024.0  # hvp peak over baseline, every d

MB = 2**20


# --------------------------------------------------------------------------- shared helpers


def n_params(d: int) -> int:
    """Number of weights P of the d-64-64-10 MLP."""
    sizes = (d, *HIDDEN, CLASSES)
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))


def jacobian_bytes(d: int) -> int:
    """Size of the dense float32 Jacobian ∂(∇_w L)/∂X: P·B·d·4 bytes."""
    return n_params(d) * BATCH * d * 4


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- worker


def emit(**record: Any) -> None:
    """One JSON line on stdout; the parent merges all lines of a worker."""
    print(json.dumps(record), flush=True)


class PeakRSS:
    """Peak resident set size of this process from the moment :meth:`start` is called.

    Uses the kernel's high-water mark (VmHWM) after resetting it through
    ``/proc/self/clear_refs``; where the reset is not allowed, a thread samples
    ``/proc/self/statm`` every 5 ms instead.
    """

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mode = ""

    def _rss_bytes(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
            self.mode = "VmHWM reset through /proc/self/clear_refs"
        except OSError:
            self.mode = "VmRSS sampled every 5 ms"
            self._peak = self._rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss_bytes())

    def peak_bytes(self) -> int:
        if self._thread is None:
            return (proc_status_kb("self", "VmHWM") or 0) * 1024
        self._peak = max(self._peak, self._rss_bytes())
        return self._peak

    def stop(self) -> None:
        self._stop.set()


def error_summary(exc: Exception) -> str:
    """The informative line of an exception message (TensorFlow's end with a node trace)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("File ", "[[", "Detected at node"))]
    return (useful[-1] if useful else "")[:300]


def run_worker(method: str, d: int, repeats: int, seed: int, save: str | None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import influence as inf

    emit(
        stage="setup",
        versions={"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
        threading={
            "intra_op_parallelism_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_parallelism_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "note": "0 means TensorFlow's default (one thread pool sized to the visible cores)",
            **{
                var: os.environ.get(var)
                for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
            },
        },
        devices=[dev.name for dev in tf.config.list_logical_devices()],
    )

    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((d,)),
            *(keras.layers.Dense(width, activation="tanh") for width in HIDDEN),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    x_train = rng.standard_normal((BATCH, d)).astype(np.float32)
    y_train = rng.integers(0, CLASSES, BATCH)
    x_val = rng.standard_normal((N_VAL, d)).astype(np.float32)
    y_val = rng.integers(0, CLASSES, N_VAL)

    def call() -> np.ndarray:
        return inf.one_step(model, LOSS, x_train, y_train, x_val, y_val, learning_rate=LEARNING_RATE, method=method)

    gc.collect()
    baseline = (proc_status_kb("self", "VmRSS") or 0) * 1024
    peak = PeakRSS()
    peak.start()

    start = time.perf_counter()
    result = call()
    cold = time.perf_counter() - start
    emit(
        stage="cold",
        params=model.count_params(),
        baseline_rss_mb=baseline / MB,
        peak_mode=peak.mode,
        cold_s=cold,
        peak_over_baseline_mb=(peak.peak_bytes() - baseline) / MB,
    )
    if save:
        np.save(save, result)

    del result
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        warm.append(time.perf_counter() - start)
    peak.stop()
    emit(
        stage="done",
        warm_s=statistics.median(warm),
        warm_all_s=warm,
        peak_over_baseline_mb=(peak.peak_bytes() - baseline) / MB,
    )


# --------------------------------------------------------------------------- parent


def launch(method: str, d: int, args: argparse.Namespace, save: Path) -> dict[str, Any]:
    """Run one worker under the memory guard and the timeout; return its merged record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method, "--features", str(d)]
    cmd += ["--repeats", str(args.repeats), "--seed", str(args.seed), "--save", str(save)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    limit_kb = int(args.mem_limit_gib * 2**20)
    record: dict[str, Any] = {"method": method, "features": d}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        killed_for = None
        observed_kb = 0
        while proc.poll() is None:
            rss_kb = proc_status_kb(proc.pid, "VmRSS") or 0
            observed_kb = max(observed_kb, rss_kb)
            if rss_kb > limit_kb:
                killed_for = f"out of memory (killed at {args.mem_limit_gib:g} GiB)"
            elif time.perf_counter() - start > args.timeout:
                killed_for = f"timed out (killed after {args.timeout:g} s)"
            if killed_for:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.02)
        record["wall_s"] = time.perf_counter() - start
        record["parent_observed_peak_rss_mb"] = observed_kb / 1024
        out.seek(0)
        for line in out:
            if line.startswith("{"):
                record.update(json.loads(line))
        err.seek(0)
        stderr_tail = err.read().strip().splitlines()[-15:]

    code = proc.returncode
    if killed_for:
        status = killed_for
    elif code == 0 and record.get("stage") == "done":
        status = "ok"
    elif code is not None and code < 0:
        name = signal.Signals(-code).name
        status = f"crashed (signal {-code}, {name}{', probably the kernel OOM killer' if -code == 9 else ''})"
    elif "error" in record:
        status = f"crashed ({record['error']})"
    else:
        status = f"crashed (exit code {code})"
    if status != "ok":
        record["stderr_tail"] = stderr_tail
        if any(word in record.get("error", "") for word in ("ResourceExhausted", "MemoryError")):
            status = f"out of memory ({status})"
        if method == "jacobian":
            status += f"; dense Jacobian would be {human_bytes(jacobian_bytes(d))}"
    record["status"] = status
    record.pop("stage", None)
    return record


def machine_info(records: list[dict[str, Any]]) -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    reported = next((r for r in records if "versions" in r), {})
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_total_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **reported.get("versions", {}),
        "devices": reported.get("devices"),
        "tf_threading": reported.get("threading"),
    }


def ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow is not None and fast else None


def summarise(records: list[dict[str, Any]], features: tuple[int, ...]) -> tuple[dict, dict]:
    by_key = {(r["method"], r["features"]): r for r in records}
    comparisons = {}
    for d in features:
        hvp, jac = by_key[("hvp", d)], by_key[("jacobian", d)]
        comparisons[str(d)] = {
            "params": n_params(d),
            "dense_jacobian_bytes": jacobian_bytes(d),
            "dense_jacobian": human_bytes(jacobian_bytes(d)),
            "speedup_warm": ratio(jac.get("warm_s"), hvp.get("warm_s")),
            "speedup_cold": ratio(jac.get("cold_s"), hvp.get("cold_s")),
            "relative_difference": hvp.get("relative_difference"),
        }

    def target(description: str, measured: Any, met: bool | None) -> dict[str, Any]:
        return {"target": description, "measured": measured, "met": met}

    speedup = comparisons.get(str(SPEEDUP_AT), {})
    hvp_time = by_key.get(("hvp", HVP_TIME_AT), {})
    hvp_peaks = {str(d): by_key[("hvp", d)].get("peak_over_baseline_mb") for d in features}
    known_peaks = [p for p in hvp_peaks.values() if p is not None]
    targets = {
        "speedup_at_256": target(
            f"hvp >= {SPEEDUP_TARGET:g}x faster than jacobian at d={SPEEDUP_AT} (warm)",
            {
                "warm": speedup.get("speedup_warm"),
                "cold": speedup.get("speedup_cold"),
                "jacobian_status": by_key.get(("jacobian", SPEEDUP_AT), {}).get("status"),
            },
            None if speedup.get("speedup_warm") is None else speedup["speedup_warm"] >= SPEEDUP_TARGET,
        ),
        "hvp_time_at_784": target(
            f"hvp under {HVP_TIME_TARGET_S:g} s at d={HVP_TIME_AT} (warm)",
            {"warm_s": hvp_time.get("warm_s"), "cold_s": hvp_time.get("cold_s")},
            None if hvp_time.get("warm_s") is None else hvp_time["warm_s"] < HVP_TIME_TARGET_S,
        ),
        "hvp_peak_memory": target(
            f"hvp peak memory < {HVP_MEMORY_TARGET_MB:g} MB over baseline at every d",
            hvp_peaks,
            None if len(known_peaks) < len(features) else max(known_peaks) < HVP_MEMORY_TARGET_MB,
        ),
    }
    return comparisons, targets


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["setup"]
    lines = [
        "# `influence.one_step`: hvp vs jacobian",
        "",
        f"MLP d-64-64-10 (tanh, tanh, softmax, float32), B={s['batch']}, {s['n_val']} validation samples, "
        f"seed {s['seed']}. Cold = first call; warm = median of {s['repeats']} further calls. "
        "Peak = peak RSS over all calls minus the RSS after building model and data (MB = MiB). "
        "Each row ran in its own process.",
        "",
        f"Load average (1 min) {report['load_average_1_5_15_min']['before'][0]:.2f} before the run, "
        f"{report['load_average_1_5_15_min']['after'][0]:.2f} after (other work on the machine inflates times).",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_total_gib']} GiB RAM, "
        f"Python {m['python']}, TensorFlow {m.get('tensorflow')}, Keras {m.get('keras')}; TF threads "
        f"intra={m['tf_threading'] and m['tf_threading']['intra_op_parallelism_threads']}, "
        f"inter={m['tf_threading'] and m['tf_threading']['inter_op_parallelism_threads']} (0 = default).",
        "",
        "| d | method | cold (s) | warm (s) | peak over baseline (MB) | status |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['features']} | {r['method']} | {fmt(r.get('cold_s'), '.3f')} | {fmt(r.get('warm_s'), '.3f')} | "
            f"{fmt(r.get('peak_over_baseline_mb'), '.1f')} | {r['status']} |"
        )
    lines += [
        "",
        "| d | weights P | dense Jacobian P·B·d·4 | speedup warm | speedup cold | max rel. difference |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d, c in report["comparisons"].items():
        lines.append(
            f"| {d} | {c['params']} | {c['dense_jacobian']} | {fmt(c['speedup_warm'], '.0f', '×')} | "
            f"{fmt(c['speedup_cold'], '.0f', '×')} | {fmt(c['relative_difference'], '.1e')} |"
        )
    lines += ["", "## Targets", ""]
    t = report["targets"]
    verdict = {True: "**met**", False: "**missed**", None: "**not measured**"}
    sp = t["speedup_at_256"]
    lines.append(
        f"- {sp['target']}: {verdict[sp['met']]} — {fmt(sp['measured']['warm'], '.0f', '×')} warm, "
        f"{fmt(sp['measured']['cold'], '.0f', '×')} cold."
    )
    ht = t["hvp_time_at_784"]
    lines.append(
        f"- {ht['target']}: {verdict[ht['met']]} — {fmt(ht['measured']['warm_s'], '.3f')} s warm, "
        f"{fmt(ht['measured']['cold_s'], '.3f')} s cold."
    )
    hm = t["hvp_peak_memory"]
    peaks = ", ".join(f"d={d}: {fmt(p, '.1f')} MB" for d, p in hm["measured"].items())
    lines.append(f"- {hm['target']}: {verdict[hm['met']]} — {peaks}.")
    return "\n".join(lines) + "\n"


def run_parent(args: argparse.Namespace) -> None:
    import numpy as np

    features = (64,) if args.quick else FEATURES
    load_before = os.getloadavg()
    out_dir = output_dir(args)
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for d in features:
            results = {}
            for method in METHODS:
                save = Path(scratch) / f"{method}_{d}.npy"
                print(f"d={d:<4} {method:<9}", end=" ", flush=True)
                record = launch(method, d, args, save)
                print(
                    f"cold {fmt(record.get('cold_s'), '.3f')} s, warm {fmt(record.get('warm_s'), '.3f')} s, "
                    f"peak +{fmt(record.get('peak_over_baseline_mb'), '.1f')} MB: {record['status']}",
                    flush=True,
                )
                records.append(record)
                results[method] = np.load(save) if save.exists() else None
            if results["hvp"] is not None and results["jacobian"] is not None:
                hvp, jac = results["hvp"], results["jacobian"]
                diff = float(np.max(np.abs(hvp - jac)) / max(float(np.max(np.abs(jac))), 1e-30))
                records[-2]["relative_difference"] = records[-1]["relative_difference"] = diff

    comparisons, targets = summarise(records, features)
    report = {
        "benchmark": "influence.one_step, method='hvp' vs method='jacobian'",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(records),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "setup": {
            "model": f"d-{'-'.join(map(str, HIDDEN))}-{CLASSES} MLP, tanh/tanh/softmax, float32",
            "loss": LOSS,
            "learning_rate": LEARNING_RATE,
            "batch": BATCH,
            "n_val": N_VAL,
            "features": list(features),
            "seed": args.seed,
            "repeats": args.repeats,
            "memory_units": "MB = MiB = 2**20 bytes",
            "timeout_s": args.timeout,
            "mem_limit_gib": args.mem_limit_gib,
        },
        "results": records,
        "comparisons": comparisons,
        "targets": targets,
    }
    json_path, md_path = write_report(out_dir, "one_step", report, markdown(report))
    print(f"wrote {json_path} and {md_path}")


def main() -> None:
    parser = benchmark_parser(__doc__, "d=64 only (smoke test)", "one_step.{json,md}")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a worker is killed")
    parser.add_argument("--mem-limit-gib", type=float, default=16.0, help="worker RSS at which it is killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--features", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        try:
            run_worker(args.method, args.features, args.repeats, args.seed, args.save)
        except Exception as exc:
            emit(error=f"{type(exc).__name__}: {error_summary(exc)}")
            raise
    else:
        run_parent(args)


if __name__ == "__main__":
    main()

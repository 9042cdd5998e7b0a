"""Small helpers shared by the benchmark scripts: their common options, machine
information, /proc memory readings and writing a report as JSON + Markdown."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "reports" / "benchmarks"  # committed reports
QUICK_OUT_DIR = REPO_ROOT / "reports" / "_scratch" / "benchmarks"  # --quick runs (ignored by git)
MB = 2**20


def benchmark_parser(doc: str, quick_help: str, writes: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (a smoke run) and ``--out-dir``.

    ``doc`` is the script's docstring (its first paragraph describes the command);
    ``writes`` names what lands in the output folder.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out-dir", help=f"where to write {writes} (default {DEFAULT_OUT_DIR.relative_to(REPO_ROOT)}; "
        f"with --quick {QUICK_OUT_DIR.relative_to(REPO_ROOT)})"
    )  # fmt: skip
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """``--out-dir`` if given, else the committed reports (or the scratch folder for ``--quick``)."""
    return Path(args.out_dir) if args.out_dir else (QUICK_OUT_DIR if args.quick else DEFAULT_OUT_DIR)


def proc_status_kb(pid: int | str, field: str) -> int | None:
    """A ``kB`` field (VmRSS, VmHWM, ...) of /proc/<pid>/status, or None if unavailable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (``/proc/self/clear_refs``); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def report_header(benchmark: str, load_at_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """The first keys of every benchmark's JSON: what it measures, the command, the date and the machine.

    ``load_at_start``: ``os.getloadavg()`` taken when the measurements began; with it the machine
    entry records the load average at start and now (other processes inflate and scatter timings).
    """
    machine = machine_info()
    if load_at_start is not None:
        machine["loadavg_1_5_15_min"] = {"start": load_at_start, "end": os.getloadavg()}
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
    }


def machine_info() -> dict[str, Any]:
    """CPU, memory, Python and library versions, TensorFlow threading of the current process."""
    import keras
    import numpy as np
    import tensorflow as tf

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model or platform.processor(),
        "memory_total_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "devices": [dev.name for dev in tf.config.list_logical_devices()],
        "tf_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "note": "0 means TensorFlow's default (sized to the visible cores)",
        },
    }


def write_report(out_dir: Path, name: str, report: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in a report become plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or an em dash for a missing value."""
    return "—" if value is None else format(value, spec) + suffix


def run_json_worker(cmd: list[str], *, timeout: float, env: dict[str, str], stderr_lines: int) -> dict[str, Any]:
    """Run a benchmark worker process and merge the JSON lines it prints into one record.

    ``status`` is "ok", "failed (exit code N)" (with the last ``stderr_lines`` lines of stderr),
    "timed out after T s", or the worker's own ``error``; ``worker_wall_s`` is its wall time.
    """
    import subprocess
    import time

    record: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        record["status"] = f"timed out after {timeout:g} s"
    else:
        output = proc.stdout
        record["status"] = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
        if proc.returncode != 0:
            record["stderr_tail"] = proc.stderr.strip().splitlines()[-stderr_lines:]
    for line in output.splitlines():
        if line.startswith("{"):
            record.update(json.loads(line))
    if "error" in record:
        record["status"] = record["error"]
    record["worker_wall_s"] = time.perf_counter() - start
    return record

"""Publishing a report into a folder that may hold an earlier one.

The report is rendered into a staging folder and then moved into place; the job
records the files it wrote (``REPORT_MANIFEST``) and removes those of a previous
run that this run did not write again, so a rerun with other settings does not
leave, say, an old ``verification.csv`` beside the new report. Files it did not
write are never touched, and the page moves last, so the old report stays whole
until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..runs import atomic_write_text

# What the job writes into out_dir besides shards/: the paths of the last report, relative to out_dir.
REPORT_MANIFEST = ".report-files.json"
STAGING = ".report-staging"
# The files of a report written before the manifest existed (a folder with shards/ and index.html).
UNLISTED_REPORT_FILES = (
    *(f"{name}.{ext}" for name in ("scores", "all_methods") for ext in ("csv", "parquet")),
    *("index.html", "verification.csv"),
    *(f"images/{name}.png" for name in ("score_distribution", "removal_scatter", "found_at_k", "convergence")),
    *(f"images/{grid}_{i:02d}.png" for grid in ("harmful", "helpful") for i in range(24)),
)


def previous_report_files(out_dir: Path) -> set[str]:
    """Paths (relative to ``out_dir``) of the report files a previous run of the job wrote there."""
    manifest = out_dir / REPORT_MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return set()
        listed = listed if isinstance(listed, list) else []
        return {p for p in map(str, listed) if not Path(p).is_absolute() and ".." not in Path(p).parts}
    earlier = (out_dir / "shards").is_dir() and (out_dir / "index.html").is_file()
    return set(UNLISTED_REPORT_FILES) if earlier else set()


def publish_report(out_dir: Path, render: Callable[[Path], Path], previous: set[str]) -> Path:
    """Render into ``out_dir/STAGING``, move the files into ``out_dir`` and remove ``previous`` others.

    ``render(folder)`` writes the report into ``folder`` and returns its page; ``previous``
    is :func:`previous_report_files` from before the run. Only those paths are ever removed,
    and the page moves last, so the old report stays whole until the new one is complete.
    """
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    page = render(staging).relative_to(staging).as_posix()
    written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    owned = sorted(previous | set(written))
    atomic_write_text(out_dir / REPORT_MANIFEST, json.dumps(owned))  # a crash below leaves nothing unlisted
    for name in sorted(written, key=lambda n: n == page):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, out_dir / name)
    for name in sorted(previous - set(written)):
        stale = out_dir / name
        if stale.is_file():
            stale.unlink()
            if stale.parent != out_dir and not any(stale.parent.iterdir()):
                stale.parent.rmdir()
    atomic_write_text(out_dir / REPORT_MANIFEST, json.dumps(written))
    shutil.rmtree(staging, ignore_errors=True)
    return out_dir / page

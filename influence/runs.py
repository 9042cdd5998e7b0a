"""Resumable runs: atomic writes, content fingerprints and a checksummed shard store.

A long run (ranking with several methods, dozens of verification retrains)
writes each finished piece of work as a *shard*: one file named by a hash of
everything that determines it (data, model, training settings, the trained
weights, the stage's own parameters). A manifest records each shard's
SHA-256. Rerunning the same command finds its shards and reuses them; a shard
whose bytes no longer match its checksum (a torn or edited file) is
recomputed. Every file is written to a temporary name and moved into place
with :func:`os.replace`, so a killed run leaves either the old file or the new
one, never half of one.

For tests, ``INFLUENCE_STOP_AFTER_SHARDS=N`` makes a store raise
:class:`RunInterrupted` right after it has written N shards, which
simulates a run killed in the middle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

STOP_AFTER_ENV = "INFLUENCE_STOP_AFTER_SHARDS"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class RunInterrupted(Exception):
    """Raised when a run stops early on purpose (``INFLUENCE_STOP_AFTER_SHARDS``); the CLI treats it like Ctrl-C."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and :func:`os.replace`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _feed(h: Any, value: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` into the hash ``h``."""
    if isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        array = np.ascontiguousarray(np.asarray(value))
        if array.dtype == object:
            raise TypeError("fingerprint: object arrays have no stable byte encoding")
        h.update(f"array:{array.dtype.str}:{array.shape}:".encode())
        h.update(array.tobytes())
    elif isinstance(value, Mapping):
        h.update(f"dict:{len(value)}:".encode())
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"list:{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
        text = repr(value.item() if isinstance(value, np.generic) else value)
        h.update(f"{type(value).__name__}:{len(text)}:{text}".encode())
    else:
        raise TypeError(f"fingerprint: cannot hash a {type(value).__name__}")


def fingerprint(*parts: Any) -> str:
    """Hex SHA-256 of arrays, numbers, strings and nested lists/dicts of them (dtype and shape included)."""
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def model_fingerprint(model: Any) -> str:
    """Fingerprint of a Keras model: its architecture (JSON config) and all its weights.

    Layer and model names count by their order of appearance, not their text: Keras numbers
    default names per session (``dense``, ``dense_1``, …), so the same model built twice
    in one process would otherwise be two models, and a rerun would reuse none of its shards.
    """
    config = json.loads(model.to_json())
    names: dict[str, str] = {}
    _collect_names(config, names)
    return fingerprint(_renamed(config, names), [np.asarray(w) for w in model.get_weights()])


def _collect_names(node: Any, names: dict[str, str]) -> None:
    """Names of the model and of every layer in a Keras config, in order of appearance."""
    if isinstance(node, dict):
        inner = node.get("config")
        if "class_name" in node and isinstance(inner, dict) and isinstance(inner.get("name"), str):
            names.setdefault(inner["name"], f"<layer {len(names)}>")
        for value in node.values():
            _collect_names(value, names)
    elif isinstance(node, list):
        for value in node:
            _collect_names(value, names)


def _renamed(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _renamed(value, names) for key, value in node.items()}
    if isinstance(node, list):
        return [_renamed(value, names) for value in node]
    return names.get(node, node) if isinstance(node, str) else node


def _stop_after() -> int | None:
    value = os.environ.get(STOP_AFTER_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(
            f"The '{STOP_AFTER_ENV}' environment variable must be a non-negative int. Got {value!r} instead."
        )
    return int(value)


def log_to_stderr(message: str) -> None:
    """Default log: one line to stderr, flushed."""
    print(message, file=sys.stderr, flush=True)


class ShardStore:
    """Checksummed shards under one folder, with a JSON manifest.

    ``key`` names a shard from its stage and the parameters that determine
    it; :meth:`arrays` and :meth:`table` return the stored result when a
    valid shard exists and otherwise compute, save and return it. Counters
    ``reused``, ``computed`` and ``corrupted`` say what happened.
    """

    def __init__(
        self, directory: str | os.PathLike, *, log: Callable[[str], None] = log_to_stderr, run: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.run = run  # recorded with each shard saved: prune keeps every shard of this run
        self.log = log
        self.reused = 0
        self.computed = 0
        self.corrupted = 0
        self._stop_after = _stop_after()
        self._entries: dict[str, dict[str, Any]] = self._read_manifest()
        self._used: set[str] = set()  # shards this run asked for: what prune keeps

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.directory / MANIFEST
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text())
            entries = manifest["shards"] if manifest.get("version") == MANIFEST_VERSION else {}
        except (ValueError, KeyError, TypeError, AttributeError):
            self.log(f"warning: {path} is unreadable; its shards will be recomputed")
            return {}
        return dict(entries)

    def _write_manifest(self) -> None:
        manifest = {"version": MANIFEST_VERSION, "shards": self._entries}
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))

    @staticmethod
    def key(stage: str, **parts: Any) -> str:
        """Shard name: the stage and a hash of ``parts`` (the inputs and settings that determine the result)."""
        return f"{stage}-{fingerprint(parts)[:24]}"

    @property
    def entry_count(self) -> int:
        """Number of shards on record in the manifest."""
        return len(self._entries)

    def entry(self, key: str) -> dict[str, Any] | None:
        """Manifest entry of a shard (file, sha256, bytes, meta), or None."""
        return self._entries.get(key)

    def load(self, key: str) -> bytes | None:
        """The shard's bytes if it exists and its checksum matches; None otherwise (corruption is logged)."""
        entry = self._entries.get(key)
        self._used.add(key)
        if entry is None:
            return None
        path = self.directory / entry["file"]
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
            self.corrupted += 1
            self.log(f"warning: shard {entry['file']} is corrupted (checksum mismatch); recomputing it")
            return None
        return data

    def save(self, key: str, data: bytes, *, suffix: str, meta: Mapping[str, Any] | None = None) -> None:
        """Write a shard atomically, then record it in the manifest."""
        name = f"{key}{suffix}"
        atomic_write_bytes(self.directory / name, data)
        previous = self._entries.get(key, {}).get("file")
        if previous and previous != name:  # the same shard in an older format
            (self.directory / previous).unlink(missing_ok=True)
        self._used.add(key)
        self._entries[key] = {
            "file": name,
            "sha256": sha256(data),
            "bytes": len(data),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "meta": dict(meta or {}),
        }
        if self.run is not None:
            self._entries[key]["run"] = self.run
        self._write_manifest()
        self.computed += 1
        if self._stop_after is not None and self.computed >= self._stop_after:
            raise RunInterrupted(f"stopped after {self.computed} shard(s) ({STOP_AFTER_ENV})")

    def stored_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """Named arrays from a valid shard ``key`` (counted as reused), or None."""
        data = self.load(key)
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError):  # e.g. a shard of an older format
            self.log(f"warning: shard {self._entries[key]['file']} is unreadable; recomputing it")
            return None
        self.reused += 1
        return arrays

    def arrays(self, key: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Named arrays from shard ``key``, computed by ``compute()`` when missing or corrupted."""
        stored = self.stored_arrays(key)
        if stored is not None:
            return stored
        result = {name: np.asarray(value) for name, value in compute().items()}
        buffer = io.BytesIO()
        np.savez(buffer, **result)  # type: ignore[arg-type]
        self.save(key, buffer.getvalue(), suffix=".npz")
        return result

    def table(self, key: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """A DataFrame (and its JSON-able ``attrs``) from shard ``key``, computed when missing or corrupted.

        Stored as ``.npz`` (one array per column, no pickles), so it needs no Parquet engine.
        """
        stored = self.stored_arrays(key)
        if stored is not None and "__columns__" in stored:
            table = _frame_from_arrays(stored)
            table.attrs.update(self._entries[key]["meta"].get("attrs", {}))
            return table
        table = compute()
        buffer = io.BytesIO()
        np.savez(buffer, **_frame_to_arrays(table))  # type: ignore[arg-type]
        attrs = json.loads(json.dumps(table.attrs, default=_jsonable))
        self.save(key, buffer.getvalue(), suffix=".npz", meta={"attrs": attrs})
        return table

    def keep(self, key: str) -> None:
        """Count shard ``key`` as used by this run without reading it (:meth:`prune` keeps it)."""
        self._used.add(key)

    def prune(self, keep_folders: Iterable[str] = ()) -> int:
        """Delete the shards of other runs, and leftovers of killed writes; return how many shards went.

        Call it after a run completes. A shard stays when this run used it or when it was saved
        for the same ``run`` (the same data, model and training: another method's ranking or
        another verification, which a rerun with those options reuses); the shards of other
        training settings go, so the folder does not grow with every setting ever run in it.
        Besides manifest entries it removes only names this package writes: temporary files
        (``.*.tmp``) and saved runs (``trajectory-*``, ``.trajectory-*`` staging folders) not
        listed in ``keep_folders``.
        """
        stale = [
            key
            for key, entry in self._entries.items()
            if key not in self._used and (self.run is None or entry.get("run") != self.run)
        ]
        for key in stale:
            (self.directory / self._entries.pop(key)["file"]).unlink(missing_ok=True)
        if stale:
            self._write_manifest()
        self._remove_own_leftovers(set(keep_folders))
        return len(stale)

    def clear(self) -> int:
        """Delete every shard on record, the manifest and this package's leftovers and saved runs
        (``--restart``); return how many shards went. Files this package did not write stay."""
        for entry in self._entries.values():
            (self.directory / entry["file"]).unlink(missing_ok=True)
        count = len(self._entries)
        self._entries.clear()
        (self.directory / MANIFEST).unlink(missing_ok=True)
        self._remove_own_leftovers(set())
        return count

    def _remove_own_leftovers(self, kept: set[str]) -> None:
        """Temporary files (``.*.tmp``) and saved runs (``trajectory-*``, ``.trajectory-*``) not in ``kept``."""
        for path in self.directory.iterdir() if self.directory.is_dir() else ():
            name = path.name
            leftover = name.startswith(".") and (name.endswith(".tmp") or name.startswith(".trajectory-"))
            if leftover or (name.startswith("trajectory-") and name not in kept):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def summary(self) -> str:
        """One line: how many shards were reused, computed and found corrupted."""
        text = f"{self.reused} reused, {self.computed} computed"
        return text + (f", {self.corrupted} corrupted and recomputed" if self.corrupted else "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _frame_to_arrays(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Columns as plain arrays; a column of equally shaped arrays (e.g. one-hot labels) is stacked."""
    arrays: dict[str, np.ndarray] = {"__columns__": np.array([str(c) for c in frame.columns])}
    stacked = []
    for i, column in enumerate(frame.columns):
        values = frame[column].to_numpy()
        if values.dtype == object and len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
            values = np.stack([np.asarray(v) for v in values])
            stacked.append(i)
        elif values.dtype == object:  # text (object or pandas' string dtype)
            values = values.astype(str)
        arrays[f"c{i}"] = values
    arrays["__stacked__"] = np.array(stacked, dtype=np.int64)
    return arrays


def _frame_from_arrays(arrays: Mapping[str, np.ndarray]) -> pd.DataFrame:
    stacked = set(arrays["__stacked__"].tolist())
    columns = {
        str(name): list(arrays[f"c{i}"]) if i in stacked else arrays[f"c{i}"]
        for i, name in enumerate(arrays["__columns__"])
    }
    return pd.DataFrame(columns)

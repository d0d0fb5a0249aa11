"""What a run's compiled programs cost, kept beside JAX's disk cache for later processes.

With the programs on disk (`programs.use_disk_cache`), what a later process
measures for a program it loads is tracing, lowering and reading it back
(about 0.1 s on a CPU), not compiling it (0.2-1.6 s). Taken as the compile
cost, that made the chooser (`Programs.choose`) buy every exact shape at
once, and those the first process had rented, never compiled, it then
compiled for real. JAX keeps each program's compile time on disk only in
whole seconds (0 for these). So each kind of Scorer (`label`) keeps a small
JSON file in the cache directory: the mean real compile seconds per program
kind, and the shapes known to be on disk. A later process then buys a shape
on disk at the cost of loading it and rents one that is not as the first
process did. The file is a hint: a wrong or lost one costs time, never a
decision (which program computes a score changes only float rounding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import jax

_KEEP = 50  # measurements a kind's mean stands for, so that it follows a changed machine


def label(*parts) -> str:
    """A name, stable across processes, for the programs of one kind of
    Scorer: from `parts` (their reprs, object addresses left out), the
    backend, its device kind and the JAX version."""
    device = jax.devices()[0]
    text = repr((parts, jax.default_backend(), getattr(device, "device_kind", ""), jax.__version__))
    return hashlib.sha256(re.sub(r" at 0x[0-9a-fA-F]+", "", text).encode()).hexdigest()[:20]


def _directory() -> Optional[Path]:
    """JAX's disk cache directory, where it is on in this process."""
    where = getattr(jax.config, "jax_compilation_cache_dir", None)
    return Path(where) if where and getattr(jax.config, "jax_enable_compilation_cache", True) else None


def _row(shape) -> list:
    return [getattr(shape, f.name) if f.name != "reach" or shape.reach is None else list(shape.reach)
            for f in dataclasses.fields(shape)]


def _well_formed(data) -> bool:
    if not isinstance(data, dict):
        return False
    seconds, rows = data.get("compile_seconds", {}), data.get("on_disk", [])
    return (isinstance(seconds, dict) and isinstance(rows, list) and all(isinstance(r, list) for r in rows)
            and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[1] >= 0
                    for v in seconds.values()))


class DiskRecord:
    """The record of one label's programs in the disk cache directory (none while the cache is off)."""

    def __init__(self, name: str):
        self.name = name
        self._read_from: Optional[Path] = None
        self._data: dict = {}

    def _path(self) -> Optional[Path]:
        where = _directory()
        return None if where is None else where / f"acdc-jax-programs-{self.name}.json"

    def _load(self) -> dict:
        path = self._path()
        if path != self._read_from:
            self._read_from, self._data = path, (self._read(path) if path is not None else {})
        return self._data

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable (a hint only: start afresh)
        return data if _well_formed(data) else {}

    def on_disk(self, shape) -> bool:
        return _row(shape) in self._load().get("on_disk", [])

    def on_disk_from(self, kinds: tuple, start_layer: int) -> bool:
        """Whether a program of one of `kinds` from `start_layer` is on disk."""
        return any(row[:2] == [kind, start_layer] for row in self._load().get("on_disk", []) for kind in kinds)

    def compile_seconds(self, kind: Optional[str] = None) -> Optional[float]:
        """The mean real compile seconds of a program of `kind` (None: of any kind), or None if none was recorded."""
        seen = self._load().get("compile_seconds", {})
        rows = [seen[kind]] if kind is not None and kind in seen else [] if kind is not None else list(seen.values())
        n = sum(r[1] for r in rows)
        return sum(r[0] * r[1] for r in rows) / n if n else None

    def note(self, shape, compiled: Optional[float], on_disk: bool) -> None:
        """Add what a program of `shape` cost (`compiled`: its real compile
        seconds; None where it was loaded) and whether it is now on disk,
        merged into the file as it is now (other processes may write it too)."""
        path = self._path()
        if path is None:
            return
        data = self._read(path)
        if compiled is not None:
            seen = data.setdefault("compile_seconds", {})
            mean, n = seen.get(shape.kind, (0.0, 0))
            seen[shape.kind] = [(mean * n + compiled) / (n + 1), min(n + 1, _KEEP)]
        rows = data.setdefault("on_disk", [])
        if on_disk and _row(shape) not in rows:
            rows.append(_row(shape))
        temp = None
        try:
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(temp, path)  # whole or not at all, for a reader in another process
        except OSError:  # a read-only or full disk: later processes estimate as before
            if temp is not None and os.path.exists(temp):
                os.unlink(temp)
            return
        self._read_from, self._data = path, data

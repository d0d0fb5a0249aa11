"""The decision log of a long run (JSON lines), and resuming from it.

The first line is a header with the run's settings and the full model's
metric; every later line is one Decision, appended (and flushed) as soon as it
is made. Resuming checks that the settings match, replays the logged decisions
against the schedule (so a log from a different run is refused), and continues
with the metric values the log recorded, which gives the same result as a run
that was never interrupted. A process writing a log holds a lock on it, so a
second run into the same log is refused instead of interleaving its lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .circuit import Decision, dumps, finite_json

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so two runs into one log are not caught there
    fcntl = None


def locked(path: Path, mode: str, busy: Optional[str] = None):
    """`path` opened with `mode` and locked for as long as it stays open (the
    lock goes with the process, so a crashed run leaves none); `busy` is the
    error where another process holds it."""
    f = open(path, mode, errors="replace")  # bytes that are not text fail the header and line checks
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ValueError(busy or f"Another process is writing the decision log {path}: the same run started "
                             "twice, or a second run into the same --out (log_path). Let that one finish, or give "
                             "this run another --out.") from None
    return f


@contextlib.contextmanager
def closed_on_error(thing):
    """Close `thing` (a file, or a RunLog: unlocking its log) if the block raises."""
    try:
        yield thing
    except BaseException:
        thing.close()
        raise


def model_fingerprint(model) -> str:
    """A short hash of every weight, to refuse resuming with another model."""
    import equinox as eqx
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def task_fingerprint(task) -> str:
    """A short hash of the prompts and of what the metrics read (answers,
    weights, positions), to refuse resuming with other prompts: a log's
    decisions hold only for the prompts that made them. Not the reference
    logits, which the model fingerprint covers and rounding may move."""
    h = hashlib.sha256()
    arrays = {"clean": task.clean, "corrupted": task.corrupted, "positions": task.positions, "weights": task.weights,
              "corrupt_positions": task.corrupt_positions, **{f"labels.{k}": v for k, v in task.labels.items()}}
    for name in sorted(arrays):
        if arrays[name] is not None:
            a = np.ascontiguousarray(np.asarray(arrays[name]))
            h.update(f"{name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def differing(saved: dict, now: dict) -> dict:
    """The settings of `now` that `saved` (read back from JSON) records
    otherwise: name -> (saved, now)."""
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != finite_json(v)}


class RunLog:
    def __init__(self, path: Optional[Path], settings: dict, initial_metric: float, logged: list[Decision],
                 file=None):
        self.path = path
        self.settings = settings
        self.initial_metric = initial_metric
        self.logged = logged
        self._file = file  # open and locked, at its end; None: nothing is written

    @classmethod
    def open(cls, path, settings: dict, initial_metric: float, resume: bool, write: bool = True) -> "RunLog":
        """`write=False` (the other processes of a multi-host run) reads a log but never writes one."""
        if path is None or (not write and not resume):
            return cls(None, settings, initial_metric, [])
        path = Path(path)
        if not resume:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = locked(path, "a+")  # emptied only once locked
            f.truncate(0)
            header = {"type": "header", "version": 1, "settings": settings, "initial_metric": initial_metric}
            f.write(dumps(header) + "\n")
            f.flush()
            return cls(path, settings, initial_metric, [], f)
        if not path.is_file():
            raise FileNotFoundError(f"No decision log to resume from at {path}.")
        f = locked(path, "r+") if write else open(path, errors="replace")
        with closed_on_error(f):
            log = cls._read(f, path, settings, write)
        if not write:
            f.close()
        return log

    @classmethod
    def _read(cls, f, path: Path, settings: dict, write: bool) -> "RunLog":
        lines = f.read().splitlines()
        if not lines:
            raise ValueError(f"The decision log {path} is empty.")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not (isinstance(header, dict) and header.get("type") == "header"
                and isinstance(header.get("settings"), dict) and "initial_metric" in header):
            raise ValueError(f"{path} does not start with an acdc-jax log header: resume from the decision log "
                             "an acdc run wrote (its log= or the CLI's log.jsonl), or start again without resume.")
        differ = differing(header["settings"], settings)
        if differ:
            hint = (" 'prompts' fingerprints the clean and corrupted tokens and what the metric reads: were these "
                    "prompts made with another seed or count?" if "prompts" in differ else "")
            raise ValueError(f"Cannot resume from {path}: the settings differ (logged, now): {differ}. Resume with "
                             f"the logged run's model, prompts and settings, or start a new log.{hint}")
        logged, good = [], 1
        for line in lines[1:]:
            try:
                logged.append(Decision.from_json(json.loads(line)))
                good += 1
            except (KeyError, TypeError, ValueError):  # JSONDecodeError is a ValueError
                break  # a line cut off by the interruption (or garbled): it and the rest are decided again
        if write:
            f.seek(0)
            f.truncate()
            f.write("\n".join(lines[:good]) + "\n")
            f.flush()
        return cls(path, settings, header["initial_metric"], logged, f if write else None)

    def replay(self, schedule, state) -> None:
        """Re-apply the logged decisions to `state`, checking each against the schedule."""
        state.metric = self.initial_metric
        events, pos = [], 0
        for i, d in enumerate(self.logged):
            if pos == len(events):
                events, pos = schedule.simulate(state.mask, state.cursor, 1), 0
            ev = events[pos]
            if ev.edge != d.index or (ev.kind == "trial") != d.tried:
                raise ValueError(
                    f"Decision {i} of the log ({d.edge}, tried={d.tried}) is not what the schedule does next "
                    f"({schedule.graph.edge_names[ev.edge]}, {ev.kind}); the log belongs to another run."
                )
            state.apply(d, ev.cursor)
            pos = len(events) if (d.tried and d.kept) else pos + 1
        # Finish a group of prunes the interruption split (they share a cursor).
        rest = [ev for ev in events[pos:] if ev.kind == "prune" and ev.cursor == state.cursor]
        if rest and pos > 0 and events[pos - 1].kind == "prune":
            done = [Decision(schedule.graph.edge_names[ev.edge], ev.edge, tried=False, kept=False) for ev in rest]
            for ev, d in zip(rest, done):
                state.apply(d, ev.cursor)
            self.write(done)

    def write(self, decisions: list[Decision]) -> None:
        if self._file is None or not decisions:
            return
        self._file.write("".join(dumps(d.to_json()) + "\n" for d in decisions))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

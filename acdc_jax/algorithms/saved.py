"""The saved progress of the long methods (edge pruning, subnetwork
probing, exact patching, EAP-IG): numpy arrays and the run's settings in one .npz,
read back without unpickling anything."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..circuit import dumps
from ..runlog import differing, locked, model_fingerprint, task_fingerprint


def run_settings(model, task, settings: dict, method: str, **more) -> dict:
    """What a saved state must share with the run resuming it: the method and
    its settings, and the fingerprints of the model and of the prompts."""
    keep = {k: settings[k] for k in ("task", "metric", "corruption", "n_prompts", "n_pos", "graph", "precision")}
    return {"method": method, "model": model_fingerprint(model), "prompts": task_fingerprint(task), **keep, **more}


def state_path(checkpoint, resume) -> Optional[Path]:
    """Where a run saves its progress: `checkpoint`, else the state it resumed
    from; None where nothing is saved, and on every process but the first."""
    import jax

    path = checkpoint or resume
    return Path(path) if path is not None and jax.process_index() == 0 else None


def lock_state(path: Optional[Path], what: str) -> contextlib.ExitStack:
    """A lock on the state at `path` for this run (nothing where nothing is
    saved); close it when the run ends. It is a file beside the state (each
    save replaces the state's file), left in place. A second run saving into
    the same state meanwhile (the same run started twice, or two runs
    resuming one state) is refused, rather than doing the work twice."""
    lock = contextlib.ExitStack()
    if path is not None:
        lock.enter_context(locked(path.with_name(path.name + ".lock"), "a", f"Another process is saving its {what} "
                                  f"to {path}: the same run started twice, or two runs resuming one state. Let that "
                                  "one finish (then resume from its state), or give this run another checkpoint."))
    return lock


def save_state(path: Path, settings: dict, step: int, arrays: dict, history: list) -> None:
    """The state after `step`, written whole or not at all (a crash while
    writing leaves the previous state)."""
    state = {f"array.{k}": _plain(v) for k, v in arrays.items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, settings=np.array(dumps(settings, sort_keys=True)), step=np.array(step),
                 history=np.array(dumps(history)), **state)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path, settings: dict, what: str) -> tuple[int, dict, list]:
    """(the last step done, the arrays, the history) of a saved `what` made
    with these settings; anything else is refused by name."""
    if not path.is_file():
        raise FileNotFoundError(f"No {what} to resume from at {path}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            saved, step, history = json.loads(str(f["settings"])), int(f["step"]), json.loads(str(f["history"]))
            arrays = {k[len("array."):]: f[k] for k in f.files if k.startswith("array.")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a {what} that acdc-jax wrote, or it was cut short "
                         f"({type(e).__name__}: {e}); start again without resume.") from e
    differ = differing(saved, settings)
    if differ:
        raise ValueError(f"Cannot resume from {path}: the settings differ (saved, now): {differ}. Resume with the "
                         "saved run's model, prompts and settings, or start again without resume.")
    return step, arrays, history


def _plain(array) -> np.ndarray:
    """bfloat16 (a type numpy files cannot name) as float32, exactly."""
    a = np.asarray(array)
    return a.astype(np.float32) if a.dtype.kind not in "fiub" else a

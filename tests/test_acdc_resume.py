"""ACDC's decision log: a run killed midway (also inside a group of pruned
edges) or stopped early resumes to the circuit of a run never stopped, and a
log of another run (other settings, other prompts, decisions out of order)
is refused."""

import dataclasses
import json
import re

import numpy as np
import pytest

from acdc_jax.acdc import acdc

from .test_acdc import _decisions


def test_resume_after_interruption_gives_the_same_circuit(small_gpt2, tmp_path):
    model, task = small_gpt2
    whole = acdc(model, task, 0.004, progress=False, max_width=4)

    class Stop(Exception):
        pass

    seen = []

    def stop_midway(decision):
        seen.append(decision)
        if len(seen) == 40:
            raise Stop

    log = tmp_path / "decisions.jsonl"
    with pytest.raises(Stop):
        acdc(model, task, 0.004, progress=False, max_width=4, log_path=log, callback=stop_midway)
    lines = log.read_text().splitlines()
    assert 1 + 40 <= len(lines) < 1 + len(whole.decisions)
    log.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])  # a line cut by the crash
    resumed = acdc(model, task, 0.004, progress=False, max_width=4, resume=log, mode="sequential")
    assert _decisions(resumed) == _decisions(whole)
    assert np.array_equal(resumed.mask, whole.mask)
    garbled = {**json.loads(lines[-1]), "index": None}  # valid JSON, wrong type: decided again, not a TypeError
    log.write_text("\n".join([*lines[:-1], json.dumps(garbled)]) + "\n")
    resumed = acdc(model, task, 0.004, progress=False, max_width=4, resume=log, mode="sequential")
    assert _decisions(resumed) == _decisions(whole)
    assert len(log.read_text().splitlines()) == 1 + len(whole.decisions)
    assert all(json.loads(x)["edge"] for x in log.read_text().splitlines()[1:])
    with pytest.raises(ValueError, match="settings differ"):
        acdc(model, task, 0.5, progress=False, resume=log)
    swapped = dataclasses.replace(task, clean=task.corrupted, corrupted=task.clean)  # other prompts, same settings
    with pytest.raises(ValueError, match="settings differ.*'prompts'.*another seed or count"):
        acdc(model, swapped, 0.004, progress=False, max_width=4, resume=log)


def test_resume_from_a_log_cut_inside_a_group_of_prunes(small_gpt2, tmp_path):
    """A receiver found unreachable has its remaining edges removed untried,
    as one group written together; a crash can cut that group. Resuming
    finishes the group and then the run, as an uninterrupted run does."""
    model, task = small_gpt2
    log = tmp_path / "decisions.jsonl"
    whole = acdc(model, task, 0.004, progress=False, max_width=4, log_path=log)
    untried = [not d.tried for d in whole.decisions]
    cut = next((i + 1 for i in range(len(untried) - 1) if untried[i] and untried[i + 1]), None)
    assert cut is not None, "this run has no two prunes in a row to cut between"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1 + cut]) + "\n")
    resumed = acdc(model, task, 0.004, progress=False, max_width=4, resume=log)
    assert _decisions(resumed) == _decisions(whole)
    assert np.array_equal(resumed.mask, whole.mask)
    assert log.read_text().splitlines() == lines


def test_resume_needs_a_log_of_this_run(small_gpt2, tmp_path):
    model, task = small_gpt2
    with pytest.raises(FileNotFoundError, match="No decision log to resume from"):
        acdc(model, task, 0.05, progress=False, resume=tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        acdc(model, task, 0.05, progress=False, resume=tmp_path / "empty.jsonl")
    (tmp_path / "other.jsonl").write_text(json.dumps({"edge": "x"}) + "\n")
    with pytest.raises(ValueError, match="does not start with an acdc-jax log header"):
        acdc(model, task, 0.05, progress=False, resume=tmp_path / "other.jsonl")
    for name, first in [("binary.jsonl", b"\xff\xfe\x00 not json"), ("list.jsonl", b"[1, 2]"),
                        ("bare.jsonl", json.dumps({"type": "header", "settings": 1}).encode())]:
        (tmp_path / name).write_bytes(first + b"\n")
        with pytest.raises(ValueError, match="does not start with an acdc-jax log header"):
            acdc(model, task, 0.05, progress=False, resume=tmp_path / name)


def test_resume_refuses_a_log_whose_decisions_are_out_of_order(small_gpt2, tmp_path):
    """A log with this run's settings whose decisions are not the ones the
    schedule makes next (two lines swapped, as an edited or merged log) is
    refused, not replayed into another circuit."""
    model, task = small_gpt2
    log = tmp_path / "decisions.jsonl"
    acdc(model, task, 0.004, progress=False, max_width=4, log_path=log)
    lines = log.read_text().splitlines()
    first, second = (re.escape(json.loads(line)["edge"]) for line in lines[1:3])
    log.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=rf"Decision 0 of the log \({second}.*is not what the schedule does next "
                                         rf"\({first}.*belongs to another run"):
        acdc(model, task, 0.004, progress=False, max_width=4, resume=log)
    log.write_text("\n".join(lines) + "\n")  # the refused resume let go of the log: the next one may write it
    resumed = acdc(model, task, 0.004, progress=False, max_width=4, resume=log)
    assert len(resumed.decisions) == len(lines) - 1


def test_a_second_run_into_a_log_being_written_is_refused(small_gpt2, tmp_path):
    """Two runs appending to one decision log (a job started twice into the
    same --out) would interleave their lines; the run writing it holds a lock,
    so the second is refused, whether it starts afresh or resumes."""
    pytest.importorskip("fcntl")
    model, task = small_gpt2
    log = tmp_path / "decisions.jsonl"
    refused = []

    def second_run(decision):
        if not refused:
            for kw in (dict(log_path=log), dict(resume=log)):
                with pytest.raises(ValueError, match=rf"Another process is writing the decision log {re.escape(str(log))}"):
                    acdc(model, task, 0.004, progress=False, **kw)
                refused.append(kw)

    first = acdc(model, task, 0.004, progress=False, max_width=4, log_path=log, callback=second_run)
    assert len(refused) == 2
    assert [json.loads(line)["edge"] for line in log.read_text().splitlines()[1:]] == [d.edge for d in first.decisions]


def test_stop_after_then_resume(small_gpt2, tmp_path):
    model, task = small_gpt2
    whole = acdc(model, task, 0.004, progress=False, max_width=4)
    assert whole.settings["finished"] and whole.settings["flops"] > 0
    log = tmp_path / "decisions.jsonl"
    part = acdc(model, task, 0.004, progress=False, max_width=4, log_path=log, stop_after=0.0)
    assert not part.settings["finished"]
    assert 0 < len(part.decisions) < len(whole.decisions)
    assert _decisions(part) == _decisions(whole)[: len(part.decisions)]
    resumed = acdc(model, task, 0.004, progress=False, max_width=4, resume=log)
    assert resumed.settings["finished"] and _decisions(resumed) == _decisions(whole)


def test_a_large_run_without_a_log_warns(monkeypatch, tmp_path):
    """A Python run over many edges without `log_path` warns that a crash
    would lose its decisions; with a log, or over few edges, it does not."""
    import importlib
    import warnings

    from acdc_jax.tasks import get

    acdc_module = importlib.import_module("acdc_jax.acdc")  # the package's `acdc` is the function
    model, task = get("induction")
    monkeypatch.setattr(acdc_module, "UNLOGGED_EDGES", 50)  # induction has 105 edges
    with pytest.warns(UserWarning, match="over 105 edges keeps no decision log.*pass log_path="):
        acdc(model, task, 0.1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acdc(model, task, 0.1, progress=False, log_path=tmp_path / "log.jsonl")
        monkeypatch.setattr(acdc_module, "UNLOGGED_EDGES", 105)
        acdc(model, task, 0.1, progress=False)

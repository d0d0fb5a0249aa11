"""The long methods save their progress as they go: edge pruning and
subnetwork probing their training state, exact patching its scores so far,
EAP-IG its sum of gradients. A run stopped or crashed and resumed ends with
the gates, history, scores and circuit of a run never stopped, and a state
from another run is refused by name."""

import dataclasses
import os

import numpy as np
import pytest

from acdc_jax.algorithms import attribution, eap_ig, edge_pruning, exact_patching, saved, subnetwork_probing
from acdc_jax.evaluate import roc_from_scores

from .test_algorithms import CFG, _mean_logit, _model, _task

METHODS = {"edge_pruning": (edge_pruning, 0.7), "subnetwork_probing": (subnetwork_probing, 0.5)}
STEPS = 10  # a history row, and so a saved state, after every step: steps // 20 < 1


@pytest.fixture(scope="module")
def random_run():
    return _model(CFG), _task(CFG, _mean_logit)


def _train(name, model, task, **kw):
    method, sparsity = METHODS[name]
    return method(model, task, steps=STEPS, sparsity=sparsity, progress=False, **kw)


def _crash_at_move(monkeypatch, n: int) -> None:
    """The process dies (KeyboardInterrupt) at the n-th move of a written state into place (and every later one:
    a dead process saves nothing more)."""
    moves = []

    def replace(src, dst):
        moves.append(dst)
        if len(moves) >= n:
            raise KeyboardInterrupt
        os.rename(src, dst)

    monkeypatch.setattr(saved.os, "replace", replace)


def _interrupt_at_update(monkeypatch, n: int) -> None:
    """Ctrl-C at the n-th step the progress bar counts: after that step's result is stored, before any save
    the run makes at it."""
    import importlib

    acdc = importlib.import_module("acdc_jax.acdc")  # the module, which the package's acdc function hides
    make = acdc.progress_bar

    def progress_bar(*args, **kw):
        bar, updates = make(*args, **kw), []
        update = bar.update

        def interrupting(k=1):
            updates.append(k)
            if len(updates) == n:
                raise KeyboardInterrupt
            return update(k)

        bar.update = interrupting
        return bar

    monkeypatch.setattr(acdc, "progress_bar", progress_bar)


def _same(a, b):
    assert np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.mask, b.mask)
    assert a.settings["history"] == b.settings["history"]
    assert a.settings["finished"] and a.settings["steps_done"] == STEPS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_stopped_run_resumes_to_the_gates_of_a_run_never_stopped(random_run, tmp_path, name):
    model, task = random_run
    whole = _train(name, model, task)
    state = tmp_path / "training.npz"
    first = _train(name, model, task, checkpoint=state, stop_after=0)  # stops after its first step
    assert not first.settings["finished"] and first.settings["steps_done"] == 1
    second = _train(name, model, task, resume=state, stop_after=0)
    assert second.settings["steps_done"] == 2
    _same(_train(name, model, task, resume=state), whole)


def test_a_crash_while_saving_leaves_the_last_state_whole(random_run, tmp_path, monkeypatch):
    """The state is written to a side file and moved over the last one; a
    crash at the move keeps the previous state, and resuming from it (a state
    some steps behind the crash) still gives the unstopped run's gates."""
    model, task = random_run
    whole = _train("edge_pruning", model, task)
    state = tmp_path / "training.npz"
    _crash_at_move(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        _train("edge_pruning", model, task, checkpoint=state)
    monkeypatch.undo()
    with np.load(state) as written:
        assert int(written["step"]) == 2  # the third state saved; the fourth never replaced it
    _same(_train("edge_pruning", model, task, resume=state), whole)


def test_an_interrupted_training_keeps_the_steps_since_its_last_row(random_run, tmp_path, monkeypatch):
    """With 60 steps a history row, and a saved state, comes every 3rd step. Ctrl-C after step 4 saves steps 3-4
    on the way out, and the resumed run ends with the gates and history of a run never stopped."""
    model, task = random_run
    whole = edge_pruning(model, task, steps=60, sparsity=0.7, progress=False)
    state = tmp_path / "training.npz"
    _interrupt_at_update(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        edge_pruning(model, task, steps=60, sparsity=0.7, progress=False, checkpoint=state)
    monkeypatch.undo()
    with np.load(state) as written:
        assert int(written["step"]) == 4
    resumed = edge_pruning(model, task, steps=60, sparsity=0.7, progress=False, resume=state)
    assert np.array_equal(resumed.scores, whole.scores) and np.array_equal(resumed.mask, whole.mask)
    assert resumed.settings["history"] == whole.settings["history"] and resumed.settings["finished"]


def test_a_state_from_another_run_is_refused_by_name(random_run, tmp_path):
    model, task = random_run
    state = tmp_path / "training.npz"
    _train("edge_pruning", model, task, checkpoint=state, stop_after=0)
    with pytest.raises(ValueError, match=r"settings differ .*'seed': \(0, 1\)"):
        _train("edge_pruning", model, task, resume=state, seed=1)
    swapped = dataclasses.replace(task, clean=task.corrupted, corrupted=task.clean)
    with pytest.raises(ValueError, match="settings differ .*'prompts'"):
        _train("edge_pruning", model, swapped, resume=state)
    with pytest.raises(ValueError, match="settings differ .*'method'"):
        _train("subnetwork_probing", model, task, resume=state)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a training state that acdc-jax wrote, or it was cut short"):
        _train("edge_pruning", model, task, resume=cut)
    with pytest.raises(FileNotFoundError, match="No training state to resume from"):
        _train("edge_pruning", model, task, resume=tmp_path / "none.npz")


def test_exact_patching_stopped_or_crashed_resumes_to_the_same_scores(random_run, tmp_path, monkeypatch):
    model, task = random_run
    whole = exact_patching(model, task, progress=False, max_width=4)
    state = tmp_path / "patching.npz"
    first = exact_patching(model, task, progress=False, max_width=4, checkpoint=state, stop_after=0)
    assert not first.settings["finished"] and first.settings["edges_done"] == 4  # one pass of 4
    assert np.isnan(first.scores).sum() == first.graph.n_edges - 4 and first.n_edges == first.graph.n_edges
    resumed = exact_patching(model, task, progress=False, resume=state)  # the saved widths, not the planned ones
    assert np.array_equal(resumed.scores, whole.scores) and resumed.settings["finished"]

    monkeypatch.setattr(attribution, "SAVE_EVERY", 0.0)  # a state after every pass, and a crash at the third
    _crash_at_move(monkeypatch, 3)
    crashed = tmp_path / "crashed.npz"
    with pytest.raises(KeyboardInterrupt):
        exact_patching(model, task, progress=False, max_width=4, checkpoint=crashed)
    monkeypatch.undo()
    with np.load(crashed) as written:
        assert int(written["step"]) == 8  # two passes of 4 edges saved
    assert np.array_equal(exact_patching(model, task, progress=False, resume=crashed).scores, whole.scores)
    with pytest.raises(ValueError, match="settings differ .*'method'"):
        _train("edge_pruning", model, task, resume=crashed)

    passes, score_pass = [], attribution.score_pass

    def interrupted(*args):  # Ctrl-C at the third pass, long before the first 30-s save
        passes.append(args)
        if len(passes) == 3:
            raise KeyboardInterrupt
        return score_pass(*args)

    monkeypatch.setattr(attribution, "score_pass", interrupted)
    stopped = tmp_path / "interrupted.npz"
    with pytest.raises(KeyboardInterrupt):
        exact_patching(model, task, progress=False, max_width=4, checkpoint=stopped)
    monkeypatch.undo()
    with np.load(stopped) as written:
        assert int(written["step"]) == 8  # the two passes done were saved on the way out
    assert np.array_equal(exact_patching(model, task, progress=False, resume=stopped).scores, whole.scores)


def test_eap_ig_stopped_or_interrupted_resumes_to_the_same_scores(random_run, tmp_path, monkeypatch):
    model, task = random_run
    whole = eap_ig(model, task, steps=5, progress=False)
    state = tmp_path / "eap_ig.npz"
    first = eap_ig(model, task, steps=5, progress=False, checkpoint=state, stop_after=0)
    assert not first.settings["finished"] and first.settings["steps_done"] == 1
    assert np.isnan(first.scores).all() and first.n_edges == first.graph.n_edges  # no scores before the end
    with pytest.raises(ValueError, match="stopped before its scores were complete"):
        roc_from_scores(first, first.edges[:3])
    assert np.array_equal(eap_ig(model, task, steps=5, progress=False, resume=state).scores, whole.scores)
    with pytest.raises(ValueError, match=r"settings differ .*'steps': \(5, 6\)"):
        eap_ig(model, task, steps=6, progress=False, resume=state)

    interrupted = tmp_path / "interrupted.npz"  # Ctrl-C after the third step, long before the first 30-s save
    _interrupt_at_update(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        eap_ig(model, task, steps=5, progress=False, checkpoint=interrupted)
    monkeypatch.undo()
    with np.load(interrupted) as written:
        assert int(written["step"]) == 2  # the three steps summed were saved on the way out
    assert np.array_equal(eap_ig(model, task, steps=5, progress=False, resume=interrupted).scores, whole.scores)


@pytest.mark.parametrize("name", ["eap_ig", "exact_patching", "edge_pruning"])
def test_a_second_run_saving_the_same_state_is_refused_while_the_first_runs(random_run, tmp_path, name):
    """Each save replaces the state's file, so the run holds a lock file
    beside it; another run saving or resuming that state meanwhile (here:
    the lock held as a running one holds it) is refused, and once it is
    released, and after a finished run, the state can be used again."""
    model, task = random_run
    run = {"eap_ig": lambda **kw: eap_ig(model, task, steps=2, progress=False, **kw),
           "exact_patching": lambda **kw: exact_patching(model, task, progress=False, max_width=4, **kw),
           "edge_pruning": lambda **kw: edge_pruning(model, task, steps=4, sparsity=0.7, progress=False, **kw)}[name]
    state = tmp_path / "state.npz"
    run(checkpoint=state, stop_after=0)
    held = saved.lock_state(state, "state")
    try:
        for kw in ({"checkpoint": state}, {"resume": state}):
            with pytest.raises(ValueError, match="Another process is saving its .* to .*state.npz"):
                run(**kw)
    finally:
        held.close()
    assert os.path.exists(str(state) + ".lock")
    resumed = run(resume=state)  # the refused runs neither saved nor kept the lock
    again = run(resume=state)  # nor did the finished one
    np.testing.assert_array_equal(resumed.scores, again.scores)

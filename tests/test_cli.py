"""The acdc-jax command: roc, the other methods, resume, tasks, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from acdc_jax.circuit import Circuit
from acdc_jax.cli import main
from acdc_jax.config import TransformerConfig
from acdc_jax.graph import CircuitGraph
from acdc_jax.tasks import TASKS


def test_roc_command_recovers_tracr_reverse(tmp_path, capsys):
    """The paper's result through the command: ACDC under zero ablation finds
    the derived tracr-reverse circuit (edge and node AUC 1.0)."""
    pytest.importorskip("tracr")
    out = tmp_path / "roc"
    taus = ["1e-5", "1e-3", "0.1", "10"]
    assert main(["roc", "--task", "tracr-reverse", "--corruption", "zeros", "--taus", *taus, "--out", str(out),
                 "--no-progress"]) == 0
    saved = json.loads((out / "roc.json").read_text())
    assert saved["edge"]["auc"] == 1.0 and saved["node"]["auc"] == 1.0
    assert saved["taus"] == [float(t) for t in taus] and len(saved["edge"]["points"]) == len(taus)
    assert saved["corruption"] == "zeros" and saved["metric"] == "l2"
    assert (out / "roc.png").stat().st_size > 0
    table = capsys.readouterr().out.splitlines()
    assert len([line for line in table if line.split() and line.split()[0] in ("1e-05", "0.001", "0.1", "10")]) == 4


@pytest.mark.slow  # the quick suite runs --method eap --n-edges in test_ties_at_the_kth_score
def test_scoring_method_keeps_the_top_edges(tmp_path, capsys):
    """--method eap --n-edges K keeps the K edges of largest |score|, or of
    largest score with --rank signed."""
    out = tmp_path / "eap"
    assert main(["discover", "--task", "induction", "--method", "eap", "--metric", "nll", "--n-edges", "12",
                 "--examples", "8", "--out", str(out), "--no-progress", "--mesh", "1x1"]) == 0
    circuit = Circuit.load(out / "circuit.json")
    assert circuit.n_edges == 12 and circuit.settings["mesh"] == {"candidates": 1, "prompts": 1}
    order = np.argsort(-np.abs(circuit.scores), kind="stable")
    assert set(circuit.edges) == {circuit.graph.edge_names[i] for i in order[:12]}
    assert not (out / "decisions.jsonl").exists()
    assert "kept 12 of" in capsys.readouterr().out
    assert main(["discover", "--task", "induction", "--method", "eap", "--out", str(out)]) == 2
    assert "needs --n-edges K" in capsys.readouterr().err
    signed = tmp_path / "eap-signed"
    assert main(["discover", "--task", "induction", "--method", "eap", "--metric", "nll", "--n-edges", "12",
                 "--examples", "8", "--rank", "signed", "--out", str(signed), "--no-progress"]) == 0
    circuit = Circuit.load(signed / "circuit.json")
    order = np.argsort(-circuit.scores, kind="stable")
    assert circuit.settings["rank"] == "signed" and circuit.scores[order[11]] > circuit.scores[order[12]]
    assert set(circuit.edges) == {circuit.graph.edge_names[i] for i in order[:12]}


def test_ties_at_the_kth_score(tmp_path, capsys):
    """EAP on tracr-reverse scores most edges exactly 0 (97 of 106: tracr's
    weights give most edges no gradient), so --n-edges 20 ties: refused with
    the ways round it, which --ties takes."""
    args = ["discover", "--task", "tracr-reverse", "--method", "eap", "--metric", "logit", "--n-edges", "20",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "refuse")]) == 2
    assert "--ties more|fewer|index" in capsys.readouterr().err
    kept = {}
    for ties in ("more", "fewer", "index"):
        assert main([*args, "--ties", ties, "--out", str(tmp_path / ties)]) == 0
        kept[ties] = Circuit.load(tmp_path / ties)
    scores = np.abs(kept["more"].scores)
    kth = np.sort(scores)[::-1][19]
    assert kept["more"].n_edges == (scores >= kth).sum() > 20 > kept["fewer"].n_edges == (scores > kth).sum()
    assert kept["index"].n_edges == 20 and kept["index"].settings["ties"] == "index"
    assert set(kept["fewer"].edges) < set(kept["index"].edges) < set(kept["more"].edges)


@pytest.mark.slow  # the quick suite resumes through the CLI in test_an_interrupted_run_says_how_to_continue_and_does
def test_resume_after_a_cut_log_gives_the_same_circuit(tmp_path):
    """A run whose decision log lost its second half (a crash) resumes with
    --resume to the circuit of the uninterrupted run."""
    args = ["discover", "--task", "induction", "--tau", "0.01", "--examples", "10", "--no-progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(args + ["--out", str(whole)]) == 0
    lines = (whole / "decisions.jsonl").read_text().splitlines(keepends=True)
    cut.mkdir()
    (cut / "decisions.jsonl").write_text("".join(lines[: len(lines) // 2]))
    assert main(args + ["--out", str(cut), "--resume"]) == 0
    a, b = Circuit.load(whole / "circuit.json"), Circuit.load(cut / "circuit.json")
    assert a.edges == b.edges and 0 < a.n_edges < a.graph.n_edges
    assert [(d.edge, d.kept) for d in a.decisions] == [(d.edge, d.kept) for d in b.decisions]
    assert (cut / "decisions.jsonl").read_text().count("\n") == len(lines)


def test_an_interrupted_run_says_how_to_continue_and_does(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a run (here: while its third batch of decisions is
    logged) ends it with exit code 130 and a line naming --resume, not a
    traceback; --resume then finishes it to the uninterrupted run's circuit."""
    from acdc_jax.runlog import RunLog

    args = ["discover", "--task", "induction", "--tau", "0.01", "--examples", "10", "--no-progress"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(args + ["--out", str(whole)]) == 0
    write, calls = RunLog.write, []

    def interrupted(self, decisions):
        calls.append(len(decisions))
        if len(calls) == 3:
            raise KeyboardInterrupt
        write(self, decisions)

    monkeypatch.setattr(RunLog, "write", interrupted)
    assert main(args + ["--out", str(stopped)]) == 130
    assert "interrupted; the same command with --resume continues" in capsys.readouterr().err
    monkeypatch.setattr(RunLog, "write", write)
    logged = (stopped / "decisions.jsonl").read_text().count("\n") - 1
    assert logged == sum(calls[:2]) and not (stopped / "circuit.json").exists()
    assert main(args + ["--out", str(stopped), "--resume"]) == 0
    assert Circuit.load(stopped).edges == Circuit.load(whole).edges


@pytest.mark.parametrize("method, extra, state", [
    ("acdc_nodes", ["--tau", "0.5"], "decisions.jsonl"),
    ("exact_patching", ["--n-edges", "20", "--max-width", "4"], "patching.npz"),
])
def test_stop_after_then_resume_gives_the_whole_runs_circuit(tmp_path, capsys, method, extra, state):
    """--stop-after ends a run early with its progress saved (a job's time
    limit); the same command with --resume finishes it as one run would."""
    args = ["discover", "--task", "induction", "--method", method, *extra, "--examples", "8", "--no-progress"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args + ["--out", str(whole)]) == 0
    assert main(args + ["--out", str(parts), "--stop-after", "0"]) == 0
    assert "before the end; the same command with --resume continues" in capsys.readouterr().out
    assert not Circuit.load(parts).settings["finished"] and (parts / state).is_file()
    saved = (parts / state).read_bytes()
    assert main(args + ["--out", str(parts)]) == 2  # without --resume: the progress is kept, not overwritten
    assert f"{state} holds the progress of a run that did not finish" in capsys.readouterr().err
    assert (parts / state).read_bytes() == saved
    assert main(args + ["--out", str(whole)]) == 0  # a finished run's directory is simply run again
    assert main(args + ["--out", str(parts), "--resume"]) == 0
    a, b = Circuit.load(whole), Circuit.load(parts)
    assert a.edges == b.edges and b.settings["finished"] and 0 < a.n_edges < a.graph.n_edges
    assert np.array_equal(a.scores, b.scores, equal_nan=True)


def test_a_crashed_roc_sweep_resumes_from_its_saved_circuits(tmp_path, capsys):
    """roc saves each tau's circuit and decision log as it goes; after a crash
    in the second tau, --resume reads the first back and continues the second
    from its log, to the ROC of a sweep never stopped."""
    args = ["roc", "--task", "induction", "--taus", "0.01", "0.1", "--examples", "8", "--no-progress"]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert main(args + ["--out", str(whole)]) == 0
    assert main(args + ["--out", str(crashed)]) == 0
    first = (crashed / "tau-0.01" / "circuit.json").read_bytes()
    (crashed / "tau-0.1" / "circuit.json").unlink()  # the crash: tau 0.1 half decided
    log = crashed / "tau-0.1" / "decisions.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[: len(lines) // 2]))
    assert main(args + ["--out", str(crashed)]) == 2  # without --resume the half-made sweep is kept
    assert "tau-0.1/decisions.jsonl holds the progress of a run that did not finish" in capsys.readouterr().err
    assert main(args + ["--out", str(crashed), "--resume"]) == 0
    assert (crashed / "tau-0.01" / "circuit.json").read_bytes() == first  # read back, not found again
    a, b = (json.loads((d / "roc.json").read_text()) for d in (whole, crashed))
    assert a["edge"] == b["edge"] and a["node"] == b["node"] and a["n_edges"] == b["n_edges"]
    assert Circuit.load(crashed / "tau-0.1").edges == Circuit.load(whole / "tau-0.1").edges
    assert log.read_text().count("\n") == len(lines)
    capsys.readouterr()
    assert main(args[:-1] + ["--seed", "1", "--no-progress", "--out", str(crashed), "--resume"]) == 2
    assert "Cannot resume the sweep" in capsys.readouterr().err


def test_rescore_ties_reaches_the_run(tmp_path):
    """--rescore-ties on keeps the near-tie rescoring that TF32 turns off by default."""
    out = tmp_path / "tf32"
    assert main(["discover", "--task", "induction", "--tau", "0.01", "--examples", "10", "--no-progress",
                 "--precision", "tensorfloat32", "--rescore-ties", "on", "--out", str(out)]) == 0
    settings = Circuit.load(out / "circuit.json").settings
    assert settings["precision"] == "tensorfloat32" and settings["rescore_ties"] is True
    assert settings["checked_programs"] >= 1  # the band was measured, as in full float32


def test_a_task_whose_corruption_changes_nothing_is_warned_of_in_one_line(tmp_path):
    """The command prints the library's warnings as plain "warning:" lines
    (not file paths and line numbers): here, corrupted prompts equal to the
    clean ones, which give an empty circuit."""
    from acdc_jax.tasks.induction import DATA

    task = tmp_path / "same.json"
    task.write_text(json.dumps({"clean": [[1, 2, 3, 4], [5, 6, 7, 8]], "corrupted": [[1, 2, 3, 4], [5, 6, 7, 8]]}))
    done = subprocess.run([sys.executable, "-m", "acdc_jax.cli", "discover", "--task", str(task), "--checkpoint",
                           str(DATA), "--tau", "0.01", "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\nwarning: Cutting every edge at once changes the metric 'kl'" in "\n" + done.stderr
    assert "UserWarning" not in done.stderr and "kept 0 of" in done.stdout


def test_version_on_the_command_line_and_in_circuit_files(tmp_path, capsys):
    """--version, and the versions that made a circuit recorded in its file,
    as installed (importlib.metadata) and as JAX reports them."""
    from importlib.metadata import version

    import jax

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"acdc-jax {version('acdc-jax')}"
    graph = CircuitGraph(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=None, d_vocab=5, n_ctx=4))
    saved = json.loads(Circuit(graph, np.ones(graph.n_edges, np.float32)).save(tmp_path / "c.json").read_text())
    assert saved["made_with"] == {"acdc_jax": version("acdc-jax"), "jax": jax.__version__,
                                  "backend": jax.default_backend()}


def test_tasks_command_lists_every_task(capsys):
    import warnings

    formatwarning = warnings.formatwarning
    assert main(["tasks"]) == 0
    assert warnings.formatwarning is formatwarning  # a Python caller keeps its own warning format
    printed = capsys.readouterr().out
    for name in TASKS:
        assert name in printed
    assert "induction          ready to run" in printed and "PATH.json" in printed


def test_tasks_command_says_when_tracr_is_missing(capsys, monkeypatch):
    """Without tracr (installed only with the extra) the tracr tasks are not
    ready to run, and the listing says how to install it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tracr" else find_spec(name, *a))
    assert main(["tasks"]) == 0
    printed = capsys.readouterr().out.splitlines()
    tracr = [line for line in printed if line.startswith("tracr-")]
    assert len(tracr) == 2 and all("needs tracr: pip install '.[tracr]'" in line for line in tracr)
    assert any(line.startswith("induction") and "ready to run" in line for line in printed)


@pytest.mark.parametrize("args, words", [
    (["discover", "--task", "induction"], "ACDC needs --tau"),
    (["discover", "--task", "induction", "--tau", "-1"], "tau must be a finite number >= 0"),
    (["discover", "--task", "nonesuch", "--tau", "0.1"], "Unknown task 'nonesuch'"),
    (["roc", "--task", "induction", "--taus", "nan"], "tau must be a finite number >= 0"),
    (["discover", "--task", "tracr-reverse", "--checkpoint", "x", "--tau", "0.1"], "do not pass a checkpoint"),
    (["discover", "--task", "induction", "--method", "edge_pruning", "--mesh", "3x1"], "needs 3 devices"),
    (["discover", "--task", "induction", "--method", "acdc_nodes"], "ACDC over nodes needs --tau"),
    (["discover", "--task", "induction", "--method", "eap", "--start", "c.json"], "--start is for --method acdc"),
    (["roc", "--task", "induction", "--method", "eap", "--start", "c.json"], "--start is for --method acdc"),
    (["discover", "--task", "t.json", "--checkpoint", "x", "--examples", "3", "--tau", "0.1"],
     "its prompts are given; do not pass n_examples (--examples)"),
    (["discover", "--task", "t.json", "--tau", "0.1"], "pass the model as checkpoint=DIR"),
    (["discover", "--task", "induction", "--method", "eap", "--n-edges", "3", "--resume"],
     "--resume is for acdc, acdc_nodes, exact_patching, eap_ig, edge_pruning, subnetwork_probing"),
    (["discover", "--task", "induction", "--method", "hisp", "--n-edges", "3", "--stop-after", "5"],
     "--stop-after is for acdc, acdc_nodes"),
    # flags the method would have ignored, and settings that were silently replaced or dropped
    (["discover", "--task", "induction", "--tau", "0.1", "--n-edges", "5"],
     "--n-edges does nothing for --method acdc; it is for eap, eap_ig, exact_patching, hisp"),
    (["discover", "--task", "induction", "--method", "eap", "--n-edges", "5", "--steps", "3"],
     "--steps does nothing for --method eap"),
    (["discover", "--task", "induction", "--method", "edge_pruning", "--tau", "0.1"],
     "--tau does nothing for --method edge_pruning"),
    (["roc", "--task", "induction", "--method", "eap", "--mode", "sequential"], "--mode does nothing for --method eap"),
    (["discover", "--task", "induction", "--method", "eap", "--tau", "0.1", "--ties", "more"],
     "it does nothing without --n-edges"),
    (["discover", "--task", "induction", "--method", "eap", "--tau", "0.1", "--n-edges", "5"], "not both"),
    (["discover", "--task", "induction", "--method", "eap_ig", "--n-edges", "5", "--steps", "0"],
     "steps (interpolation steps, --steps) must be a whole number >= 1, got 0"),
    (["discover", "--task", "induction", "--tau", "0.1", "--dtype", "bfloat16", "--precision", "tensorfloat32"],
     "with --dtype bfloat16 there are none"),
    (["discover", "--task", "induction", "--method", "exact_patching", "--n-edges", "106"],
     "must be a whole number between 0 and 105, got 106"),
])
def test_command_errors(tmp_path, capsys, args, words):
    assert main(args + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.slow
def test_dtype_reaches_every_method(tmp_path):
    """--dtype bfloat16 runs the other methods in bf16 too (it used to reach
    only ACDC over edges), with JAX's default matmul precision, as ACDC does.
    EAP's bf16 scores are those of a float32 run up to bf16 rounding."""
    from acdc_jax.algorithms import eap
    from acdc_jax.tasks import get

    for method, extra in (("eap", ["--n-edges", "10", "--metric", "nll"]), ("acdc_nodes", ["--tau", "0.05"])):
        out = tmp_path / method
        assert main(["discover", "--task", "induction", "--method", method, *extra, "--dtype", "bfloat16",
                     "--out", str(out), "--no-progress"]) == 0
        settings = json.loads((out / "circuit.json").read_text())["settings"]
        assert (settings["dtype"], settings["precision"]) == ("bfloat16", "default")
    bf16, f32 = Circuit.load(tmp_path / "eap").scores, eap(*get("induction"), metric="nll").scores
    assert not np.array_equal(bf16, f32) and np.corrcoef(bf16, f32)[0, 1] > 0.99
    assert np.abs(bf16 - f32).max() < 0.2 * np.abs(f32).max()


@pytest.mark.parametrize("method, extra", [("exact_patching", ["--tau", "0.01"]), ("edge_pruning", ["--steps", "2"])])
def test_mesh_reaches_every_method(tmp_path, method, extra):
    """--mesh is passed to the scoring methods too: a 1x1 mesh is recorded in
    the circuit's settings (test_sharding.py compares real meshes)."""
    pytest.importorskip("tracr")
    out = tmp_path / method
    assert main(["discover", "--task", "tracr-reverse", "--method", method, "--mesh", "1x1", *extra,
                 "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["settings"]["mesh"] == {"candidates": 1, "prompts": 1}


def test_roc_of_a_scoring_method(tmp_path):
    """roc --method exact_patching ranks every edge by its single-cut effect:
    on tracr-reverse under zero ablation it ranks the circuit perfectly."""
    pytest.importorskip("tracr")
    out = tmp_path / "roc"
    assert main(["roc", "--task", "tracr-reverse", "--method", "exact_patching", "--corruption", "zeros",
                 "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "roc.json").read_text())
    assert saved["method"] == "exact_patching" and saved["edge"]["auc"] == pytest.approx(1.0)
    fpr = [p[0] for p in saved["edge"]["points"]]
    assert fpr == sorted(fpr) and len(fpr) > 2  # one point per score threshold, from the top


_EXIT = """
import sys, threading, time
from acdc_jax import cli, programs
started = threading.Event()
if {busy}:
    programs.submit(lambda: (started.set(), time.sleep(300)))  # a compilation XLA cannot stop
    started.wait()
cli.main = lambda: (print("written"), {code})[1]
cli.run()
"""


@pytest.mark.parametrize("busy", [True, False])
def test_the_command_exits_without_waiting_for_programs_compiling_ahead(busy):
    """The console script leaves once its output is written, with main's exit
    code, although a compile thread still runs (a normal exit would join it
    for 300 s), and exits normally when none does."""
    script = _EXIT.format(busy=busy, code=3)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "written\n"

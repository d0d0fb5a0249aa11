"""ACDC from a start circuit (`start=`): edges outside it are removed from the
beginning and never tried. Checked against the plain re-implementation of
the original loop given the same start, in batched and sequential mode,
from a random circuit (cuts in every layer) and from ACDC over nodes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import CircuitGraph, patched_forward
from acdc_jax.acdc import acdc
from acdc_jax.algorithms import acdc_nodes
from acdc_jax.circuit import start_mask
from acdc_jax.tasks.base import Task, kl_divergence

from .helpers import force_accelerator_path, random_hf_gpt2
from .reference_acdc import reference_acdc

VOCAB = 31


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    _, model = random_hf_gpt2(tmp_path_factory.mktemp("start"), n_layer=2, n_embd=16, n_head=2, vocab=VOCAB, seed=4)
    rng = np.random.default_rng(0)
    task = Task("random-kl", rng.integers(0, VOCAB, (6, 7)), rng.integers(0, VOCAB, (6, 7)),
                positions=np.array([5, 6]), metrics={"kl": kl_divergence})
    graph = task.graph(model)
    start = np.asarray(np.random.default_rng(1).random(graph.n_edges) < 0.6, np.float32)
    return model, task, graph, start


def _decisions(circuit):
    return [(d.edge, d.tried, d.kept) for d in circuit.decisions]


def _reference(model, task, graph, tau, start):
    bound, tokens, corruption = task.bind(model), jnp.asarray(task.clean), task.make_corruption(model)

    def metric_of(present):
        logits = patched_forward(model, tokens, graph.mask(present), corruption, graph)[:, task.positions]
        return float(kl_divergence(logits, bound))

    return reference_acdc(model.config, metric_of, tau, start=set(graph.edges_in(start)))


@pytest.mark.parametrize("tau", [0.0005, 0.002, 0.005])
def test_a_random_start_circuit_matches_the_reference_loop(small, tau):
    model, task, graph, start = small
    ref = _reference(model, task, graph, tau, start)
    assert len(ref) == int(start.sum())  # every edge of the start, and none other, is decided once
    assert any(kept for _, _, kept in ref) and any(tried and not kept for _, tried, kept in ref)
    for mode in ("sequential", "batched"):
        ours = acdc(model, task, tau, mode=mode, progress=False, max_width=8, start=start)
        assert _decisions(ours) == ref
        assert not (ours.mask > start).any()
    assert ours.settings["start"]["edges"] == int(start.sum())


def test_the_run_starts_at_the_start_circuits_metric(small):
    model, task, graph, start = small
    c = acdc(model, task, 0.002, mode="sequential", progress=False, start=start)
    first = next(d for d in c.decisions if d.tried)
    logits = patched_forward(model, jnp.asarray(task.clean), jnp.asarray(start), task.make_corruption(model),
                             graph)[:, task.positions]
    assert first.metric_before == pytest.approx(float(kl_divergence(logits, task.bind(model))), rel=1e-6)
    assert first.metric_before > 1e-3  # the start circuit is not the full model here


def test_wide_passes_as_on_an_accelerator(small, monkeypatch):
    model, task, graph, start = small
    ref = _reference(model, task, graph, 0.002, start)
    force_accelerator_path(monkeypatch)
    assert _decisions(acdc(model, task, 0.002, progress=False, max_width=64, start=start)) == ref


@pytest.mark.parametrize("tau", [pytest.param(0.003, marks=pytest.mark.slow), 0.01, 0.03])
def test_edges_within_the_node_circuit_of_the_induction_model(tau):
    """The hierarchical use: ACDC over nodes first, then over the edges among
    the kept nodes. Batched (dense and sparse passes) makes the sequential
    loop's decisions, and the circuit stays inside the node circuit."""
    from acdc_jax.tasks import get

    model, task = get("induction", n_examples=20)
    nodes = acdc_nodes(model, task, 0.03, progress=False)
    assert 0 < nodes.n_edges < nodes.graph.n_edges
    seq = acdc(model, task, tau, mode="sequential", progress=False, start=nodes)
    assert len(seq.decisions) == nodes.n_edges
    for sparse in ("off", "on"):
        bat = acdc(model, task, tau, progress=False, start=nodes, sparse=sparse)
        assert _decisions(bat) == _decisions(seq)
        assert bat.settings["passes"] < seq.settings["passes"]
        assert (bat.settings["sparse_passes"] > 0) == (sparse == "on")
    assert not (seq.mask > nodes.mask).any() and 0 < seq.n_edges < nodes.n_edges


def test_tracr_within_its_node_circuit():
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr import reverse_task

    model, task = reverse_task()
    nodes = acdc_nodes(model, task, 1e-3, corruption="zeros", metric="l2", progress=False)
    seq = acdc(model, task, 1e-3, mode="sequential", corruption="zeros", metric="l2", progress=False, start=nodes)
    bat = acdc(model, task, 1e-3, corruption="zeros", metric="l2", progress=False, start=nodes)
    assert _decisions(bat) == _decisions(seq)
    canonical = task.graph(model).mask(task.canonical)
    assert np.array_equal(bat.mask, np.asarray(canonical))  # still the compiled circuit exactly


def test_resume_with_a_start(small, tmp_path):
    model, task, graph, start = small
    log = tmp_path / "decisions.jsonl"
    whole = acdc(model, task, 0.002, progress=False, max_width=4, start=start, log_path=log)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1 + len(lines) // 2]) + "\n")
    resumed = acdc(model, task, 0.002, progress=False, max_width=4, start=start, resume=log)
    assert _decisions(resumed) == _decisions(whole)
    assert log.read_text().splitlines() == lines
    other = start.copy()
    other[np.flatnonzero(start)[0]] = 0.0
    with pytest.raises(ValueError, match="settings differ.*start"):
        acdc(model, task, 0.002, progress=False, start=other, resume=log)
    with pytest.raises(ValueError, match="settings differ.*start"):
        acdc(model, task, 0.002, progress=False, resume=log)


def test_start_from_names_a_saved_circuit_or_a_mask(small, tmp_path):
    model, task, graph, start = small
    names = graph.edges_in(start)
    assert np.array_equal(start_mask(graph, names), start)
    c = acdc(model, task, 0.002, mode="sequential", progress=False, start=names)
    path = c.save(tmp_path / "circuit.json")
    assert np.array_equal(start_mask(graph, path), c.mask)
    assert np.array_equal(start_mask(graph, tmp_path), c.mask)  # the run directory
    assert np.array_equal(start_mask(graph, c), c.mask)


def test_bad_start_circuits_are_refused(small):
    model, task, graph, start = small
    with pytest.raises(ValueError, match=r"shape \[%d\]" % graph.n_edges):
        start_mask(graph, start[:-1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        start_mask(graph, start * 0.5)
    with pytest.raises(KeyError, match="No edge named"):
        start_mask(graph, ["blocks.9.attn.hook_result[0]->logits"])
    other = CircuitGraph(model.config, split_embed=True)
    with pytest.raises(ValueError, match="another graph"):
        acdc(model, task, 0.01, progress=False, start=acdc_nodes(model, task, 0.01, graph=other, progress=False))
    with pytest.raises(TypeError, match="path of a circuit.json"):
        start_mask(graph, "circuit.txt")
    with pytest.raises(FileNotFoundError, match="No circuit file at"):
        start_mask(graph, "runs/none/circuit.json")


@pytest.mark.slow
def test_cli_discover_from_a_node_circuit(tmp_path, capsys):
    from acdc_jax.cli import main

    nodes_dir, edges_dir = tmp_path / "nodes", tmp_path / "edges"
    main(["discover", "--task", "induction", "--method", "acdc_nodes", "--tau", "0.03", "--out", str(nodes_dir),
          "--no-progress"])
    main(["discover", "--task", "induction", "--tau", "0.01", "--out", str(edges_dir), "--no-progress",
          "--start", str(nodes_dir)])
    nodes = json.loads((nodes_dir / "circuit.json").read_text())
    edges = json.loads((edges_dir / "circuit.json").read_text())
    assert f"tau=0.01, within a start circuit of {nodes['n_kept']} edges" in capsys.readouterr().out
    assert set(edges["edges"]) <= set(nodes["edges"])
    assert edges["settings"]["start"]["edges"] == nodes["n_kept"] == len(edges["decisions"])
    roc_dir = tmp_path / "roc"
    main(["roc", "--task", "induction", "--taus", "0.01", "0.1", "--out", str(roc_dir), "--no-progress",
          "--start", str(nodes_dir / "circuit.json")])
    roc = json.loads((roc_dir / "roc.json").read_text())
    assert roc["taus"] == [0.01, 0.1] and roc["n_edges"][0] == edges["n_kept"]

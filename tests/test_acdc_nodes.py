"""ACDC over nodes: removing a node is PyTorch resample ablation of that head
or MLP; the batched walk makes the decisions of a plain loop over nodes
written here with the patched forward; a run resumes from a cut log."""

import dataclasses
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import CircuitGraph, Corruption, patched_forward
from acdc_jax.algorithms import acdc_nodes, node_order
from acdc_jax.algorithms.nodes import _Nodes
from acdc_jax.tasks.base import Task, kl_divergence

from .helpers import force_accelerator_path, random_hf_gpt2, torch_logits

VOCAB = 31


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    pt, model = random_hf_gpt2(tmp_path_factory.mktemp("nodes"), n_layer=3, n_embd=16, n_head=4, vocab=VOCAB,
                               seed=2, scale=0.3)
    rng = np.random.default_rng(5)
    task = Task("random-kl", rng.integers(0, VOCAB, (8, 7)), rng.integers(0, VOCAB, (8, 7)),
                positions=np.array([4, 6]), metrics={"kl": kl_divergence})
    return pt, model, task


def test_node_order_goes_from_the_output_back_mlp_first():
    from acdc_jax import TransformerConfig

    graph = CircuitGraph(TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, d_mlp=8))
    assert node_order(graph) == ["m1", "a1.0", "a1.1", "m0", "a0.0", "a0.1"]
    assert node_order(graph, "descending")[:3] == ["m1", "a1.1", "a1.0"]


def test_removing_nodes_is_resample_ablation_in_pytorch(gpt2):
    """The circuit without nodes {a2.1, m1, a0.3} equals the HF model with
    those heads' and that MLP's outputs replaced by their corrupted-run values
    (forward hooks), whatever their inputs."""
    pt, model, task = gpt2
    graph = CircuitGraph(model.config)
    removed = {"a2.1", "m1", "a0.3"}
    mask = _Nodes(graph, node_order(graph)).circuit_mask(removed)
    clean, corrupt = task.clean, task.corrupted
    ours = patched_forward(model, jnp.asarray(clean), jnp.asarray(mask),
                           Corruption.from_prompts(model, jnp.asarray(corrupt)), graph)
    d_head = model.config.d_head
    blocks = pt.transformer.h
    saved, hooks = {}, []

    def record(l):
        def z_hook(mod, args):
            saved[("z", l)] = args[0].clone()
        def mlp_hook(mod, args, out):
            saved[("mlp", l)] = out.clone()
        return [blocks[l].attn.c_proj.register_forward_pre_hook(z_hook), blocks[l].mlp.register_forward_hook(mlp_hook)]

    hooks = [h for l in range(3) for h in record(l)]
    torch_logits(pt, corrupt)
    for h in hooks:
        h.remove()

    def ablate_head(l, h):
        def hook(mod, args):
            z = args[0].clone()
            z[..., h * d_head:(h + 1) * d_head] = saved[("z", l)][..., h * d_head:(h + 1) * d_head]
            return (z,)
        return blocks[l].attn.c_proj.register_forward_pre_hook(hook)

    hooks = [ablate_head(2, 1), ablate_head(0, 3),
             blocks[1].mlp.register_forward_hook(lambda mod, args, out: saved[("mlp", 1)])]
    ref = torch_logits(pt, clean)
    for h in hooks:
        h.remove()
    assert np.abs(ref - torch_logits(pt, clean)).max() > 1e-2  # the ablation matters
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5


def _plain_loop(model, task, tau, head_order="ascending"):
    """ACDC over nodes as a plain loop: cut a node's outgoing edges, run the
    patched forward, keep the cut when the metric rises by less than tau."""
    graph = CircuitGraph(model.config)
    corruption, bound, tokens = task.make_corruption(model), task.bind(model), jnp.asarray(task.clean)

    def metric_of(mask):
        logits = patched_forward(model, tokens, jnp.asarray(mask), corruption, graph)[:, task.positions]
        return float(kl_divergence(logits, bound))

    mask = np.ones(graph.n_edges, np.float32)
    current, removed, out = metric_of(mask), set(), []
    for node in node_order(graph, head_order):
        edges = [e for e in graph.edges if e.kind == "residual" and e.sender.component == node]
        trial = mask.copy()
        trial[[e.index for e in edges]] = 0.0
        new = metric_of(trial)
        if new - current < tau:
            mask, current = trial, new
            removed.add(node)
        out.append((node, True, node not in removed))
    return out


def _decisions(circuit):
    return [(d.edge, d.tried, d.kept) for d in circuit.decisions]


@pytest.mark.parametrize("tau", [pytest.param(3e-3, marks=pytest.mark.slow), 1e-2, 3e-2])
def test_batched_and_sequential_make_the_plain_loops_decisions(gpt2, tau):
    _, model, task = gpt2
    ref = _plain_loop(model, task, tau)
    assert any(kept for *_, kept in ref) and any(not kept for *_, kept in ref)
    seq = acdc_nodes(model, task, tau, mode="sequential", progress=False)
    bat = acdc_nodes(model, task, tau, progress=False)
    assert _decisions(seq) == ref and _decisions(bat) == ref
    assert np.array_equal(seq.mask, bat.mask)
    assert seq.settings["nodes"] == [n for n, _, kept in ref if kept]


def test_near_ties_are_rescored_in_full_float32_only(gpt2, monkeypatch):
    """As for edges: by default a chain's trials near tau are checked in full
    passes only at full float32 precision; in TF32 no program is checked, so
    the only full passes are the full model's, the empty circuit's (is the
    metric flat?) and the final circuit's."""
    from acdc_jax.scoring import Scorer

    _, model, task = gpt2
    full, counted = Scorer.full, []
    monkeypatch.setattr(Scorer, "full", lambda self, mask: counted.append(1) or full(self, mask))
    exact = acdc_nodes(model, task, 1e-2, progress=False)
    assert exact.settings["rescore_ties"] is True and len(counted) > 3  # the programs were checked
    counted.clear()
    fast = acdc_nodes(model, task, 1e-2, progress=False, precision="tensorfloat32")
    assert fast.settings["rescore_ties"] is False and fast.settings["rescored"] == 0 and len(counted) == 3


def test_wide_vmapped_chains_as_on_an_accelerator(gpt2, monkeypatch):
    _, model, task = gpt2
    ref = _plain_loop(model, task, 1e-2, head_order="descending")
    from acdc_jax.scoring import Scorer

    force_accelerator_path(monkeypatch)
    monkeypatch.setattr("acdc_jax.algorithms.nodes._chain_width", lambda p, cap, cpu: cap)
    widths, batch = [], Scorer.batch
    monkeypatch.setattr(Scorer, "batch", lambda self, cands, *a, **k: widths.append(len(cands)) or batch(self, cands, *a, **k))
    bat = acdc_nodes(model, task, 1e-2, head_order="descending", max_width=8, progress=False)
    assert _decisions(bat) == ref and max(widths) == 8 and len(widths) < len(ref)


def test_the_circuit_keeps_the_edges_between_kept_nodes(gpt2):
    _, model, task = gpt2
    c = acdc_nodes(model, task, 1e-2, progress=False)
    kept = set(c.settings["nodes"]) | {"embed", "logits"}
    for e, on in zip(c.graph.edges, c.mask):
        assert bool(on) == (e.sender.component in kept and e.receiver.component in kept)
    tried = [d for d in c.decisions if d.tried]
    removed_last = [d for d in tried if not d.kept][-1]
    assert c.metric == pytest.approx(removed_last.metric_after, abs=1e-6)  # the in-edges it also drops are inert
    first = c.graph.edge_index(next(e for e in c.graph.edges if e.sender.component == tried[0].edge))
    assert c.scores[first] == pytest.approx(tried[0].result)


def test_a_cut_log_resumes_to_the_same_circuit(gpt2, tmp_path):
    _, model, task = gpt2
    log = tmp_path / "nodes.jsonl"
    whole = acdc_nodes(model, task, 1e-2, log_path=log, progress=False)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:len(lines) // 2]) + "\n" + lines[len(lines) // 2][:20])  # a crash mid-line
    resumed = acdc_nodes(model, task, 1e-2, resume=log, progress=False)
    assert _decisions(resumed) == _decisions(whole) and np.array_equal(resumed.mask, whole.mask)
    with pytest.raises(ValueError, match="settings differ"):
        acdc_nodes(model, task, 2e-2, resume=log, progress=False)
    swapped = dataclasses.replace(task, clean=task.corrupted, corrupted=task.clean)
    with pytest.raises(ValueError, match="settings differ.*'prompts'"):
        acdc_nodes(model, swapped, 1e-2, resume=log, progress=False)
    lines = log.read_text().splitlines()  # whole again; now two decisions swapped, as in an edited log
    assert len(lines) == 1 + len(whole.decisions) and lines[1] != lines[2]
    log.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match="Decision 0 of the log .* is not what ACDC over nodes does next .* another run"):
        acdc_nodes(model, task, 1e-2, resume=log, progress=False)


def test_bad_arguments_are_named(gpt2):
    _, model, task = gpt2
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        acdc_nodes(model, task, -1.0, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        acdc_nodes(model, task, 0.1, mode="fast", progress=False)
    with pytest.raises(ValueError, match="head_order must be"):
        acdc_nodes(model, task, 0.1, head_order="random", progress=False)


def test_the_command_line_runs_acdc_over_nodes(tmp_path, capsys):
    """discover --method acdc_nodes on the shipped induction model keeps its
    previous-token and induction heads (scores.json), and roc sweeps it."""
    import json

    from acdc_jax import Circuit
    from acdc_jax.cli import main

    out = tmp_path / "nodes"
    assert main(["discover", "--task", "induction", "--method", "acdc_nodes", "--tau", "0.01", "--examples", "20",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    circuit = Circuit.load(out / "circuit.json")
    assert f"over nodes, tau=0.01, {len(circuit.settings['nodes'])} of 8 nodes kept" in printed
    picture = "circuit.svg" if shutil.which("dot") else "circuit.png"  # Graphviz where installed
    assert (out / "decisions.jsonl").exists() and (out / picture).exists()
    from acdc_jax.tasks.induction import recorded_heads

    previous, induction = recorded_heads()
    named = {f"a{layer}.{head}" for layer, head in previous + induction}
    assert named and named <= set(circuit.settings["nodes"])
    assert main(["roc", "--task", "induction", "--method", "acdc_nodes", "--taus", "0.01", "1.0",
                 "--examples", "20", "--out", str(tmp_path / "roc"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "roc" / "roc.json").read_text())["method"] == "acdc_nodes"


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-proportion"])
def test_tracr_nodes_are_recovered_exactly(name):
    """With zero ablation (the paper's tracr setting), the kept nodes are the
    ones the compiled program's circuit runs through, no more, no fewer."""
    pytest.importorskip("tracr")
    from acdc_jax.evaluate import nodes_of
    from acdc_jax.tasks import get

    model, task = get(name)
    circuit = acdc_nodes(model, task, 1e-3, corruption="zeros", progress=False)
    truth = nodes_of(circuit.graph, task.canonical) - {"embed", "pos", "logits"}
    assert truth and set(circuit.settings["nodes"]) == truth


def test_a_trial_at_tau_is_rescored_and_decided_as_the_sequential_loop(gpt2):
    """tau set to the first trial's metric change (which no earlier decision
    alters) puts that trial within rounding of tau: the batched run checks it
    in full passes and decides every node as the sequential loop does."""
    _, model, task = gpt2
    first = acdc_nodes(model, task, 1e-2, mode="sequential", progress=False).decisions[0]
    assert first.tried and first.result > 0
    seq = acdc_nodes(model, task, first.result, mode="sequential", progress=False)
    assert seq.decisions[0].result == first.result  # the tie itself
    bat = acdc_nodes(model, task, first.result, progress=False)
    assert bat.settings["rescored"] > 0 and _decisions(bat) == _decisions(seq)
    # decided on the full passes' value (the chain's pass gave 0.0264610469 against 0.0264610282 here)
    assert bat.decisions[0].result == first.result

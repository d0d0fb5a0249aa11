"""Circuits exported as EAP-IG graph JSON: the edge names are exactly those of
the EAP-IG library's graph (built here from its documented construction), and
the exported circuit computes what the circuit computes."""

import json
import re

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import Circuit, CircuitGraph, Corruption, patched_forward
from acdc_jax.cli import main
from acdc_jax.cli_tools import _provenance
from acdc_jax.config import TransformerConfig
from acdc_jax.export import from_eap_ig, to_eap_ig
from acdc_jax.tasks import get

from .helpers import peaked_random_model_and_task

BASE = dict(n_layers=3, d_model=16, n_heads=2, d_head=4, d_vocab=13, n_ctx=8, d_mlp=32)


def eap_ig_edge_names(n_layers: int, n_heads: int, parallel: bool) -> set:
    """EAP-IG's ``Graph.from_model``: each layer's heads read q, k and v from
    the input and every earlier head and MLP; the MLP reads those and, unless
    it runs in parallel, its own layer's heads; the logits read everything."""
    stream, names = ["input"], set()
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names |= {f"{s}->{h}<{x}>" for s in stream for h in heads for x in "qkv"}
        if parallel:
            names |= {f"{s}->m{layer}" for s in stream}
            stream += heads
        else:
            stream += heads
            names |= {f"{s}->m{layer}" for s in stream}
        stream.append(f"m{layer}")
    return names | {f"{s}->logits" for s in stream}


@pytest.mark.parametrize("parallel", [False, True])
def test_the_edges_are_those_of_an_eap_ig_graph(parallel):
    config = TransformerConfig(**BASE, parallel_attn_mlp=parallel)
    graph = CircuitGraph(config)
    exported = to_eap_ig(Circuit(graph, np.ones(graph.n_edges, np.float32)))
    assert set(exported["edges"]) == eap_ig_edge_names(3, 2, parallel)
    assert exported["cfg"] == {"n_layers": 3, "n_heads": 2, "parallel_attn_mlp": parallel, "d_model": 16}
    assert all(e["in_graph"] for e in exported["edges"].values())


def test_the_exported_circuit_computes_what_the_circuit_computes():
    """Read back as a mask over the residual edges alone (every q/k/v step
    kept, as in EAP-IG's graph), the exported circuit gives the circuit's
    logits: an edge into a head whose q/k/v step is cut is out of the export."""
    config = TransformerConfig(**BASE)
    model, task = peaked_random_model_and_task(config, seed=3, prompt_seed=4, n_prompts=4)
    graph = CircuitGraph(config)
    rng = np.random.default_rng(0)
    mask = (rng.random(graph.n_edges) < 0.6).astype(np.float32)
    scores = rng.normal(size=graph.n_edges)
    scores[:5] = np.nan
    circuit = Circuit(graph, mask, scores=scores)
    exported = to_eap_ig(circuit)
    assert sum(not e["in_graph"] for e in exported["edges"].values()) > (mask[[e.index for e in graph.edges
                                                                               if e.kind == "residual"]] == 0).sum()
    names = {}  # EAP-IG name -> our edge, from the names' parts alone
    for e in graph.edges:
        if e.kind == "residual":
            s, r = e.sender, e.receiver
            sender = "input" if s.kind == "embed" else (f"m{s.layer}" if s.kind == "mlp" else f"a{s.layer}.h{s.head}")
            receiver = {"logits": "logits", "mlp_in": f"m{r.layer}"}.get(r.kind, f"a{r.layer}.h{r.head}<{r.kind}>")
            names[f"{sender}->{receiver}"] = e.index
    read_back = np.array([1.0 if e.kind == "qkv" else 0.0 for e in graph.edges], np.float32)
    for name, edge in exported["edges"].items():
        read_back[names[name]] = float(edge["in_graph"])
        if np.isfinite(scores[names[name]]):
            assert edge["score"] == scores[names[name]]
        else:
            assert edge["score"] == 0.0
    tokens = jnp.asarray(task.clean)
    corruption = Corruption.from_prompts(model, jnp.asarray(task.corrupted))
    ours = patched_forward(model, tokens, jnp.asarray(mask), corruption, graph)
    theirs = patched_forward(model, tokens, jnp.asarray(read_back), corruption, graph)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-5, atol=1e-5)
    steps = np.array([e.kind == "qkv" for e in graph.edges])
    ungated = np.where(steps, 1.0, mask).astype(np.float32)  # every kept residual edge, whatever its step
    assert not np.allclose(np.asarray(ours), np.asarray(patched_forward(model, tokens, jnp.asarray(ungated),
                                                                        corruption, graph)))


def test_export_command_and_its_refusals(tmp_path, capsys):
    graph = CircuitGraph(TransformerConfig(**BASE))
    Circuit(graph, np.ones(graph.n_edges, np.float32)).save(tmp_path / "run" / "circuit.json")
    assert main(["export", str(tmp_path / "run")]) == 0
    written = json.loads((tmp_path / "run" / "eap_ig_graph.json").read_text())
    assert set(written) == {"cfg", "nodes", "edges"} and written["nodes"]["a2.h1"]["in_graph"]
    for options, words in [(dict(split_qkv=False), "split_qkv=True"), (dict(split_embed=True), "one input node")]:
        other = CircuitGraph(TransformerConfig(**BASE), **options)
        Circuit(other, np.ones(other.n_edges, np.float32)).save(tmp_path / "other.json")
        assert main(["export", str(tmp_path / "other.json")]) == 2
        assert words in capsys.readouterr().err


def test_an_eap_ig_graph_reads_back_to_the_same_function(tmp_path):
    config = TransformerConfig(**BASE)
    model, task = peaked_random_model_and_task(config, seed=5, prompt_seed=6, n_prompts=4)
    graph = CircuitGraph(config)
    mask = (np.random.default_rng(1).random(graph.n_edges) < 0.6).astype(np.float32)
    read = from_eap_ig(json.loads(json.dumps(to_eap_ig(Circuit(graph, mask)))), graph)
    tokens, corruption = jnp.asarray(task.clean), Corruption.from_prompts(model, jnp.asarray(task.corrupted))
    np.testing.assert_allclose(np.asarray(patched_forward(model, tokens, jnp.asarray(read.mask), corruption, graph)),
                               np.asarray(patched_forward(model, tokens, jnp.asarray(mask), corruption, graph)),
                               rtol=1e-5, atol=1e-5)
    assert all(read.mask[e.index] == 1 for e in graph.edges if e.kind == "qkv")  # EAP-IG cuts no step
    exported = to_eap_ig(Circuit(graph, mask))
    with pytest.raises(ValueError, match="for another model .*'n_heads': \\(3, 2\\)"):
        from_eap_ig({**exported, "cfg": {**exported["cfg"], "n_heads": 3}}, graph)
    with pytest.raises(ValueError, match="names an edge this model's graph lacks: 'a9.h0->logits'"):
        from_eap_ig({**exported, "edges": {"a9.h0->logits": {"score": 1.0, "in_graph": True}}}, graph)
    with pytest.raises(ValueError, match="Not an EAP-IG graph"):
        from_eap_ig({"edges": {}}, graph)
    name = next(iter(exported["edges"]))
    for change, field in [(dict(cfg=[1]), r"cfg \(an object\)"), (dict(edges=[name]), r"edges \(edge name ->"),
                          (dict(edges={name: {"in_graph": "false"}}), rf"edges\['{re.escape(name)}'\] \(in_graph"),
                          (dict(edges={name: {"in_graph": True, "score": "0.5"}}), rf"edges\['{re.escape(name)}'\]")]:
        with pytest.raises(ValueError, match=rf"Malformed field\(s\) in the EAP-IG graph: {field}"):
            from_eap_ig({**exported, **change}, graph)


def test_evaluate_command_scores_a_saved_circuit_as_the_run_did(tmp_path, capsys):
    """`acdc-jax evaluate` on a run's circuit.json (a non-rotary model, whose
    config read back from JSON once differed from the model's) and on its
    EAP-IG export prints the faithfulness the run recorded, and the heads
    on its residual edges as discover did, read here from the edge names."""
    out = tmp_path / "run"
    assert main(["discover", "--task", "induction", "--tau", "0.01", "--examples", "8", "--out", str(out),
                 "--no-progress"]) == 0
    saved = json.loads((out / "circuit.json").read_text())
    step = re.compile(r"blocks\.\d+\.hook_[qkv]_input\[\d+\]->blocks\.\d+\.attn\.hook_[qkv]\[\d+\]")
    heads = {f"a{m[1]}.{m[2]}" for e in saved["edges"] if not step.fullmatch(e)
             for m in re.finditer(r"blocks\.(\d+)\.(?:attn\.hook_result|hook_[qkv]_input)\[(\d+)\]", e)}
    nodes_line = f"heads and MLPs on its residual edges: {' '.join(sorted(heads))}"
    assert heads and nodes_line in capsys.readouterr().out
    assert main(["export", str(out)]) == 0
    capsys.readouterr()
    canonical = get("induction")[1].canonical
    for source in (out, out / "eap_ig_graph.json"):
        assert main(["evaluate", str(source), "--task", "induction", "--examples", "8"]) == 0
        printed = capsys.readouterr().out
        assert f"faithfulness {saved['settings']['faithfulness']['normalized']:.3f}" in printed and nodes_line in printed
        # the run's fingerprints of its model and prompts; an EAP-IG graph records neither
        assert ("scored on the model and prompts it was found on" in printed) == (source == out)
    assert main(["evaluate", str(out), "--task", "induction", "--examples", "8", "--seed", "1"]) == 0
    assert "scored on other prompts than it was found on" in capsys.readouterr().out
    model, task = get("induction", n_examples=8)
    other = eqx.tree_at(lambda m: m.embed.W_E, model, model.embed.W_E * 1.01)
    assert _provenance(Circuit.load(out), other, task) == ["scored on another model (other weights)"]
    # an EAP-IG graph has no q/k/v steps to cut (all read back as kept), so only the residual edges are scored
    residual = {e for e in canonical if not step.fullmatch(e)}
    assert 0 < len(residual) < len(canonical)
    assert f"canonical circuit's residual edges ({len(residual)} edges): recovered" in printed

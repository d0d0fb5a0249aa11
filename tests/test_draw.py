"""Pictures of circuits: the DOT text draws each kept edge between its parts,
labelled by the input it enters, marks edges outside a canonical circuit and
the canonical edges missed (as the module documents), and render writes SVG
through Graphviz where ``dot`` is installed, PNG otherwise."""

import re

import numpy as np
import pytest

from acdc_jax import Circuit, CircuitGraph, TransformerConfig
from acdc_jax import draw

GRAPH = CircuitGraph(TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8, d_mlp=16))
QUERY = "blocks.0.attn.hook_result[1]->blocks.1.hook_q_input[0]"
MLP = "blocks.0.hook_mlp_out->blocks.1.hook_mlp_in"
DIRECT = "blocks.0.hook_resid_pre->blocks.1.hook_resid_post"
VALUE = "blocks.0.attn.hook_result[0]->blocks.1.hook_v_input[1]"


def _circuit(names):
    mask = np.zeros(GRAPH.n_edges, np.float32)
    mask[[GRAPH.edge_index(n) for n in names]] = 1
    return Circuit(GRAPH, mask)


def _edges(dot: str) -> dict:
    """(sender, receiver) -> the attribute text of each drawn edge."""
    return {(s, r): attrs for s, r, attrs in re.findall(r'"([^"]+)" -> "([^"]+)" \[([^\]]*)\]', dot)}


def test_dot_draws_kept_edges_by_input_and_marks_them_against_the_canonical_circuit():
    dot = draw.to_dot(_circuit([QUERY, MLP, DIRECT]), canonical=[QUERY, MLP, VALUE], title="t")
    assert dot.startswith("digraph circuit {") and 'label="t"' in dot
    edges = _edges(dot)
    assert set(edges) == {("a0.1", "a1.0"), ("m0", "m1"), ("embed", "logits"), ("a0.0", "a1.1")}
    assert f'color="{draw.COLORS["q"]}"' in edges["a0.1", "a1.0"] and 'label="q"' in edges["a0.1", "a1.0"]
    assert "penwidth=1.0" in edges["m0", "m1"] and 'label=""' in edges["m0", "m1"]
    # kept but not canonical: red and thick; canonical but not kept: grey and dashed, with its input
    assert f'color="{draw.EXTRA}"' in edges["embed", "logits"] and "penwidth=2.5" in edges["embed", "logits"]
    assert "style=dashed" in edges["a0.0", "a1.1"] and 'label="v"' in edges["a0.0", "a1.1"]
    nodes = set(re.findall(r'^  "([^"]+)" \[fillcolor', dot, re.M))
    assert nodes == {"embed", "a0.0", "a0.1", "a1.0", "a1.1", "m0", "m1", "logits"}


def test_dot_without_a_canonical_circuit_draws_one_edge_per_input_entered():
    key = "blocks.0.attn.hook_result[1]->blocks.1.hook_k_input[0]"
    dot = draw.to_dot(_circuit([QUERY, key, VALUE]))
    drawn = re.findall(r'"([^"]+)" -> "([^"]+)" \[[^\]]*label="(\w*)"', dot)
    assert sorted(drawn) == [("a0.0", "a1.1", "v"), ("a0.1", "a1.0", "k"), ("a0.1", "a1.0", "q")]
    assert "dashed" not in dot and draw.EXTRA not in dot


def test_render_writes_png_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    written = draw.render(_circuit([QUERY, DIRECT]), tmp_path / "c", canonical=[QUERY])
    assert [p.name for p in written] == ["c.dot", "c.png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_writes_svg_with_graphviz(tmp_path):
    if draw.shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    written = draw.render(_circuit([QUERY, DIRECT]), tmp_path / "c")
    assert [p.name for p in written] == ["c.dot", "c.svg"]
    svg = written[1].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert {"a0.1", "a1.0", "embed", "logits"} <= set(re.findall(r"<title>([^<&]+)</title>", svg))

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


GPT2_GRAPH = CircuitGraph(TransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_vocab=50257,
                                            n_ctx=1024, d_mlp=3072))


def _part(hook: str) -> str:
    m = re.fullmatch(r"blocks\.(\d+)\.(?:attn\.hook_result|hook_[qkv]_input)\[(\d+)\]", hook)
    if m:
        return f"a{m[1]}.{m[2]}"
    m = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_(?:in|out)", hook)
    return f"m{m[1]}" if m else {"blocks.0.hook_resid_pre": "embed"}.get(hook, hook)


@pytest.mark.parametrize("keep, limits, letters", [(0.005, False, True), (0.03, True, True), (0.1, True, False)])
def test_large_circuits_are_drawn_in_bounded_time(keep, limits, letters):
    """Graphviz's layout time grows faster than the edges (a GPT-2-small
    circuit of 3,302 drawn edges took over 10 minutes): past MANY drawn edges
    its crossing minimisation and ranking are cut short, and past CROWDED the
    q/k/v letters give way to a legend. Every edge is still drawn: the DOT's
    edges are those read from the edge names here."""
    mask = (np.random.default_rng(0).random(GPT2_GRAPH.n_edges) < keep).astype(np.float32)
    circuit = Circuit(GPT2_GRAPH, mask)
    dot = draw.to_dot(circuit)
    step = re.compile(r".*hook_[qkv]_input\[\d+\]->.*attn\.hook_[qkv]\[\d+\]")
    expected = set()
    for name in circuit.edges:
        if not step.fullmatch(name):
            sender, receiver = name.split("->")
            letter = re.search(r"hook_([qkv])_input", receiver)
            expected.add((_part(sender), "logits" if "resid_post" in receiver else _part(receiver),
                          letter[1] if letter else ""))
    drawn = re.findall(r'"([^"]+)" -> "([^"]+)" \[([^\]]*)\]', dot)
    assert len(drawn) == len(expected) and {(s, r) for s, r, _ in drawn} == {(s, r) for s, r, _ in expected}
    assert ("mclimit=0.1; nslimit=1;" in dot) == limits == (len(expected) > draw.MANY)
    assert all(("label=" in attrs) == letters for _, _, attrs in drawn)
    assert (draw.LEGEND in dot) == (not letters) == (len(expected) > draw.CROWDED)


def test_render_falls_back_to_png_when_graphviz_takes_too_long(tmp_path, monkeypatch):
    import subprocess

    def too_slow(command, **kw):
        assert kw["timeout"] == draw.DOT_SECONDS
        raise subprocess.TimeoutExpired(command, kw["timeout"])

    monkeypatch.setattr(draw.shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(draw.subprocess, "run", too_slow)
    mask = (np.random.default_rng(1).random(GPT2_GRAPH.n_edges) < 0.1).astype(np.float32)
    with pytest.warns(UserWarning, match="Graphviz took over .* drawing a PNG with matplotlib instead"):
        written = draw.render(Circuit(GPT2_GRAPH, mask), tmp_path / "c")
    assert [p.name for p in written] == ["c.dot", "c.png"] and not (tmp_path / "c.svg").exists()
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

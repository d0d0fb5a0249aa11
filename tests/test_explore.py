"""The interactive edge matrices (penzai named arrays, treescope HTML)."""

import numpy as np
import pytest

from acdc_jax.circuit import Circuit
from acdc_jax.explore import edge_matrix, named, show, write_html
from acdc_jax.graph import CircuitGraph
from acdc_jax.model import TransformerConfig


@pytest.fixture(scope="module")
def circuit():
    graph = CircuitGraph(TransformerConfig(n_layers=2, n_heads=3, d_model=12, d_head=4, d_mlp=16, d_vocab=11,
                                           n_ctx=8))
    rng = np.random.default_rng(0)
    mask = (rng.random(graph.n_edges) < 0.5).astype(np.float32)
    scores = rng.normal(size=graph.n_edges)
    scores[rng.random(graph.n_edges) < 0.2] = np.nan  # dropped without a trial
    return Circuit(graph, mask, 0.1, [], {"method": "acdc", "tau": 0.01, "task": "random"}, scores)


def test_matrix_places_every_residual_edge(circuit):
    g = circuit.graph
    residual = [e for e in g.edges if e.kind == "residual"]
    for view, per_edge in (("kept", circuit.mask), ("score", circuit.scores)):
        values, valid, senders, receivers = edge_matrix(circuit, view)
        assert values.shape == (len(g.senders), len(g.receivers)) == (len(senders), len(receivers))
        assert valid.sum() == sum(np.isfinite(per_edge[e.index]) for e in residual)
        for e in residual:
            i, j = g.senders.index(e.sender), g.receivers.index(e.receiver)
            if np.isfinite(per_edge[e.index]):
                assert valid[i, j] and values[i, j] == pytest.approx(per_edge[e.index])
            else:
                assert not valid[i, j]
    # a head never sends to its own layer's inputs: those pairs are not edges
    values, valid, senders, receivers = edge_matrix(circuit, "kept")
    assert senders[:2] == ["embed", "a0.0"] and receivers[-3:] == ["a1.2.v", "m1.in", "logits"]
    assert not valid[senders.index("a1.0"), receivers.index("a1.2.q")]
    assert valid[senders.index("a0.1"), receivers.index("a1.2.q")]


def test_named_axes_and_bad_views(circuit):
    values, valid = named(circuit, "score")
    assert values.named_shape == {"sender": len(circuit.graph.senders), "receiver": len(circuit.graph.receivers)}
    assert valid.named_shape == values.named_shape
    with pytest.raises(ValueError, match="view must be one of"):
        edge_matrix(circuit, "weights")
    unscored = Circuit(circuit.graph, circuit.mask)
    with pytest.raises(ValueError, match="no scores"):
        edge_matrix(unscored, "score")


def test_write_html_is_a_standalone_page(circuit, tmp_path):
    path = write_html(circuit, tmp_path / "edges.html")
    text = path.read_text()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    kept = int((circuit.mask > 0.5).sum())
    assert f"random (acdc, tau=0.01): {kept} of {circuit.graph.n_edges} edges kept" in text
    assert "treescope-container" in text and "a1.2.q" in text  # the renderer and the receiver labels
    # a circuit without scores shows the kept edges only
    assert "scores (metric change" not in write_html(Circuit(circuit.graph, circuit.mask), tmp_path / "k.html").read_text()


def test_show_outside_a_notebook_points_to_the_page(circuit):
    with pytest.raises(RuntimeError, match="write_html"):
        show(circuit)

"""Edge counts against the published ones, and the graph's structure."""

import networkx as nx
import numpy as np
import pytest

from acdc_jax import CircuitGraph, TransformerConfig, expected_edge_count

GPT2_SMALL = TransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_vocab=50257, n_ctx=1024, d_mlp=3072)
ATTN_ONLY_4L = TransformerConfig(n_layers=4, d_model=512, n_heads=8, d_head=64, d_vocab=48262, n_ctx=2048,
                                 positional="shortformer")
REDWOOD_2L = TransformerConfig(n_layers=2, d_model=256, n_heads=8, d_head=32, d_vocab=50259, n_ctx=2048,
                               positional="shortformer")
TRACR_REVERSE = TransformerConfig(n_layers=4, d_model=41, n_heads=1, d_head=12, d_vocab=5, n_ctx=6, d_mlp=30,
                                  normalization="none", act_fn="relu", causal=False)
TRACR_PROPORTION = TransformerConfig(n_layers=2, d_model=14, n_heads=1, d_head=7, d_vocab=6, n_ctx=6, d_mlp=1,
                                     normalization="none", act_fn="relu", causal=False)

# Published counts: the ACDC paper (Conmy et al. 2023, its tables and code) counts
# the q/k/v steps; auto-circuit counts residual edges only (all src/dest pairs
# with the source strictly earlier), split or not.
PUBLISHED = [
    ("gpt2-small acdc", GPT2_SMALL, dict(), 32_923),
    ("gpt2-small auto-circuit split", GPT2_SMALL, dict(qkv_edges=False), 32_491),
    ("gpt2-small auto-circuit unsplit", GPT2_SMALL, dict(split_qkv=False), 11_611),
    ("attn-only-4l acdc", ATTN_ONLY_4L, dict(), 1_377),
    ("attn-only-4l residual", ATTN_ONLY_4L, dict(qkv_edges=False), 1_281),
    ("redwood_attn_2l acdc", REDWOOD_2L, dict(), 305),
    ("tracr-reverse acdc", TRACR_REVERSE, dict(split_embed=True), 106),
    ("tracr-proportion acdc", TRACR_PROPORTION, dict(split_embed=True), 38),
]


@pytest.mark.parametrize("label,config,options,count", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_edge_counts_match_published(label, config, options, count):
    graph = CircuitGraph(config, **options)
    assert graph.n_edges == count
    assert expected_edge_count(config, **options) == count


def test_edge_set_is_every_sender_strictly_before_every_receiver():
    config = TransformerConfig(n_layers=3, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8, d_mlp=16)
    g = CircuitGraph(config)
    # Independent enumeration: order components by position in the forward pass.
    def order(node):
        if node.kind in ("embed",):
            return -1.0
        if node.kind == "head":
            return node.layer + 0.5
        if node.kind == "mlp":
            return node.layer + 0.75
        if node.kind in ("q", "k", "v"):
            return node.layer + 0.25
        if node.kind == "mlp_in":
            return node.layer + 0.6
        return 1e9  # logits
    pairs = {(s.name, r.name) for s in g.senders for r in g.receivers if order(s) < order(r)}
    residual = {(e.sender.name, e.receiver.name) for e in g.edges if e.kind == "residual"}
    assert residual == pairs
    assert len(set(g.edge_names)) == g.n_edges
    assert all(g.edge_index(name) == i for i, name in enumerate(g.edge_names))


def test_names_say_which_convention():
    config = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8)
    g = CircuitGraph(config)
    assert "blocks.0.attn.hook_result[1]->blocks.1.hook_k_input[0]" in g.edge_names
    assert "blocks.1.hook_q_input[1]->blocks.1.attn.hook_q[1]" in g.edge_names
    u = CircuitGraph(config, split_qkv=False)
    assert "blocks.0.attn.hook_result[1]->blocks.1.hook_attn_in[0]" in u.edge_names
    assert not any("hook_q" in n for n in u.edge_names)
    with pytest.raises(KeyError, match="No edge named"):
        g.edge_index("blocks.1.attn.hook_result[0]->blocks.0.hook_q_input[0]")


@pytest.mark.parametrize("options", [dict(), dict(qkv_edges=False), dict(split_qkv=False)], ids=str)
def test_networkx_view_is_a_dag_reaching_the_logits(options):
    """At every granularity each head's inputs lead to its output, so every
    sender reaches the logits, and the embedding reaches every sender."""
    config = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8, d_mlp=16)
    g = CircuitGraph(config, **options)
    mask = np.ones(g.n_edges)
    mask[0] = 0
    nxg = g.to_networkx(mask)
    assert nx.is_directed_acyclic_graph(nxg)
    removable = [d for _, _, d in nxg.edges(data=True) if d["kind"] != "internal"]
    assert len(removable) == g.n_edges
    assert sum(not d["present"] for d in removable) == 1
    logits = g.receivers[-1].name
    assert all(nx.has_path(nxg, s.name, logits) for s in g.senders)
    assert all(nx.has_path(nxg, g.senders[0].name, s.name) for s in g.senders)
    assert set(nxg.nodes) == {n for e in g.edges for n in (e.sender.name, e.receiver.name)} | {s.name for s in g.senders}


def test_graph_hash_and_equality():
    config = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8)
    assert CircuitGraph(config) == CircuitGraph(config)
    assert hash(CircuitGraph(config)) == hash(CircuitGraph(config))
    assert CircuitGraph(config) != CircuitGraph(config, split_embed=True)


@pytest.mark.parametrize("options", [dict(), dict(qkv_edges=False), dict(split_qkv=False)])
def test_places_follow_the_dense_layout(options):
    """Each edge's places in the dense masks, from the layout the docs give:
    per layer, the q, k and v columns of each head then the MLP input; the
    logits last; the sender's slot as the row; a q/k/v step edge has no row
    and sits at its input's column."""
    graph = CircuitGraph(TransformerConfig(n_layers=3, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=8, d_mlp=8),
                         **options)
    H, per_layer = graph.n_heads, 3 * graph.n_heads + 1
    row = {s.name: i for i, s in enumerate(graph.senders)}

    def columns(node):
        if node.kind == "logits":
            return [graph.n_layers * per_layer]
        if node.kind == "mlp_in":
            return [node.layer * per_layer + 3 * H]
        letters = "qkv" if node.kind == "attn_in" else node.kind
        return [node.layer * per_layer + "qkv".index(c) * H + node.head for c in letters]

    expected = {}
    for e in graph.edges:
        if e.kind == "residual":
            expected[e.index] = {(row[e.sender.name], c) for c in columns(e.receiver)}
        else:
            expected[e.index] = {(-1, c) for c in columns(e.sender)}
    rng = np.random.default_rng(0)
    for edges in ([0], [graph.n_edges - 1], sorted(rng.choice(graph.n_edges, 17, replace=False).tolist())):
        rows, cols = graph.places(np.array(edges))
        assert set(zip(rows.tolist(), cols.tolist())) == set().union(*(expected[e] for e in edges))
        assert len(rows) == sum(len(expected[e]) for e in edges)

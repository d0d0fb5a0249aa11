"""Matrix-multiply FLOPs (2 per multiply-add) of the passes ACDC runs.

Counted from the shapes, as `patching.run_from` computes them, and checked
against XLA's own cost analysis in tests/test_flops.py. Elementwise work
(LayerNorm, softmax, GELU) is left out; it is a few percent.
"""

from __future__ import annotations

from .graph import CircuitGraph
from .config import TransformerConfig
from .patching import upstream_offset


def attention_flops(c: TransformerConfig, heads: int, n_pos: int, n_q: int | None = None) -> int:
    """`heads` heads over `n_pos` keys, with queries at `n_q` positions (default all)."""
    n_q = n_pos if n_q is None else n_q
    qkv = 2 * (n_q + 2 * n_pos) * c.d_model * c.d_head * heads
    pattern = 2 * 2 * heads * n_q * n_pos * c.d_head
    out = 2 * heads * n_q * c.d_head * c.d_model
    return qkv + pattern + out


def mlp_flops(c: TransformerConfig, n_pos: int) -> int:
    return 0 if c.d_mlp is None else 2 * (3 if c.gated_mlp else 2) * n_pos * c.d_model * c.d_mlp


def forward_flops(c: TransformerConfig, n_pos: int, n_out: int | None = None) -> int:
    """One example through the plain model, logits at `n_out` positions (all by default)."""
    n_out = n_pos if n_out is None else n_out
    body = c.n_layers * (attention_flops(c, c.n_heads, n_pos) + mlp_flops(c, n_pos))
    return body + 2 * n_out * c.d_model * c.d_vocab_out


def pass_flops(graph: CircuitGraph, start_layer: int, heads: int, n_pos: int, n_out: int,
               upstream_rows: int | None = None) -> dict:
    """One example and one candidate mask through the patched model from
    `start_layer`, recomputing `heads` heads there, with the last layer's
    queries, MLP and logits at the `n_out` metric positions only (the
    Scorer's passes: `run_from(..., narrow=True)`); split into ``mixing``
    (each receiver's masked sum over the sender stack), ``model`` (attention,
    MLPs, unembedding) and ``total``. With `upstream_rows`, the receivers
    after the start layer read the cached senders through a shared sum
    (`patching.upstream_mix`, counted by `upstream_flops`) plus that many rows."""
    c, N, H, L = graph.config, graph.n_senders, graph.n_heads, graph.n_layers
    n_up = graph.n_senders_before_attn(start_layer) if start_layer < L else N
    later = N if upstream_rows is None else N - n_up + upstream_rows  # rows a receiver after the start layer mixes
    mixing = model = 0
    for layer in range(start_layer, L):
        k = heads if layer == start_layer else H
        n_q = n_out if layer == L - 1 else n_pos
        rows = n_up if layer == start_layer else later  # the start layer's heads mix `up` only
        mlp_rows = N if layer == start_layer else later
        mixing += 2 * k * rows * (n_q + 2 * n_pos) * c.d_model + (2 * mlp_rows * n_q * c.d_model if graph.has_mlp else 0)
        model += attention_flops(c, k, n_pos, n_q) + mlp_flops(c, n_q)
    mixing += 2 * (later if start_layer < L else N) * n_out * c.d_model
    model += 2 * n_out * c.d_model * c.d_vocab_out
    return {"mixing": mixing, "model": model, "total": mixing + model}


def upstream_flops(graph: CircuitGraph, start_layer: int, n_pos: int) -> int:
    """One example: the cached senders' sum into every receiver after `start_layer`, once per pass."""
    n_up = graph.n_senders_before_attn(start_layer)
    later = graph.n_columns - upstream_offset(graph, start_layer)
    return 2 * n_up * later * n_pos * graph.config.d_model


def base_heads_flops(graph: CircuitGraph, layer: int, heads: int, n_pos: int) -> int:
    """One example: `heads` heads of `layer` from the cached upstream senders."""
    c = graph.config
    return 3 * heads * 2 * graph.n_senders_before_attn(layer) * n_pos * c.d_model + attention_flops(c, heads, n_pos)


def sweep_floor(graph: CircuitGraph, n_pos: int, n_out: int) -> int:
    """One example: every edge scored once, in a pass from its receiver's
    layer that recomputes one head there and reads the cached senders through
    a shared sum (one changed row); the least FLOPs the batched passes can
    spend on a sweep, with no candidate wasted."""
    per_layer = {}
    for e in graph.edges:  # the logits' layer is n_layers
        per_layer[e.receiver.layer] = per_layer.get(e.receiver.layer, 0) + 1
    return sum(n * pass_flops(graph, layer, 1, n_pos, n_out, 1 if 0 < layer < graph.n_layers else None)["total"]
               for layer, n in per_layer.items())

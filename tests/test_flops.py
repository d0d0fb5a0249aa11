"""The analytic FLOP counts agree with XLA's cost analysis of the same passes.

A 3-layer model keeps every count exact on XLA's side: its cost analysis
counts a scan's body once, and the patched pass scans only over the layers
between the first and the last. XLA also counts elementwise work, so ours is a little lower."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import dense, scoring
from acdc_jax.flops import base_heads_flops, forward_flops, pass_flops, sweep_floor, upstream_flops
from acdc_jax.candidates import Candidates
from acdc_jax.graph import CircuitGraph
from acdc_jax.model import Transformer, TransformerConfig
from acdc_jax.corruption import Corruption
from acdc_jax.programs import Shape
from acdc_jax.tasks.base import Task, kl_divergence

B, P, W = 3, 12, 4


STYLES = {"gpt2": dict(), "llama": dict(act_fn="silu", normalization="RMS", positional="rotary", gated_mlp=True)}


@pytest.fixture(scope="module", params=sorted(STYLES))
def setup(request):
    c = TransformerConfig(n_layers=3, d_model=64, n_heads=4, d_head=16, d_vocab=500, n_ctx=16, d_mlp=256,
                          **STYLES[request.param])
    model = Transformer(c, key=jax.random.PRNGKey(0))
    graph = CircuitGraph(c)
    rng = np.random.default_rng(0)
    clean, corrupted = rng.integers(0, 500, (B, P)), rng.integers(0, 500, (B, P))
    task = Task("t", clean, corrupted, positions=np.array([P - 1]), metrics={"kl": kl_divergence}).bind(model)
    corruption = Corruption.from_prompts(model, corrupted)
    return model, graph, corruption, scoring.Scorer(model, graph, task, corruption, kl_divergence)


def _close(ours, xla):
    assert 0.8 * xla <= ours <= xla, (ours, xla)  # elementwise work is a larger share at this toy width


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_pass_flops(setup, start):
    model, graph, corruption, s = setup
    masks = jnp.ones((W, graph.n_edges))
    lowered = dense.batch_metric.lower(model, graph, start, corruption, kl_divergence, s.task, s.arrays, masks,
                                          s.tokens, s.deviations, s.positions)
    _close(W * B * pass_flops(graph, start, graph.n_heads, P, 1)["total"], lowered.lowered.cost_analysis()["flops"])


@pytest.mark.parametrize("start", [0, 1, 2])
def test_pass_flops_with_a_shared_upstream_sum(setup, start):
    model, graph, corruption, s = setup
    masks, rows = jnp.ones((W, graph.n_edges)), jnp.array([0])
    lowered = dense.batch_metric.lower(model, graph, start, corruption, kl_divergence, s.task, s.arrays, masks,
                                          s.tokens, s.deviations, s.positions, None, (masks[0], rows))
    ours = W * B * pass_flops(graph, start, graph.n_heads, P, 1, upstream_rows=1)["total"]
    _close(ours + B * upstream_flops(graph, start, P), lowered.lowered.cost_analysis()["flops"])


def test_base_heads_and_forward_flops(setup):
    model, graph, corruption, s = setup
    heads = jnp.arange(2)
    lowered = dense.layer_heads.lower(model, graph, 1, corruption, jnp.ones(graph.n_edges), s.tokens,
                                         s.deviations, heads)
    _close(B * base_heads_flops(graph, 1, 2, P), lowered.lowered.cost_analysis()["flops"])
    one_layer = dataclasses.replace(model.config, n_layers=1)
    m1 = Transformer(one_layer, key=jax.random.PRNGKey(1))
    lowered = eqx.filter_jit(lambda m, t: m(t)).lower(m1, s.tokens)
    _close(B * forward_flops(one_layer, P), lowered.lowered.cost_analysis()["flops"])


def test_scorer_counts_flops(setup):
    model, graph, corruption, s = setup
    before = s.flops
    ones = np.ones(graph.n_edges, np.float32)
    s.batch(Candidates(ones, [[], []]), 1, 4, shape=Shape("pass", 1, 4, None, None))
    assert s.flops - before == 4 * B * pass_flops(graph, 1, graph.n_heads, P, 1)["total"]


def test_sweep_floor_counts_each_edge_once_from_its_receivers_layer():
    """One attention-only layer of H heads (split q/k/v, no step edges): 3H
    edges from the embedding into the heads, scored from layer 0, and H + 1
    into the logits, scored from the end; and the floor lies between the
    unembedding alone and the sequential loop's full passes."""
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=3, d_head=4, d_vocab=50, n_ctx=8)
    graph = CircuitGraph(cfg, split_qkv=True, qkv_edges=False)
    H, n_pos, n_out = cfg.n_heads, 6, 2
    assert graph.n_edges == 3 * H + H + 1
    want = (3 * H * pass_flops(graph, 0, 1, n_pos, n_out)["total"]
            + (H + 1) * pass_flops(graph, 1, 1, n_pos, n_out)["total"])
    assert sweep_floor(graph, n_pos, n_out) == want
    big = CircuitGraph(TransformerConfig(n_layers=3, d_model=16, n_heads=4, d_head=4, d_vocab=40, n_ctx=8, d_mlp=32))
    floor = sweep_floor(big, n_pos, n_out)
    assert big.n_edges * 2 * n_out * 16 * 40 < floor < big.n_edges * pass_flops(big, 0, 4, n_pos, n_out)["total"]

"""OLMo 2 checkpoints (``Olmo2ForCausalLM``) against transformers: logits
parity with no norms before attention and the MLP, norms after them, and one
query norm and one key norm across all heads; mutations that fail parity; a
cut into one head's query input moves its layer mates' queries; batched ACDC
against the reference loop, where no pass may recompute only some of a
layer's heads. The edges cut by PyTorch hooks are in test_llama_families."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import CircuitGraph, Corruption, patched_forward
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.errors import ConfigError

from .helpers import (assert_acdc_matches_the_reference_loop, edit_config, logits_gap, random_hf_llama,
                      random_prompt_task)

VOCAB = 61
CASES = {"mha": dict(n_kv=4), "gqa-tied": dict(n_kv=2, tie_word_embeddings=True),
         "mqa": dict(n_kv=1, head_dim=12)}


def _random(tmp_path, case):
    return random_hf_llama(tmp_path, model_type="olmo2", name=case, n_layers=3, seed=3, scale=0.3, **CASES[case])


def _parity(model, pt):
    return logits_gap(model, pt, 12, VOCAB)


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    return _random(tmp_path_factory.mktemp("olmo2"), "mha")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    c = model.config
    assert c.post_norm and c.qk_norm_across_heads and not c.pre_norm
    assert _parity(model, pt) <= 1e-5


def test_a_saved_model_loads_back_with_its_logits(olmo2, tmp_path):
    import acdc_jax as aj

    pt, model = olmo2
    loaded = aj.load(aj.save(model, tmp_path / "saved"))
    assert loaded.config == model.config and _parity(loaded, pt) <= 1e-5


def test_each_olmo2_difference_is_needed_for_parity(olmo2):
    """Mutations fail parity: per-head query and key norms (the weights cut
    per head), norms before attention and the MLP, or no norms after them."""
    pt, model = olmo2
    c, arrays = model.config, model_arrays(model)
    assert _parity(model, pt) <= 1e-5
    H, K = c.n_heads, c.d_head
    per_head = {k: v.reshape(v.shape[0], H, K)[:, 0] for k, v in arrays.items() if k.endswith(("q_norm.w", "k_norm.w"))}
    mutants = [
        fill_model(dataclasses.replace(c, qk_norm_across_heads=False), {**arrays, **per_head}),
        fill_model(dataclasses.replace(c, pre_norm=True), {**arrays, "blocks.ln1.w": np.ones((c.n_layers, c.d_model),
                   np.float32), "blocks.ln2.w": np.ones((c.n_layers, c.d_model), np.float32)}),
        fill_model(dataclasses.replace(c, post_norm=False),
                   {k: v for k, v in arrays.items() if "_post" not in k}),
    ]
    for mutant in mutants:
        assert _parity(mutant, pt) > 1e-3


def test_a_cut_into_one_heads_query_moves_its_layer_mates(olmo2):
    """The query norm spans the layer's heads: cutting an edge into head 0's
    query input changes head 1's z in that layer, as in the model."""
    from acdc_jax.patching import patched_logits_and_deviations

    _, model = olmo2
    graph = CircuitGraph(model.config)
    clean = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (3, 9)))
    corruption = Corruption.from_prompts(model, jnp.asarray(np.random.default_rng(8).integers(0, VOCAB, (3, 9))))
    mask = graph.ones().at[graph.edge_index("blocks.0.hook_resid_pre->blocks.1.hook_q_input[0]")].set(0.0)
    z = lambda m: patched_logits_and_deviations(model, graph, clean, m, corruption, z_at=np.arange(9))[2]
    moved = np.abs(np.asarray(z(mask) - z(graph.ones())))[:, 1]  # layer 1, [batch, heads, pos, d_head]
    assert moved[:, 1].max() > 1e-4 and moved[:, 0].max() > 1e-4


def test_no_program_recomputes_only_some_heads(olmo2):
    """Where heads share a norm, a pass recomputes every head of its start
    layer (no head cache); asked for some heads, the layer refuses."""
    from acdc_jax.layers import Attention
    from acdc_jax.model import layer

    _, model = olmo2
    attn = layer(model.blocks, 1).attn
    x = jnp.ones((2, 5, model.config.d_model))
    with pytest.raises(ValueError, match="needs every head's projection"):
        Attention.head_z(attn, x, x, x, heads=jnp.array([0, 1]))


def _random_task(seed):
    return random_prompt_task(seed, VOCAB, "random-olmo2")


def test_acdc_matches_the_reference_loop_batched_sequential_and_on_the_accelerator_path(olmo2, monkeypatch):
    assert_acdc_matches_the_reference_loop(olmo2[1], _random_task(3), 1e-2, monkeypatch)


def test_jax_grad_through_the_norms_is_finite(olmo2):
    _, model = olmo2
    graph = CircuitGraph(model.config)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (3, 9)))
    corruption = Corruption.from_prompts(model, jnp.asarray(np.random.default_rng(8).integers(0, VOCAB, (3, 9))))
    g = jax.grad(lambda m: patched_forward(model, tokens, m, corruption, graph)[:, -1].sum())(graph.ones())
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_bad_configs_are_refused_by_name(tmp_path, olmo2):
    from acdc_jax.config import TransformerConfig

    with pytest.raises(ConfigError, match="qk_norm_across_heads=True needs qk_norm=True"):
        TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, normalization="RMS",
                          qk_norm_across_heads=True)
    pt, _ = olmo2
    import converters

    d = tmp_path / "biased"
    pt.save_pretrained(d, safe_serialization=True)
    edit_config(d, {"attention_bias": True})
    with pytest.raises(ConfigError, match="o_proj's bias sits inside the norm after attention"):
        converters.convert(d)

"""Gemma 2 checkpoints (``Gemma2ForCausalLM``) against transformers: logits
parity with its norms after attention and after the MLP, capped attention
scores and logits, ``query_pre_attn_scalar`` and a sliding window; edges cut
by PyTorch hooks, where a head's sender is its share of the norm after
attention; batched ACDC against the sequential loop; refusals by name."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import CircuitGraph, Corruption, patched_forward
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.config import TransformerConfig
from acdc_jax.errors import CheckpointError, ConfigError

from .helpers import (assert_acdc_matches_the_reference_loop, assert_cut_matches, assert_missing_tensor_named,
                      edit_config, logits_gap, random_hf_llama, random_prompt_task)
from .test_llama import EDGES, torch_patched_logits
from .test_llama_families import family_model

VOCAB = 61
# caps low enough that random weights' scores and logits reach them
CASES = {
    "gqa": dict(n_kv=2, attn_logit_softcapping=0.5, final_logit_softcapping=1.0),
    "mqa-scalar-window": dict(n_kv=1, head_dim=12, query_pre_attn_scalar=10, attn_logit_softcapping=0.5,
                              final_logit_softcapping=1.0, sliding_window=12),
    "mha-uncapped-untied": dict(n_kv=4, attn_logit_softcapping=None, final_logit_softcapping=None,
                                tie_word_embeddings=False),
}


def _random(tmp_path, case, **kw):
    return random_hf_llama(tmp_path, model_type="gemma2", name=case, scale=0.3, **copy.deepcopy({**CASES[case], **kw}))


def _parity(model, pt, n=None):
    return logits_gap(model, pt, n or min(model.config.n_ctx, 20), VOCAB)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    c = model.config
    assert c.post_norm and (c.attn_softcap is None) == (CASES[case]["attn_logit_softcapping"] is None)
    assert _parity(model, pt) <= 1e-5


def _rebuilt(model, config=None, **arrays):
    """The model's weights (some replaced) under `config` (default: its own)."""
    return fill_model(config or model.config, {**model_arrays(model), **arrays})


def test_each_gemma2_difference_is_needed_for_parity(tmp_path):
    """Mutations fail parity: either cap dropped, the two norms after the
    sublayers swapped, or the attention scaled by head_dim instead of
    query_pre_attn_scalar."""
    pt, model = _random(tmp_path, "mqa-scalar-window")
    arrays = model_arrays(model)
    c = model.config
    mutants = [
        _rebuilt(model, dataclasses.replace(c, attn_softcap=None)),
        _rebuilt(model, dataclasses.replace(c, logit_softcap=None)),
        _rebuilt(model, **{"blocks.ln1_post.w": arrays["blocks.ln2_post.w"],
                           "blocks.ln2_post.w": arrays["blocks.ln1_post.w"]}),
        _rebuilt(model, dataclasses.replace(c, attn_scale=float(np.sqrt(c.d_head)))),
    ]
    for mutant in mutants:
        assert _parity(mutant, pt) > 1e-3


def test_query_pre_attn_scalar_sets_the_attention_scale(tmp_path):
    _, model = _random(tmp_path, "mqa-scalar-window")
    assert model.config.attn_scale == pytest.approx(np.sqrt(10))
    assert model.config.n_ctx == 12  # the sliding window bounds prompts
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=12"):
        model(jnp.zeros((1, 13), jnp.int32))


@pytest.mark.parametrize("case,change,error,words", [
    ("gqa", dict(attention_bias=True), ConfigError, "attention_bias=true is not supported for gemma2"),
    ("gqa", dict(use_bidirectional_attention=True), ConfigError, "use_bidirectional_attention"),
    ("gqa", dict(hidden_activation="silu"), ConfigError, "hidden_activation 'silu'"),
    ("gqa", dict(attn_logit_softcapping=-1.0), ConfigError, "attn_softcap must be a positive finite float"),
    ("gqa", dict(num_hidden_layers=3), CheckpointError, "Missing tensor 'model.layers.2.self_attn.q_proj.weight'"),
])
def test_bad_configs_are_refused_by_name(tmp_path, case, change, error, words):
    _random(tmp_path, case)
    edit_config(tmp_path / case, change)
    with pytest.raises(error, match=words):
        converters.convert(tmp_path / case)


def test_a_missing_norm_after_the_mlp_is_named(tmp_path):
    _random(tmp_path, "gqa")
    assert_missing_tensor_named(tmp_path / "gqa", "model.layers.1.post_feedforward_layernorm.weight")


def test_gemma2_fields_are_refused_elsewhere(tmp_path):
    random_hf_llama(tmp_path, name="llama")
    edit_config(tmp_path / "llama", {"final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="final_logit_softcapping is read only for model_type gemma2 or gemma3_text"):
        converters.convert(tmp_path / "llama")


def test_post_norm_needs_rmsnorm():
    base = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=6, d_mlp=8)
    with pytest.raises(ConfigError, match="post_norm=True needs normalization='RMS'"):
        TransformerConfig(**base, post_norm=True)
    with pytest.raises(ConfigError, match="logit_softcap must be a positive finite float"):
        TransformerConfig(**base, normalization="RMS", logit_softcap=float("nan"))


# --- the edge-decomposed forward ----------------------------------------------

@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return family_model("gemma2", tmp_path_factory)


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def test_heads_normalised_alone_fail_the_hook_reference(gemma2, monkeypatch):
    """A mutation: each head's sender normalised on its own (not as its share
    of the norm of the heads' sum) misses PyTorch's patched logits."""
    from acdc_jax.layers import LayerNorm

    pt, model = gemma2
    names = ("blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[2]",
             "blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[3]")
    clean, corrupt = _tokens(7), _tokens(8)
    ref = torch_patched_logits(pt, clean, corrupt, EDGES[names])
    monkeypatch.setattr(LayerNorm, "shares", lambda self, parts: self(parts))
    jax.clear_caches()  # the patched forward is compiled already; its mutant must not outlive this test
    try:
        with pytest.raises(AssertionError):
            assert_cut_matches(pt, model, CircuitGraph(model.config), names, clean, corrupt, ref)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_a_cut_into_one_head_changes_its_layer_mates_senders(gemma2):
    """With a norm after attention, a head's sender depends on the other heads
    of its layer through the shared rms: cutting an edge into head 0 of
    layer 1 moves head 1's sender there, as in the model."""
    _, model = gemma2
    graph = CircuitGraph(model.config)
    clean, corruption = _tokens(7), Corruption.from_prompts(model, _tokens(8))
    from acdc_jax.patching import patched_logits_and_deviations

    mask = graph.ones().at[graph.edge_index("blocks.0.hook_resid_pre->blocks.1.hook_q_input[0]")].set(0.0)
    full = patched_logits_and_deviations(model, graph, clean, graph.ones(), corruption)[1]
    cut = patched_logits_and_deviations(model, graph, clean, mask, corruption)[1]
    row = graph.n_embed + (graph.n_heads + 1) + 1  # layer 1, head 1
    assert np.abs(np.asarray(cut[:, row] - full[:, row])).max() > 1e-4
    assert np.abs(np.asarray(patched_forward(model, clean, mask, corruption, graph)
                             - patched_forward(model, clean, graph.ones(), corruption, graph))).max() > 1e-4


def test_sparse_passes_and_the_streamed_kl_are_not_used(gemma2):
    from acdc_jax.fused_kl import streams
    from acdc_jax.sparse import eligible
    from acdc_jax.tasks.base import kl_divergence

    _, model = gemma2
    assert not eligible(CircuitGraph(model.config))
    attn_only = dataclasses.replace(model.config, d_mlp=None, gated_mlp=False)
    assert not eligible(CircuitGraph(attn_only))
    assert not streams(kl_divergence, jnp.zeros(1, jnp.float32), True, model)


def _random_task(seed):
    return random_prompt_task(seed, VOCAB, "random-gemma2")


@pytest.mark.slow  # 22 s; the quick suite runs the same check through post-attention norms on Gemma 3,
# and Gemma 2's softcaps through its parity and hook-reference edge tests
def test_acdc_matches_the_reference_loop_batched_sequential_and_on_the_accelerator_path(gemma2, monkeypatch):
    """The batched mode recomputes a subset of a layer's heads, whose norm still reads every head."""
    assert_acdc_matches_the_reference_loop(gemma2[1], _random_task(3), 1e-2, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1e-3, 3e-2])
def test_batched_acdc_decides_like_the_sequential_loop_at_more_taus(gemma2, tau):
    from .test_batched_equals_sequential import _same

    _, model = gemma2
    circuit = _same(model, _random_task(3), tau)
    assert 0 < circuit.n_edges < CircuitGraph(model.config).n_edges


def test_jax_grad_through_the_caps_and_norms_is_finite(gemma2):
    _, model = gemma2
    graph = CircuitGraph(model.config)
    corruption = Corruption.from_prompts(model, _tokens(8))
    f = lambda m: patched_forward(model, _tokens(7), m, corruption, graph)[:, -1].sum()
    g = jax.grad(f)(graph.ones())
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0

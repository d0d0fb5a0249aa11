"""The families read by the Llama converter with changes of their own (Phi-3,
Qwen3, OLMo, OLMo 2 and 3, SmolLM3, Granite, Gemma 2 and Gemma 3), on random transformers models: all-ones
masks give the plain forward, and cutting each of the Llama tests' edges
matches their PyTorch hook reference. That reference patches q_proj, k_proj
and v_proj (Phi-3: the fused qkv_proj's rows of the receiver), so
transformers then applies each family's per-head norms, clamp and rotation to
the patched projection; with norms after attention and after the MLP
(Gemma 2 and 3, OLMo 2), the senders are each head's share of the norm after
attention and the norm after the MLP's output; OLMo 2's query and key norms
span all heads, so transformers normalises a patched head's rows together
with the other heads'. Each family's own file holds
its parity, refusals and ACDC tests, with the model built here."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import CircuitGraph

from .helpers import assert_all_ones_and_zeros, assert_cut_matches, random_hf_llama
from .test_llama import EDGES, torch_patched_logits

VOCAB = 61
GEMMA3_ROPES = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}
FAMILIES = {
    "phi3": dict(model_type="phi3", seed=1, scale=0.2, partial_rotary_factor=0.5),
    "qwen3": dict(model_type="qwen3", seed=2, scale=0.3),
    "olmo": dict(model_type="olmo", seed=3, scale=0.2, clip_qkv=0.3),
    "olmo2": dict(model_type="olmo2", seed=3, scale=0.3),
    "granite": dict(model_type="granite", seed=1, scale=0.3, embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.0625, logits_scaling=8.0),
    "smollm3": dict(model_type="smollm3", seed=2, scale=0.2, no_rope_layers=[1, 0, 1]),
    "olmo3": dict(model_type="olmo3", seed=1, scale=0.3, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                   "full_attention": {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 16}}),
    "gemma2": dict(model_type="gemma2", seed=1, scale=0.3, attn_logit_softcapping=0.5, final_logit_softcapping=1.0),
    "gemma3": dict(model_type="gemma3_text", seed=1, scale=0.3, sliding_window=16, sliding_window_pattern=2,
                   rope_parameters=GEMMA3_ROPES, final_logit_softcapping=1.0),
}


def family_model(name: str, tmp_path_factory):
    """(the transformers model, ours) of family `name`: 3 layers, 2 key/value heads."""
    kwargs = copy.deepcopy(FAMILIES[name])
    return random_hf_llama(tmp_path_factory.mktemp(name), n_layers=3, n_kv=2, **kwargs)


def family_tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return family_model(request.param, tmp_path_factory)


def test_all_ones_is_the_plain_forward_and_all_zeros_the_corrupted_run(family):
    _, model = family
    assert_all_ones_and_zeros(model, CircuitGraph(model.config), family_tokens(0), family_tokens(1))


@pytest.mark.parametrize("names", sorted(EDGES), ids=lambda n: n[0])
def test_patched_edges_match_pytorch_hooks(family, names):
    pt, model = family
    clean, corrupt = family_tokens(7), family_tokens(8)
    ref = torch_patched_logits(pt, clean, corrupt, EDGES[names])
    assert_cut_matches(pt, model, CircuitGraph(model.config), names, clean, corrupt, ref)

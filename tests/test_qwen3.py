"""Qwen3 checkpoints (``Qwen3ForCausalLM``): Llama with an RMSNorm of each
head's query and key. Logits parity is in test_llama.py; here the norms'
weights are shown to matter, edges are cut by PyTorch hooks on q_proj,
k_proj and v_proj (transformers then normalises the patched projection),
and ACDC makes the reference loop's decisions."""

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax.checkpoint import fill_model, model_arrays

from .helpers import assert_acdc_matches_the_reference_loop, torch_logits
from .test_gemma2 import _random_task
from .test_llama_families import family_model

VOCAB = 61


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return family_model("qwen3", tmp_path_factory)


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def test_the_query_and_key_norms_are_read_and_needed(qwen3):
    pt, model = qwen3
    assert model.config.qk_norm and not model.config.post_norm
    arrays = model_arrays(model)
    q_norm = pt.model.layers[1].self_attn.q_norm.weight.detach().numpy()
    np.testing.assert_array_equal(arrays["blocks.attn.q_norm.w"][1], q_norm)
    tokens = np.asarray(_tokens(5))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 1e-5
    ones = {n: np.ones_like(a) for n, a in arrays.items() if n.endswith(("q_norm.w", "k_norm.w"))}
    mutant = fill_model(model.config, {**arrays, **ones})
    assert np.abs(np.asarray(mutant(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() > 1e-3


@pytest.mark.slow  # 13 s; the quick suite runs ACDC through per-head norms on Gemma 3
def test_acdc_matches_the_reference_loop(qwen3):
    assert_acdc_matches_the_reference_loop(qwen3[1], _random_task(5), 1e-2)

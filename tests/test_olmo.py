"""OLMo checkpoints (``OlmoForCausalLM``, the first generation): Llama with
LayerNorms that have no weights and queries, keys and values clamped after
the projection (``clip_qkv``). Logits parity, the clamp shown to matter,
edges cut by PyTorch hooks on the projections (transformers then clamps the
patched projection), ACDC against the reference loop, refusals."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.errors import ConfigError

from .helpers import assert_acdc_matches_the_reference_loop, edit_config, random_hf_llama, torch_logits
from .test_gemma2 import _random_task
from .test_llama_families import family_model

VOCAB = 61


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def _gap(model, pt, tokens):
    return np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max()


@pytest.mark.parametrize("options", [dict(), dict(clip_qkv=0.1, n_kv=1), dict(attention_bias=True, n_kv=4),
                                     dict(tie_word_embeddings=True, clip_qkv=0.5)], ids=str)
def test_logits_match_transformers(tmp_path, options):
    pt, model = random_hf_llama(tmp_path, model_type="olmo", scale=0.2, **options)
    assert (model.config.normalization, model.config.ln_eps) == ("LNPre", 1e-5)
    assert model.config.qkv_clip == options.get("clip_qkv")
    assert _gap(model, pt, np.asarray(_tokens(0, (3, 20)))) <= 1e-5


def test_the_clamp_is_needed_for_parity(tmp_path):
    pt, model = random_hf_llama(tmp_path, model_type="olmo", scale=0.2, clip_qkv=0.1)
    unclamped = fill_model(dataclasses.replace(model.config, qkv_clip=None), model_arrays(model))
    assert _gap(unclamped, pt, np.asarray(_tokens(0))) > 1e-3


def test_clip_qkv_is_refused_elsewhere(tmp_path):
    random_hf_llama(tmp_path, name="llama")
    edit_config(tmp_path / "llama", {"clip_qkv": 8.0})
    with pytest.raises(ConfigError, match="clip_qkv is read only for model_type olmo"):
        converters.convert(tmp_path / "llama")


@pytest.fixture(scope="module")
def olmo(tmp_path_factory):
    return family_model("olmo", tmp_path_factory)


@pytest.mark.slow  # 13 s; the quick suite runs ACDC through changes inside the heads on Gemma 3
def test_acdc_matches_the_reference_loop(olmo):
    assert_acdc_matches_the_reference_loop(olmo[1], _random_task(6), 1e-2)

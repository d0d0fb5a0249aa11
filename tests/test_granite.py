"""Granite checkpoints (``GraniteForCausalLM``) against transformers: Llama
with four scalars (the embedding's, each sublayer output's, the attention
scores' and the logits' divisor) folded into the weights; logits parity,
each scalar needed for it, refusals by name, and batched ACDC against the
reference loop. The edges cut by PyTorch hooks are in test_llama_families.
The scalars are of the published models' sizes: with all four at 1 the
scores are not scaled and transformers' own float32 logits are 4e-5 from a
float64 run."""

import numpy as np
import pytest

import converters
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.errors import ConfigError

from .helpers import (assert_acdc_matches_the_reference_loop, edit_config, logits_gap, random_hf_llama,
                      random_prompt_task)

VOCAB = 61
SCALARS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0)
CASES = {"gqa": dict(n_kv=2), "mha-tied": dict(n_kv=4, tie_word_embeddings=True), "mqa": dict(n_kv=1)}


def _random(tmp_path, case):
    return random_hf_llama(tmp_path, model_type="granite", name=case, n_layers=3, seed=1, scale=0.3,
                           **SCALARS, **CASES[case])


def _parity(model, pt):
    return logits_gap(model, pt, 14, VOCAB)


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    return _random(tmp_path_factory.mktemp("granite"), "gqa")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    assert model.config.attn_scale == 16.0  # 1 / attention_multiplier
    assert _parity(model, pt) <= 1e-5


def test_each_scalar_is_needed_for_parity(granite):
    """Mutations fail parity: each folded scalar undone in turn."""
    pt, model = granite
    arrays, m = model_arrays(model), SCALARS
    mutants = {
        "embedding": {"embed.W_E": arrays["embed.W_E"] / m["embedding_multiplier"]},
        "residual": {"blocks.attn.W_O": arrays["blocks.attn.W_O"] / m["residual_multiplier"],
                     "blocks.mlp.W_out": arrays["blocks.mlp.W_out"] / m["residual_multiplier"]},
        "logits": {"unembed.W_U": arrays["unembed.W_U"] * m["logits_scaling"]},
    }
    assert _parity(model, pt) <= 1e-5
    for name, change in mutants.items():
        assert _parity(fill_model(model.config, {**arrays, **change}), pt) > 1e-3, name
    import dataclasses

    unscaled = dataclasses.replace(model.config, attn_scale=float(np.sqrt(model.config.d_head)))
    assert _parity(fill_model(unscaled, arrays), pt) > 1e-3


def test_bad_scalars_are_refused_by_name(tmp_path, granite):
    pt, _ = granite
    d = tmp_path / "bad"
    pt.save_pretrained(d, safe_serialization=True)
    edit_config(d, {"logits_scaling": 0})
    with pytest.raises(ConfigError, match="logits_scaling must be a positive finite number"):
        converters.convert(d)
    edit_config(d, {"logits_scaling": 8.0, "model_type": "llama"})
    with pytest.raises(ConfigError, match="is read only for model_type granite"):
        converters.convert(d)


def _random_task(seed):
    return random_prompt_task(seed, VOCAB, "random-granite")


def test_acdc_matches_the_reference_loop_batched_sequential_and_on_the_accelerator_path(granite, monkeypatch):
    assert_acdc_matches_the_reference_loop(granite[1], _random_task(3), 1e-2, monkeypatch)

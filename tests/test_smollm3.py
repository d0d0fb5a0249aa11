"""SmolLM3 checkpoints (``SmolLM3ForCausalLM``) against transformers: Llama
with no rotary positions in some layers (``no_rope_layers``: every fourth by
default), which rotate here at zero frequencies, so that a rope's cos/sin
factor (YaRN) applies to the other layers only; logits parity, mutations that
fail it, refusals by name, and batched ACDC against the reference loop. The
edges cut by PyTorch hooks are in test_llama_families. The weights are
perturbed by 0.2 (the Llama tests' 0.3 gives logits whose float32 error,
transformers' own against a float64 run included, is about 2e-5)."""

import dataclasses

import pytest

import converters
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.errors import ConfigError

from .helpers import (assert_acdc_matches_the_reference_loop, edit_config, logits_gap, random_hf_llama,
                      random_prompt_task)

VOCAB = 61
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "attention_factor": 1.3}
CASES = {
    "defaults": dict(),
    "flags-untied": dict(no_rope_layers=[1, 0, 0, 1], tie_word_embeddings=False),
    "yarn": dict(rope_parameters=YARN),
    "every-layer-yarn": dict(no_rope_layers=[1, 1, 1, 1], rope_parameters=YARN),
    "window": dict(use_sliding_window=True, sliding_window=12),
}


def _random(tmp_path, case):
    return random_hf_llama(tmp_path, model_type="smollm3", name=case, n_layers=4, seed=2, scale=0.2, **CASES[case])


def _parity(model, pt):
    return logits_gap(model, pt, min(14, model.config.n_ctx), VOCAB)


@pytest.fixture(scope="module")
def smollm3(tmp_path_factory):
    return _random(tmp_path_factory.mktemp("smollm3"), "yarn")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    c = model.config
    flags = CASES[case].get("no_rope_layers", [1, 1, 1, 0])
    assert c.rotary_local_layers == tuple(l for l, f in enumerate(flags) if not f)
    assert c.n_ctx == (12 if case == "window" else 64)
    assert _parity(model, pt) <= 1e-5


def test_each_smollm3_difference_is_needed_for_parity(smollm3):
    """Mutations fail parity: every layer rotated, or YaRN's factor folded
    into every layer's attention scale (as for Llama) instead of the rotated
    layers' cosines and sines."""
    pt, model = smollm3
    c, arrays = model.config, model_arrays(model)
    assert c.rotary_attention_factor == 1.3 and _parity(model, pt) <= 1e-5
    for config in (dataclasses.replace(c, rotary_local_layers=(), rotary_local_inv_freq=None),
                   dataclasses.replace(c, rotary_attention_factor=1.0, attn_scale=c.attn_scale / 1.3 ** 2)):
        assert _parity(fill_model(config, arrays), pt) > 1e-3


def test_bad_configs_are_refused_by_name(tmp_path, smollm3):
    pt, _ = smollm3
    d = tmp_path / "bad"
    pt.save_pretrained(d, safe_serialization=True)
    for change, words in [({"no_rope_layers": [1, 0]}, "no_rope_layers must give 1 .* for each of the 4 layers"),
                          ({"no_rope_layers": None, "no_rope_layer_interval": 0}, "no_rope_layer_interval must be")]:
        edit_config(d, change)
        with pytest.raises(ConfigError, match=words):
            converters.convert(d)
        pt.save_pretrained(d, safe_serialization=True)
    llama = tmp_path / "llama"
    pt.save_pretrained(llama, safe_serialization=True)
    edit_config(llama, {"model_type": "llama"})
    with pytest.raises(ConfigError, match="no_rope_layers is read only for model_type smollm3"):
        converters.convert(llama)


def _random_task(seed):
    return random_prompt_task(seed, VOCAB, "random-smollm3")


# 34 s; its layers differ from Llama's only in their rotary frequencies, which parity and the hook-reference cuts test
@pytest.mark.slow
def test_acdc_matches_the_reference_loop_batched_sequential_and_on_the_accelerator_path(smollm3, monkeypatch):
    assert_acdc_matches_the_reference_loop(smollm3[1], _random_task(3), 1e-2, monkeypatch)

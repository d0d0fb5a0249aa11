"""Gemma 3 text checkpoints (``Gemma3ForCausalLM``, ``gemma3_text``) against
transformers: logits parity with per-head query and key norms, local and
global layers that rotate with different frequencies (from transformers 5's
per-layer-type ``rope_parameters`` and from the older fields), the norms
after attention and the MLP; edges cut by PyTorch hooks; ACDC against the
reference loop; mutations; refusals by name."""

import copy
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import CircuitGraph
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.config import TransformerConfig
from acdc_jax.errors import ConfigError

from .helpers import (assert_acdc_matches_the_reference_loop, assert_all_ones_and_zeros, assert_missing_tensor_named,
                      edit_config, random_hf_llama)
from .test_gemma2 import _parity, _random_task
from .test_llama_families import GEMMA3_ROPES, family_model

VOCAB = 61
ROPES = GEMMA3_ROPES
CASES = {
    # layers 0 and 2 local, 1 global; the global rope linearly scaled, as in Gemma 3 4B and up
    "gqa-local-global": dict(n_kv=2, n_layers=3, sliding_window=16, sliding_window_pattern=2, rope_parameters=ROPES),
    "mqa-scalar-capped": dict(n_kv=1, head_dim=12, query_pre_attn_scalar=10, final_logit_softcapping=1.0,
                              sliding_window=12, rope_parameters=ROPES),
    "mha-global-untied": dict(n_kv=4, layer_types=["full_attention"] * 2, tie_word_embeddings=False),
}


def _random(tmp_path, case, **kw):
    return random_hf_llama(tmp_path, model_type="gemma3_text", name=case, scale=0.3,
                           **copy.deepcopy({**CASES[case], **kw}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    c = model.config
    assert c.qk_norm and c.post_norm and c.attn_softcap is None
    assert c.rotary_local_layers == {"gqa-local-global": (0, 2), "mqa-scalar-capped": (0, 1),
                                     "mha-global-untied": ()}[case]
    assert _parity(model, pt) <= 1e-5


def test_the_two_layer_types_rotate_as_transformers_does(tmp_path):
    pt, model = _random(tmp_path, "gqa-local-global")
    rotary = pt.model.rotary_emb
    np.testing.assert_allclose(model.config.rotary_inv_freq, rotary.full_attention_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.config.rotary_local_inv_freq, rotary.sliding_attention_inv_freq.numpy(), rtol=1e-6)


def test_the_older_rope_fields_read_the_same(tmp_path):
    """Configs written before transformers 5 give rope_theta and rope_scaling
    (global layers), rope_local_base_freq and sliding_window_pattern."""
    pt, _ = _random(tmp_path, "gqa-local-global")
    path = tmp_path / "gqa-local-global" / "config.json"
    cfg = json.loads(path.read_text())
    for name in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        cfg.pop(name, None)
    cfg.update(rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=50.0,
               sliding_window_pattern=2)
    path.write_text(json.dumps(cfg))
    model = converters.convert(tmp_path / "gqa-local-global")
    assert model.config.rotary_local_layers == (0, 2)
    assert _parity(model, pt) <= 1e-5


def test_each_gemma3_difference_is_needed_for_parity(tmp_path):
    """Mutations fail parity: every layer rotated with the global frequencies,
    the two frequencies swapped, or the per-head norms' weights dropped."""
    pt, model = _random(tmp_path, "gqa-local-global")
    c, arrays = model.config, model_arrays(model)
    mutants = [
        dataclasses.replace(c, rotary_local_inv_freq=None, rotary_local_layers=()),
        dataclasses.replace(c, rotary_inv_freq=c.rotary_local_inv_freq, rotary_local_inv_freq=c.rotary_inv_freq),
    ]
    for config in mutants:
        assert _parity(fill_model(config, arrays), pt) > 1e-3
    ones = {n: np.ones_like(a) for n, a in arrays.items() if n.endswith(("q_norm.w", "k_norm.w"))}
    assert _parity(fill_model(c, {**arrays, **ones}), pt) > 1e-3


@pytest.mark.parametrize("case,change,error,words", [
    ("gqa-local-global", dict(attn_logit_softcapping=50.0), ConfigError, "transformers' Gemma 3 does not apply it"),
    ("gqa-local-global", dict(rope_parameters={"rope_type": "default", "rope_theta": 10.0}), ConfigError,
     "rope_parameters must be given per layer type"),
    ("gqa-local-global", dict(rope_theta=10.0), ConfigError, "are both given; keep one"),
    ("gqa-local-global", dict(layer_types=["full_attention"]), ConfigError, "for each of the 3 layers"),
    ("gqa-local-global", dict(rope_parameters={**ROPES, "full_attention": {
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0, "original_max_position_embeddings": 16}}),
     ConfigError, "no cos/sin factor"),
    ("gqa-local-global", dict(attention_bias=True), ConfigError,
     "attention_bias=true is not supported for gemma3_text"),
])
def test_bad_configs_are_refused_by_name(tmp_path, case, change, error, words):
    _random(tmp_path, case)
    edit_config(tmp_path / case, change)
    with pytest.raises(error, match=words):
        converters.convert(tmp_path / case)


def test_a_missing_key_norm_is_named(tmp_path):
    _random(tmp_path, "mha-global-untied")
    assert_missing_tensor_named(tmp_path / "mha-global-untied", "model.layers.1.self_attn.k_norm.weight")


def test_a_config_without_tie_word_embeddings_is_tied_as_transformers_reads_it(tmp_path):
    """Published Gemma configs leave tie_word_embeddings out; transformers'
    Gemma configs default it to true, and their checkpoints hold no lm_head."""
    from safetensors.numpy import load_file

    pt, _ = _random(tmp_path, "gqa-local-global")
    directory = tmp_path / "gqa-local-global"
    cfg = json.loads((directory / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    (directory / "config.json").write_text(json.dumps(cfg))
    assert "lm_head.weight" not in load_file(str(directory / "model.safetensors"))
    assert _parity(converters.convert(directory), pt) <= 1e-5


@pytest.mark.parametrize("fields,words", [
    (dict(rotary_local_layers=(0,)), "go together"),
    (dict(rotary_local_layers=(3,), rotary_local_inv_freq=(1.0, 0.5)), "distinct layers 0..1"),
    (dict(rotary_local_layers=(0,), rotary_local_inv_freq=(1.0,)), "rotary_dim / 2 = 2"),
    (dict(qk_norm=True, normalization="LN"), "qk_norm=True needs normalization='RMS'"),
])
def test_bad_rotary_and_norm_settings_are_refused(fields, words):
    base = dict(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=6, d_mlp=8, normalization="RMS",
                positional="rotary")
    with pytest.raises(ConfigError, match=words):
        TransformerConfig(**{**base, **fields})


# --- the edge-decomposed forward ----------------------------------------------

@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return family_model("gemma3", tmp_path_factory)


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def test_acdc_matches_the_reference_loop_batched_sequential_and_on_the_accelerator_path(gemma3, monkeypatch):
    assert_acdc_matches_the_reference_loop(gemma3[1], _random_task(4), 1e-2, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1e-3, 3e-2])
def test_batched_acdc_decides_like_the_sequential_loop_at_more_taus(gemma3, tau):
    from .test_batched_equals_sequential import _same

    _, model = gemma3
    circuit = _same(model, _random_task(4), tau)
    assert 0 < circuit.n_edges < CircuitGraph(model.config).n_edges


def test_saved_and_loaded_in_our_own_format(gemma3, tmp_path):
    """acdc_jax.save writes the new config fields to JSON and back: the same
    config (so the same graph) and the same logits."""
    from acdc_jax import save

    _, model = gemma3
    save(model, tmp_path / "saved")
    loaded = converters.convert(tmp_path / "saved")
    assert loaded.config == model.config
    CircuitGraph(model.config).check_config(loaded.config)
    assert np.array_equal(np.asarray(loaded(_tokens(3))), np.asarray(model(_tokens(3))))


# --- image-text checkpoints (Gemma 3 4B and up): the text model ----------------------

def _image_text(tmp_path, name="image-text"):
    """A random Gemma3ForConditionalGeneration (a tiny SigLIP tower), saved and converted."""
    import torch
    import transformers

    from .helpers import _perturbed

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=VOCAB + 8, max_position_embeddings=64, sliding_window=16,
                sliding_window_pattern=2, rope_parameters=copy.deepcopy(ROPES))
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2,
                                       image_token_index=VOCAB + 3)
    torch.manual_seed(3)
    return _perturbed(transformers.Gemma3ForConditionalGeneration(config), 0.3, tmp_path / name)


def test_an_image_text_checkpoints_text_model_matches_transformers(tmp_path):
    """Text-only prompts through Gemma3ForConditionalGeneration: its vision
    tower and projector are dropped, its language model converted."""
    from .helpers import logits_gap

    pt, model = _image_text(tmp_path)
    assert model.config.rotary_local_layers == (0, 2) and model.config.qk_norm
    assert logits_gap(model, pt, 12, VOCAB) <= 1e-5
    assert_all_ones_and_zeros(model, CircuitGraph(model.config), _tokens(0), _tokens(1))


def test_the_image_text_names_of_other_transformers_versions_convert_alike(tmp_path):
    """transformers 4.52-4.57 kept the language model under
    ``model.language_model.`` and the tower under ``model.vision_tower.``."""
    from safetensors.numpy import load_file, save_file

    _, model = _image_text(tmp_path)
    path = tmp_path / "image-text" / "model.safetensors"
    renamed = {}
    for name, value in load_file(str(path)).items():
        for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = value
    save_file(renamed, str(path))
    again = converters.convert(tmp_path / "image-text")
    assert np.array_equal(np.asarray(again(_tokens(2))), np.asarray(model(_tokens(2))))


@pytest.mark.parametrize("change,words", [
    (dict(tie_word_embeddings=False), "tie_word_embeddings differs"),
    (dict(audio_config={}), r"unsupported field\(s\) \['audio_config'\]"),
    (dict(text_config={"model_type": "gemma2"}), "text_config has model_type 'gemma2'"),
])
def test_bad_image_text_configs_are_refused_by_name(tmp_path, change, words):
    _image_text(tmp_path)
    directory = tmp_path / "image-text"
    cfg = json.loads((directory / "config.json").read_text())
    if "text_config" in change:
        cfg["text_config"].update(change["text_config"])
    else:
        cfg.update(change)
        cfg["text_config"]["tie_word_embeddings"] = True
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=words):
        converters.convert(directory)

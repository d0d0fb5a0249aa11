"""Phi-3 checkpoints (``Phi3ForCausalLM``) against transformers: logits
parity with grouped-query attention, partial rotary, tied embeddings, a
sliding window and LongRoPE (also under its older names); edges cut by
PyTorch hooks on the fused q/k/v projection; refusals by name."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import CircuitGraph
from acdc_jax.errors import CheckpointError, ConfigError

from .helpers import edit_config, logits_gap, random_hf_llama, torch_logits
from .test_llama_families import family_model

VOCAB = 61
D_HEAD = 8  # d_model 32 over 4 heads
LONGROPE = {"rope_type": "longrope", "rope_theta": 500.0,
            "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [2.0, 3.0, 6.0, 9.0]}
CASES = {
    "gqa": dict(n_kv=2),
    "mha-tied": dict(n_kv=4, tie_word_embeddings=True),
    "partial-rotary-window": dict(n_kv=2, partial_rotary_factor=0.5, sliding_window=24),
    "longrope": dict(n_kv=2, rope_parameters=LONGROPE, original_max_position_embeddings=16),
    # Phi-4-mini's kind: LongRoPE's cos/sin factor on part of each head
    "partial-longrope-tied": dict(n_kv=1, tie_word_embeddings=True, original_max_position_embeddings=16,
                                  rope_parameters={**LONGROPE, "partial_rotary_factor": 0.5,
                                                   "short_factor": [1.0, 3.0], "long_factor": [2.0, 5.0]}),
}


def _random(tmp_path, case, **kw):
    # a deep copy: transformers adds fields to the rope dict it is given
    return random_hf_llama(tmp_path, model_type="phi3", name=case, **copy.deepcopy({**CASES[case], **kw}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    assert logits_gap(model, pt, min(model.config.n_ctx, 20), VOCAB) <= 1e-5


def test_longrope_holds_its_short_factors_up_to_the_original_length(tmp_path):
    """Up to original_max_position_embeddings tokens transformers uses the
    short factors, with cos and sin scaled by sqrt(1 + ln(64/16) / ln 16);
    a longer prompt would switch every position to the long factors, so it
    is refused."""
    pt, model = _random(tmp_path, "longrope")
    assert model.config.n_ctx == 16 and model.config.rotary_dim == D_HEAD
    powers = 500.0 ** (np.arange(0, D_HEAD, 2) / D_HEAD)
    assert np.allclose(model.config.rotary_inv_freq, 1 / (np.array(LONGROPE["short_factor"]) * powers), rtol=1e-6)
    assert model.config.attn_scale == pytest.approx(np.sqrt(D_HEAD) / (1 + np.log(4) / np.log(16)))
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=16"):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("older", ["su", "yarn"])
def test_older_longrope_names_are_longrope(tmp_path, older):
    """Phi-3 configs written before transformers named it call LongRoPE 'su'
    or 'yarn' under rope_scaling; transformers reads both as LongRoPE."""
    pt, _ = _random(tmp_path, "longrope")
    path = tmp_path / "longrope" / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_scaling"] = {"type": older, "short_factor": params["short_factor"], "long_factor": params["long_factor"]}
    cfg["rope_theta"] = params["rope_theta"]
    path.write_text(json.dumps(cfg))
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 16))
    model = converters.convert(tmp_path / "longrope")
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 1e-5


@pytest.mark.parametrize("case,change,error,words", [
    ("longrope", dict(rope_parameters={**LONGROPE, "short_factor": [1.0, 2.0]}), ConfigError,
     "short_factor, 4 positive numbers"),
    ("longrope", dict(original_max_position_embeddings=None, rope_parameters=LONGROPE), ConfigError,
     "needs original_max_position_embeddings"),
    ("gqa", dict(hidden_act="gelu"), ConfigError, "hidden_act 'gelu'"),
    ("gqa", dict(num_hidden_layers=3), CheckpointError, "Missing tensor 'model.layers.2.self_attn.qkv_proj.weight'"),
    ("gqa", dict(num_key_value_heads=4), CheckpointError, r"qkv_proj.weight' .* has shape \(64, 32\), expected \(96, 32\)"),
])
def test_bad_configs_are_refused_by_name(tmp_path, case, change, error, words):
    _random(tmp_path, case)
    edit_config(tmp_path / case, change)
    with pytest.raises(error, match=words):
        converters.convert(tmp_path / case)


def test_a_top_level_original_length_is_refused_outside_phi3(tmp_path):
    random_hf_llama(tmp_path, name="llama")
    edit_config(tmp_path / "llama", {"original_max_position_embeddings": 16})
    with pytest.raises(ConfigError, match="original_max_position_embeddings at the top level is a Phi-3 field"):
        converters.convert(tmp_path / "llama")


# --- the edge-decomposed forward ----------------------------------------------

@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return family_model("phi3", tmp_path_factory)


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1e-3, 1e-2, 3e-2])
def test_batched_acdc_decides_like_the_sequential_loop(phi3, tau):
    from acdc_jax.tasks import prompt_task

    from .test_batched_equals_sequential import _same

    _, model = phi3
    rng = np.random.default_rng(3)
    task = prompt_task(rng.integers(0, VOCAB, (6, 8)).tolist(), rng.integers(0, VOCAB, (6, 8)).tolist(),
                       position=[5, 7], name="random-phi3")
    circuit = _same(model, task, tau)
    assert 0 < circuit.n_edges < CircuitGraph(model.config).n_edges

"""OLMo 3 checkpoints (``Olmo3ForCausalLM``) against transformers: OLMo 2's
norms, with sliding-window layers that rotate at their own frequencies and
full-attention layers that may carry YaRN and its cos/sin factor; logits
parity, mutations that fail it, the older rope fields as transformers reads
them, refusals by name, and batched ACDC against the reference loop. The
edges cut by PyTorch hooks are in test_llama_families."""

import copy
import dataclasses

import pytest

import converters
from acdc_jax.checkpoint import fill_model, model_arrays
from acdc_jax.errors import ConfigError

from .helpers import (assert_acdc_matches_the_reference_loop, edit_config, logits_gap, random_hf_llama,
                      random_prompt_task)

VOCAB = 61
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "attention_factor": 1.3, "beta_fast": 32, "beta_slow": 1}
CASES = {
    "defaults": dict(),
    "thetas": dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    "yarn-factor": dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                         "full_attention": YARN}),
    "yarn-implicit-factor-mqa": dict(n_kv=1, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        "full_attention": {k: v for k, v in YARN.items() if k != "attention_factor"}}),
}


def _random(tmp_path, case, seed=1):
    kw = {"n_kv": 2, "sliding_window": 16, "layer_types": TYPES, **copy.deepcopy(CASES[case])}
    return random_hf_llama(tmp_path, model_type="olmo3", name=case, n_layers=4, seed=seed, scale=0.3, **kw)


def _parity(model, pt):
    return logits_gap(model, pt, 14, VOCAB)


@pytest.fixture(scope="module")
def olmo3(tmp_path_factory):
    return _random(tmp_path_factory.mktemp("olmo3"), "yarn-factor")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    c = model.config
    assert c.qk_norm_across_heads and not c.pre_norm and c.rotary_local_layers == (0, 2, 3) and c.n_ctx == 16
    assert (c.rotary_attention_factor != 1.0) == case.startswith("yarn")
    assert _parity(model, pt) <= 1e-5


def test_each_olmo3_difference_is_needed_for_parity(olmo3):
    """Mutations fail parity: the cos/sin factor dropped, every layer rotated
    as the full-attention ones, or the factor put on every layer."""
    pt, model = olmo3
    c, arrays = model.config, model_arrays(model)
    assert c.rotary_attention_factor == 1.3 and _parity(model, pt) <= 1e-5
    for config in (dataclasses.replace(c, rotary_attention_factor=1.0),
                   dataclasses.replace(c, rotary_local_layers=(), rotary_local_inv_freq=None)):
        assert _parity(fill_model(config, arrays), pt) > 1e-3


def test_the_older_rope_fields_are_read_as_transformers_reads_them(tmp_path, olmo3):
    """A config with rope_theta and rope_scaling (transformers 4's fields):
    the full-attention layers take both, the sliding ones the default theta."""
    pt, _ = olmo3
    d = tmp_path / "older"
    pt.save_pretrained(d, safe_serialization=True)
    import json

    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=1000.0, rope_scaling={k: v for k, v in YARN.items() if k != "rope_theta"})
    (d / "config.json").write_text(json.dumps(cfg))
    import transformers

    reread = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    ours = converters.convert(d)
    assert ours.config.rotary_attention_factor == 1.3
    assert _parity(ours, reread) <= 1e-5


def test_bad_rope_configs_are_refused_by_name(tmp_path, olmo3):
    pt, _ = olmo3
    d = tmp_path / "bad"
    pt.save_pretrained(d, safe_serialization=True)
    cases = [
        ({"rope_parameters": {"sliding_attention": YARN, "full_attention": YARN}},
         "OLMo 3's sliding_attention rope must rotate the whole head with no cos/sin factor"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}, "must be given per layer type"),
        ({"rope_theta": 10.0}, "rope_parameters and the older rope_theta / rope_scaling are both given"),
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types must give one of"),
    ]
    for change, words in cases:
        edit_config(d, change)
        with pytest.raises(ConfigError, match=words):
            converters.convert(d)
        pt.save_pretrained(d, safe_serialization=True)


def _random_task(seed):
    return random_prompt_task(seed, VOCAB, "random-olmo3")


@pytest.mark.slow  # 26 s; per-layer-type ropes run through ACDC in test_gemma3, the across-heads norms in test_olmo2
def test_acdc_matches_the_reference_loop_batched_sequential_and_on_the_accelerator_path(olmo3, monkeypatch):
    assert_acdc_matches_the_reference_loop(olmo3[1], _random_task(3), 1e-2, monkeypatch)

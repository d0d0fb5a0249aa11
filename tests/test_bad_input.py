"""Malformed checkpoints and configs raise errors that name the problem."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import converters
from acdc_jax import CheckpointError, CircuitGraph, ConfigError, Corruption, TaskError, patched_forward
from converters.transformer_lens import tl_config

from .helpers import random_hf_gpt2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    random_hf_gpt2(tmp, tied=True, seed=2)
    return tmp / "gpt2_tied_2"


def _copy(saved, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(saved, out)
    return out


def test_truncated_safetensors(saved, tmp_path):
    d = _copy(saved, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(malformed|truncated)"):
        converters.convert(d)


def test_missing_tensor(saved, tmp_path):
    d = _copy(saved, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"Missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        converters.convert(d)


def test_misshaped_tensor(saved, tmp_path):
    d = _copy(saved, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"][:, :-1].copy()
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'h\.0\.attn\.c_attn\.weight'.*shape \(16, 47\), expected \(16, 48\)"):
        converters.convert(d)


def test_unused_tensor(saved, tmp_path):
    d = _copy(saved, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["transformer.h.2.ln_1.weight"] = np.ones(16, np.float32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"not used: \['h\.2\.ln_1\.weight'\]"):
        converters.convert(d)


def _edit_config(saved, tmp_path, **changes):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_unknown_architecture(saved, tmp_path):
    d = _edit_config(saved, tmp_path, model_type="olmoe")
    with pytest.raises(ConfigError, match="model_type='olmoe'"):
        converters.convert(d)


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(activation_function="silu"), "activation_function 'silu'"),
        (dict(rope_theta=10000.0), r"Unsupported config field\(s\) \['rope_theta'\]"),
    ],
)
def test_unsupported_config_option(saved, tmp_path, change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        converters.convert(_edit_config(saved, tmp_path, **change))


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(positional_embedding_type="rotary"), "positional_embedding_type 'rotary'"),
        (dict(normalization_type="RMS"), "normalization_type 'RMS'"),
        (dict(gated_mlp=True), "gated_mlp=True"),
        (dict(n_key_value_heads=1), "n_key_value_heads=1"),
        (dict(mystery_option=3), "mystery_option"),
        (dict(act_fn="swish"), "act_fn 'swish' is not supported"),
        (dict(attention_dir="sideways"), "attention_dir 'sideways' is not supported"),
    ],
)
def test_transformer_lens_config_rejections(change, pattern):
    cfg = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8, attn_only=True, **change)
    with pytest.raises(ConfigError, match=pattern):
        tl_config(cfg)


def test_patched_forward_rejects_bad_shapes(saved):
    model = converters.convert(saved)
    graph = CircuitGraph(model.config)
    clean = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(TaskError, match="corrupted prompts have shape"):
        patched_forward(model, clean, graph.ones(), Corruption.from_prompts(model, jnp.zeros((2, 6), jnp.int32)))
    with pytest.raises(ValueError, match="masks must have shape"):
        patched_forward(model, clean, jnp.ones(3), Corruption.zeros())
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(jnp.zeros((1, 100), jnp.int32))


def test_checkpoint_paths_without_a_model(saved, tmp_path):
    """Each way a path can fail to hold a model names what was looked for."""
    (tmp_path / "empty").mkdir()
    no_weights = _copy(saved, tmp_path)
    (no_weights / "model.safetensors").unlink()
    tl = tmp_path / "tl"
    tl.mkdir()
    (tl / "config.json").write_text(json.dumps(dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8)))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"hidden": 8}))
    cases = [
        (lambda: converters.convert(tmp_path / "nowhere"), CheckpointError, "nowhere does not exist"),
        (lambda: converters.convert(tmp_path / "empty"), CheckpointError, "config.json"),
        (lambda: converters.convert(no_weights), CheckpointError, "No GPT-2 weights"),
        (lambda: converters.convert(no_weights, format="hf-gpt2"), CheckpointError,
         "No model.safetensors, model.safetensors.index.json, pytorch_model.bin"),
        (lambda: converters.convert(no_weights, format="flax-gpt2"), CheckpointError, "No flax_model.msgpack"),
        (lambda: converters.convert(tl), CheckpointError, "No TransformerLens weights"),
        (lambda: converters.convert(odd), ConfigError, "Cannot tell the checkpoint format"),
        (lambda: converters.convert(saved, format="onnx"), ConfigError, "Unknown format 'onnx'"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value), (words, str(info.value))

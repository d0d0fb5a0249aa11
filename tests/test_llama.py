"""Llama-family checkpoints (RMSNorm, rotary, gated MLP, grouped-query
attention) against transformers: logits parity for each config option, the
edge-decomposed forward against hand-written PyTorch hooks, and ACDC's
batched decisions against the sequential loop."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import CircuitGraph, Corruption, TransformerConfig, patched_forward
from acdc_jax.config import default_inv_freq as config_default_inv_freq
from acdc_jax.errors import CheckpointError, ConfigError
from acdc_jax.tasks import prompt_task

from .helpers import (assert_all_ones_and_zeros, assert_cut_matches, edit_config, logits_gap, random_hf_llama,
                      record_senders, torch_logits)
from .test_batched_equals_sequential import _same

VOCAB = 61


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


@pytest.mark.parametrize("options", [
    dict(), dict(tie_word_embeddings=True), dict(attention_bias=True), dict(model_type="mistral"),
    dict(model_type="qwen2"), dict(n_kv=4, rope_theta=500.0), dict(n_kv=1, head_dim=12),
    # Qwen3 perturbed by 0.2, not 0.3: there float32 rounding alone came to 7.9e-6 of the 1e-5 (3.3e-6 here)
    dict(model_type="qwen3", scale=0.2), dict(model_type="qwen3", attention_bias=True, n_kv=1, head_dim=12, scale=0.2),
], ids=str)
def test_logits_match_transformers(tmp_path, options):
    pt, model = random_hf_llama(tmp_path, **options)
    # about 1e-6 measured; a wrong rotary base, bias or head grouping is off by 1e-2 or more
    assert logits_gap(model, pt, 20, VOCAB) <= 1e-5


ROPES = {
    "linear": dict(factor=3.0),
    "dynamic": dict(factor=2.0),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    "yarn": dict(factor=4.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(factor=4.0, original_max_position_embeddings=16, mscale=2.0, mscale_all_dim=1.0,
                        beta_fast=8, truncate=False),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_scaled_rotary_embeddings_match_transformers(tmp_path, kind):
    """Llama 3's and YaRN's frequencies (with YaRN's cos/sin factor) and
    linear scaling, as transformers computes them; dynamic NTK is the default
    embedding up to max_position_embeddings."""
    rope = {"rope_type": kind.split("-")[0], "rope_theta": 10000.0, **ROPES[kind]}
    pt, model = random_hf_llama(tmp_path, n_kv=4, rope_parameters=rope)
    assert logits_gap(model, pt, 30, VOCAB) <= 1e-5
    scaled = model.config.rotary_inv_freq
    default = np.asarray(config_default_inv_freq(model.config.rotary_dim, 10000.0))
    if kind == "dynamic":
        assert scaled is None
    else:  # the scaling changes most frequencies here, so parity tests it
        assert np.mean(np.abs(np.asarray(scaled) / default - 1) > 0.1) >= 0.5
    assert (model.config.attn_scale != np.sqrt(model.config.d_head)) == kind.startswith("yarn")
    assert TransformerConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config


def test_sharded_safetensors(tmp_path):
    pt, _ = random_hf_llama(tmp_path, name="whole")
    d = tmp_path / "sharded"
    pt.save_pretrained(d, max_shard_size="20KB")
    index = d / "model.safetensors.index.json"
    assert index.is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    model = converters.convert(d)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 1e-5
    meta = json.loads(index.read_text())
    meta["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(meta["weight_map"].values()))
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists tensor.*model.layers.9.mlp.up_proj.weight"):
        converters.convert(d)


@pytest.mark.parametrize("change,error,words", [
    (dict(partial_rotary_factor=0.5), ConfigError, "partial_rotary_factor"),
    (dict(rope_scaling={"rope_type": "proportional", "factor": 8.0}, rope_parameters=None), ConfigError,
     "rope type 'proportional'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "mrope_section": [2]}), ConfigError,
     r"rope field\(s\) \['mrope_section'\]"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0.5}), ConfigError, "'factor' of at least 1"),
    (dict(hidden_act="gelu"), ConfigError, "hidden_act 'gelu'"),
    (dict(hidden_activation="gelu_pytorch_tanh"), ConfigError, "hidden_activation is a Gemma field"),
    (dict(mlp_bias=True), ConfigError, "mlp_bias"),
    (dict(num_key_value_heads=3), ConfigError, "not a multiple of num_key_value_heads=3"),
    (dict(use_qk_norm=True), ConfigError, r"Unsupported config field\(s\) \['use_qk_norm'\]"),
    (dict(num_hidden_layers=3), CheckpointError, "Missing tensor 'model.layers.2.self_attn.q_proj.weight'"),
    (dict(hidden_size=40), CheckpointError, "has shape"),
])
def test_bad_configs_are_refused_by_name(tmp_path, change, error, words):
    random_hf_llama(tmp_path, name="base")
    edit_config(tmp_path / "base", change)
    with pytest.raises(error, match=words):
        converters.convert(tmp_path / "base")


def test_a_sliding_window_shorter_than_the_context_limits_the_prompt_length(tmp_path):
    _, model = random_hf_llama(tmp_path, model_type="mistral", sliding_window=16)
    assert model.config.n_ctx == 16
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=16"):
        model(_tokens(0, (1, 17)))


# --- the edge-decomposed forward ----------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return random_hf_llama(tmp_path_factory.mktemp("llama"), n_layers=3, seed=1, scale=0.2)


@pytest.mark.parametrize("options", [dict(), dict(split_qkv=False), dict(qkv_edges=False)], ids=str)
def test_all_ones_is_the_plain_forward_and_all_zeros_the_corrupted_run(llama, options):
    _, model = llama
    graph = CircuitGraph(model.config, **options)
    assert_all_ones_and_zeros(model, graph, _tokens(0), _tokens(1))


def torch_patched_logits(pt, clean, corrupt, edge):
    """Cut edges by hand with forward hooks on HF Llama (or Phi-3, whose q, k
    and v rows share one fused qkv_proj; or Gemma 2, whose senders are its
    norms' shares and whose MLP reads pre_feedforward_layernorm). `edge` is
    (kind, sender, receiver); a k or v receiver is a key/value head group,
    whose query heads all get the patched input."""
    import torch

    cfg = pt.config
    H, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    layers = pt.model.layers
    gemma2 = hasattr(layers[0], "pre_feedforward_layernorm")
    olmo2 = not hasattr(layers[0], "input_layernorm")  # no norms before attention and the MLP
    post_norms = (lambda blk: (blk.post_attention_layernorm, blk.post_feedforward_layernorm)) \
        if gemma2 or olmo2 else None

    def record(tokens):
        return record_senders(pt, tokens, layers, H, dh, lambda blk: blk.self_attn.o_proj,
                              lambda W, rows: W[:, rows].T, pt.model.embed_tokens, post_norms)

    clean_t, corrupt_t = torch.tensor(np.asarray(clean)), torch.tensor(np.asarray(corrupt))
    a_clean, a_corr = record(clean_t), record(corrupt_t)
    for acts in (a_clean, a_corr):  # Granite scales the embedding and each sublayer's output before the sum
        for key in acts:
            if key[0] in ("head", "mlp"):
                acts[key] = acts[key] * getattr(cfg, "residual_multiplier", 1.0)
            elif key[0] == "embed":
                acts[key] = acts[key] * getattr(cfg, "embedding_multiplier", 1.0)
    kind, sender, receiver = edge
    delta = None if kind == "qkv" else a_clean[sender] - a_corr[sender]
    if receiver[0] in ("q", "k", "v"):
        letter, l, h = receiver
        blk = layers[l]
        fused = getattr(blk.self_attn, "qkv_proj", None)
        proj = fused if fused is not None else getattr(blk.self_attn, f"{letter}_proj")
        first = h * dh + (0 if fused is None else {"q": 0, "k": H * dh, "v": (H + n_kv) * dh}[letter])
        def qkv_hook(mod, args, out):
            resid = a_corr[("resid", l)] if kind == "qkv" else a_clean[("resid", l)] - delta
            new = torch.nn.functional.linear(resid if olmo2 else blk.input_layernorm(resid), mod.weight, mod.bias)
            out = out.clone()
            out[..., first:first + dh] = new[..., first:first + dh]
            return out
        hook = proj.register_forward_hook(qkv_hook)
    elif receiver[0] == "mlp_in":
        blk = layers[receiver[1]]
        mlp_norm = blk.pre_feedforward_layernorm if gemma2 else blk.mlp if olmo2 else blk.post_attention_layernorm
        hook = mlp_norm.register_forward_pre_hook(lambda m, a: (a[0] - delta,))
    else:
        hook = pt.model.norm.register_forward_pre_hook(lambda m, a: (a[0] - delta,))
    with torch.no_grad():
        out = pt(clean_t).logits.numpy()
    hook.remove()
    return out


# edge names cut together: (kind, sender, receiver) for the hook reference. Heads 2 and 3 share
# key/value head 1, so cutting a sender from both of their k (or v) inputs is a cut of that group.
EDGES = {
    ("blocks.0.hook_resid_pre->blocks.1.hook_q_input[3]",): ("residual", ("embed",), ("q", 1, 3)),
    ("blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[2]",
     "blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[3]"): ("residual", ("head", 0, 1), ("k", 2, 1)),
    ("blocks.1.hook_mlp_out->blocks.2.hook_v_input[0]",
     "blocks.1.hook_mlp_out->blocks.2.hook_v_input[1]"): ("residual", ("mlp", 1), ("v", 2, 0)),
    ("blocks.1.attn.hook_result[2]->blocks.1.hook_mlp_in",): ("residual", ("head", 1, 2), ("mlp_in", 1)),
    ("blocks.2.hook_mlp_out->blocks.2.hook_resid_post",): ("residual", ("mlp", 2), ("logits",)),
    ("blocks.1.hook_q_input[1]->blocks.1.attn.hook_q[1]",): ("qkv", None, ("q", 1, 1)),
}


@pytest.mark.parametrize("names", sorted(EDGES), ids=lambda n: n[0])
def test_patched_edges_match_pytorch_hooks(llama, names):
    pt, model = llama
    graph = CircuitGraph(model.config)
    clean, corrupt = _tokens(7), _tokens(8)
    ref = torch_patched_logits(pt, clean, corrupt, EDGES[names])
    assert_cut_matches(pt, model, graph, names, clean, corrupt, ref)


def test_cutting_one_of_two_heads_sharing_keys_is_its_own_intervention(llama):
    """Each query head has its own key input: a cut into head 2's keys changes
    the output, and differs from cutting the same edge into both heads."""
    _, model = llama
    graph = CircuitGraph(model.config)
    clean, corruption = _tokens(7), Corruption.from_prompts(model, _tokens(8))
    one = graph.ones().at[graph.edge_index("blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[2]")].set(0.0)
    both = one.at[graph.edge_index("blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[3]")].set(0.0)
    full, a, b = (patched_forward(model, clean, m, corruption, graph) for m in (graph.ones(), one, both))
    assert np.abs(np.asarray(a - full)).max() > 1e-4 and np.abs(np.asarray(a - b)).max() > 1e-4


@pytest.mark.parametrize("tau", [pytest.param(1e-3, marks=pytest.mark.slow), 1e-2,
                                 pytest.param(3e-2, marks=pytest.mark.slow)])
def test_batched_acdc_decides_like_the_sequential_loop(llama, tau):
    _, model = llama
    rng = np.random.default_rng(3)
    task = prompt_task(rng.integers(0, VOCAB, (6, 8)).tolist(), rng.integers(0, VOCAB, (6, 8)).tolist(),
                       position=[5, 7], name="random-llama")
    circuit = _same(model, task, tau)
    assert 0 < len(circuit.edges) < CircuitGraph(model.config).n_edges


def test_converted_model_saves_and_loads(llama, tmp_path, capsys):
    """`python -m converters` writes the acdc-jax format; it loads to the same logits."""
    from acdc_jax import load
    from converters.__main__ import main

    pt, model = llama
    src = tmp_path / "hf"
    pt.save_pretrained(src)
    assert main([str(src), "--out", str(tmp_path / "out")]) == 0
    assert "3 layers x 4 heads" in capsys.readouterr().out
    loaded = load(tmp_path / "out")
    assert loaded.config == model.config and loaded.config.gated_mlp and loaded.config.positional == "rotary"
    tokens = _tokens(4)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))

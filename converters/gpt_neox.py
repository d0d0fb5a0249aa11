"""Hugging Face GPT-NeoX checkpoints (Pythia, GPT-NeoX-20B) -> acdc_jax.Transformer.

LayerNorm with biases, rotary queries and keys over the first
``partial_rotary_factor`` (``rotary_pct``) of each head, and, with
``use_parallel_residual`` (Pythia's setting), an MLP that reads the layer's
input rather than the attention's output, so that the circuit graph has no
edge from a layer's heads to its own MLP.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from acdc_jax.checkpoint import fill_model
from acdc_jax.errors import ConfigError
from acdc_jax.model import Transformer, TransformerConfig

from ._source import HF_ACT, HF_INERT, Source, check_fields, plain_config, require, stack
from .rope import rope_settings


_HANDLED = {
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "max_position_embeddings", "layer_norm_eps", "use_parallel_residual", "attention_bias",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base", "rope_theta",
    "partial_rotary_factor",
}
# Fields that do not change the eval-mode forward pass.
_IGNORED = HF_INERT | {"attention_dropout", "classifier_dropout", "hidden_dropout"}  # dropout


def gpt_neox_config(hf: Mapping[str, Any], origin: str = "config.json") -> tuple[TransformerConfig, bool, bool]:
    """TransformerConfig, whether the projections have biases, and whether the unembedding is tied."""
    check_fields(hf, handled=_HANDLED, ignored=_IGNORED, origin=origin)
    if require(hf, "model_type", origin) != "gpt_neox":
        raise ConfigError(f"{origin}: model_type {hf['model_type']!r} is not 'gpt_neox'.")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACT:
        raise ConfigError(f"{origin}: hidden_act {act!r} is not supported; use one of {sorted(HF_ACT)}.")
    d_model, n_heads = require(hf, "hidden_size", origin), require(hf, "num_attention_heads", origin)
    if d_model % n_heads:
        raise ConfigError(f"{origin}: hidden_size={d_model} is not divisible by num_attention_heads={n_heads}.")
    d_head = d_model // n_heads
    rope = rope_settings(hf, origin, d_head, default_factor=0.25,
                         older={"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"})
    if rope.attention_factor != 1.0 and rope.rotary_dim < d_head:
        raise ConfigError(f"{origin}: a rope attention_factor with partial rotary is not supported.")
    config = TransformerConfig(
        n_layers=require(hf, "num_hidden_layers", origin), d_model=d_model, n_heads=n_heads, d_head=d_head,
        d_vocab=require(hf, "vocab_size", origin),
        n_ctx=min(require(hf, "max_position_embeddings", origin), rope.n_ctx or math.inf),
        d_mlp=require(hf, "intermediate_size", origin), act_fn=HF_ACT[act], normalization="LN", positional="rotary",
        causal=True, ln_eps=hf.get("layer_norm_eps", 1e-5), rotary_dim=rope.rotary_dim, rotary_base=rope.base,
        rotary_inv_freq=rope.inv_freq, attn_scale=math.sqrt(d_head) / rope.attention_factor ** 2,
        parallel_attn_mlp=bool(hf.get("use_parallel_residual", True)),
    )
    return config, bool(hf.get("attention_bias", True)), bool(hf.get("tie_word_embeddings", False))


def from_hf_gpt_neox(state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
                     origin: str = "GPT-NeoX state dict") -> Transformer:
    """Convert a GPT-NeoX state dict (numpy arrays, ``GPTNeoXForCausalLM``
    names, torch ``Linear`` layout ``[out, in]``) and its config.json."""
    config, bias, tied = gpt_neox_config(plain_config(hf_config))
    src = Source(state_dict, origin)
    L, D, H, K, M, V = config.n_layers, config.d_model, config.n_heads, config.d_head, config.d_mlp, config.d_vocab
    per_layer: dict[str, list[np.ndarray]] = {}

    def put(name: str, value: np.ndarray) -> None:
        per_layer.setdefault(name, []).append(value)

    def take_bias(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return src.take(key, shape) if bias else np.zeros(shape, np.float32)

    for l in range(L):
        p = f"gpt_neox.layers.{l}."
        src.ignore([p + "attention.bias", p + "attention.masked_bias", p + "attention.rotary_emb.inv_freq"])
        # rows are [head, (q, k, v), d_head]
        qkv_w = src.take(p + "attention.query_key_value.weight", (3 * D, D)).reshape(H, 3, K, D)
        qkv_b = take_bias(p + "attention.query_key_value.bias", (3 * D,)).reshape(H, 3, K)
        for i, letter in enumerate("QKV"):
            put(f"blocks.attn.W_{letter}", qkv_w[:, i].transpose(0, 2, 1))
            put(f"blocks.attn.b_{letter}", qkv_b[:, i])
        put("blocks.attn.W_O", src.take(p + "attention.dense.weight", (D, D)).T.reshape(H, K, D))
        put("blocks.attn.b_O", take_bias(p + "attention.dense.bias", (D,)))
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            put(f"blocks.{ours}.w", src.take(p + theirs + ".weight", (D,)))
            put(f"blocks.{ours}.b", src.take(p + theirs + ".bias", (D,)))
        put("blocks.mlp.W_in", src.take(p + "mlp.dense_h_to_4h.weight", (M, D)).T)
        put("blocks.mlp.b_in", src.take(p + "mlp.dense_h_to_4h.bias", (M,)))
        put("blocks.mlp.W_out", src.take(p + "mlp.dense_4h_to_h.weight", (D, M)).T)
        put("blocks.mlp.b_out", src.take(p + "mlp.dense_4h_to_h.bias", (D,)))

    arrays = {name: stack(values) for name, values in per_layer.items()}
    arrays["embed.W_E"] = src.take("gpt_neox.embed_in.weight", (V, D))
    arrays["ln_final.w"] = src.take("gpt_neox.final_layer_norm.weight", (D,))
    arrays["ln_final.b"] = src.take("gpt_neox.final_layer_norm.bias", (D,))
    if tied:
        src.ignore(["embed_out.weight"])
        arrays["unembed.W_U"] = arrays["embed.W_E"].T.copy()
    else:
        arrays["unembed.W_U"] = src.take("embed_out.weight", (V, D)).T.copy()
    arrays["unembed.b_U"] = np.zeros((V,), np.float32)
    src.finish()
    return fill_model(config, arrays, source=origin)

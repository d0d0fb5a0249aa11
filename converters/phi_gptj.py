"""Hugging Face Phi (phi-1, phi-1.5, phi-2) and GPT-J checkpoints -> acdc_jax.Transformer.

Both run attention and the MLP in parallel on one LayerNorm of the layer's
input (``parallel_attn_mlp``; the shared norm's weights go to both ``ln1``
and ``ln2``), rotate part of each head, and have a biased LM head. GPT-J
rotates interleaved pairs ``(2i, 2i + 1)``; its query and key dimensions are
reordered here to the rotate-half pairs ``(i, i + rotary_dim / 2)`` that the
model uses, the same reordering for both, so every score is unchanged.
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

_DROPOUT = {"resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"}
_HANDLED = {
    "phi": {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings", "layer_norm_eps",
            "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
            "qk_layernorm"},
    "gptj": {"model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner",
             "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "rotary", "scale_attn_weights"},
}
# GPT-J's config.json also carries GPT-2's sequence-summary head settings, unused by the LM.
_IGNORED = HF_INERT | _DROPOUT | {"gradient_checkpointing", "summary_activation", "summary_first_dropout",
                                  "summary_proj_to_labels", "summary_type", "summary_use_proj"}
_NAMES = {  # (layer prefix, q/k/v, attention output, MLP in, MLP out, embedding, final norm)
    "phi": ("model.layers.{}.", "self_attn.{}_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2", "input_layernorm",
            "model.embed_tokens", "model.final_layernorm"),
    "gptj": ("transformer.h.{}.", "attn.{}_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out", "ln_1",
             "transformer.wte", "transformer.ln_f"),
}


def phi_gptj_config(hf: Mapping[str, Any], origin: str = "config.json") -> tuple[TransformerConfig, int]:
    """TransformerConfig of a Phi or GPT-J config.json, and the number of key/value heads."""
    kind = require(hf, "model_type", origin)
    if kind not in _HANDLED:
        raise ConfigError(f"{origin}: model_type {kind!r} is neither 'phi' nor 'gptj'.")
    check_fields(hf, handled=_HANDLED[kind], ignored=_IGNORED, origin=origin)
    get = (lambda phi, gptj, default=None: hf.get(phi if kind == "phi" else gptj, default))
    d_model, n_heads = require(hf, "hidden_size" if kind == "phi" else "n_embd", origin), get("num_attention_heads", "n_head")
    if not n_heads or d_model % n_heads:
        raise ConfigError(f"{origin}: the model width {d_model} is not divisible by the head count {n_heads}.")
    d_head, n_kv = d_model // n_heads, hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ConfigError(f"{origin}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}.")
    act = get("hidden_act", "activation_function", "gelu_new")
    if act not in HF_ACT:
        raise ConfigError(f"{origin}: activation {act!r} is not supported; use one of {sorted(HF_ACT)}.")
    if kind == "phi":
        if hf.get("qk_layernorm"):
            raise ConfigError(f"{origin}: qk_layernorm=true is not supported (a norm inside each head's q and k).")
        rope = rope_settings(hf, origin, d_head, default_factor=0.5)
        if rope.attention_factor != 1.0:
            raise ConfigError(f"{origin}: a rope attention_factor with partial rotary is not supported.")
        rotary = dict(rotary_dim=rope.rotary_dim, rotary_base=rope.base, rotary_inv_freq=rope.inv_freq)
        width = require(hf, "intermediate_size", origin)
        n_ctx = min(require(hf, "max_position_embeddings", origin), rope.n_ctx or math.inf)
    else:
        if not hf.get("rotary_dim") or hf["rotary_dim"] > d_head or hf.get("rotary") is False:
            raise ConfigError(f"{origin}: GPT-J needs a rotary_dim between 2 and the head size {d_head}, "
                              f"got {hf.get('rotary_dim')!r} (transformers cannot run it otherwise).")
        if hf.get("scale_attn_weights", True) is not True:
            raise ConfigError(f"{origin}: scale_attn_weights=false is not supported.")
        rotary = dict(rotary_dim=hf["rotary_dim"], rotary_base=10000.0)
        width = hf.get("n_inner") or 4 * d_model
        n_ctx = require(hf, "n_positions", origin)
    config = TransformerConfig(
        n_layers=require(hf, "num_hidden_layers" if kind == "phi" else "n_layer", origin), d_model=d_model,
        n_heads=n_heads, d_head=d_head, d_vocab=require(hf, "vocab_size", origin),
        n_ctx=n_ctx, d_mlp=width,
        act_fn=HF_ACT[act], normalization="LN", positional="rotary", causal=True,
        ln_eps=get("layer_norm_eps", "layer_norm_epsilon", 1e-5), attn_scale=math.sqrt(d_head),
        parallel_attn_mlp=True, **rotary,
    )
    return config, n_kv


def from_hf_phi(state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
                origin: str = "Phi state dict") -> Transformer:
    """Convert a ``PhiForCausalLM`` state dict (numpy arrays, torch ``Linear``
    layout ``[out, in]``) and its config.json."""
    return _convert(state_dict, hf_config, origin, "phi")


def from_hf_gptj(state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
                 origin: str = "GPT-J state dict") -> Transformer:
    """Convert a ``GPTJForCausalLM`` state dict (numpy arrays, torch ``Linear``
    layout ``[out, in]``) and its config.json."""
    return _convert(state_dict, hf_config, origin, "gptj")


def _convert(state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any], origin: str, kind: str) -> Transformer:
    hf_config = plain_config(hf_config)
    if hf_config.get("model_type") != kind:
        raise ConfigError(f"{origin}: model_type {hf_config.get('model_type')!r} is not {kind!r}.")
    config, n_kv = phi_gptj_config(hf_config)
    layer, qkv, out, fc_in, fc_out, ln, embed, ln_f = _NAMES[kind]
    src = Source(state_dict, origin)
    L, D, H, K, M, V = config.n_layers, config.d_model, config.n_heads, config.d_head, config.d_mlp, config.d_vocab
    R = config.rotary_dim
    # GPT-J's interleaved pairs (2i, 2i + 1) become rotate-half pairs (i, i + R / 2)
    order = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2), np.arange(R, K)]) if kind == "gptj" else None
    per_layer: dict[str, list[np.ndarray]] = {}

    def put(name: str, value: np.ndarray) -> None:
        per_layer.setdefault(name, []).append(value)

    def bias(key: str, shape: tuple[int, ...]) -> np.ndarray:  # GPT-J's projections have none
        return src.take(key, shape) if kind == "phi" else np.zeros(shape, np.float32)

    for l in range(L):
        p = layer.format(l)
        src.ignore([p + "attn.bias", p + "attn.masked_bias"])  # causal-mask buffers of older GPT-J files
        for letter, n in (("Q", H), ("K", n_kv), ("V", n_kv)):
            name = p + qkv.format(letter.lower())
            w = src.take(name + ".weight", (n * K, D)).reshape(n, K, D).transpose(0, 2, 1)
            b = bias(name + ".bias", (n * K,)).reshape(n, K)
            if order is not None and letter in "QK":
                w, b = w[..., order], b[..., order]
            put(f"blocks.attn.W_{letter}", np.repeat(w, H // n, axis=0))
            put(f"blocks.attn.b_{letter}", np.repeat(b, H // n, axis=0))
        put("blocks.attn.W_O", src.take(p + out + ".weight", (D, H * K)).T.reshape(H, K, D))
        put("blocks.attn.b_O", bias(p + out + ".bias", (D,)))
        for part in ("w", "b"):  # one norm feeds attention and the MLP
            value = src.take(p + ln + (".weight" if part == "w" else ".bias"), (D,))
            put(f"blocks.ln1.{part}", value)
            put(f"blocks.ln2.{part}", value)
        put("blocks.mlp.W_in", src.take(p + fc_in + ".weight", (M, D)).T)
        put("blocks.mlp.b_in", src.take(p + fc_in + ".bias", (M,)))
        put("blocks.mlp.W_out", src.take(p + fc_out + ".weight", (D, M)).T)
        put("blocks.mlp.b_out", src.take(p + fc_out + ".bias", (D,)))

    arrays = {name: stack(values) for name, values in per_layer.items()}
    arrays["embed.W_E"] = src.take(embed + ".weight", (V, D))
    arrays["ln_final.w"] = src.take(ln_f + ".weight", (D,))
    arrays["ln_final.b"] = src.take(ln_f + ".bias", (D,))
    if hf_config.get("tie_word_embeddings", False):  # the bias stays the LM head's own
        src.ignore(["lm_head.weight"])
        arrays["unembed.W_U"] = arrays["embed.W_E"].T.copy()
    else:
        arrays["unembed.W_U"] = src.take("lm_head.weight", (V, D)).T.copy()
    arrays["unembed.b_U"] = src.take("lm_head.bias", (V,))
    src.finish()
    return fill_model(config, arrays, source=origin)

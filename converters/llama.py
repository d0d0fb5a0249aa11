"""Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, OLMo 1-3, Phi-3, SmolLM3, Granite) -> acdc_jax.Transformer.

These share one layout: RMSNorm, rotary queries and keys (rotate-half,
scaled as in Llama 3 and YaRN where the config says so: converters.rope), a
gated SiLU MLP and grouped-query attention, with the tensor names of
``LlamaForCausalLM``. Grouped key/value heads are repeated once per query
head, so every head has its own k and v input in the circuit graph: cutting
an edge into head 0's keys leaves head 1's keys alone even where the two
share weights. With all masks on, that is exactly the model's forward pass.

Gemma (the first generation) differs only in numbers that fold into the
weights: its RMSNorm multiplies by ``1 + weight``, its embedding is scaled by
``sqrt(hidden_size)`` (the tied unembedding is not), and its gated MLP uses
the tanh GELU.

Gemma 2 adds an RMSNorm after attention and after the MLP (``post_norm``:
each head's sender is its share of the normalised sum of the layer's heads),
caps attention scores and logits with ``c * tanh(x / c)``, and scales
attention by ``query_pre_attn_scalar``. Its sliding-window layers see every
key up to the window, so prompts are limited to it. Gemma 3 (``gemma3_text``,
or the text model of an image-text ``gemma3`` checkpoint) adds an RMSNorm of
each head's query and key (``qk_norm``) and rotates its sliding-window
layers with other frequencies than its global ones (`converters.gemma`).

Qwen3 is Llama with an RMSNorm of each head's query and key after the
projection (``qk_norm``), and biases on all four projections or none. OLMo 2
has no norms before attention and the MLP, Gemma 2's norms after them
(``post_norm``, plain RMSNorm weights), and one RMSNorm over all heads'
queries and one over all keys (``qk_norm_across_heads``); OLMo 3 adds
sliding-window layers with their own rotary frequencies and YaRN's cos/sin
factor on its full-attention layers only (`converters.gemma`). OLMo
(the first generation) is Llama with LayerNorms that have no weights
(``LNPre``, eps 1e-5) and, with ``clip_qkv``, queries, keys and values
clamped after the projection (``qkv_clip``).

SmolLM3 is Llama with no rotary positions in some layers (``no_rope_layers``),
which rotate here at zero frequencies. Granite is Llama with four scalars, folded into
the weights: ``embedding_multiplier`` (W_E), ``residual_multiplier`` (each
sublayer's output projection), ``attention_multiplier`` (the attention
scale) and ``logits_scaling`` (W_U).

Phi-3 (``Phi3ForCausalLM``: Phi-3, Phi-3.5, Phi-4-mini) is Llama with fused
``qkv_proj`` and ``gate_up_proj`` tensors, which are split, a rotary
embedding that may cover part of each head, and LongRoPE, whose short
factors hold for prompts up to ``original_max_position_embeddings`` tokens
(longer prompts are refused: transformers switches to the long factors).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from acdc_jax.checkpoint import fill_model
from acdc_jax.errors import CheckpointError, ConfigError
from acdc_jax.model import Transformer, TransformerConfig

from ._source import HF_INERT, Source, check_fields, plain_config, require, stack
from .gemma import gemma3_rotary, image_text_config, image_text_weights, olmo3_rotary
from .rope import rope_settings

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo", "olmo2",
               "olmo3", "phi3", "smollm3", "granite")
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_POST_NORM = ("gemma2", "gemma3_text")
_GRANITE = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
_OLMO2 = ("olmo2", "olmo3")
# fields that only these model types read
_ONLY = {"query_pre_attn_scalar": _POST_NORM, "attn_logit_softcapping": _POST_NORM,
         "final_logit_softcapping": _POST_NORM, "rope_local_base_freq": ("gemma3_text",),
         "sliding_window_pattern": ("gemma3_text",), "_sliding_window_pattern": ("gemma3_text",),
         "clip_qkv": ("olmo",), "no_rope_layers": ("smollm3",), "no_rope_layer_interval": ("smollm3",),
         **{f: ("granite",) for f in _GRANITE}}

_HANDLED = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "attention_bias", "mlp_bias", "tie_word_embeddings", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "pretraining_tp", "hidden_activation", "use_bidirectional_attention",
    "original_max_position_embeddings", *_ONLY,
}
# Fields that do not change the eval-mode forward pass.
_IGNORED = HF_INERT | {"attention_dropout", "resid_pdrop", "embd_pdrop",  # dropout
                       "transformers.js_config",  # a note for transformers.js
                       "cache_implementation",  # Gemma 2's generation cache
                       "sliding_window_size"}  # an older Gemma 2 name that transformers does not read


def _rope(hf: Mapping[str, Any], d_head: int, origin: str):
    """The `Rope` of a Llama-family config, the attention scale, and the
    factor for the rotated columns of W_Q and W_K. A scaled rope's cos/sin
    factor multiplies every rotated query and key dimension: where that is
    all of them it divides the attention scale twice, else the converter
    multiplies the rotated columns by it. Only Phi-3 rotates part of a head."""
    if hf["model_type"] == "phi3":
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if params.get("rope_type", params.get("type")) in ("su", "yarn"):  # Phi-3's older names for LongRoPE
            params["rope_type"] = "longrope"
            params.pop("type", None)
            hf = {**hf, "rope_parameters": params, "rope_scaling": None}
    elif "original_max_position_embeddings" in hf:
        raise ConfigError(f"{origin}: original_max_position_embeddings at the top level is a Phi-3 field; "
                          f"model_type {hf['model_type']!r} reads it from rope_parameters.")
    rope = rope_settings(hf, origin, d_head)
    if rope.rotary_dim != d_head and hf["model_type"] != "phi3":
        raise ConfigError(
            f"{origin}: partial_rotary_factor is not supported for Llama-family models: transformers' Llama "
            "code rotates every dimension whatever it says, so the checkpoint's intent is unclear."
        )
    scale = math.sqrt(hf.get("query_pre_attn_scalar") or d_head)  # Gemma 2 scales by its own number
    if rope.rotary_dim != d_head:
        return rope, scale, rope.attention_factor
    return rope, scale / rope.attention_factor ** 2, 1.0


def llama_config(hf: Mapping[str, Any], origin: str = "config.json"
                 ) -> tuple[TransformerConfig, int, tuple[bool, bool], bool, float]:
    """TransformerConfig, the number of key/value heads, whether (q/k/v, o)
    have biases, whether the unembedding is tied, and the factor for the
    rotated columns of W_Q and W_K (1 unless only part of a head rotates)."""
    if hf.get("model_type") == "gemma3":
        hf = image_text_config(hf, origin)
    check_fields(hf, handled=_HANDLED, ignored=_IGNORED, origin=origin)
    model_type = require(hf, "model_type", origin)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{origin}: model_type {model_type!r} is not a Llama-family model ({', '.join(MODEL_TYPES)}).")
    olmo2 = model_type in _OLMO2  # OLMo 2's layout: norms after the sublayers, query/key norms across heads
    post_norm = model_type in _POST_NORM or olmo2
    for field, types in _ONLY.items():
        if field in hf and model_type not in types:
            raise ConfigError(f"{origin}: {field} is read only for model_type {' or '.join(types)}; "
                              f"{model_type!r} does not read it.")
    act = _activation(hf, model_type, origin)
    if hf.get("mlp_bias", False):
        raise ConfigError(f"{origin}: mlp_bias=true is not supported (the gated MLP here has no gate bias).")
    d_model = require(hf, "hidden_size", origin)
    n_heads = require(hf, "num_attention_heads", origin)
    n_kv = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ConfigError(f"{origin}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}.")
    d_head = hf.get("head_dim") or d_model // n_heads
    n_layers = require(hf, "num_hidden_layers", origin)
    factor = 1.0
    if model_type == "gemma3_text":
        (rope, attn_scale, local, local_inv), qk_factor = gemma3_rotary(hf, d_head, n_layers, origin), 1.0
    elif model_type == "olmo3":
        (rope, local, local_inv, factor), attn_scale, qk_factor = olmo3_rotary(hf, d_head, n_layers, origin), None, 1.0
    else:
        (rope, attn_scale, qk_factor), local, local_inv = _rope(hf, d_head, origin), (), None
        if model_type == "smollm3":
            local, local_inv, factor, attn_scale = _no_rope(hf, n_layers, rope, attn_scale, origin)
        if model_type == "granite":  # scores times attention_multiplier instead of over sqrt(d_head)
            attn_scale = attn_scale / math.sqrt(d_head) / float(_multipliers(hf, origin)["attention_multiplier"])
    n_ctx = require(hf, "max_position_embeddings", origin)
    window = _sliding_window(hf, model_type)
    if window is not None and window < n_ctx:
        n_ctx = window  # beyond the window the model masks keys; longer prompts are refused instead
    n_ctx = min(n_ctx, rope.n_ctx or n_ctx)
    config = TransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
        d_vocab=require(hf, "vocab_size", origin), n_ctx=n_ctx, d_mlp=require(hf, "intermediate_size", origin),
        act_fn=act, positional="rotary", causal=True, qkv_clip=hf.get("clip_qkv"),
        # OLMo's LayerNorm has no weights and a fixed eps
        normalization="LNPre" if model_type == "olmo" else "RMS",
        ln_eps=1e-5 if model_type == "olmo" else hf.get("rms_norm_eps", 1e-5 if olmo2 else 1e-6),
        rotary_dim=rope.rotary_dim, rotary_base=rope.base, rotary_inv_freq=rope.inv_freq, attn_scale=attn_scale,
        rotary_local_inv_freq=local_inv, rotary_local_layers=local, rotary_attention_factor=factor,
        gated_mlp=True, post_norm=post_norm,
        attn_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        logit_softcap=hf.get("final_logit_softcapping") if model_type in _POST_NORM else None,
        qk_norm=model_type in ("gemma3_text", "qwen3") or olmo2, qk_norm_across_heads=olmo2, pre_norm=not olmo2,
    )
    # Phi-3's projections never have biases (transformers ignores attention_bias there)
    qkv_bias = model_type == "qwen2" or (model_type != "phi3" and bool(hf.get("attention_bias", False)))
    o_bias = model_type not in ("qwen2", "phi3") and bool(hf.get("attention_bias", False))
    if model_type in _GEMMA and hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{origin}: use_bidirectional_attention is not supported; causal attention only.")
    if post_norm and o_bias:
        raise ConfigError(f"{origin}: attention_bias=true is not supported for {model_type}: o_proj's bias sits "
                          "inside the norm after attention, so it belongs to no head's share of it.")
    # transformers' Gemma configs tie by default, and the published ones leave the field out
    tied = bool(hf.get("tie_word_embeddings", model_type in _GEMMA + ("smollm3",)))
    return config, n_kv, (qkv_bias, o_bias), tied, qk_factor


def _multipliers(hf: Mapping[str, Any], origin: str) -> dict[str, np.float32]:
    """Granite's scalars (1 where absent, and for other families): they fold
    into the embedding, each sublayer's output projection, the attention
    scale and the unembedding."""
    out = {}
    for name in _GRANITE:
        value = hf.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ConfigError(f"{origin}: {name} must be a positive finite number, got {value!r}.")
        out[name] = np.float32(value)
    return out


def _no_rope(hf: Mapping[str, Any], n_layers: int, rope, attn_scale: float, origin: str):
    """SmolLM3's layers without rotary positions (``no_rope_layers[l] == 0``;
    by default every ``no_rope_layer_interval``-th): the "local" layers, with
    zero frequencies, so that they rotate by nothing. The rope's cos/sin
    factor then applies to the other layers only (`rotary_attention_factor`),
    not to the attention scale of every layer. Returns (those layers, their
    frequencies, the factor, the attention scale)."""
    interval = hf.get("no_rope_layer_interval", 4)
    if not (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1):
        raise ConfigError(f"{origin}: no_rope_layer_interval must be a positive int, got {interval!r}.")
    flags = hf.get("no_rope_layers")
    if flags is None:
        flags = [int((l + 1) % interval != 0) for l in range(n_layers)]
    if not (isinstance(flags, list) and len(flags) == n_layers and all(f in (0, 1) for f in flags)):
        raise ConfigError(f"{origin}: no_rope_layers must give 1 (rotary) or 0 (none) for each of the {n_layers} "
                          f"layers, got {flags!r}.")
    local = tuple(l for l, f in enumerate(flags) if f == 0)
    if not local:
        return (), None, 1.0, attn_scale
    return local, (0.0,) * (rope.rotary_dim // 2), rope.attention_factor, attn_scale * rope.attention_factor ** 2


def _activation(hf: Mapping[str, Any], model_type: str, origin: str) -> str:
    if model_type not in _GEMMA:
        if "hidden_activation" in hf:
            raise ConfigError(f"{origin}: hidden_activation is a Gemma field; model_type {model_type!r} does not "
                              "read it.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{origin}: hidden_act {hf['hidden_act']!r} is not supported; "
                              "Llama-family MLPs use 'silu'.")
        return "silu"
    # transformers reads hidden_act, and takes Gemma's legacy 'gelu' for the tanh approximation
    for field in ("hidden_act", "hidden_activation"):
        if hf.get(field) not in (None, "gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"{origin}: {field} {hf[field]!r} is not supported; Gemma uses 'gelu_pytorch_tanh'.")
    return "gelu_new"


def _sliding_window(hf: Mapping[str, Any], model_type: str):
    if model_type in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window")


def from_hf_llama(state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
                  origin: str = "Llama state dict") -> Transformer:
    """Convert a Llama-family state dict (numpy arrays, ``LlamaForCausalLM``
    names, torch ``Linear`` layout ``[out, in]``) and its config.json."""
    hf_config = plain_config(hf_config)
    if hf_config.get("model_type") == "gemma3":  # an image-text checkpoint: its text model
        hf_config, state_dict = image_text_config(hf_config, origin), image_text_weights(state_dict)
    config, n_kv, (qkv_bias, o_bias), tied, qk_factor = llama_config(hf_config)
    gemma = hf_config["model_type"] in _GEMMA
    if hf_config["model_type"] == "phi3":
        state_dict = _split_fused(state_dict, config, n_kv, origin)
    src = Source(state_dict, origin)
    mult = _multipliers(hf_config, origin)
    residual = mult["residual_multiplier"]  # on each sublayer's output, bias included

    def norm(key: str, size: Optional[int] = None) -> np.ndarray:
        w = src.take(key, (size or D,))
        return w + np.float32(1) if gemma else w

    L, D, H, K, M, V = config.n_layers, config.d_model, config.n_heads, config.d_head, config.d_mlp, config.d_vocab

    def heads_in(w: np.ndarray, n: int) -> np.ndarray:  # [n*K, D] -> [H, D, K], kv heads repeated
        return np.repeat(w.reshape(n, K, D).transpose(0, 2, 1), H // n, axis=0)

    qk = np.ones(K, np.float32)
    qk[:config.rotary_dim] = qk_factor

    per_layer: dict[str, list[np.ndarray]] = {}

    def put(name: str, value: np.ndarray) -> None:
        per_layer.setdefault(name, []).append(value)

    for l in range(L):
        p = f"model.layers.{l}."
        src.ignore([p + "self_attn.rotary_emb.inv_freq"])
        for letter, n in (("Q", H), ("K", n_kv), ("V", n_kv)):
            proj = f"{p}self_attn.{letter.lower()}_proj."
            scale = qk if letter in "QK" else np.float32(1)
            put(f"blocks.attn.W_{letter}", heads_in(src.take(proj + "weight", (n * K, D)), n) * scale)
            bias = src.take(proj + "bias", (n * K,)).reshape(n, K) if qkv_bias else np.zeros((n, K), np.float32)
            put(f"blocks.attn.b_{letter}", np.repeat(bias, H // n, axis=0) * scale)
        put("blocks.attn.W_O", src.take(p + "self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D) * residual)
        put("blocks.attn.b_O", (src.take(p + "self_attn.o_proj.bias", (D,)) if o_bias else np.zeros(D, np.float32))
            * residual)
        if config.normalization == "RMS" and config.pre_norm:
            put("blocks.ln1.w", norm(p + "input_layernorm.weight"))
        if config.qk_norm_across_heads:  # OLMo 2: one norm over all heads, the key's over the key/value heads
            put("blocks.attn.q_norm.w", norm(p + "self_attn.q_norm.weight", H * K))
            k_norm = norm(p + "self_attn.k_norm.weight", n_kv * K).reshape(n_kv, K)
            put("blocks.attn.k_norm.w", np.repeat(k_norm, H // n_kv, axis=0).reshape(H * K))
        elif config.qk_norm:
            for letter in "qk":
                put(f"blocks.attn.{letter}_norm.w", norm(f"{p}self_attn.{letter}_norm.weight", K))
        if config.post_norm:  # Gemma 2: post_attention_layernorm is the norm after attention, not before the MLP
            put("blocks.ln1_post.w", norm(p + "post_attention_layernorm.weight"))
            if config.pre_norm:  # OLMo 2 has no norm before the MLP
                put("blocks.ln2.w", norm(p + "pre_feedforward_layernorm.weight"))
            put("blocks.ln2_post.w", norm(p + "post_feedforward_layernorm.weight"))
        elif config.normalization == "RMS":
            put("blocks.ln2.w", norm(p + "post_attention_layernorm.weight"))
        put("blocks.mlp.W_gate", src.take(p + "mlp.gate_proj.weight", (M, D)).T)
        put("blocks.mlp.W_in", src.take(p + "mlp.up_proj.weight", (M, D)).T)
        put("blocks.mlp.b_in", np.zeros(M, np.float32))
        put("blocks.mlp.W_out", src.take(p + "mlp.down_proj.weight", (D, M)).T * residual)
        put("blocks.mlp.b_out", np.zeros(D, np.float32))

    arrays = {name: stack(values) for name, values in per_layer.items()}
    embedding = src.take("model.embed_tokens.weight", (V, D))
    arrays["embed.W_E"] = embedding * np.float32(math.sqrt(D)) if gemma else embedding * mult["embedding_multiplier"]
    if config.normalization == "RMS":
        arrays["ln_final.w"] = norm("model.norm.weight")
    if tied:  # as in transformers: a tied head is the token embedding, whatever lm_head holds
        src.ignore(["lm_head.weight"])
        arrays["unembed.W_U"] = embedding.T / mult["logits_scaling"]
    else:
        if not src.has("lm_head.weight"):
            raise CheckpointError(
                f"Missing tensor 'lm_head.weight' in {origin}: the config sets tie_word_embeddings=false "
                "(a base model without its LM head?)."
            )
        arrays["unembed.W_U"] = src.take("lm_head.weight", (V, D)).T / mult["logits_scaling"]
    arrays["unembed.b_U"] = np.zeros((V,), np.float32)
    src.finish()
    return fill_model(config, arrays, source=origin)


def _split_fused(state_dict: Mapping[str, np.ndarray], config: TransformerConfig, n_kv: int,
                 origin: str) -> dict[str, np.ndarray]:
    """Phi-3's fused tensors under Llama's names: ``qkv_proj`` rows are the
    queries, then the keys, then the values; ``gate_up_proj`` rows the gate,
    then the up projection."""
    out = dict(state_dict)
    D, K, M = config.d_model, config.d_head, config.d_mlp
    q, kv = config.n_heads * K, n_kv * K
    fused = Source(state_dict, origin)  # for its shape checks
    for l in range(config.n_layers):
        p = f"model.layers.{l}."
        qkv = fused.take(p + "self_attn.qkv_proj.weight", (q + 2 * kv, D))
        gate_up = fused.take(p + "mlp.gate_up_proj.weight", (2 * M, D))
        del out[p + "self_attn.qkv_proj.weight"], out[p + "mlp.gate_up_proj.weight"]
        for name, rows in (("q", qkv[:q]), ("k", qkv[q:q + kv]), ("v", qkv[q + kv:])):
            out[f"{p}self_attn.{name}_proj.weight"] = rows
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate_up[:M], gate_up[M:]
    return out

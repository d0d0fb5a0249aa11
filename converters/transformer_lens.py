"""TransformerLens HookedTransformer state dict + config JSON -> acdc_jax.Transformer.

Covers attn-only-Nl, gelu-Nl, redwood_attn_2l and other models whose config
uses only the features listed below. Both HookedTransformerConfig dicts and
the ``config.json`` of Neel Nanda's toy models (``normalization``,
``shortformer_pos``) are accepted.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from acdc_jax.checkpoint import fill_model
from acdc_jax.errors import ConfigError
from acdc_jax.model import Transformer, TransformerConfig

from ._source import Source, check_fields, plain_config, require, stack

_ACT = {"gelu_new": "gelu_new", "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_NORM = {"LN": "LN", "LNPre": "LNPre", None: "none"}
_POS = {"standard": "learned", "shortformer": "shortformer"}

_HANDLED = {
    "n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out",
    "act_fn", "eps", "use_attn_scale", "attn_scale", "normalization_type", "normalization",
    "attention_dir", "attn_only", "positional_embedding_type", "shortformer_pos",
}


def _off(value: Any) -> bool:
    return value in (None, False, 0, -1, -1.0)


# Fields that change the forward pass in ways not implemented here: allowed only when off.
_MUST_BE_OFF: dict[str, Callable[[Any], bool]] = {
    name: _off
    for name in (
        "parallel_attn_mlp", "gated_mlp", "final_rms", "use_local_attn", "scale_attn_by_inverse_layer_idx",
        "post_embedding_ln", "use_normalization_before_and_after", "attn_scores_soft_cap",
        "output_logits_soft_cap", "rotary_dim", "use_qk_norm", "num_experts", "experts_per_token",
        "window_size", "attn_types", "relative_attention_max_distance", "relative_attention_num_buckets",
        "use_NTK_by_parts_rope", "use_yarn_rope", "load_in_4bit",
    )
}

# Bookkeeping, hooks, initialisation, tokenizer and rotary settings that are
# inert unless the features above are on.
_IGNORED = {
    "model_name", "use_hook_mlp_in", "use_attn_in", "use_split_qkv_input", "use_attn_result",
    "use_hook_tokens", "original_architecture", "architecture", "from_checkpoint", "checkpoint_index",
    "checkpoint_label_type", "checkpoint_value", "tokenizer_name", "init_mode", "n_devices", "seed",
    "initializer_range", "init_weights", "n_params", "dtype", "tokenizer_prepends_bos",
    "default_prepend_bos", "device", "rotary_base", "rotary_base_local", "rotary_scaling_factor",
    "rotary_adjacent_pairs", "trust_remote_code", "decoder_start_token_id", "tie_word_embeddings",
    "NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor",
    "NTK_original_ctx_len", "yarn_factor", "yarn_attention_factor", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_original_max_position_embeddings", "norm_topk_prob", "ungroup_grouped_query_attention",
    "n_key_value_heads",
}


def tl_config(cfg: Mapping[str, Any], origin: str = "TransformerLens config") -> TransformerConfig:
    check_fields(cfg, handled=_HANDLED, ignored=_IGNORED | set(_MUST_BE_OFF), origin=origin)
    for name, is_ok in _MUST_BE_OFF.items():
        if name in cfg and not is_ok(cfg[name]):
            raise ConfigError(f"{origin}: {name}={cfg[name]!r} is not supported by this converter.")
    n_heads = require(cfg, "n_heads", origin)
    kv = cfg.get("n_key_value_heads")
    if kv not in (None, n_heads):
        raise ConfigError(f"{origin}: n_key_value_heads={kv!r} (grouped-query attention) is not supported.")
    act = cfg.get("act_fn", "relu")
    if act not in _ACT:
        raise ConfigError(f"{origin}: act_fn {act!r} is not supported; use one of {sorted(_ACT)}.")
    norm = cfg.get("normalization_type", cfg.get("normalization", "LN"))
    if norm not in _NORM:
        raise ConfigError(f"{origin}: normalization_type {norm!r} is not supported; use LN, LNPre or null.")
    if "shortformer_pos" in cfg:
        pos_type = "shortformer" if cfg["shortformer_pos"] else "standard"
    else:
        pos_type = cfg.get("positional_embedding_type", "standard")
    if pos_type not in _POS:
        raise ConfigError(
            f"{origin}: positional_embedding_type {pos_type!r} is not supported; use standard or shortformer."
        )
    direction = cfg.get("attention_dir", "causal")
    if direction not in ("causal", "bidirectional"):
        raise ConfigError(f"{origin}: attention_dir {direction!r} is not supported.")
    d_head = require(cfg, "d_head", origin)
    if not cfg.get("use_attn_scale", True):
        scale = 1.0
    else:
        scale = cfg.get("attn_scale", -1.0)
        scale = math.sqrt(d_head) if scale is None or scale <= 0 else float(scale)
    attn_only = bool(cfg.get("attn_only", False))
    d_mlp = None if attn_only else require(cfg, "d_mlp", origin)
    d_vocab_out = cfg.get("d_vocab_out", -1)
    return TransformerConfig(
        n_layers=require(cfg, "n_layers", origin),
        d_model=require(cfg, "d_model", origin),
        n_heads=n_heads,
        d_head=d_head,
        d_vocab=require(cfg, "d_vocab", origin),
        n_ctx=require(cfg, "n_ctx", origin),
        d_mlp=d_mlp,
        d_vocab_out=None if d_vocab_out in (None, -1) else d_vocab_out,
        act_fn=_ACT[act],
        normalization=_NORM[norm],
        positional=_POS[pos_type],
        causal=direction == "causal",
        ln_eps=cfg.get("eps", 1e-5),
        attn_scale=scale,
    )


def from_transformer_lens(
    state_dict: Mapping[str, np.ndarray], tl_cfg: Mapping[str, Any], origin: str = "TransformerLens state dict"
) -> Transformer:
    """Convert a HookedTransformer state dict (numpy arrays) and its config dict."""
    config = tl_config(plain_config(tl_cfg))
    return from_transformer_lens_arrays(state_dict, config, origin)


def from_transformer_lens_arrays(
    state_dict: Mapping[str, np.ndarray], config: TransformerConfig, origin: str = "TransformerLens state dict"
) -> Transformer:
    src = Source(state_dict, origin)
    L, D, H, K, V, Vo = (config.n_layers, config.d_model, config.n_heads, config.d_head, config.d_vocab, config.d_vocab_out)
    per_layer: dict[str, list[np.ndarray]] = {}
    for l in range(L):
        p = f"blocks.{l}."
        src.ignore([p + "attn.mask", p + "attn.IGNORE"])  # causal-mask buffers
        shapes = {"W_Q": (H, D, K), "W_K": (H, D, K), "W_V": (H, D, K), "W_O": (H, K, D),
                  "b_Q": (H, K), "b_K": (H, K), "b_V": (H, K), "b_O": (D,)}
        for name, shape in shapes.items():
            per_layer.setdefault(f"blocks.attn.{name}", []).append(src.take(p + f"attn.{name}", shape))
        lns = ["ln1"] if config.attn_only else ["ln1", "ln2"]
        if config.normalization == "LN":
            for ln in lns:
                for w in ("w", "b"):
                    per_layer.setdefault(f"blocks.{ln}.{w}", []).append(src.take(p + f"{ln}.{w}", (D,)))
        if not config.attn_only:
            M = config.d_mlp
            for name, shape in {"W_in": (D, M), "b_in": (M,), "W_out": (M, D), "b_out": (D,)}.items():
                per_layer.setdefault(f"blocks.mlp.{name}", []).append(src.take(p + f"mlp.{name}", shape))
    arrays = {name: stack(values) for name, values in per_layer.items()}
    arrays["embed.W_E"] = src.take("embed.W_E", (V, D))
    if config.positional != "none":
        arrays["embed.W_pos"] = src.take("pos_embed.W_pos", (config.n_ctx, D))
    if config.normalization == "LN":
        arrays["ln_final.w"] = src.take("ln_final.w", (D,))
        arrays["ln_final.b"] = src.take("ln_final.b", (D,))
    arrays["unembed.W_U"] = src.take("unembed.W_U", (D, Vo))
    arrays["unembed.b_U"] = src.take("unembed.b_U", (Vo,))
    src.finish()
    return fill_model(config, arrays, source=origin)


def to_transformer_lens(model: Transformer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The inverse: a TransformerLens-layout state dict and config dict. Used to
    ship our own trained checkpoints in the format researchers already load."""
    c = model.config
    if c.positional == "none":
        raise ConfigError("TransformerLens has no layout for a model without positional embeddings.")
    unwritten = [name for name, on in (("rotary", c.positional == "rotary"), ("RMSNorm", c.normalization == "RMS"),
                                       ("gated_mlp", c.gated_mlp), ("parallel_attn_mlp", c.parallel_attn_mlp),
                                       ("capped", c.attn_softcap is not None or c.logit_softcap is not None)) if on]
    if unwritten:
        raise ConfigError(f"The TransformerLens export does not write {', '.join(unwritten)} models; "
                          "save them with acdc_jax.save instead.")
    sd: dict[str, np.ndarray] = {"embed.W_E": np.asarray(model.embed.W_E)}
    if model.embed.W_pos is not None:
        sd["pos_embed.W_pos"] = np.asarray(model.embed.W_pos)
    b = model.blocks
    for l in range(c.n_layers):
        p = f"blocks.{l}."
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[p + f"attn.{name}"] = np.asarray(getattr(b.attn, name)[l])
        if c.normalization == "LN":
            sd[p + "ln1.w"], sd[p + "ln1.b"] = np.asarray(b.ln1.w[l]), np.asarray(b.ln1.b[l])
            if not c.attn_only:
                sd[p + "ln2.w"], sd[p + "ln2.b"] = np.asarray(b.ln2.w[l]), np.asarray(b.ln2.b[l])
        if not c.attn_only:
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[p + f"mlp.{name}"] = np.asarray(getattr(b.mlp, name)[l])
    if c.normalization == "LN":
        sd["ln_final.w"], sd["ln_final.b"] = np.asarray(model.ln_final.w), np.asarray(model.ln_final.b)
    sd["unembed.W_U"], sd["unembed.b_U"] = np.asarray(model.unembed.W_U), np.asarray(model.unembed.b_U)
    cfg = {
        "n_layers": c.n_layers, "d_model": c.d_model, "n_ctx": c.n_ctx, "d_head": c.d_head,
        "n_heads": c.n_heads, "d_mlp": c.d_mlp, "d_vocab": c.d_vocab, "d_vocab_out": c.d_vocab_out,
        "act_fn": c.act_fn, "eps": c.ln_eps, "attn_scale": c.attn_scale,
        "normalization_type": {"none": None}.get(c.normalization, c.normalization),
        "attention_dir": "causal" if c.causal else "bidirectional", "attn_only": c.attn_only,
        "positional_embedding_type": {"learned": "standard", "shortformer": "shortformer"}[c.positional],
    }
    return sd, cfg

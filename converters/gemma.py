"""Rotary settings per layer type, for Gemma 3 (``Gemma3TextConfig``) and
OLMo 3 (``Olmo3Config``): their sliding-window ("local") layers and their
full-attention ("global") layers rotate with different frequencies (OLMo 3's
global layers also with YaRN's cos/sin factor). The weights load as the
Llama family's (`converters.llama`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from acdc_jax.config import default_inv_freq
from acdc_jax.errors import ConfigError

from .rope import Rope, rope_settings

LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # transformers' defaults


def local_layers(hf: Mapping[str, Any], n_layers: int, origin: str, pattern: int = 6) -> tuple[int, ...]:
    """The sliding-window layers: from ``layer_types``, else every layer but
    each ``sliding_window_pattern``-th (Gemma 3: 6 by default; OLMo 3: every
    4th), as transformers reads them."""
    types = hf.get("layer_types")
    if types is None:
        # transformers 5 saves the latter
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", pattern))
        if not (isinstance(pattern, int) and pattern >= 1):
            raise ConfigError(f"{origin}: sliding_window_pattern must be a positive int, got {pattern!r}.")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{origin}: layer_types must give one of {LAYER_TYPES} for each of the {n_layers} layers, "
                          f"got {types!r}.")
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def gemma3_ropes(hf: Mapping[str, Any], d_head: int, origin: str) -> dict[str, Rope]:
    """Gemma 3's `layer_type_ropes`: the older format's local layers read
    ``rope_local_base_freq``, and no layer may have a cos/sin factor (the
    per-head norms come after the projection, so it folds into no weight)."""
    return layer_type_ropes(hf, d_head, origin, "Gemma 3", DEFAULT_THETA, "rope_local_base_freq", ())


def layer_type_ropes(hf: Mapping[str, Any], d_head: int, origin: str, family: str, default_theta: Mapping[str, float],
                     local_theta: Optional[str], factor_on: tuple[str, ...]) -> dict[str, Rope]:
    """Each layer type's `Rope`: transformers 5's ``rope_parameters`` per
    layer type, or the older ``rope_theta`` and ``rope_scaling`` (global
    layers) and the field `local_theta` (local layers; without one, their
    default theta, as transformers 5 reads an older OLMo 3 config). A cos/sin
    factor other than 1 is refused but on the layer types `factor_on`."""
    params = hf.get("rope_parameters")
    if params is not None and not set(params) <= set(LAYER_TYPES):
        raise ConfigError(f"{origin}: {family}'s rope_parameters must be given per layer type {LAYER_TYPES}, "
                          f"got the fields {sorted(params)}.")
    older = ("rope_theta", "rope_scaling") + ((local_theta,) if local_theta else ())
    if params is None:
        params = {"full_attention": {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")},
                  "sliding_attention": {"rope_type": "default",
                                        "rope_theta": hf.get(local_theta) if local_theta else None}}
    elif any(k in hf for k in older):
        raise ConfigError(f"{origin}: rope_parameters and the older {' / '.join(older)} are both given; keep one.")
    ropes = {}
    for kind in LAYER_TYPES:
        sub = {k: v for k, v in (params.get(kind) or {}).items() if v is not None}
        sub.setdefault("rope_theta", default_theta[kind])
        rope = rope_settings({"rope_parameters": sub, "max_position_embeddings": hf.get("max_position_embeddings")},
                             f"{origin} ({kind} rope)", d_head)
        if (rope.attention_factor != 1.0 and kind not in factor_on) or rope.rotary_dim != d_head:
            allowed = "" if kind in factor_on else " with no cos/sin factor"
            raise ConfigError(f"{origin}: {family}'s {kind} rope must rotate the whole head{allowed} "
                              f"(got {rope.rotary_dim} of {d_head} dimensions, factor {rope.attention_factor}).")
        ropes[kind] = rope
    return ropes


def olmo3_rotary(hf: Mapping[str, Any], d_head: int, n_layers: int, origin: str
                 ) -> tuple[Rope, tuple[int, ...], Optional[tuple[float, ...]], float]:
    """OLMo 3's global layers' `Rope`, its local layers, their inverse
    frequencies (None without local layers) and the global layers' cos/sin
    factor (YaRN's, on those layers only)."""
    theta = {kind: 500_000.0 for kind in LAYER_TYPES}  # transformers' Olmo3Config default
    ropes = layer_type_ropes(hf, d_head, origin, "OLMo 3", theta, None, ("full_attention",))
    local, sliding = local_layers(hf, n_layers, origin, pattern=4), ropes["sliding_attention"]
    local_inv = (sliding.inv_freq or default_inv_freq(sliding.rotary_dim, sliding.base)) if local else None
    full = ropes["full_attention"]
    return full, local, local_inv, full.attention_factor


def gemma3_rotary(hf: Mapping[str, Any], d_head: int, n_layers: int, origin: str
                  ) -> tuple[Rope, float, tuple[int, ...], Optional[tuple[float, ...]]]:
    """The global layers' `Rope`, the attention scale, the local layers and
    their inverse frequencies (None without local layers)."""
    if hf.get("attn_logit_softcapping") is not None:
        raise ConfigError(f"{origin}: attn_logit_softcapping is set, but transformers' Gemma 3 does not apply it "
                          "(its per-head norms took its place); set it to null.")
    ropes, local = gemma3_ropes(hf, d_head, origin), local_layers(hf, n_layers, origin)
    sliding = ropes["sliding_attention"]
    local_inv = (sliding.inv_freq or default_inv_freq(sliding.rotary_dim, sliding.base)) if local else None
    return ropes["full_attention"], math.sqrt(hf.get("query_pre_attn_scalar") or d_head), local, local_inv


# transformers' Gemma3TextConfig defaults: an image-text config's text_config gives only the fields that differ
TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "attention_bias": False, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": None, "attn_logit_softcapping": None,
}
# the image-text config's own fields that do not change the text model's forward pass
_IMAGE_TEXT_FIELDS = {"text_config", "vision_config", "model_type", "mm_tokens_per_image", "boi_token_index",
                      "eoi_token_index", "image_token_index", "tie_word_embeddings"}
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def image_text_config(hf: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The text model's config of a Gemma 3 image-text checkpoint
    (``Gemma3ForConditionalGeneration``, model_type ``gemma3``): its
    ``text_config`` over transformers' defaults, and the tying of the LM head."""
    from ._source import HF_INERT

    unknown = sorted(set(hf) - _IMAGE_TEXT_FIELDS - HF_INERT)
    if unknown:
        raise ConfigError(f"{origin}: unsupported field(s) {unknown} in a Gemma 3 image-text config.")
    text = dict(hf.get("text_config") or {})
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ConfigError(f"{origin}: text_config has model_type {text['model_type']!r}; Gemma 3's is 'gemma3_text'.")
    ties = {hf.get("tie_word_embeddings"), text.get("tie_word_embeddings")} - {None}
    if len(ties) > 1:
        raise ConfigError(f"{origin}: tie_word_embeddings differs between the config and its text_config; "
                          "the LM head's source is unclear.")
    return {**TEXT_DEFAULTS, **text, "model_type": "gemma3_text", "tie_word_embeddings": ties.pop() if ties else True}


def image_text_weights(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's tensors of a Gemma 3 image-text checkpoint under
    ``Gemma3ForCausalLM``'s names; the vision tower and projector are dropped."""
    out = {}
    for name, value in state_dict.items():
        if name.startswith(_VISION):
            continue
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    return out

"""The rotary embedding of a Hugging Face config: its base, the share of each
head it rotates, and, for a scaled rotary embedding (linear, dynamic NTK,
Llama 3, YaRN, LongRoPE), the inverse frequencies and cos/sin factor that
transformers computes for it. Other rope types are refused by name."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import numpy as np

from acdc_jax.config import default_inv_freq, rope_powers
from acdc_jax.errors import ConfigError

_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"}
# The fields each supported rope type reads; any other field is refused.
_FIELDS = {
    "default": set(),
    "linear": set(),
    "dynamic": {"original_max_position_embeddings"},
    "llama3": {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"},
}


@dataclasses.dataclass(frozen=True)
class Rope:
    base: float
    rotary_dim: int
    inv_freq: Optional[tuple[float, ...]]  # None: the default base ** (-2i / rotary_dim)
    attention_factor: float  # transformers multiplies cos and sin by it
    n_ctx: Optional[int] = None  # the longest prompt these frequencies hold for, if shorter than the model's


def rope_settings(config: Mapping[str, Any], origin: str, d_head: int, default_factor: float = 1.0,
                  older: Optional[Mapping[str, str]] = None) -> Rope:
    """The rotary embedding of an HF config, read from transformers 5's
    ``rope_parameters``, else the older ``rope_scaling`` and top-level fields
    (``older`` maps a family's own older names to ``rope_theta`` and
    ``partial_rotary_factor``), else the defaults."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _FIELDS:
        raise ConfigError(
            f"{origin}: rope type {kind!r} is not supported (only {', '.join(_FIELDS)}); "
            "the queries and keys would be rotated wrongly."
        )
    unknown = sorted(set(params) - _COMMON - _FIELDS[kind])
    if unknown:
        raise ConfigError(f"{origin}: rope field(s) {unknown} of rope type {kind!r} are not supported.")

    def find(name: str, default: float) -> float:
        names = [name] + [old for old, new in (older or {}).items() if new == name]
        return float(next((src[n] for src in (params, config) for n in names if n in src), default))

    base, share = find("rope_theta", 10000.0), find("partial_rotary_factor", default_factor)
    dim = int(d_head * share)
    if kind in ("default", "dynamic"):
        # dynamic NTK changes nothing up to max_position_embeddings, which bounds the prompt length
        return Rope(base, dim, None, 1.0)
    max_positions = config.get("max_position_embeddings")
    if kind == "longrope":
        return _longrope(params, config, origin, base, dim, max_positions)
    original = params.get("original_max_position_embeddings", max_positions)
    factor = params.get("factor")
    if factor is None and kind == "yarn" and original and max_positions:
        factor = max_positions / original
    if not (isinstance(factor, (int, float)) and factor >= 1):
        raise ConfigError(f"{origin}: rope type {kind!r} needs a 'factor' of at least 1, got {factor!r}.")
    inv = np.asarray(default_inv_freq(dim, base), np.float32)
    if kind == "linear":
        return Rope(base, dim, _tuple(inv / np.float32(factor)), 1.0)
    if original is None:
        raise ConfigError(f"{origin}: rope type {kind!r} needs original_max_position_embeddings.")
    if kind == "llama3":
        return Rope(base, dim, _tuple(_llama3(inv, float(factor), params, float(original))), 1.0)
    return _yarn(params, base, dim, float(factor), float(original))


def _tuple(inv: np.ndarray) -> tuple[float, ...]:
    return tuple(float(f) for f in inv.astype(np.float32))


def _llama3(inv: np.ndarray, factor: float, params: Mapping, original: float) -> np.ndarray:
    """Llama 3.1's frequencies: long wavelengths divided by `factor`, short
    ones kept, a smooth blend between."""
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > original / low, inv / np.float32(factor), inv)
    smooth = (np.float32(original) / wavelen - np.float32(low)) / np.float32(high - low)
    blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: Mapping, base: float, dim: int, factor: float, original: float) -> Rope:
    """YaRN (Peng et al. 2023): interpolate the low frequencies, keep the high
    ones, a linear ramp between, and scale cos and sin by attention_factor."""
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)
    fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(fast), correction(slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the share of each frequency left unscaled
    powers = rope_powers(dim, base)
    inv = (1 / (np.float32(factor) * powers)) * (1 - keep) + (1 / powers) * keep
    return Rope(base, dim, _tuple(inv), float(attention))


def _longrope(params: Mapping, config: Mapping, origin: str, base: float, dim: int, max_positions) -> Rope:
    """LongRoPE (Phi-3): per-frequency divisors, `short_factor` up to
    original_max_position_embeddings tokens and `long_factor` beyond (the
    whole prompt switches). Prompts are capped at that length, so the short
    factors are the model's; cos and sin are scaled as transformers does."""
    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if not isinstance(original, int) or original < 1:
        raise ConfigError(f"{origin}: rope type 'longrope' needs original_max_position_embeddings, got {original!r}.")
    short = params.get("short_factor")
    if not (isinstance(short, (list, tuple)) and len(short) == dim // 2
            and all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in short)):
        raise ConfigError(f"{origin}: rope type 'longrope' needs short_factor, {dim // 2} positive numbers (one per "
                          f"rotated pair), got {short!r}.")
    factor = params.get("factor") or (max_positions or original) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    powers = rope_powers(dim, base)
    inv = 1 / (np.asarray(short, np.float32) * powers)
    return Rope(base, dim, _tuple(inv), float(attention), original if max_positions is None or max_positions > original
                else None)

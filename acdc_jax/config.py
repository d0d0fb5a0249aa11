"""A decoder-only transformer's hyperparameters, checked when made."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import numpy as np

from .errors import ConfigError

ACT_FNS = ("gelu_new", "gelu", "relu", "silu")
NORMALIZATIONS = ("LN", "LNPre", "RMS", "none")
POSITIONALS = ("learned", "shortformer", "rotary", "none")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a decoder-only transformer.

    ``normalization``: ``"LN"`` (LayerNorm with weight and bias), ``"LNPre"``
    (centre and scale only, as after TransformerLens' ``fold_ln``), ``"RMS"``
    (RMSNorm: scale by the root mean square, then a weight; no centring) or
    ``"none"``.
    ``positional``: ``"learned"`` (added to the residual stream),
    ``"shortformer"`` (added to the query and key inputs only, after LN),
    ``"rotary"`` (queries and keys rotated by position after the projection:
    the first ``rotary_dim`` dimensions of each head, in rotate-half pairs
    ``(i, i + rotary_dim / 2)`` as Llama and GPT-NeoX do, with frequencies
    ``rotary_base ** (-2i / rotary_dim)``, or ``rotary_inv_freq`` when given:
    the ``rotary_dim / 2`` inverse frequencies of a scaled rotary embedding,
    such as Llama 3's) or ``"none"``.
    ``d_mlp=None`` makes an attention-only model; ``gated_mlp`` makes the MLP
    ``act(x W_gate) * (x W_in + b_in)`` before ``W_out``, as in Llama;
    ``parallel_attn_mlp`` makes the MLP read the layer's input, as attention
    does, not its output (GPT-NeoX, Pythia, GPT-J).
    ``post_norm`` (Gemma 2) also RMS-normalises each sublayer's output before
    it joins the residual stream: the sum of a layer's heads (``b_O`` is
    added after that norm) and the MLP's output. ``attn_softcap`` and
    ``logit_softcap`` cap the attention scores and the logits at ``c`` by
    ``c * tanh(x / c)``. ``qk_norm`` (Gemma 3) RMS-normalises each head's
    query and key after the projection, before the rotation; with
    ``qk_norm_across_heads`` (OLMo 2) one RMSNorm spans every head's query
    (and key) at a position, each head's projected from its own input.
    ``pre_norm=False`` (OLMo 2) drops the norms before attention and the
    MLP, which then read the residual stream as it is; ``qkv_clip``
    (OLMo) clamps the projected queries, keys and values to ``[-c, c]``.
    ``rotary_local_layers`` (Gemma 3's sliding-window layers) rotate with
    ``rotary_local_inv_freq`` instead of the model's other frequencies (zeros:
    not at all, as SmolLM3's layers without rotary positions).
    ``rotary_attention_factor`` (YaRN's on OLMo 3's full-attention layers
    only) multiplies the cosines and sines of the layers that are not local.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: Optional[int] = None
    d_vocab_out: Optional[int] = None
    act_fn: str = "gelu_new"
    normalization: str = "LN"
    positional: str = "learned"
    causal: bool = True
    ln_eps: float = 1e-5
    attn_scale: Optional[float] = None
    rotary_dim: Optional[int] = None
    rotary_base: float = 10000.0
    rotary_inv_freq: Optional[tuple[float, ...]] = None
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    post_norm: bool = False
    attn_softcap: Optional[float] = None
    logit_softcap: Optional[float] = None
    qk_norm: bool = False
    qk_norm_across_heads: bool = False
    pre_norm: bool = True
    qkv_clip: Optional[float] = None
    rotary_local_inv_freq: Optional[tuple[float, ...]] = None
    rotary_local_layers: tuple[int, ...] = ()
    rotary_attention_factor: float = 1.0

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx"):
            _check_positive_int(name, getattr(self, name))
        if self.d_mlp is not None:
            _check_positive_int("d_mlp", self.d_mlp)
        if self.d_vocab_out is None:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        _check_positive_int("d_vocab_out", self.d_vocab_out)
        for name, allowed in (
            ("act_fn", ACT_FNS),
            ("normalization", NORMALIZATIONS),
            ("positional", POSITIONALS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"TransformerConfig.{name}={getattr(self, name)!r} is not supported; "
                    f"use one of {allowed}."
                )
        if not isinstance(self.causal, bool):
            raise ConfigError(f"TransformerConfig.causal must be a bool, got {self.causal!r}.")
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps > 0):
            raise ConfigError(f"TransformerConfig.ln_eps must be a positive float, got {self.ln_eps!r}.")
        if self.attn_scale is None:
            object.__setattr__(self, "attn_scale", math.sqrt(self.d_head))
        if not (isinstance(self.attn_scale, (int, float)) and self.attn_scale > 0):
            raise ConfigError(
                f"TransformerConfig.attn_scale must be a positive float, got {self.attn_scale!r}."
            )
        object.__setattr__(self, "attn_scale", float(self.attn_scale))
        self._check_rotary()
        for flag in ("gated_mlp", "parallel_attn_mlp", "qk_norm_across_heads", "pre_norm", "post_norm", "qk_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"TransformerConfig.{flag} must be a bool, got {getattr(self, flag)!r}.")
        for flag in ("gated_mlp", "parallel_attn_mlp"):
            if getattr(self, flag) and self.d_mlp is None:
                raise ConfigError(f"TransformerConfig.{flag}=True needs an MLP: set d_mlp.")
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ConfigError("TransformerConfig.qk_norm_across_heads=True needs qk_norm=True.")
        for flag in ("post_norm", "qk_norm"):
            if getattr(self, flag) and self.normalization != "RMS":
                raise ConfigError(f"TransformerConfig.{flag}=True needs normalization='RMS' (its norms are "
                                  f"RMSNorms), got {self.normalization!r}.")
        for name in ("attn_softcap", "logit_softcap", "qkv_clip"):
            cap = getattr(self, name)
            if cap is not None:
                if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (0 < cap < math.inf):
                    raise ConfigError(f"TransformerConfig.{name} must be a positive finite float or None, got {cap!r}.")
                object.__setattr__(self, name, float(cap))

    def _check_rotary(self) -> None:
        f = self.rotary_attention_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f < math.inf):
            raise ConfigError(f"TransformerConfig.rotary_attention_factor must be a positive finite float, got {f!r}.")
        object.__setattr__(self, "rotary_attention_factor", float(f))
        if f != 1.0 and self.positional != "rotary":
            raise ConfigError(f"TransformerConfig.rotary_attention_factor={f} needs positional='rotary'.")
        object.__setattr__(self, "rotary_local_layers", tuple(self.rotary_local_layers))  # a list after JSON
        if self.positional != "rotary":
            if self.rotary_local_layers:
                raise ConfigError("TransformerConfig.rotary_local_layers is set but positional="
                                  f"{self.positional!r}; set positional='rotary' or leave it empty.")
            for name in ("rotary_dim", "rotary_inv_freq", "rotary_local_inv_freq"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"TransformerConfig.{name} is set but positional={self.positional!r}; "
                        f"set positional='rotary' or leave {name} unset."
                    )
            return
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.d_head)
        _check_positive_int("rotary_dim", self.rotary_dim)
        if self.rotary_dim % 2 or self.rotary_dim > self.d_head:
            raise ConfigError(
                f"TransformerConfig.rotary_dim={self.rotary_dim} must be even and at most d_head={self.d_head}."
            )
        if not (isinstance(self.rotary_base, (int, float)) and self.rotary_base > 1):
            raise ConfigError(f"TransformerConfig.rotary_base must be a float above 1, got {self.rotary_base!r}.")
        object.__setattr__(self, "rotary_base", float(self.rotary_base))
        object.__setattr__(self, "ln_eps", float(self.ln_eps))
        for name, least in (("rotary_inv_freq", "positive"), ("rotary_local_inv_freq", "non-negative")):
            if getattr(self, name) is not None:
                inv = tuple(float(f) for f in getattr(self, name))  # a list after JSON
                # local layers may rotate by nothing (SmolLM3's layers without rotary positions: zeros)
                if len(inv) != self.rotary_dim // 2 or not all(
                        math.isfinite(f) and (f > 0 if least == "positive" else f >= 0) for f in inv):
                    raise ConfigError(
                        f"TransformerConfig.{name} must be rotary_dim / 2 = {self.rotary_dim // 2} {least} "
                        f"finite floats, got {len(inv)} values."
                    )
                object.__setattr__(self, name, inv)
        local = tuple(self.rotary_local_layers)
        if not all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < self.n_layers for l in local) \
                or len(set(local)) != len(local):
            raise ConfigError("TransformerConfig.rotary_local_layers must name distinct layers "
                              f"0..{self.n_layers - 1}, got {self.rotary_local_layers!r}.")
        if bool(local) != (self.rotary_local_inv_freq is not None):
            raise ConfigError("TransformerConfig.rotary_local_layers and rotary_local_inv_freq go together: set both "
                              "(the layers that rotate with the local frequencies, and those frequencies) or neither.")
        object.__setattr__(self, "rotary_local_layers", tuple(sorted(local)))

    @property
    def rotary(self) -> Optional["Rotary"]:
        """How queries and keys rotate, for a rotary model; else None."""
        if self.positional != "rotary":
            return None
        inv = self.rotary_inv_freq if self.rotary_inv_freq is not None else default_inv_freq(self.rotary_dim,
                                                                                             self.rotary_base)
        if not self.rotary_local_layers:
            return Rotary(self.rotary_dim, tuple(inv), factor=self.rotary_attention_factor)
        flags = tuple(int(l in self.rotary_local_layers) for l in range(self.n_layers))
        return Rotary(self.rotary_dim, tuple(inv), tuple(self.rotary_local_inv_freq), flags,
                      self.rotary_attention_factor)

    @property
    def attn_only(self) -> bool:
        return self.d_mlp is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"Unknown TransformerConfig field(s) {unknown}; known fields are {sorted(known)}."
            )
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in d
        )
        if missing:
            raise ConfigError(f"TransformerConfig is missing required field(s) {missing}.")
        return cls(**d)


class Rotary(NamedTuple):
    """Rotary positions as a model's attention applies them (hashable: a
    static field of the attention module). The first `dim` dimensions of
    each head rotate in pairs at `inv_freq`; where some layers rotate at
    other frequencies (Gemma 3's local layers), `local_flags` marks them
    (0/1 per layer) and `local_inv_freq` gives theirs; the other layers'
    cosines and sines are multiplied by `factor`."""

    dim: int
    inv_freq: tuple
    local_inv_freq: Optional[tuple] = None
    local_flags: Optional[tuple] = None
    factor: float = 1.0  # on the cosines and sines of the layers that are not local


def rope_powers(dim: int, base: float) -> np.ndarray:
    """``base ** (2i / dim)`` in float32, as transformers computes it: the
    exponents in float32, the powers rounded from float64. PyTorch's float32
    power is close to correctly rounded and numpy's is not: over common head
    sizes and bases numpy's gave 346 of 2,016 rotary frequencies one ulp off
    PyTorch's, rounding 11."""
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)


def default_inv_freq(dim: int, base: float) -> tuple[float, ...]:
    """``base ** (-2i / dim)`` in float32, computed as transformers does."""
    return tuple(float(f) for f in np.float32(1.0) / rope_powers(dim, base))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"TransformerConfig.{name} must be a positive int, got {value!r}.")

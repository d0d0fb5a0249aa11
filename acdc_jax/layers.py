"""The layers a transformer is built from: norms, rotary positions,
attention per head and the MLP, as small Equinox modules and functions.

Weights follow TransformerLens' layout (``W_Q`` [n_heads, d_model, d_head],
``W_O`` [n_heads, d_head, d_model], ``W_in`` [d_model, d_mlp]); `model.py`
stacks them on a leading ``n_layers`` axis.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import Rotary, TransformerConfig


def _normal(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    return 0.02 * jr.normal(key, shape, dtype=jnp.float32)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis, or RMSNorm (mode "RMS": no centring, a
    weight and no bias). ``w`` is None for "LNPre" and "none", ``b`` unless "LN"."""

    w: Optional[Float[Array, " d_model"]]
    b: Optional[Float[Array, " d_model"]]
    mode: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, d_model: int, mode: str, eps: float):
        self.mode, self.eps = mode, eps
        self.w = jnp.ones((d_model,), jnp.float32) if mode in ("LN", "RMS") else None
        self.b = jnp.zeros((d_model,), jnp.float32) if mode == "LN" else None

    def __call__(self, x: Float[Array, "*rest d_model"]) -> Float[Array, "*rest d_model"]:
        if self.mode == "none":
            return x
        if self.mode != "RMS":
            x = x - x.mean(-1, keepdims=True)
        x = x * self._inv_rms(x)
        if self.w is not None:
            x = x * _lead(self.w, x.ndim)
        if self.b is not None:
            x = x + _lead(self.b, x.ndim)
        return x

    def shares(self, parts: Float[Array, "*rest n pos d_model"]) -> Float[Array, "*rest n pos d_model"]:
        """Each of `parts`' share of this RMSNorm of their sum: the parts times
        the sum's weight / rms, so that the shares add up to the normalised sum."""
        total = parts.sum(-3)
        factor = self._inv_rms(total) * _lead(self.w, total.ndim)
        return parts * factor[..., None, :, :]

    def _inv_rms(self, x: Float[Array, "*rest d_model"]) -> Float[Array, "*rest 1"]:
        return jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)


def softcap(x: Array, cap: Optional[float]) -> Array:
    """``cap * tanh(x / cap)`` (Gemma 2's cap on attention scores and logits), or x."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _lead(a: Array, ndim: int) -> Array:
    """Give `a` leading unit axes up to `ndim` (rank promotion is explicit here)."""
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def rotate(x: Float[Array, "n_heads pos d_head"], positions: Int[Array, " pos"], rotary: Optional[Rotary],
           layer=None):
    """Rotary position embedding of queries or keys at `positions` (rotate-half
    pairs over the first rotary_dim dimensions; the rest pass through), with
    the frequencies of `layer` (an int, traced or not) where layers differ."""
    if rotary is None:
        return x
    dim, inv_freq, local = rotary.dim, jnp.asarray(rotary.inv_freq, dtype=jnp.float32), None
    if rotary.local_flags is not None:
        if layer is None:
            raise ValueError("This model's layers rotate with different frequencies: pass the layer.")
        local = jnp.asarray(rotary.local_flags)[layer] == 1
        inv_freq = jnp.where(local, jnp.asarray(rotary.local_inv_freq, dtype=jnp.float32), inv_freq)
    angle = positions.astype(jnp.float32)[:, None] * inv_freq[None]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if rotary.factor != 1.0:  # the non-local layers' factor, as transformers scales them, before the cast
        factor = rotary.factor if local is None else jnp.where(local, 1.0, rotary.factor)
        cos, sin = cos * factor, sin * factor
    cos, sin = _lead(cos.astype(x.dtype), x.ndim), _lead(sin.astype(x.dtype), x.ndim)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 : dim]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., dim:]], axis=-1)


def attention_pattern(
    q: Float[Array, "n_heads q_pos d_head"],
    k: Float[Array, "n_heads pos d_head"],
    scale: float,
    causal: bool,
    q_positions: Optional[Int[Array, " q_pos"]] = None,
    rotary: Optional[Rotary] = None,
    cap: Optional[float] = None,
    layer=None,
) -> Float[Array, "n_heads q_pos pos"]:
    """Softmax attention weights; queries sit at `q_positions` (default: every
    position), keys at every position."""
    at = jnp.arange(q.shape[1]) if q_positions is None else q_positions
    if rotary is not None:
        q, k = rotate(q, at, rotary, layer), rotate(k, jnp.arange(k.shape[1]), rotary, layer)
    scores = softcap(jnp.einsum("hqd,hkd->hqk", q, k) / scale, cap)
    if causal:
        allowed = (jnp.arange(k.shape[1])[None, :] <= at[:, None])[None]
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1)


def attend(
    q: Float[Array, "n_heads q_pos d_head"],
    k: Float[Array, "n_heads pos d_head"],
    v: Float[Array, "n_heads pos d_head"],
    scale: float,
    causal: bool,
    q_positions: Optional[Int[Array, " q_pos"]] = None,
    rotary: Optional[Rotary] = None,
    cap: Optional[float] = None,
    layer=None,
) -> Float[Array, "n_heads q_pos d_head"]:
    """Scaled dot-product attention per head; returns z (before W_O)."""
    return jnp.einsum("hqk,hkd->hqd", attention_pattern(q, k, scale, causal, q_positions, rotary, cap, layer), v)


class Attention(eqx.Module):
    """Per-head attention; ``q_norm`` and ``k_norm`` (``qk_norm``: Gemma 3,
    Qwen3) normalise each head's query and key after the projection, and
    ``clip`` (``qkv_clip``: OLMo) clamps queries, keys and values there.
    With ``across_heads`` (OLMo 2) each norm spans all heads (its weight
    [n_heads * d_head]): a head's query is its own input's projection over
    the rms of every head's at that position, so a cut into one head's
    query input moves the others', as a hook on ``q_proj``'s rows does."""

    W_Q: Float[Array, "n_heads d_model d_head"]
    b_Q: Float[Array, "n_heads d_head"]
    W_K: Float[Array, "n_heads d_model d_head"]
    b_K: Float[Array, "n_heads d_head"]
    W_V: Float[Array, "n_heads d_model d_head"]
    b_V: Float[Array, "n_heads d_head"]
    W_O: Float[Array, "n_heads d_head d_model"]
    b_O: Float[Array, " d_model"]
    q_norm: Optional[LayerNorm]
    k_norm: Optional[LayerNorm]
    scale: float = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    rotary: Optional[Rotary] = eqx.field(static=True)
    softcap: Optional[float] = eqx.field(static=True)
    clip: Optional[float] = eqx.field(static=True)
    across_heads: bool = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        H, D, K = config.n_heads, config.d_model, config.d_head
        kq, kk, kv, ko = jr.split(key, 4)
        self.W_Q, self.W_K, self.W_V = (_normal(k, (H, D, K)) for k in (kq, kk, kv))
        self.b_Q = self.b_K = self.b_V = jnp.zeros((H, K), jnp.float32)
        self.W_O = _normal(ko, (H, K, D))
        self.b_O = jnp.zeros((D,), jnp.float32)
        self.scale, self.causal, self.rotary = config.attn_scale, config.causal, config.rotary
        self.softcap, self.clip = config.attn_softcap, config.qkv_clip
        self.across_heads = config.qk_norm_across_heads
        size = H * K if self.across_heads else K
        norm = lambda: LayerNorm(size, "RMS", config.ln_eps) if config.qk_norm else None
        self.q_norm, self.k_norm = norm(), norm()

    def finish(self, q: Array, k: Array, v: Array, heads: Optional[Array] = None) -> tuple[Array, Array, Array]:
        """Projected queries, keys and values [n_heads, pos, d_head] after the
        clamp and the query and key norms, if any."""
        if self.clip is not None:
            q, k, v = (jnp.clip(a, -self.clip, self.clip) for a in (q, k, v))
        if self.q_norm is None:
            return q, k, v
        if not self.across_heads:
            return self.q_norm(q), self.k_norm(k), v
        if heads is not None:  # the rms reads every head: no program recomputes only some (scoring.py)
            raise ValueError("A query/key norm across heads needs every head's projection: recompute all heads.")
        return _across_heads(self.q_norm, q), _across_heads(self.k_norm, k), v

    def head_results(
        self,
        xq: Float[Array, "n q_pos d_model"],
        xk: Float[Array, "n pos d_model"],
        xv: Float[Array, "n pos d_model"],
        heads: Optional[Int[Array, " n"]] = None,
        q_positions: Optional[Int[Array, " q_pos"]] = None,
        layer=None,
    ) -> Float[Array, "n q_pos d_model"]:
        """Each head's write to the residual stream (without b_O), from its own
        (already normalised) query, key and value inputs; for the heads listed
        in `heads` only, if given, and at the query positions `q_positions`
        only, if given (then `xq` holds just those). `layer`: this layer's
        index, where layers rotate differently."""
        z = self.head_z(xq, xk, xv, heads, q_positions, layer)
        return jnp.einsum("hpk,hkd->hpd", z, self.W_O if heads is None else jnp.take(self.W_O, heads, axis=0))

    def head_z(
        self,
        xq: Float[Array, "n q_pos d_model"],
        xk: Float[Array, "n pos d_model"],
        xv: Float[Array, "n pos d_model"],
        heads: Optional[Int[Array, " n"]] = None,
        q_positions: Optional[Int[Array, " q_pos"]] = None,
        layer=None,
    ) -> Float[Array, "n q_pos d_head"]:
        """`head_results` before W_O."""
        pick = (lambda a: a) if heads is None else (lambda a: jnp.take(a, heads, axis=0))
        q = jnp.einsum("hpd,hdk->hpk", xq, pick(self.W_Q)) + pick(self.b_Q)[:, None, :]
        k = jnp.einsum("hpd,hdk->hpk", xk, pick(self.W_K)) + pick(self.b_K)[:, None, :]
        v = jnp.einsum("hpd,hdk->hpk", xv, pick(self.W_V)) + pick(self.b_V)[:, None, :]
        q, k, v = self.finish(q, k, v, heads)
        return attend(q, k, v, self.scale, self.causal, q_positions, self.rotary, self.softcap, layer)


def _across_heads(norm: LayerNorm, x: Float[Array, "n_heads pos d_head"]) -> Float[Array, "n_heads pos d_head"]:
    """RMSNorm of each position's heads together (the weight is [n_heads * d_head])."""
    inv = jax.lax.rsqrt((x * x).mean((0, 2), keepdims=True) + norm.eps)
    return x * inv * norm.w.reshape(x.shape[0], 1, x.shape[2])


def activation(name: str, x: Array) -> Array:
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


class MLP(eqx.Module):
    """``act(x W_in + b_in) W_out + b_out``, or with ``W_gate`` (a gated MLP)
    ``(act(x W_gate) * (x W_in + b_in)) W_out + b_out``."""

    W_in: Float[Array, "d_model d_mlp"]
    b_in: Float[Array, " d_mlp"]
    W_gate: Optional[Float[Array, "d_model d_mlp"]]
    W_out: Float[Array, "d_mlp d_model"]
    b_out: Float[Array, " d_model"]
    act_fn: str = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)  # the gate's key apart, so that models without one initialise as before
        self.W_in = _normal(k1, (config.d_model, config.d_mlp))
        self.W_gate = _normal(jr.fold_in(key, 2), (config.d_model, config.d_mlp)) if config.gated_mlp else None
        self.b_in = jnp.zeros((config.d_mlp,), jnp.float32)
        self.W_out = _normal(k2, (config.d_mlp, config.d_model))
        self.b_out = jnp.zeros((config.d_model,), jnp.float32)
        self.act_fn = config.act_fn

    def __call__(self, x: Float[Array, "*rest d_model"]) -> Float[Array, "*rest d_model"]:
        h = x @ self.W_in + _lead(self.b_in, x.ndim)
        h = activation(self.act_fn, h) if self.W_gate is None else activation(self.act_fn, x @ self.W_gate) * h
        return h @ self.W_out + _lead(self.b_out, x.ndim)

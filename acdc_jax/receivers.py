"""A sparse pass's start layer from cached projections of its senders.

While ACDC works through the receivers of layer l, the senders before l keep
their deviations under the circuit (their own inputs come later in the
schedule). A head's q, k or v input under a candidate mask is then
``base + sum_s a_s dev_s`` with fixed ``dev_s`` and only the coefficients
``a_s = m_dir * m_add[s]`` changing. LayerNorm's centring P (the identity for
RMSNorm) and the projection are linear, so ``(P x) diag(gamma) W = sum_s a_s A_s`` with
``A_s = (P dev_s) diag(gamma) W`` [pos, d_head] computed once per layer
(`receiver_cache`, the base counted as a sender with a = 1), and the variance
``|P x|^2 / d_model`` is a quadratic form in a over the Gram matrix of the
centred senders at each position. A candidate then costs about
n_senders x d_head per position and input to recompute a head there, not
d_model x (n_senders + d_head). The result equals the direct computation up
to float rounding (another summation order), which ACDC's near-tie band
measures as it does for every program.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .corruption import _corrupt_base, corruption_axes, example_inputs
from .graph import CircuitGraph
from .layers import attend
from .model import Transformer, layer


class ReceiverCache(eqx.Module):
    """Layer l's heads' q/k/v projections of each sender before it (and of
    the corrupted base, last), for every prompt."""

    proj: Float[Array, "batch n_in n_heads 3 pos d_head"]  # (P dev_s) diag(gamma) W_{Q,K,V}
    gram: Optional[Float[Array, "batch pos n_in n_in"]]  # <P dev_s, P dev_r> (None without LayerNorm)
    const: Float[Array, "batch n_heads 3 pos d_head"]  # beta W + b, and the shortformer positions' W_Q, W_K


def n_inputs(graph: CircuitGraph, l: int) -> int:
    return graph.n_senders_before_attn(l) + 1


@eqx.filter_jit
def receiver_cache(model: Transformer, graph: CircuitGraph, l: int, corruption, tokens, mid) -> ReceiverCache:
    """The cache of layer `l` from the senders' deviations `mid` [batch, n, pos, d_model]."""
    blk = layer(model.blocks, l)
    ln, attn = blk.ln1, blk.attn
    W = jnp.stack([attn.W_Q, attn.W_K, attn.W_V], 1)  # [H, 3, d_model, d_head]
    n = graph.n_senders_before_attn(l)

    def one(tok, acts, mid):
        corr, pos_qk = example_inputs(corruption, model, tok, acts)
        x = jnp.concatenate([mid[:n], _corrupt_base(model, corr, l)[None]])
        gram = None
        if ln.mode in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdims=True)
        if ln.mode != "none":
            gram = jnp.einsum("spd,rpd->psr", x, x)
        proj = jnp.einsum("spd,htdk->shtpk", x if ln.w is None else x * ln.w[None, None], W)
        const = jnp.broadcast_to(jnp.stack([attn.b_Q, attn.b_K, attn.b_V], 1)[:, :, None], proj.shape[1:])
        if ln.b is not None:
            const = const + jnp.einsum("d,htdk->htk", ln.b, W)[:, :, None]
        if pos_qk is not None:  # added to the normalised query and key inputs
            const = const.at[:, :2].add(jnp.einsum("pd,htdk->htpk", pos_qk, W[:, :2]))
        return proj, gram, const

    proj, gram, const = jax.vmap(one, in_axes=(0, corruption_axes(corruption), 0))(tokens, corruption.acts, mid)
    return ReceiverCache(proj, gram, const)


def cached_z(model: Transformer, graph: CircuitGraph, l: int, cache: ReceiverCache, m_add, m_dir, heads,
             q_positions=None) -> Float[Array, "n q_pos d_head"]:
    """z of layer `l`'s `heads` under the masks, for one prompt's `cache`
    (queries at `q_positions` only, if given)."""
    blk = layer(model.blocks, l)
    H, k = graph.n_heads, heads.shape[0]
    n = cache.proj.shape[0] - 1
    cols = l * graph._layer_columns + jnp.stack([heads, H + heads, 2 * H + heads], 1)  # [k, 3]: q, k, v
    a = jnp.concatenate([m_dir[cols][None] * m_add[:n][:, cols], jnp.ones((1, k, 3), m_add.dtype)])
    proj = jnp.einsum("snt,sntpk->ntpk", a, jnp.take(cache.proj, heads, axis=1))
    if cache.gram is not None:
        var = jnp.einsum("snt,psr,rnt->ntp", a, cache.gram, a) / model.config.d_model
        proj = proj * jax.lax.rsqrt(var + blk.ln1.eps)[..., None]
    proj = proj + jnp.take(cache.const, heads, axis=0)
    q = proj[:, 0] if q_positions is None else proj[:, 0][:, q_positions]
    return attend(q, proj[:, 1], proj[:, 2], blk.attn.scale, blk.attn.causal, q_positions, blk.attn.rotary,
                  blk.attn.softcap, l)


def cached_flops(graph: CircuitGraph, l: int, heads: int, n_pos: int, n_q: int) -> int:
    """FLOPs of `heads` heads of layer `l` from the cache, one candidate and prompt."""
    c, n_in = graph.config, n_inputs(graph, l)
    mix = 2 * 3 * heads * n_in * n_pos * c.d_head
    var = 2 * 3 * heads * n_pos * n_in * (n_in + 1) if c.normalization != "none" else 0
    pattern = 2 * 2 * heads * n_q * n_pos * c.d_head
    return mix + var + pattern


def cache_flops(graph: CircuitGraph, l: int, n_pos: int) -> int:
    """FLOPs of building layer `l`'s cache, one prompt."""
    c, n_in = graph.config, n_inputs(graph, l)
    return 2 * n_in * n_pos * c.d_model * (3 * c.n_heads * c.d_head + n_in)

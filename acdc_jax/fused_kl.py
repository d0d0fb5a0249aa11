"""KL divergence to the full model of logits given as a low-rank change of
a base, streamed over the vocabulary.

A sparse pass's candidate has logits ``(pre + u @ G) * scale + bias``
(`sparse.py`): the base's unembedded numerator plus a few heads' maps. Made
whole, they are a [candidates x prompts, vocabulary] array that a CPU
writes to memory and reads back several times (the product, the scale and
bias, the log-softmax, the KL), which cost more than the product itself.
Here the vocabulary is walked in chunks small enough to stay in cache,
summing as it goes, so each logit is made once and never stored:

    KL(p || q) = LSE(l) - LSE(lr) - sum_v p_v (l_v - lr_v)

for the reference logits lr (p = softmax(lr)) and the candidate's l. Both
terms are made from the difference r = l - lr per token (the first as the
log-sum-exp of r + log p), so a candidate close to the full model loses no
precision to the logits' size. The result equals
`tasks.base.kl_divergence` up to float rounding (another summation order),
which ACDC's near-tie band measures as it does for every program.
"""

from __future__ import annotations

from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .layers import _lead
from .model import Transformer
from .sharding import fetch
from .tasks.base import kl_divergence

ROW_CHUNK_BYTES = 3 << 19  # one chunk of logits (rows x tokens x 4 bytes) fits in a core's L2 cache


def chunk_width(rows: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two from 128 to 4096 whose chunk fits ROW_CHUNK_BYTES."""
    width = 128
    while width < 4096 and rows * 2 * width * 4 <= ROW_CHUNK_BYTES:
        width *= 2
    return min(width, vocab)


def streams(metric, x: Array, loop: bool, model: Transformer) -> bool:
    """Whether a pass takes this path: KL divergence in float32, on a CPU
    (`loop`; accelerators keep the whole logits, which they fuse well), of
    logits that are not capped (the cap is not a low-rank change)."""
    return loop and metric is kl_divergence and x.dtype == jnp.float32 and model.unembed.softcap is None


def final_numerator(ln, x):
    """ln_final's numerator: x centred, times gamma (as its mode has them)."""
    if ln.mode == "none":
        return x
    if ln.mode != "RMS":
        x = x - x.mean(-1, keepdims=True)
    return x if ln.w is None else x * _lead(ln.w, x.ndim)


def final_scale(ln, x):
    """ln_final's 1/sigma of each residual in `x` (1 without normalisation)."""
    if ln.mode == "none":
        return jnp.ones(x.shape[:-1], x.dtype)
    xc = x if ln.mode == "RMS" else x - x.mean(-1, keepdims=True)
    return jax.lax.rsqrt((xc * xc).mean(-1) + ln.eps)


def final_bias(model: Transformer):
    ln, un = model.ln_final, model.unembed
    return un.b_U if ln.b is None else un.b_U + ln.b @ un.W_U


class KLReference(eqx.Module):
    """What streamed KL reads of the full model's logits and of the model,
    made once per run (`kl_reference`, `reference_arrays`): made in every
    pass, the log-softmax and the bias (a product with W_U) cost a sparse
    pass of the benchmark model a tenth of its time."""

    logits: Float[Array, "rows vocab"]  # the full model's, float32
    log_p: Float[Array, "rows vocab"]  # their log-softmax
    p: Float[Array, "rows vocab"]
    lse: Float[Array, " rows"]  # LSE(log_p): 0 but for float rounding
    bias: Float[Array, " vocab"]  # of the logits (`final_bias`)


def kl_reference(reference: Float[Array, "rows vocab"], bias: Float[Array, " vocab"]) -> KLReference:
    logits = reference.astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return KLReference(logits, log_p, jnp.exp(log_p), jax.nn.logsumexp(log_p, axis=-1), bias)


def model_reference(model: Transformer, reference: Float[Array, "*rows vocab"]) -> KLReference:
    """The `KLReference` of a task's reference logits (any leading shape) under `model`'s bias."""
    return kl_reference(reference.reshape(-1, reference.shape[-1]), final_bias(model))


_model_reference = eqx.filter_jit(model_reference)  # one program, kept across runs


def reference_arrays(model: Transformer, arrays: dict) -> dict:
    """`arrays` (a task's, `tasks.base.task_arrays`) with its `KLReference`
    under "kl", made once, for the passes that stream KL (`streams`)."""
    if arrays.get("reference") is None or model.unembed.softcap is not None:
        return arrays
    return {**arrays, "kl": _model_reference(model, arrays["reference"])}


def residual_kl(
    model: Transformer,
    x: Float[Array, "cand batch pos d_model"],
    arrays,
    u: Optional[Float[Array, "cand batch pos rank"]] = None,
    maps: Optional[Array] = None,
    pre: Optional[Float[Array, "batch pos vocab"]] = None,
    heads: Optional[Int[Array, " k"]] = None,
    running_max: bool = False,
) -> tuple[Float[Array, " cand"], Bool[Array, ""]]:
    """`kl_divergence` of each candidate whose final residuals at the metric
    positions are `x`, and whose unembedded ln_final numerator is
    ``pre + u @ maps`` (by default the numerator of `x` through `W_U`; with
    `heads`, the maps of those heads, see `low_rank_kl`), and whether it is
    exact. Reads the reference from ``arrays["kl"]`` where
    `reference_arrays` made it, else makes it here."""
    cand, rows = x.shape[0], x.shape[1] * x.shape[2]
    if u is None:
        u, maps = final_numerator(model.ln_final, x), model.unembed.W_U
    ref = arrays.get("kl")
    if ref is None:
        ref = model_reference(model, arrays["reference"])
    kl, ok = low_rank_kl(u.reshape(cand, rows, -1), maps, None if pre is None else pre.reshape(rows, -1),
                         final_scale(model.ln_final, x).reshape(cand, rows), ref, heads=heads, running_max=running_max)
    return weighted_mean(kl, arrays["weights"]), ok


def low_rank_kl(
    u: Float[Array, "cand batch rank"],
    maps: Array,
    pre: Optional[Float[Array, "batch vocab"]],
    scale: Float[Array, "cand batch"],
    ref: KLReference,
    width: Optional[int] = None,
    running_max: bool = False,
    heads: Optional[Int[Array, " k"]] = None,
) -> tuple[Float[Array, "cand batch"], Bool[Array, ""]]:
    """KL(softmax(ref.logits) || softmax(l)) per candidate and row, for
    ``l = (pre + u @ maps) * scale[..., None] + ref.bias`` (no `pre`: zero),
    and whether every sum held. `maps` is [rank, vocab], or with `heads`
    every head's map [n_heads, d_head, vocab], of which those of `heads`
    are read chunk by chunk (rank = k x d_head; gathered whole first, they
    were a copy as large as the maps read, in every pass).

    Without `running_max` the sum of exp(l - LSE(lr)) is taken as it comes
    (a running maximum doubled the cost: a second sweep of every chunk).
    Its terms cannot overflow, nor the sum lose precision to underflow,
    unless a candidate's LSE moves some 70 nats from the reference's; where
    one does, the flag is False and the caller sums again with
    `running_max`. That is a second program, compiled only when a run needs
    it: inside the pass (a `lax.cond`) it was compiled into every pass
    program (the benchmark model's sparse programs took 15-20% longer)."""
    rows, vocab = ref.logits.shape
    width = width or chunk_width(u.shape[0] * rows, vocab)
    top, total, diff = _sums(u, maps, heads, pre, scale, ref, width, running_max=running_max)
    kl = _kl(top, total, diff)
    ok = jnp.all((total > 1e-30) & jnp.isfinite(kl))
    # less LSE(log p), which float rounding of log p moves off 0
    return kl - ref.lse[None], ok


def exact(program: Callable[[bool], tuple]) -> np.ndarray:
    """The metrics of a pass program that may stream KL (`program(running_max)`
    returns the metrics and whether they are exact: a traced flag where it
    streams, else a static True, so that other passes fetch nothing more),
    run again with the running maximum where the plain sums failed."""
    metrics, ok = program(False)
    return fetch(metrics) if ok is True or bool(fetch(ok)) else fetch(program(True)[0])


def _kl(top, total, diff):
    return top + jnp.log(total) - diff  # LSE(l) - LSE(lr) - sum p (l - lr)


def _heads_chunk(maps, heads, start, width: int):
    """Columns start:start + width of the maps of `heads`, [k x d_head, width]."""
    size = (1, maps.shape[1], width)
    return jax.vmap(lambda h: jax.lax.dynamic_slice(maps, (h, 0, start), size)[0])(heads).reshape(-1, width)


def _sums(u, maps, heads, pre, scale, ref: KLReference, width: int, running_max: bool):
    """Per candidate and row over the vocabulary, in chunks of `width`: the
    running maximum of l - LSE(lr) (0 without `running_max`), the sum of
    exp(l - LSE(lr) - that maximum), and sum p (l - lr)."""
    vocab = ref.logits.shape[1]

    def step(carry, start, width=width):
        top, total, diff = carry
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)
        logits = jnp.einsum("cbr,rv->cbv", u, cut(maps) if heads is None else _heads_chunk(maps, heads, start, width))
        if pre is not None:
            logits = logits + cut(pre)[None]
        r = logits * scale[..., None] + cut(ref.bias)[None, None] - cut(ref.logits)[None]  # l - lr, small near the reference
        diff = diff + jnp.sum(cut(ref.p)[None] * r, axis=-1)
        t = r + cut(ref.log_p)[None]  # l - LSE(lr)
        if not running_max:
            return (top, total + jnp.exp(t).sum(-1), diff), None
        new_top = jnp.maximum(top, t.max(-1))
        total = total * jnp.exp(top - new_top) + jnp.exp(t - new_top[..., None]).sum(-1)
        return (new_top, total, diff), None

    zeros = jnp.zeros(scale.shape, jnp.float32)
    carry = (zeros - jnp.inf if running_max else zeros, zeros, zeros)
    n_full = vocab // width
    carry, _ = jax.lax.scan(step, carry, jnp.arange(n_full) * width)
    if vocab % width:
        carry, _ = step(carry, n_full * width, width=vocab % width)
    return carry


def weighted_mean(values: Float[Array, "cand batch"], weights: Optional[Array]) -> Float[Array, " cand"]:
    """Per candidate, as `tasks.base.kl_divergence` averages its rows."""
    if weights is None:
        return values.mean(-1)
    w = weights.reshape(-1).astype(values.dtype)
    return (values * w[None]).sum(-1) / w.sum()

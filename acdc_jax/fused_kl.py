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

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

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


def residual_kl(
    model: Transformer,
    x: Float[Array, "cand batch pos d_model"],
    arrays,
    u: Optional[Float[Array, "cand batch pos rank"]] = None,
    maps: Optional[Float[Array, "rank vocab"]] = None,
    pre: Optional[Float[Array, "batch pos vocab"]] = None,
    running_max: bool = False,
) -> tuple[Float[Array, " cand"], Bool[Array, ""]]:
    """`kl_divergence` of each candidate whose final residuals at the metric
    positions are `x`, and whose unembedded ln_final numerator is
    ``pre + u @ maps`` (by default the numerator of `x` through `W_U`), and
    whether it is exact (see `low_rank_kl`)."""
    cand, rows = x.shape[0], x.shape[1] * x.shape[2]
    if u is None:
        u, maps = final_numerator(model.ln_final, x), model.unembed.W_U
    kl, ok = low_rank_kl(u.reshape(cand, rows, -1), maps, None if pre is None else pre.reshape(rows, -1),
                         final_scale(model.ln_final, x).reshape(cand, rows), final_bias(model),
                         arrays["reference"].reshape(rows, -1).astype(jnp.float32), running_max=running_max)
    return weighted_mean(kl, arrays["weights"]), ok


def low_rank_kl(
    u: Float[Array, "cand batch rank"],
    maps: Float[Array, "rank vocab"],
    pre: Optional[Float[Array, "batch vocab"]],
    scale: Float[Array, "cand batch"],
    bias: Float[Array, " vocab"],
    reference: Float[Array, "batch vocab"],
    width: Optional[int] = None,
    running_max: bool = False,
) -> tuple[Float[Array, "cand batch"], Bool[Array, ""]]:
    """KL(softmax(reference) || softmax(l)) per candidate and row, for
    ``l = (pre + u @ maps) * scale[..., None] + bias`` (no `pre`: zero), and
    whether every sum held.

    Without `running_max` the sum of exp(l - LSE(lr)) is taken as it comes
    (a running maximum doubled the cost: a second sweep of every chunk).
    Its terms cannot overflow, nor the sum lose precision to underflow,
    unless a candidate's LSE moves some 70 nats from the reference's; where
    one does, the flag is False and the caller sums again with
    `running_max`. That is a second program, compiled only when a run needs
    it: inside the pass (a `lax.cond`) it was compiled into every pass
    program (the benchmark model's sparse programs took 15-20% longer)."""
    rows, vocab = reference.shape
    width = width or chunk_width(u.shape[0] * rows, vocab)
    log_p = jax.nn.log_softmax(reference, axis=-1)
    top, total, diff = _sums(u, maps, pre, scale, bias, reference, log_p, width, running_max=running_max)
    kl = _kl(top, total, diff)
    ok = jnp.all((total > 1e-30) & jnp.isfinite(kl))
    # less LSE(log p), which float rounding of log p moves off 0
    return kl - jax.nn.logsumexp(log_p, axis=-1)[None], ok


def exact(program: Callable[[bool], tuple]) -> np.ndarray:
    """The metrics of a pass program that may stream KL (`program(running_max)`
    returns the metrics and whether they are exact: a traced flag where it
    streams, else a static True, so that other passes fetch nothing more),
    run again with the running maximum where the plain sums failed."""
    metrics, ok = program(False)
    return fetch(metrics) if ok is True or bool(fetch(ok)) else fetch(program(True)[0])


def _kl(top, total, diff):
    return top + jnp.log(total) - diff  # LSE(l) - LSE(lr) - sum p (l - lr)


def _sums(u, maps, pre, scale, bias, reference, log_p, width: int, running_max: bool):
    """Per candidate and row over the vocabulary, in chunks of `width`: the
    running maximum of l - LSE(lr) (0 without `running_max`), the sum of
    exp(l - LSE(lr) - that maximum), and sum p (l - lr)."""
    vocab = reference.shape[1]
    p = jnp.exp(log_p)

    def step(carry, start, width=width):
        top, total, diff = carry
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)
        logits = jnp.einsum("cbr,rv->cbv", u, cut(maps))
        if pre is not None:
            logits = logits + cut(pre)[None]
        r = logits * scale[..., None] + cut(bias)[None, None] - cut(reference)[None]  # l - lr, small near the reference
        diff = diff + jnp.sum(cut(p)[None] * r, axis=-1)
        t = r + cut(log_p)[None]  # l - LSE(lr)
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

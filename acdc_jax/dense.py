"""The programs of dense passes: every sender from the start layer on is
recomputed for each candidate (`Scorer` runs them; `sparse.py` holds the
passes that recompute only the heads a cut reaches).

On one CPU device a pass loops over its candidates, each over its prompts,
and keeps only the final residual at the metric positions; elsewhere the
candidates are vmapped (docs/performance.md, "Memory traffic on a CPU").
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .corruption import Corruption, corruption_axes, example_inputs
from .fused_kl import residual_kl, streams
from .patching import (patched_logits_and_deviations, per_prompt, run_from, senders_before, start_layer_heads,
                       upstream_mix)
from .tasks.base import apply_metric


@eqx.filter_jit
def deviations(model, graph, tokens, masks, corruption, z_at: Optional[tuple] = None):
    """Every sender's deviation (act - corrupt) under `masks`, for every
    prompt; with `z_at`, also every head's z at those positions (see
    `patched_logits_and_deviations`)."""
    out = patched_logits_and_deviations(model, graph, tokens, masks, corruption, out_positions=np.zeros((1,), np.int32),
                                        z_at=None if z_at is None else np.asarray(z_at))
    return out[1] if z_at is None else out[1:]


def metric_of_mask(model, graph, corruption, metric, task, arrays, mask, tokens, positions, chunk=None):
    """The metric of one circuit (a full forward, logits at the metric's
    positions only). With `chunk`, the forward and the backward pass of its
    gradient run that many prompts at a time (`_chunked_metric`)."""
    out_positions = np.asarray(positions)
    if chunk is not None and chunk < tokens.shape[0]:
        return _chunked_metric(model, graph, corruption, metric, task, arrays, tokens, out_positions, chunk)(mask)
    logits = patched_logits_and_deviations(model, graph, tokens, mask, corruption, out_positions, narrow=True)[0]
    return apply_metric(metric, logits, task, arrays)


def _chunked_metric(model, graph, corruption, metric, task, arrays, tokens, out_positions, chunk):
    """mask -> metric, whose gradient holds one chunk of prompts' activations
    at a time: the metric reads only the logits at its positions, so its
    gradient is the sum over chunks of each chunk's vector-Jacobian product
    with d metric / d logits, for any metric (not only means over prompts).
    The backward pass runs each chunk's forward again."""
    n = tokens.shape[0]
    if n % chunk:
        raise ValueError(f"prompt_chunk={chunk} must divide the {n} prompts.")
    split = lambda a: a.reshape((n // chunk, chunk) + a.shape[1:])
    toks = split(tokens)
    acts = jax.tree_util.tree_map(split, corruption.acts) if corruption_axes(corruption) == 0 else None

    def chunk_logits(mask, tok, act):
        corr = corruption if act is None else Corruption(corruption.kind, act)
        return patched_logits_and_deviations(model, graph, tok, mask, corr, out_positions, narrow=True)[0]

    def all_logits(mask):
        out = jax.lax.map(lambda c: chunk_logits(mask, *c), (toks, acts))
        return out.reshape((n,) + out.shape[2:])

    def score(logits):
        return apply_metric(metric, logits, task, arrays)

    @jax.custom_vjp
    def f(mask):
        return score(all_logits(mask))

    def fwd(mask):
        logits = all_logits(mask)
        value, g = jax.value_and_grad(score)(logits)
        return value, (mask, g.astype(logits.dtype))

    def bwd(saved, ct):
        mask, g = saved

        def add(total, c):
            tok, act, g_chunk = c
            _, pull = jax.vjp(lambda m: chunk_logits(m, tok, act), mask)
            return total + pull(g_chunk)[0], None

        total, _ = jax.lax.scan(add, jnp.zeros_like(mask), (toks, acts, split(g * ct.astype(g.dtype))))
        return (total,)

    f.defvjp(fwd, bwd)
    return f


@eqx.filter_jit
def full_metric(model, graph, corruption, metric, task, arrays, mask, tokens, positions, chunk=None):
    """The metric of one circuit (`metric_of_mask`, forward only). With
    `chunk`, the prompts run that many at a time up to the final residual
    at the metric's positions; the unembedding then runs over all of them at
    once, reading `W_U` once rather than once per chunk."""
    if chunk is None or chunk >= tokens.shape[0]:
        return metric_of_mask(model, graph, corruption, metric, task, arrays, mask, tokens, positions)
    out_positions = np.asarray(positions)

    def resid(tok, acts):  # a chunk of prompts (and of their corrupted activations, where they have their own)
        return patched_logits_and_deviations(model, graph, tok, mask, Corruption(corruption.kind, acts),
                                             out_positions, narrow=True, residual=True)[0]

    x = map_prompts(resid, (tokens, corruption.acts), (0, corruption_axes(corruption)), chunk, out_axis=0)
    return apply_metric(metric, model.unembed(model.ln_final(x)), task, arrays)


@eqx.filter_jit
def metric_grads(model, graph, corruption, metric, task, arrays, masks, tokens, positions, chunk=None):
    def f(mask):
        return metric_of_mask(model, graph, corruption, metric, task, arrays, mask, tokens, positions, chunk)

    return jax.lax.map(jax.value_and_grad(f), masks)


@eqx.filter_jit
def layer_heads(model, graph, layer, corruption, mask, tokens, deviations, heads):
    """Results of `heads` of `layer` under `mask`, for every prompt [batch, n, pos, d_model]."""
    m_add, m_dir = graph.dense_masks(mask)

    def one(m_add, tok, up, acts):
        corr, pos_qk = example_inputs(corruption, model, tok, acts)
        return start_layer_heads(model, graph, layer, up, m_add, m_dir, corr, pos_qk, heads)

    up_all = deviations[:, :senders_before(graph, layer)]
    return jax.vmap(one, in_axes=(0, 0, 0, corruption_axes(corruption)))(per_prompt(m_add, tokens.shape[0]), tokens,
                                                                         up_all, corruption.acts)


def map_prompts(fn, args: tuple, axes: tuple, chunk: Optional[int] = None, out_axis: Optional[int] = None):
    """``jax.vmap(fn, in_axes=axes)(*args)`` over the prompt axis; with `chunk`,
    that many prompts at a time in a loop, so that only one chunk's
    activations are alive at once (the results are the same). With
    `out_axis`, `fn` itself takes a chunk (args mapped over their first axis)
    and puts the prompts at that axis of its result."""
    if out_axis is not None and chunk is None:
        return fn(*args)
    if chunk is None:
        return jax.vmap(fn, in_axes=axes)(*args)
    mapped = [i for i, ax in enumerate(axes) if ax == 0]
    n = jax.tree_util.tree_leaves(args[mapped[0]])[0].shape[0]
    if n % chunk:
        raise ValueError(f"prompt_chunk={chunk} must divide the {n} prompts.")

    def step(chunk_args):
        full = list(args)
        for i, a in zip(mapped, chunk_args):
            full[i] = a
        return fn(*full) if out_axis is not None else jax.vmap(fn, in_axes=axes)(*full)

    split = [jax.tree_util.tree_map(lambda x: x.reshape((n // chunk, chunk) + x.shape[1:]), args[i]) for i in mapped]
    out = jax.lax.map(step, split)
    if out_axis is not None:  # [n_chunks, ..., chunk, ...] -> [..., n, ...]
        out = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, out_axis), out)
        return jax.tree_util.tree_map(lambda x: x.reshape(x.shape[:out_axis] + (n,) + x.shape[out_axis + 2:]), out)
    return jax.tree_util.tree_map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def candidates_metric(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, deviations,
                       positions, chunk, base_results=None, heads=None, upstream=None, loop=False, running_max=False):
    """Each candidate's metric, and whether it is exact (False: run again
    with `running_max`; see `fused_kl.exact`)."""
    up_all = deviations[:, :senders_before(graph, start_layer)]
    out_positions = np.asarray(positions)
    axes = corruption_axes(corruption)
    base_add = None if upstream is None else graph.dense_masks(upstream[0])[0]

    def one_example(m_dir, m_add, tok, up, acts, results, shared):  # m_add: this prompt's copy (`per_prompt`)
        corr, pos_qk = example_inputs(corruption, model, tok, acts)
        first = None if results is None else (results, heads)
        if shared is None and base_add is not None:  # the same for every candidate: vmap computes it once
            shared = upstream_mix(graph, start_layer, up, base_add, upstream[1])
        return run_from(model, graph, start_layer, up, m_add, m_dir, corr, pos_qk, out_positions, first,
                        narrow=True, upstream=shared, residual=True)[0]

    def metric_of(resid):
        logits = model.unembed(model.ln_final(resid))
        return apply_metric(metric, logits, task, arrays)

    in_axes = (0, 0, axes, 0 if base_results is not None else None)
    args = (tokens, up_all, corruption.acts, base_results)

    def on_prompts(mask, tok, *rest):  # a candidate over (a chunk of) prompts, each with its copy of the mask
        m_add, m_dir = graph.dense_masks(mask)
        ex_axes = (0,) + in_axes + (None if rest[-1] is None else 0,)
        return jax.vmap(lambda *a: one_example(m_dir, *a), in_axes=ex_axes)(per_prompt(m_add, tok.shape[0]), tok, *rest)

    if not loop:
        def one_candidate(mask):
            return metric_of(map_prompts(lambda *a: on_prompts(mask, *a, None), args, in_axes, chunk, out_axis=0))

        return jax.vmap(one_candidate)(masks), True

    # CPU: one candidate at a time over each chunk of prompts (its activations stay in cache), the
    # cached senders' shared sum once per chunk, then the unembedding and metric over groups of candidates
    def prompts_step(*chunk_args):
        shared = None
        if base_add is not None:
            shared = jax.vmap(lambda up: upstream_mix(graph, start_layer, up, base_add, upstream[1]))(chunk_args[1])
        return jax.lax.map(lambda mask: on_prompts(mask, *chunk_args, shared), masks)

    resid = map_prompts(prompts_step, args, in_axes, chunk, out_axis=1)  # [candidates, prompts, out, d_model]
    if streams(metric, resid, loop, model):
        return residual_kl(model, resid, arrays, running_max=running_max)
    n, group = masks.shape[0], metric_group(resid.shape[1] * resid.shape[2], masks.shape[0])
    out = jax.lax.map(jax.vmap(metric_of), resid.reshape((n // group, group) + resid.shape[1:]))
    return out.reshape(n), True


def metric_group(rows_per_candidate: int, n: int, rows: int = 48) -> int:
    """Candidates per unembedding step on a CPU: about `rows` rows of logits
    (enough to amortise reading the unembedding, few enough to stay in
    cache), a power of two that divides `n`."""
    g = 1
    while 2 * g * rows_per_candidate <= rows and n % (2 * g) == 0:
        g *= 2
    return g


@eqx.filter_jit
def batch_metric(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, deviations, positions,
                  chunk=None, upstream=None, loop=False, running_max=False):
    return candidates_metric(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, deviations,
                              positions, chunk, upstream=upstream, loop=loop, running_max=running_max)


@eqx.filter_jit
def batch_metric_heads(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, deviations,
                        positions, base_results, heads, chunk=None, upstream=None, loop=False, running_max=False):
    return candidates_metric(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, deviations,
                              positions, chunk, base_results, heads, upstream, loop, running_max)

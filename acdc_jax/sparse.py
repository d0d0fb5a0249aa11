"""Sparse passes for attention-only models: recompute only the heads a cut
reaches, and unembed only the change.

A candidate that cuts edges into receivers from layer L on changes the heads
those receivers belong to, then the heads that read a changed head through an
edge of the base circuit, and so on (`reach` finds that superset on the
host). Every other sender keeps its deviation under the base circuit, held in
a `BaseState` that follows the base as ACDC removes edges (`rebase`: the
heads the removals reach are recomputed). The start layer's heads come from
the receiver cache (`receivers.py`). The candidates cut no logits edge, so
their final residual differs from the base's only through the changed heads'
z and W_O, and the unembedded numerator of ln_final (centred, times gamma) is
the base's plus ``u @ G_h`` per changed head h, with
``G_h = W_O_h P diag(gamma) W_U`` [d_head, vocab] computed once
(`head_maps`): d_head x vocab multiply-adds per changed head instead of
d_model x vocab. The scale 1/sigma comes from the candidate's own residual.
The metric equals the dense pass's up to float rounding (another summation
order), which ACDC's near-tie band measures as it does for every program.
"""

from __future__ import annotations

import functools
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .corruption import _corrupt_base, corruption_axes, example_inputs
from .flops import attention_flops
from .fused_kl import final_bias, final_numerator, final_scale, residual_kl, streams
from .graph import CircuitGraph, with_sentinels
from .layers import _lead
from .model import Transformer, layer
from .patching import _heads_at
from .receivers import ReceiverCache, cached_flops, cached_z
from .tasks.base import apply_metric


class BaseState(eqx.Module):
    """Every sender's deviation (act - corrupt) under a base circuit, for every prompt."""

    mid: Float[Array, "batch n_mid pos d_model"]  # the senders before the last layer, at every position
    last: Float[Array, "batch n_heads n_out d_model"]  # the last layer's heads, at the metric positions
    z: Float[Array, "batch n_all_heads n_out d_head"]  # every head's z at the metric positions
    pre: Float[Array, "batch n_out d_vocab_out"]  # ln_final's numerator of the final residual, unembedded


def eligible(graph: CircuitGraph) -> bool:
    """Attention-only models whose heads write straight to the logits (no norm
    after attention, no cap on the logits) from linear projections of their
    inputs' norms (no norm or clamp of each query, key and value)."""
    c = graph.config
    return not graph.has_mlp and not c.post_norm and c.logit_softcap is None and not c.qk_norm and c.qkv_clip is None


def reach(graph: CircuitGraph, base: np.ndarray, cols: np.ndarray, start_layer: int) -> tuple[list, list]:
    """The heads of each layer from `start_layer` whose output a cut at the
    receiver columns `cols` can change, when every other edge is as in `base`
    (or absent), and those of them with an edge into the logits in `base`
    (global head index l * n_heads + h)."""
    add, _ = graph._gather
    m_add = with_sentinels(base)[add] != 0
    H, E = graph.n_heads, graph.n_embed
    changed: list[int] = []
    out = []
    for l in range(start_layer, graph.n_layers):
        first = l * graph._layer_columns
        mine = cols[(cols >= first) & (cols < first + 3 * H)]
        hs = set(((mine - first) % H).tolist())
        if changed:
            hs |= set((np.flatnonzero(m_add[changed, first:first + 3 * H].any(0)) % H).tolist())
        out.append(sorted(hs))
        changed += [E + l * H + h for h in sorted(hs)]
    to_logits = [r - E for r in changed if m_add[r, graph.logits_column]]
    return out, to_logits


def pow2(n: int, most: int) -> int:
    return 0 if n == 0 else min(1 << (n - 1).bit_length(), most)


def sizes(heads: list, to_logits: list, graph: CircuitGraph) -> tuple:
    """A program's padded sizes: heads per layer, then heads into the logits."""
    H = graph.n_heads
    return tuple(pow2(len(hs), H) for hs in heads) + (pow2(len(to_logits), graph.n_layers * H),)


def padded(heads: list, to_logits: list, size: tuple, graph: CircuitGraph):
    """Index arrays for a program of `size`: each layer's heads (padded with
    one of them, or head 0: recomputing an unchanged head changes nothing but
    rounding), the place of each logits head among the recomputed heads'
    concatenated z, its global index, and 1 (0 for padding)."""
    layers = [np.asarray((hs + [hs[-1] if hs else 0] * k)[:k], np.int32) for hs, k in zip(heads, size[:-1])]
    start, place = 0, {}
    L, H = graph.n_layers, graph.n_heads
    first = L - len(heads)
    for i, hs in enumerate(heads):
        for j, h in enumerate(hs):
            place[(first + i) * H + h] = start + j
        start += size[i]
    k = size[-1]
    pick = np.zeros(k, np.int32)
    glob = np.zeros(k, np.int32)
    valid = np.zeros(k, np.float32)
    for i, g in enumerate(to_logits):
        pick[i], glob[i], valid[i] = place[g], g, 1.0
    return tuple(layers), pick, glob, valid


def low_rank(k: int, c) -> bool:
    """Whether `k` heads' maps have fewer rows than the residual stream."""
    return k * c.d_head < c.d_model


def sparse_flops(graph: CircuitGraph, start_layer: int, size: tuple, n_pos: int, n_out: int, kind: str) -> int:
    """Matrix-multiply FLOPs of one candidate and one example in a program of
    `size`: a sparse pass (`kind` "sparse") computes its start layer from the
    receiver cache; a move of the base state unembeds the whole residual
    ("rebase") or only the recomputed heads' change ("update")."""
    c, L = graph.config, graph.n_layers
    total = 0
    for i, (l, k) in enumerate(zip(range(start_layer, L), size[:-1])):
        n_q = n_out if l == L - 1 else n_pos
        if l == start_layer and kind == "sparse":  # from the receiver cache
            total += cached_flops(graph, l, k, n_pos, n_q) + 2 * k * n_q * c.d_head * c.d_model
            continue
        mixed = graph.n_senders_before_attn(l) + sum(size[:i])  # the base's deviations, then the changes so far
        total += 2 * k * mixed * (n_q + 2 * n_pos) * c.d_model + attention_flops(c, k, n_pos, n_q)
    if kind == "update":
        return total + 2 * n_out * c.d_vocab_out * c.d_head * sum(size[:-1])
    total += 2 * graph.n_senders * n_out * c.d_model
    total += 2 * n_out * c.d_vocab_out * (c.d_head * size[-1] if kind == "sparse" and low_rank(size[-1], c) else c.d_model)
    return total


def _logits(model: Transformer, x, pre):
    """Logits of the final residual `x`, given its numerator unembedded (`pre`)."""
    return pre * final_scale(model.ln_final, x)[..., None] + _lead(final_bias(model), pre.ndim)


@eqx.filter_jit
def _head_maps(model: Transformer, heads) -> Float[Array, "n_all_heads d_head d_vocab_out"]:
    W_O = model.blocks.attn.W_O
    W_O = W_O.reshape((-1,) + W_O.shape[2:])
    maps = jnp.einsum("hkd,dv->hkv", final_numerator(model.ln_final, W_O[heads]), model.unembed.W_U)
    return jnp.zeros(W_O.shape[:2] + maps.shape[-1:], maps.dtype).at[heads].set(maps)


_maps_cache: list = []  # [(the weights the maps were made from, the heads made, the maps)]: the last model's


def head_maps(model: Transformer, heads=None) -> Float[Array, "n_all_heads d_head d_vocab_out"]:
    """G_h = W_O_h P diag(gamma) W_U for the global head indices `heads`
    (default: every head; layer-major), zero for the others: a pass reads
    the maps of heads with an edge into the logits only, and ACDC decides
    those edges first. Kept for the last model asked, as a threshold sweep
    asks again for each tau (every head's take as long as a few dozen
    forward passes to make)."""
    n_all = model.config.n_layers * model.config.n_heads
    want = frozenset(range(n_all) if heads is None else (int(h) for h in heads))
    key = (model.ln_final.mode, model.blocks.attn.W_O, model.ln_final.w, model.unembed.W_U)
    old = _maps_cache[0] if _maps_cache else None
    if old is None or old[0][0] != key[0] or any(a is not b for a, b in zip(old[0][1:], key[1:])):
        old = None
    if old is None or not want <= old[1]:
        made = want | (old[1] if old is not None else frozenset())
        _maps_cache[:] = [(key, made, _head_maps(model, jnp.asarray(sorted(made), jnp.int32)))]
    return _maps_cache[0][2]


def _first(hs, dtype):
    """1 for each head's first slot in a padded list (of one layer's heads, or
    of global head indices), 0 for its repeats."""
    i = jnp.arange(hs.shape[0])
    return jnp.where(((hs[:, None] == hs[None, :]) & (i[None, :] < i[:, None])).any(1), 0, 1).astype(dtype)


def _changes(model, graph, start_layer, heads, m_add, m_dir, corr, pos_qk, mid, last, out_at,
             cache: Optional[ReceiverCache] = None):
    """Layer by layer from `start_layer`, the `heads` of each under the masks
    (one prompt's deviations `mid` and `last` under the base, read, not
    written: a later layer adds the changes to the base's deviations).
    Returns, per layer with heads, (layer, heads, their new deviations, the
    change from the base's, zero on padding slots), and the heads' z at
    `out_at`, concatenated [sum of sizes, n_out, d_head]. With `cache` (one
    prompt's), the start layer's heads come from it (`receivers.py`)."""
    L = graph.n_layers
    changes, zs, rows, deltas = [], [], [], []
    for l, hs in zip(range(start_layer, L), heads):
        if hs.shape[0] == 0:
            continue
        blk, before, is_last = layer(model.blocks, l), graph.n_senders_before_attn(l), l == L - 1
        q_at = out_at if is_last else None
        if cache is not None and l == start_layer:
            z = cached_z(model, graph, l, cache, m_add, m_dir, hs, q_at)
        else:
            stacks, m = (mid[:before],), m_add
            if deltas:  # the base's deviations, plus the changes of the heads recomputed so far
                stacks, m = stacks + (jnp.concatenate(deltas),), jnp.concatenate([m_add[:before], m_add[jnp.concatenate(rows)]])
            z = _heads_at(blk, graph, l, _corrupt_base(model, corr, l), stacks, m, m_dir, pos_qk, hs, q_at, z=True)
        corrupt = jnp.take(corr.heads[l], hs, axis=0)
        dev = jnp.einsum("hpk,hkd->hpd", z, jnp.take(blk.attn.W_O, hs, axis=0)) - (corrupt[:, out_at] if is_last else corrupt)
        delta = _first(hs, dev.dtype)[:, None, None] * (dev - (last[hs] if is_last else mid[before + hs]))
        changes.append((l, hs, dev, delta))
        rows.append(before + hs)
        deltas.append(delta)
        zs.append(z if is_last else z[:, out_at])
    z = jnp.concatenate(zs) if zs else jnp.zeros((1, len(out_at), model.config.d_head), mid.dtype)
    return changes, z


def _final_residual(model, graph, corr, mid, last, m_add, out_at):
    base = _corrupt_base(model, corr, graph.n_layers)[out_at]
    m, n = m_add[:, graph.logits_column], mid.shape[0]  # two sums: concatenated, the senders were a copy per pass
    return base + jnp.einsum("s,spd->pd", m[:n], mid[:, out_at]) + jnp.einsum("s,spd->pd", m[n:], last)


def rebase(model, graph, start_layer, corruption, tokens, state: BaseState, mask, heads, changed, out_at, maps,
           dense) -> BaseState:
    """`state` moved to the circuit `mask` (see `_rebase`). `state` is
    donated: its buffers are updated in place, so it must not be used after."""
    return BaseState(*_rebase(model, graph, start_layer, corruption, tokens, state, mask, heads, changed,
                              tuple(out_at), maps, dense))


@functools.partial(jax.jit, static_argnames=("graph", "start_layer", "out_at"), donate_argnames=("state",))
def _rebase(model, graph, start_layer, corruption, tokens, state: BaseState, mask, heads, changed, out_at, maps,
            dense):
    """`state` moved to the circuit `mask`, which differs from its own only at
    the inputs of `heads` (per layer from `start_layer`) and at the logits:
    those heads are recomputed (their global indices: `changed`, in order).
    The unembedded numerator is then made again from the final residual
    where `dense` (a traced flag, so that both ways share one program) or
    where the maps would have as many rows as the residual; else it is
    updated by each recomputed head's change of z times its map (once per
    head: padding slots repeat a head). The heads' rows are written into the
    donated state in place (a copy of the state cost more than the move)."""
    m_add, m_dir = graph.dense_masks(mask)
    out_at = np.asarray(out_at)
    axes = corruption_axes(corruption)

    def one(tok, acts, mid, last):
        corr, pos_qk = example_inputs(corruption, model, tok, acts)
        changes, z = _changes(model, graph, start_layer, heads, m_add, m_dir, corr, pos_qk, mid, last, out_at)
        return [dev for _, _, dev, _ in changes], z

    devs, z = _per_prompt(one, (tokens, corruption.acts, state.mid, state.last), axes)
    mid, last = state.mid, state.last
    moved = [(start_layer + i, hs) for i, hs in enumerate(heads) if hs.shape[0]]  # as `_changes` returns them
    for (l, hs), dev in zip(moved, devs):
        if l == graph.n_layers - 1:
            last = last.at[:, hs].set(dev)
        else:
            mid = mid.at[:, graph.n_senders_before_attn(l) + hs].set(dev)

    def unembed(mid, last):
        def one_pre(tok, acts, mid, last):
            corr = example_inputs(corruption, model, tok, acts)[0]
            x = _final_residual(model, graph, corr, mid, last, m_add, out_at)
            return final_numerator(model.ln_final, x) @ model.unembed.W_U

        return jax.vmap(one_pre, in_axes=(0, axes, 0, 0))(tokens, corruption.acts, mid, last)

    def update(mid, last):  # one product per recomputed head, over every prompt (lax.cond passes both the same)
        coef = _first(changed, z.dtype) * m_add[graph.n_embed + changed, graph.logits_column]
        u = coef[None, :, None, None] * (z - state.z[:, changed])
        pre = state.pre
        for i in range(changed.shape[0]):
            pre = pre + jnp.einsum("bnd,dv->bnv", u[:, i], maps[changed[i]])
        return pre

    if low_rank(changed.shape[0], model.config):
        pre = jax.lax.cond(dense, unembed, update, mid, last)
    else:
        pre = unembed(mid, last)
    z = state.z if changed.shape[0] == 0 else state.z.at[:, changed].set(z)  # one index per recomputed slot
    return mid, last, z, pre


@eqx.filter_jit
def sparse_metric(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, state: BaseState,
                  maps, cache: ReceiverCache, heads, pick, glob, valid, out_at, loop: bool = True,
                  running_max: bool = False):
    """Metric of each candidate mask (each the base of `state` with some
    edges cut, none into the logits, all into `heads`' inputs or reaching
    only them: see `reach`). `pick`, `glob`, `valid`: the heads into the
    logits (`padded`). On a CPU (`loop`) the prompts run one at a time, each
    with every candidate, and KL divergence streams the low-rank logits over
    the vocabulary (`fused_kl.py`); elsewhere, and for other metrics, the
    logits are made whole. The final residual is the base's plus the
    recomputed heads' changes. Returns the metrics and whether they are
    exact (False: run again with `running_max`; see `fused_kl.exact`)."""
    out_at = np.asarray(out_at)
    E, H, L, col = graph.n_embed, graph.n_heads, graph.n_layers, graph.logits_column
    axes = corruption_axes(corruption)
    m_base = graph.dense_masks(masks[0])[0]  # no candidate cuts an edge into the logits

    def base_residual(tok, acts, mid, last):
        return _final_residual(model, graph, example_inputs(corruption, model, tok, acts)[0], mid, last, m_base, out_at)

    x_base = jax.vmap(base_residual, in_axes=(0, axes, 0, 0))(tokens, corruption.acts, state.mid, state.last)

    m_adds, m_dirs = jax.vmap(graph.dense_masks)(masks)

    def one(m_add, m_dir, tok, acts, mid, last, z_base, cache):
        corr, pos_qk = example_inputs(corruption, model, tok, acts)
        changes, z = _changes(model, graph, start_layer, heads, m_add, m_dir, corr, pos_qk, mid, last, out_at, cache)
        dx = sum(jnp.einsum("h,hpd->pd", m_add[E + l * H + hs, col], delta if l == L - 1 else delta[:, out_at])
                 for l, hs, _, delta in changes)
        return dx, (valid * m_add[E + glob, col])[:, None, None] * (z[pick] - z_base[glob])

    if loop:  # one prompt at a time, its deviations read once for every candidate
        def per_prompt(*prompt):
            return jax.vmap(one, in_axes=(0, 0) + (None,) * 6)(m_adds, m_dirs, *prompt)

        dx, u = _per_prompt(per_prompt, (tokens, corruption.acts, state.mid, state.last, state.z, cache), axes)
        dx, u = jnp.moveaxis(dx, 0, 1), jnp.moveaxis(u, 0, 1)
    else:
        per_candidate = lambda m_add, m_dir: jax.vmap(one, in_axes=(None, None, 0, axes, 0, 0, 0, 0))(
            m_add, m_dir, tokens, corruption.acts, state.mid, state.last, state.z, cache)
        dx, u = jax.vmap(per_candidate)(m_adds, m_dirs)
    x = x_base[None] + dx
    k = glob.shape[0]
    if streams(metric, x, loop, model):  # the numerator as the base's plus the maps', or the residual's own
        factors = ()
        if low_rank(k, model.config):
            factors = (jnp.moveaxis(u, 2, 3), maps, state.pre, glob)
        return residual_kl(model, x, arrays, *factors, running_max=running_max)
    if low_rank(k, model.config):
        pre = state.pre[None] + jnp.einsum("cpknd,kdv->cpnv", u, jnp.take(maps, glob, axis=0))
    else:  # as many maps' rows as the residual has: unembed the residual itself
        pre = final_numerator(model.ln_final, x) @ model.unembed.W_U
    logits = _logits(model, x, pre)
    score = lambda lg: apply_metric(metric, lg, task, arrays)
    return (jax.lax.map(score, logits) if loop else jax.vmap(score)(logits)), True


@functools.partial(jax.jit, static_argnames=("graph", "out_at", "d_vocab"))
def initial_state(graph: CircuitGraph, deviations, z, out_at: tuple, d_vocab: int) -> BaseState:
    """The state of the circuit that `deviations` and `z` (every head's, at
    the metric positions `out_at`: `dense.deviations`) belong to, but for
    the unembedded numerator: zeros, for the first move to make (dense)."""
    n_mid = graph.n_senders_before_attn(graph.n_layers - 1)
    batch, n_layers, n_heads, n_out, d_head = z.shape
    return BaseState(deviations[:, :n_mid], deviations[:, n_mid:][:, :, np.asarray(out_at)],
                     z.reshape(batch, n_layers * n_heads, n_out, d_head),
                     jnp.zeros((batch, n_out, d_vocab), deviations.dtype))


def diff_columns(graph: CircuitGraph, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Receiver columns of the edges where two circuits differ."""
    edges = np.flatnonzero(np.asarray(old) != np.asarray(new))
    return np.unique(graph.places(edges)[1])


def _per_prompt(fn, args: tuple, acts_axis):
    """`fn` over the prompts one at a time (a loop, not vmap: each prompt's
    base state is read once, and a vmapped move made XLA copy the whole
    state to put the prompt axis inward). `args[1]` is the corruption's
    acts, mapped over if `acts_axis` is 0, else shared by every prompt."""
    if acts_axis == 0:
        return jax.lax.map(lambda a: fn(*a), args)
    return jax.lax.map(lambda a: fn(a[0], args[1], *a[1:]), (args[0],) + args[2:])

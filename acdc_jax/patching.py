"""The edge-decomposed ("patched") forward pass.

Every receiver r reads

    x_r = corrupt_r + qkv_mask[r] * sum_s mask[s, r] * (act_s - corrupt_act_s)

where ``corrupt_r`` is the residual stream the corrupted run gives r (the sum
of every upstream sender's corrupted output plus the constant attention
biases), ``act_s`` is sender s's output in this same pass (so a cut edge
changes everything downstream of it: path patching), and ``qkv_mask`` is the
q/k/v-step edge (1 for MLP inputs and the logits). With all masks 1 this is the
plain forward; with all masks 0 it is the corrupted run.

A pass can start at any layer from cached deviations of the senders before it
(`run_from`), which is what batched ACDC uses.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .corruption import Corruption, _corrupt_base, corruption_axes, example_inputs
from .graph import CircuitGraph
from .model import SenderActivations, Transformer, check_token_values, layer


def embed_deviations(
    model: Transformer, graph: CircuitGraph, tokens: Int[Array, " pos"], corr: SenderActivations
) -> Float[Array, "n_embed pos d_model"]:
    """Clean minus corrupted output of the embedding sender(s)."""
    tok, pos, _ = model.embeddings(tokens)
    if graph.split_embed:
        rows = [tok - corr.tok] + ([pos - corr.pos] if pos is not None else [])
        return jnp.stack(rows)
    clean = tok if pos is None else tok + pos
    corrupt = corr.tok if pos is None else corr.tok + corr.pos
    return (clean - corrupt)[None]


def senders_before(graph: CircuitGraph, start_layer: int) -> int:
    """Senders upstream of layer `start_layer` (all of them for n_layers: the unembedding)."""
    if start_layer >= graph.n_layers:
        return graph.n_senders
    return graph.n_senders_before_attn(start_layer)


class UpstreamMix(eqx.Module):
    """The cached upstream senders' part of every receiver after the start
    layer, summed once under a base mask and shared by all the candidates of a
    pass. A candidate adds its own differences from the base at `rows`: the
    upstream senders whose edges into those receivers any candidate changes."""

    shared: Float[Array, "n_later pos d_model"]
    rows: Int[Array, " k"]
    base_rows: Float[Array, "k n_columns"]
    offset: int = eqx.field(static=True)  # first column after the start layer

    def at(self, positions) -> "UpstreamMix":
        return UpstreamMix(self.shared[:, positions], self.rows, self.base_rows, self.offset)


def upstream_offset(graph: CircuitGraph, start_layer: int) -> int:
    """The first receiver column after layer `start_layer` (the logits' after the last layer)."""
    return min((start_layer + 1) * graph._layer_columns, graph.logits_column)


def upstream_mix(graph: CircuitGraph, start_layer: int, up: Float[Array, "n_up pos d_model"],
                 base_add: Float[Array, "n_senders n_columns"], rows: Int[Array, " k"]) -> UpstreamMix:
    """`UpstreamMix` of the senders `up` under the dense base mask `base_add`."""
    offset = upstream_offset(graph, start_layer)
    shared = jnp.einsum("sc,spd->cpd", base_add[:up.shape[0], offset:], up)
    return UpstreamMix(shared, rows, base_add[rows], offset)


def _masked_sum(m_add, stacks, cols, positions=None, upstream: Optional[UpstreamMix] = None):
    """For each receiver column in `cols`, the sum over the senders of `stacks`
    (deviations [n, pos, d_model], concatenated in order) of mask * deviation,
    at `positions` only if given. With `upstream`, the first stack (the cached
    upstream senders) is read through it instead of being mixed again."""
    pick = (lambda a: a) if positions is None else (lambda a: a[:, positions])
    out, row = 0, 0
    if upstream is not None:
        up, stacks = stacks[0], stacks[1:]
        delta = jnp.take(m_add[upstream.rows] - upstream.base_rows, cols, axis=1)
        shared = jnp.take(upstream.shared, cols - upstream.offset, axis=0)
        out = pick(shared) + jnp.einsum("kr,kpd->rpd", delta, pick(up[upstream.rows]))
        row = up.shape[0]
    for stack in stacks:
        if stack.shape[0]:
            m_cols = jnp.take(m_add[row:row + stack.shape[0]], cols, axis=1)
            out = out + jnp.einsum("sr,spd->rpd", m_cols, pick(stack))
            row += stack.shape[0]
    return out


def _heads_at(blk, graph: CircuitGraph, l, base, stacks, m_add, m_dir, pos_qk, heads=None, q_positions=None,
              upstream=None, z=False):
    """Results of layer l's heads (all, or those in `heads`) from their masked
    inputs over the senders in `stacks`; at the query positions `q_positions`
    only, if given (keys and values still read every position), before any
    norm after attention (`Block.head_senders`). With `z`, the heads' z
    (before W_O) instead."""
    H = graph.n_heads
    hs = jnp.arange(H) if heads is None else heads
    n = hs.shape[0]
    cols = l * graph._layer_columns + jnp.concatenate([hs, H + hs, 2 * H + hs])
    scale = m_dir[cols][:, None, None]
    if q_positions is None:
        x = base[None] + scale * _masked_sum(m_add, stacks, cols, None, upstream)
        xq, xkv = x[:n], x[n:]
    else:
        xq = base[q_positions][None] + scale[:n] * _masked_sum(m_add, stacks, cols[:n], q_positions, upstream)
        xkv = base[None] + scale[n:] * _masked_sum(m_add, stacks, cols[n:], None, upstream)
    xq, xk, xv = blk.ln1(xq), blk.ln1(xkv[:n]), blk.ln1(xkv[n:])
    if pos_qk is not None:
        xq = xq + (pos_qk if q_positions is None else pos_qk[q_positions])[None]
        xk = xk + pos_qk[None]
    return (blk.attn.head_z if z else blk.attn.head_results)(xq, xk, xv, heads, q_positions, l)


def start_layer_heads(model, graph, start_layer, up, m_add, m_dir, corr, pos_qk, heads=None,
                      q_positions=None) -> Float[Array, "n q_pos d_model"]:
    """Results of layer `start_layer`'s heads (all, or `heads`; at
    `q_positions` only, if given) for one mask, from the deviations `up` of
    the senders before it (nothing after them has been computed yet, so only
    `up` is mixed)."""
    return _heads_at(layer(model.blocks, start_layer), graph, start_layer, _corrupt_base(model, corr, start_layer),
                     (up,), m_add, m_dir, pos_qk, heads, q_positions)


def run_from(
    model: Transformer,
    graph: CircuitGraph,
    start_layer: int,
    up: Float[Array, "n_up pos d_model"],
    m_add: Float[Array, "n_senders n_columns"],
    m_dir: Float[Array, " n_columns"],
    corr: SenderActivations,
    pos_qk: Optional[Float[Array, "pos d_model"]],
    out_positions: Optional[np.ndarray] = None,
    first: Optional[tuple] = None,
    narrow: bool = False,
    upstream: Optional[UpstreamMix] = None,
    residual: bool = False,
    z_at: Optional[np.ndarray] = None,
):
    """Run one example from layer `start_layer` to the logits.

    `up` holds the deviations (act - corrupt) of the senders before that layer;
    they are read, never recomputed. The middle layers are a `lax.scan`, so
    the compiled program does not grow with depth; the deviations of the
    senders computed here form the scan's carry (rows of later senders are
    still zero when a layer reads them, and their masks are zero too).
    `first = (results, heads)` gives the start layer's head results under
    another mask that differs from this one only at the inputs of `heads`;
    only those heads are recomputed. `upstream` (see `upstream_mix`) gives
    `up`'s share of the later receivers' inputs, summed once for many masks.
    With `narrow` (and `out_positions`) the last layer runs its queries, its
    MLP and the logits at `out_positions` only, since nothing else reaches the
    logits there; the deviations are then not returned. Returns the logits (at
    `out_positions`, or all; with `residual`, the final residual stream before
    `ln_final` and the unembedding instead) and the deviations; with `z_at`
    (a whole pass: no `first`, `narrow` or `upstream`), also the heads' z
    at those positions, [n_layers - start_layer, n_heads, len(z_at), d_head]
    (the state of a sparse pass: `sparse.py`).
    """
    c = model.config
    H, L, E = c.n_heads, c.n_layers, graph.n_embed
    n_up = up.shape[0]
    if n_up != senders_before(graph, start_layer):
        raise ValueError(f"start layer {start_layer} needs {senders_before(graph, start_layer)} cached senders, got {n_up}.")
    if upstream is not None and (start_layer >= L or upstream.offset != upstream_offset(graph, start_layer)):
        raise ValueError(f"The upstream mix does not belong to a pass from layer {start_layer}.")
    per_layer = H + int(graph.has_mlp)
    narrow = narrow and out_positions is not None
    n_full = L - 1 if narrow else L  # layers start_layer .. n_full - 1 run at every position
    if z_at is not None and (first is not None or narrow or upstream is not None):
        raise ValueError("z_at needs a whole pass: no first, narrow or upstream.")
    base = _corrupt_base(model, corr, start_layer)
    mlps = corr.mlps if corr.mlps is not None else [None] * L

    def with_z(blk, l, stacks, base):  # the heads' results, and their z at z_at (as head_results makes them)
        z = _heads_at(blk, graph, l, base, stacks, m_add, m_dir, pos_qk, z=True)
        return jnp.einsum("hpk,hkd->hpd", z, blk.attn.W_O), z[:, z_at]

    def heads_of(blk, l, up, down, base, q_positions=None):
        if l != start_layer:  # a Python int here; the scanned layers call _heads_at directly
            return _heads_at(blk, graph, l, base, (up, down), m_add, m_dir, pos_qk, None, q_positions, upstream)
        if first is None:
            return start_layer_heads(model, graph, l, up, m_add, m_dir, corr, pos_qk, None, q_positions)
        results, heads = first
        results = results if q_positions is None else results[:, q_positions]
        return results.at[heads].set(start_layer_heads(model, graph, l, up, m_add, m_dir, corr, pos_qk, heads,
                                                       q_positions))

    def finish_layer(blk, l, results, up, down, base, corr_heads, corr_mlp, later):
        slot = E + l * per_layer - n_up
        down = jax.lax.dynamic_update_slice_in_dim(down, blk.head_senders(results) - corr_heads, slot, axis=0)
        base_in, base = base, base + corr_heads.sum(0) + blk.attn.b_O[None]
        if blk.mlp is not None:
            col = jnp.atleast_1d(l * graph._layer_columns + 3 * H)
            # with parallel attention and MLP the graph has no edges from this layer's heads to its MLP
            x = (base_in if c.parallel_attn_mlp else base) + _masked_sum(m_add, (up, down), col, None, later)[0]
            out = blk.mlp_out(x)
            down = jax.lax.dynamic_update_slice_in_dim(down, (out - corr_mlp)[None], slot + H, axis=0)
            base = base + corr_mlp
        return down, base

    def layer_step(carry, l):
        # each layer's weights and corrupted outputs are indexed here, not sliced into the scan's inputs:
        # a pass that loops over candidates copied those slices once per candidate (docs/performance.md)
        down, base = carry
        blk, corr_heads, corr_mlp = layer(model.blocks, l), corr.heads[l], None if corr.mlps is None else corr.mlps[l]
        if z_at is None:
            results, z = _heads_at(blk, graph, l, base, (up, down), m_add, m_dir, pos_qk, None, None, upstream), None
        else:
            results, z = with_z(blk, l, (up, down), base)
        return finish_layer(blk, l, results, up, down, base, corr_heads, corr_mlp, upstream), z

    down = jnp.zeros((graph.n_senders - n_up, up.shape[1], c.d_model), up.dtype)
    zs = []
    if start_layer < n_full:
        blk = layer(model.blocks, start_layer)
        if z_at is None:
            results = heads_of(blk, start_layer, up, down, base)
        else:
            results, z = with_z(blk, start_layer, (up,), base)
            zs.append(z[None])
        down, base = finish_layer(blk, start_layer, results, up, down, base, corr.heads[start_layer],
                                  mlps[start_layer], None)
    if start_layer + 1 < n_full:
        (down, base), z = jax.lax.scan(layer_step, (down, base), jnp.arange(start_layer + 1, n_full))
        zs.append(z)
    logits_col = np.array([graph.logits_column])
    if not narrow:
        x = base + _masked_sum(m_add, (up, down), logits_col, None, upstream)[0]
        x = x if out_positions is None else x[out_positions]
        out = (x if residual else model.unembed(model.ln_final(x))), down
        return out if z_at is None else out + (jnp.concatenate(zs),)

    at = np.asarray(out_positions)
    upstream_at = None if upstream is None else upstream.at(at)
    if start_layer < L:
        l, blk = L - 1, layer(model.blocks, L - 1)
        results = heads_of(blk, l, up, down, base, at)
        up, down, base = up[:, at], down[:, at], base[at]
        down, base = finish_layer(blk, l, results, up, down, base, corr.heads[l][:, at],
                                  None if mlps[l] is None else mlps[l][at], None if l == start_layer else upstream_at)
    else:
        up, base = up[:, at], base[at]
    x = base + _masked_sum(m_add, (up, down), logits_col, None, upstream_at)[0]
    return (x if residual else model.unembed(model.ln_final(x))), None


def patched_forward(
    model: Transformer,
    tokens: Int[Array, "batch pos"],
    masks: Float[Array, " n_edges"],
    corruption: Corruption,
    graph: Optional[CircuitGraph] = None,
) -> Float[Array, "batch pos d_vocab_out"]:
    """Logits of the model with each edge scaled by its mask (0 = patched to
    the corruption, 1 = kept, fractions interpolate). Jit-compiled, vmappable
    over a leading batch of mask sets, and differentiable in `masks`."""
    graph = graph if graph is not None else CircuitGraph(model.config)
    graph.check_config(model.config)
    tokens = jnp.asarray(tokens)
    single = tokens.ndim == 1
    if single:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}.")
    if masks.shape != (graph.n_edges,):
        raise ValueError(f"masks must have shape ({graph.n_edges},) for {graph!r}, got {tuple(masks.shape)}.")
    check_token_values(tokens, model.config.d_vocab)
    corruption.check(tokens)
    logits = _patched(model, graph, tokens, masks, corruption)
    return logits[0] if single else logits


@eqx.filter_jit
def _patched(model, graph, tokens, masks, corruption):
    return patched_logits_and_deviations(model, graph, tokens, masks, corruption)[0]


def per_prompt(m_add: Float[Array, "n_senders n_columns"], n: int) -> Float[Array, "n n_senders n_columns"]:
    """The dense mask repeated for each of `n` prompts, to be mapped over with
    them. Each receiver's masked sum is then a product batched over prompts
    that reads the sender stack where it lies ([prompts, senders, ...] under
    vmap); with one mask shared by every prompt, XLA moved the whole stack to
    put the senders first, twice per layer (a third of a CPU pass from layer
    0 of a GPT-2-small-shaped model: docs/performance.md)."""
    return jnp.broadcast_to(m_add, (n,) + m_add.shape)


def patched_logits_and_deviations(model, graph, tokens, masks, corruption, out_positions=None, narrow=False,
                                  z_at=None, residual=False):
    """Batched patched forward that also returns every sender's deviation
    (act - corrupt), [batch, n_senders, pos, d_model]; with `narrow`, only the
    logits at `out_positions` (see `run_from`) and None; with `z_at`, also
    every head's z at those positions, [batch, n_layers, n_heads, len(z_at), d_head];
    with `residual`, the final residual stream instead of the logits."""
    m_add, m_dir = graph.dense_masks(masks.astype(model.embed.W_E.dtype))

    def one(m_add, tok, acts):
        corr, pos_qk = example_inputs(corruption, model, tok, acts)
        up = embed_deviations(model, graph, tok, corr)
        out = run_from(model, graph, 0, up, m_add, m_dir, corr, pos_qk, out_positions, narrow=narrow, z_at=z_at,
                       residual=residual)
        return (out[0], None if out[1] is None else jnp.concatenate([up, out[1]])) + out[2:]

    return jax.vmap(one, in_axes=(0, 0, corruption_axes(corruption)))(per_prompt(m_add, tokens.shape[0]), tokens,
                                                                      corruption.acts)

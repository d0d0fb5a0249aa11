"""The transformer: a plain Equinox forward pass.

The plain forward is the reference that the edge-decomposed forward in
`patching.py` is checked against.

Dimension names used in the jaxtyping shapes of this package:
``batch pos d_model n_heads d_head d_mlp d_vocab d_vocab_out n_layers n_ctx``.
Weights follow TransformerLens' layout (``W_Q`` [n_heads, d_model, d_head],
``W_O`` [n_heads, d_head, d_model], ``W_in`` [d_model, d_mlp]) so that each
head's write to the residual stream is an edge sender, and the per-layer
weights are stacked on a leading ``n_layers`` axis.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import TransformerConfig
from .layers import MLP, Attention, LayerNorm, _lead, _normal, attention_pattern, softcap


class Block(eqx.Module):
    """One layer. ``ln1_post`` and ``ln2_post`` (``post_norm``: Gemma 2) normalise
    the attention's and the MLP's outputs before they join the residual stream;
    without ``pre_norm`` (OLMo 2) ``ln1`` and ``ln2`` pass their input through."""

    ln1: LayerNorm
    attn: Attention
    ln2: Optional[LayerNorm]
    mlp: Optional[MLP]
    ln1_post: Optional[LayerNorm]
    ln2_post: Optional[LayerNorm]

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ka, km = jr.split(key)
        norm = lambda: LayerNorm(config.d_model, config.normalization, config.ln_eps)
        pre = lambda: norm() if config.pre_norm else LayerNorm(config.d_model, "none", config.ln_eps)
        self.ln1 = pre()
        self.attn = Attention(config, key=ka)
        if config.attn_only:
            self.ln2 = self.mlp = None
        else:
            self.ln2 = pre()
            self.mlp = MLP(config, key=km)
        self.ln1_post = norm() if config.post_norm else None
        self.ln2_post = norm() if config.post_norm and not config.attn_only else None

    def head_senders(self, results: Float[Array, "*rest n_heads pos d_model"]
                     ) -> Float[Array, "*rest n_heads pos d_model"]:
        """What each head writes to the residual stream, from its result
        (z times its W_O rows): with a norm after attention, its share of it."""
        return results if self.ln1_post is None else self.ln1_post.shares(results)

    def mlp_out(self, x: Float[Array, "*rest d_model"]) -> Float[Array, "*rest d_model"]:
        """The MLP's write to the residual stream from its (un-normalised) input."""
        out = self.mlp(self.ln2(x))
        return out if self.ln2_post is None else self.ln2_post(out)


class Embedding(eqx.Module):
    W_E: Float[Array, "d_vocab d_model"]
    W_pos: Optional[Float[Array, "n_ctx d_model"]]

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ke, kp = jr.split(key)
        self.W_E = _normal(ke, (config.d_vocab, config.d_model))
        self.W_pos = None if config.positional in ("none", "rotary") else _normal(kp, (config.n_ctx, config.d_model))


class Unembed(eqx.Module):
    W_U: Float[Array, "d_model d_vocab_out"]
    b_U: Float[Array, " d_vocab_out"]
    softcap: Optional[float] = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        self.W_U = _normal(key, (config.d_model, config.d_vocab_out))
        self.b_U = jnp.zeros((config.d_vocab_out,), jnp.float32)
        self.softcap = config.logit_softcap

    def __call__(self, x: Float[Array, "*rest d_model"]) -> Float[Array, "*rest d_vocab_out"]:
        return softcap(x @ self.W_U + _lead(self.b_U, x.ndim), self.softcap)


class SenderActivations(eqx.Module):
    """What each edge sender writes to the residual stream, for one or more prompts.

    ``tok``/``pos`` are the token and (learned) position embeddings, ``heads``
    each head's output without the attention bias ``b_O`` (which is constant
    and belongs to no edge), ``mlps`` each MLP's output including its bias.
    ``resid``, if given, is the residual stream they sum to before each layer
    and after the last (`corruption.with_resid`). Leading ``*batch`` axes are
    optional.
    """

    tok: Float[Array, "*batch pos d_model"]
    pos: Optional[Float[Array, "*batch pos d_model"]]
    heads: Float[Array, "*batch n_layers n_heads pos d_model"]
    mlps: Optional[Float[Array, "*batch n_layers pos d_model"]]
    resid: Optional[Float[Array, "*batch n_layers_plus_1 pos d_model"]] = None


def layer(blocks: Block, index: int) -> Block:
    """The parameters of one layer from the stacked blocks."""
    return jax.tree_util.tree_map(lambda a: a[index], blocks)


class Transformer(eqx.Module):
    """A decoder-only transformer with a plain forward pass.

    ``model(tokens)`` takes int tokens [batch, pos] (or [pos]) and returns
    logits [batch, pos, d_vocab_out]. Layers are stacked in ``blocks`` and the
    plain forward scans over them.
    """

    config: TransformerConfig = eqx.field(static=True)
    embed: Embedding
    blocks: Block
    ln_final: LayerNorm
    unembed: Unembed

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ke, kb, ku = jr.split(key, 3)
        self.config = config
        self.embed = Embedding(config, key=ke)
        self.blocks = eqx.filter_vmap(lambda k: Block(config, key=k))(jr.split(kb, config.n_layers))
        self.ln_final = LayerNorm(config.d_model, config.normalization, config.ln_eps)
        self.unembed = Unembed(config, key=ku)

    def __call__(self, tokens: Int[Array, "*batch pos"]) -> Float[Array, "*batch pos d_vocab_out"]:
        return _map_batch(lambda t: self._forward(t, collect=False)[0], tokens, self.config)

    def run_with_senders(
        self, tokens: Int[Array, "*batch pos"]
    ) -> tuple[Float[Array, "*batch pos d_vocab_out"], SenderActivations]:
        """Logits plus every edge sender's activation (the "hook_result",
        "hook_mlp_out" and embedding hooks of TransformerLens)."""
        return _map_batch(lambda t: self._forward(t, collect=True), tokens, self.config)

    def attention_patterns(self, tokens: Int[Array, "*batch pos"]) -> Float[Array, "*batch n_layers n_heads pos pos"]:
        """Every head's attention pattern (query position x key position)."""
        return _map_batch(lambda t: self._forward(t, collect="patterns")[1], tokens, self.config)

    def embeddings(self, tokens: Int[Array, " pos"]):
        """Token embedding, residual position embedding, and the shortformer
        position embedding that is added to queries and keys (or None)."""
        check_tokens(tokens, self.config)
        n = tokens.shape[-1]
        tok = self.embed.W_E[tokens]
        pos = self.embed.W_pos[:n] if self.config.positional == "learned" else None
        pos_qk = self.embed.W_pos[:n] if self.config.positional == "shortformer" else None
        return tok, pos, pos_qk

    def _forward(self, tokens: Int[Array, " pos"], collect):
        """collect: False (logits only), True (and sender activations) or "patterns"."""
        tok, pos, pos_qk = self.embeddings(tokens)
        resid = tok if pos is None else tok + pos

        def step(resid, xs):
            block, index = xs
            resid_in = resid
            x = block.ln1(resid)
            xqk = x if pos_qk is None else x + pos_qk
            attn = block.attn
            q = jnp.einsum("pd,hdk->hpk", xqk, attn.W_Q) + attn.b_Q[:, None, :]
            k = jnp.einsum("pd,hdk->hpk", xqk, attn.W_K) + attn.b_K[:, None, :]
            v = jnp.einsum("pd,hdk->hpk", x, attn.W_V) + attn.b_V[:, None, :]
            q, k, v = attn.finish(q, k, v)
            pattern = attention_pattern(q, k, attn.scale, attn.causal, rotary=attn.rotary, cap=attn.softcap,
                                        layer=index)
            z = jnp.einsum("hqk,hkd->hqd", pattern, v)
            if collect is True:
                heads = block.head_senders(jnp.einsum("hpk,hkd->hpd", z, attn.W_O))
                resid = resid + heads.sum(0) + attn.b_O[None]
            else:
                heads = pattern if collect == "patterns" else None
                out = jnp.einsum("hpk,hkd->pd", z, attn.W_O)
                resid = resid + (out if block.ln1_post is None else block.ln1_post(out)) + attn.b_O[None]
            mlp_out = None
            if block.mlp is not None:
                mlp_out = block.mlp_out(resid_in if self.config.parallel_attn_mlp else resid)
                resid = resid + mlp_out
            return resid, (heads, mlp_out if collect is True else None)

        resid, (heads, mlps) = jax.lax.scan(step, resid, (self.blocks, jnp.arange(self.config.n_layers)))
        logits = self.unembed(self.ln_final(resid))
        if collect == "patterns":
            return logits, heads
        if not collect:
            return logits, None
        return logits, SenderActivations(tok=tok, pos=pos, heads=heads, mlps=mlps)


def check_tokens(tokens: Array, config: TransformerConfig) -> None:
    """Shape and dtype checks that hold under jit (values are not checked)."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got dtype {tokens.dtype}.")
    if tokens.shape[-1] > config.n_ctx:
        raise ValueError(
            f"Sequence length {tokens.shape[-1]} exceeds the model's context n_ctx={config.n_ctx}."
        )


def check_token_values(tokens, d_vocab: int, what: str = "tokens", error=ValueError) -> None:
    """Every id in [0, d_vocab): an embedding lookup under jit clamps an id
    outside it and runs on without a word. Traced tokens (values unknown
    here) are not checked."""
    try:
        t = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:
        return
    if t.size == 0:
        return
    bad = np.flatnonzero((t.reshape(-1) < 0) | (t.reshape(-1) >= d_vocab))
    if bad.size:
        where = np.unravel_index(bad[0], t.shape)
        raise error(
            f"{what}: token id {int(t[where])} at index {tuple(int(i) for i in where)} is outside the model's "
            f"vocabulary 0..{d_vocab - 1} ({bad.size} such id(s)). Tokenize with the model's own tokenizer."
        )


def _map_batch(fn, tokens, config: TransformerConfig):
    check_token_values(tokens, config.d_vocab)
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 0:
        raise ValueError("tokens must have shape [pos] or [batch, pos], got a scalar.")
    if tokens.ndim == 1:
        return fn(tokens)
    lead = tokens.shape[:-1]
    out = jax.vmap(fn)(tokens.reshape((-1, tokens.shape[-1])))
    return jax.tree_util.tree_map(lambda a: a.reshape(lead + a.shape[1:]), out)


def cast(model: Transformer, dtype) -> Transformer:
    """The model with every floating-point weight cast to `dtype`."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model
    )

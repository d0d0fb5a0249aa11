"""What a cut edge carries instead of the sender's clean output: the
corrupted prompts' sender outputs, their mean, or zeros, and the per-example
views of them that a pass reads."""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from .errors import TaskError
from .layers import _lead
from .model import SenderActivations, Transformer, check_token_values


class Corruption(eqx.Module):
    """What a cut edge carries instead of the sender's clean activation.

    ``"prompts"``: the sender's activation on the matching corrupted prompt;
    ``"mean"``: its mean over a dataset, per position; ``"zeros"``: zero.
    Build with `from_prompts`, `mean` or `zeros`.
    """

    kind: str = eqx.field(static=True)
    acts: Optional[SenderActivations]

    @classmethod
    def from_prompts(cls, model: Transformer, corrupted_tokens: Int[Array, "batch pos"]) -> "Corruption":
        tokens = _checked(model, corrupted_tokens, "corrupted tokens")
        return cls("prompts", with_resid(model, _senders(model, tokens)))

    @classmethod
    def mean(cls, model: Transformer, tokens: Int[Array, "batch pos"]) -> "Corruption":
        tokens = _checked(model, tokens, "tokens for a mean corruption")
        acts = jax.tree_util.tree_map(lambda a: a.mean(0), _senders(model, tokens))
        return cls("mean", with_resid(model, acts))

    @classmethod
    def zeros(cls) -> "Corruption":
        return cls("zeros", None)

    def check(self, tokens: Array) -> None:
        if self.kind == "prompts" and self.acts.tok.shape[:2] != tokens.shape[:2]:
            raise TaskError(
                f"Clean tokens have shape {tuple(tokens.shape)} but the corrupted prompts have shape "
                f"{tuple(self.acts.tok.shape[:2])}; give one corrupted prompt of equal length per clean prompt."
            )
        if self.kind == "mean" and self.acts.tok.shape[0] < tokens.shape[1]:
            raise TaskError(
                f"The mean corruption covers {self.acts.tok.shape[0]} positions, the prompts have {tokens.shape[1]}."
            )


def _checked(model: Transformer, tokens, what: str) -> Int[Array, "batch pos"]:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise TaskError(f"{what} must have shape [batch, pos], got {tokens.shape}.")
    check_token_values(tokens, model.config.d_vocab, what, TaskError)
    return tokens


@eqx.filter_jit
def _senders(model: Transformer, tokens):
    return model.run_with_senders(tokens)[1]


def example_corruption(corruption: Corruption, model: Transformer, n_pos: int, acts) -> SenderActivations:
    """Corrupted sender outputs for one example (`acts` is this example's slice, if any)."""
    c = model.config
    if corruption.kind == "zeros":
        dt = model.embed.W_E.dtype
        z = jnp.zeros((n_pos, c.d_model), dt)
        return SenderActivations(
            tok=z,
            pos=z if c.positional == "learned" else None,
            heads=jnp.zeros((c.n_layers, c.n_heads, n_pos, c.d_model), dt),
            mlps=None if c.attn_only else jnp.zeros((c.n_layers, n_pos, c.d_model), dt),
        )
    if corruption.kind == "mean":
        return jax.tree_util.tree_map(lambda a: a[..., :n_pos, :], acts)
    return acts


def example_inputs(corruption: Corruption, model: Transformer, tokens, acts):
    """One example's corrupted sender outputs and its shortformer position
    embedding (added to queries and keys; None for other position types)."""
    return example_corruption(corruption, model, tokens.shape[0], acts), model.embeddings(tokens)[2]


def corruption_axes(corruption: Corruption):
    """vmap axes for `Corruption.acts` over the prompt batch."""
    return 0 if corruption.kind == "prompts" else None


@eqx.filter_jit
def with_resid(model: Transformer, acts: SenderActivations) -> SenderActivations:
    """`acts` with the residual stream before each layer and after the last
    summed once, which a pass then reads instead of summing every earlier
    head's output again (on a CPU, reading them all cost more than a move of
    the sparse passes' base state)."""
    resid = jnp.stack(_summed_bases(model, acts, model.config.n_layers), axis=-3)
    return SenderActivations(acts.tok, acts.pos, acts.heads, acts.mlps, resid)


def _corrupt_base(model: Transformer, corr: SenderActivations, start_layer: int):
    """The corrupted residual stream before layer `start_layer`."""
    if corr.resid is not None:
        return corr.resid[start_layer]
    return _summed_bases(model, corr, start_layer)[-1]


def _summed_bases(model: Transformer, corr: SenderActivations, last: int) -> list:
    """The residual streams before layers 0 .. `last` (any leading batch axes)."""
    base = corr.tok if corr.pos is None else corr.tok + corr.pos
    bases = [base]
    for l in range(last):
        base = base + corr.heads[..., l, :, :, :].sum(-3) + _lead(model.blocks.attn.b_O[l], base.ndim)
        if model.config.d_mlp is not None:
            base = base + corr.mlps[..., l, :, :]
        bases.append(base)
    return bases

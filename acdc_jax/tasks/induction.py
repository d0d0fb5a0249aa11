"""Induction on a 2-layer attention-only model that ships with the package.

The model was trained by ``scripts/train_induction.py`` on sequences of random
tokens in which a random segment appears twice, at random places; it is stored
in TransformerLens layout (``data/induction``) and loaded through the
converter. The metric positions are those inside the second copy whose next
token continues the copy; "kl" (default) is the KL divergence there and "nll"
the negative log-probability of the right next token. The corrupted prompts are
the clean ones in another order (as in the ACDC paper's induction task).

Ground truth, from the attention scores measured after training and recorded
in ``scores.json`` (previous-token heads in layer 0, induction heads in layer
1): previous-token heads -> induction heads' key input; embedding -> the
induction heads' query and value inputs; induction heads -> logits; and the
induction heads' q/k/v steps. A previous-token head moves the previous
token's identity through its value path (embedding -> v input, v step). Its
query and key are not in the ground truth: the model uses shortformer
positions, added to q and k inside attention, so its pattern is positional.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..model import Transformer
from .base import Task, check_examples, kl_divergence

DATA = Path(__file__).parent / "data" / "induction"
N_RANDOM, LENGTH, MIN_REPEAT, MAX_REPEAT = 48, 30, 5, 10  # token ids 1..48 are random tokens, 0 is BOS


def repeated_sequences(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [batch, LENGTH], source [batch, LENGTH]). ``source[b, p]`` is,
    for a position p inside the second copy whose next token continues the
    copy, the position of that next token in the first copy; -1 elsewhere."""
    tokens = rng.integers(1, N_RANDOM + 1, (batch, LENGTH))
    tokens[:, 0] = 0
    source = np.full((batch, LENGTH), -1)
    for i in range(batch):
        n = rng.integers(MIN_REPEAT, MAX_REPEAT + 1)
        first = rng.integers(1, LENGTH - 2 * n + 1)
        second = rng.integers(first + n, LENGTH - n + 1)
        tokens[i, second:second + n] = tokens[i, first:first + n]
        source[i, second:second + n - 1] = np.arange(first + 1, first + n)
    return tokens, source


def nll(logits, task):
    """Mean negative log-probability of the right next token at the repeated positions."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, task.labels["next"][..., None], axis=-1)[..., 0]
    w = task.weights
    return -(picked * w).sum() / w.sum()


def load_induction_model(directory: str | Path = DATA) -> Transformer:
    import converters

    return converters.convert(Path(directory), format="transformer-lens")


def recorded_heads(directory: str | Path = DATA) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    meta = json.loads((Path(directory) / "scores.json").read_text())
    return [tuple(h) for h in meta["previous_token_heads"]], [tuple(h) for h in meta["induction_heads"]]


def induction_canonical(previous: list, induction: list) -> frozenset:
    embed = "blocks.0.hook_resid_pre"
    edges = set()
    for lp, hp in previous:
        edges.add(f"{embed}->blocks.{lp}.hook_v_input[{hp}]")
        edges.add(f"blocks.{lp}.hook_v_input[{hp}]->blocks.{lp}.attn.hook_v[{hp}]")
        for li, hi in induction:
            edges.add(f"blocks.{lp}.attn.hook_result[{hp}]->blocks.{li}.hook_k_input[{hi}]")
    for li, hi in induction:
        edges |= {f"{embed}->blocks.{li}.hook_{c}_input[{hi}]" for c in "qv"}
        edges |= {f"blocks.{li}.hook_{c}_input[{hi}]->blocks.{li}.attn.hook_{c}[{hi}]" for c in "qkv"}
        edges.add(f"blocks.{li}.attn.hook_result[{hi}]->blocks.{li}.hook_resid_post")
    return frozenset(edges)


def induction_task(n_examples: int = 50, seed: int = 0, directory: str | Path = DATA) -> Task:
    check_examples("induction", n_examples)  # one prompt has no other to be corrupted by: it searched forever
    rng = np.random.default_rng(10_000 + seed)
    tokens, source = repeated_sequences(rng, n_examples)
    positions = np.arange(1, LENGTH - 1)
    weights = (source[:, positions] >= 0).astype(np.float32)
    nxt = tokens[:, positions + 1]
    perm = rng.permutation(n_examples)
    while np.any(perm == np.arange(n_examples)):
        perm = rng.permutation(n_examples)
    previous, induction = recorded_heads(directory)
    return Task(
        name="induction",
        clean=tokens,
        corrupted=tokens[perm],
        positions=positions,
        weights=weights,
        metrics={"kl": kl_divergence, "nll": nll},
        labels={"next": nxt.astype(np.int32)},
        vocab_labels=("next",),
        canonical=induction_canonical(previous, induction),
        description="induction on repeated random segments (shipped 2-layer attention-only model).",
    )


def induction(n_examples: int = 50, seed: int = 0) -> tuple[Transformer, Task]:
    return load_induction_model(), induction_task(n_examples, seed)


__all__ = ["induction", "induction_task", "load_induction_model", "repeated_sequences", "nll"]

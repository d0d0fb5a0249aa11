"""How many candidates a batched pass can hold: the memory side of batching.

The width of a pass is the largest power of two whose candidates' activations
fit in half the free device memory (an estimate per candidate, with headroom
for XLA's temporaries); when fewer than 8 would fit, the prompts are run in
chunks inside the pass instead.
"""

from __future__ import annotations

from typing import Optional

import jax

from .graph import CircuitGraph
from .model import Transformer


def available_memory_bytes(device=None) -> int:
    """Free memory on the device (accelerators) or in the host (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # pragma: no cover - backend specific
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux hosts
        pass
    return 4 << 30


def bytes_per_candidate(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int) -> int:
    """A generous estimate of one candidate's activation memory in a pass from
    the start of the model: the sender deviation stack, a layer's q/k/v inputs
    and attention scores, the MLP hidden layer and the logits, times 3 for
    XLA's temporaries."""
    c = model.config
    floats = n_prompts * (
        graph.n_senders * n_pos * c.d_model
        + 4 * 3 * c.n_heads * n_pos * c.d_model
        + 2 * c.n_heads * n_pos * n_pos
        + (4 * n_pos * c.d_mlp if c.d_mlp else 0)
        + 2 * n_out * c.d_vocab_out
    )
    return 3 * model.embed.W_E.dtype.itemsize * floats


def plan_batch(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int, max_width: int,
               candidate_shards: int = 1, prompt_shards: int = 1, min_width: int = 8,
               available: Optional[int] = None) -> tuple[int, Optional[int]]:
    """(pass width, prompt chunk) for batched passes. The width is the
    largest power of two that fits (`choose_width`); while it is below
    `min_width`, the prompts are halved into chunks that a pass runs one after
    another, keeping only the logits of the others."""
    local = n_prompts // prompt_shards
    chunk, cap = local, max(1, max_width // candidate_shards)
    logits = 3 * model.embed.W_E.dtype.itemsize * n_out * model.config.d_vocab_out
    while True:
        per = bytes_per_candidate(model, graph, chunk, n_pos, n_out) + (local - chunk) * logits
        width = choose_width(per, cap, available=available)
        if width >= min(min_width, cap) or chunk % 2 or prompt_shards > 1:
            break
        chunk //= 2
    return width * candidate_shards, None if chunk == local else chunk


def choose_width(per_candidate: int, max_width: int, budget_fraction: float = 0.5, available: Optional[int] = None) -> int:
    """The largest power of two <= max_width whose candidates fit in the budget."""
    available = available_memory_bytes() if available is None else available
    fit = max(1, int(budget_fraction * available // max(per_candidate, 1)))
    width = 1
    while width * 2 <= min(fit, max_width):
        width *= 2
    return width


def default_max_width() -> int:
    """Wide batches pay off on accelerators; on a CPU the pass is compute-bound."""
    return 256 if jax.default_backend() != "cpu" else 16

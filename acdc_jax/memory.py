"""How many candidates a batched pass can hold: the memory side of batching.

A pass from layer `start` holds, beyond the weights: every sender's clean
deviation and corrupted activation for all prompts, XLA's temporaries around
them and, where the cached senders' share of the later receivers is summed
once (`patching.upstream_mix`), that sum (`pass_bytes`'s fixed part); and per
candidate and prompt, the deviations of the senders computed in the pass (the
scan's carry, held twice), one layer's working set (each head's q/k/v
inputs, mixed and normalised, its result and deviation: about 12 sender-sized
arrays per head, half as many in the last layer, whose queries run at the
metric positions only; the attention scores; the MLP hidden layer), and the logits
at the metric positions. XLA's own buffer assignment of the compiled pass
came to up to 1.3x this count, so it is taken 1.5 times; the tests
(`tests/test_memory.py`) check that the estimate is never below XLA's.

A pass from a later layer needs less, so each start layer gets its own width:
the largest power of two that fits in 70% of the free device memory. When
fewer than 8 candidates would fit from layer 0, the prompts run in chunks
inside the pass.
"""

from __future__ import annotations

from typing import Optional

import jax

from .errors import check_whole, positive_setting
from .graph import CircuitGraph
from .model import Transformer
from .sharding import candidate_shards, prompt_shards

HEADROOM = 1.5  # over the counted floats: XLA allocated up to 1.3x as much (tests/test_memory.py)
BUDGET_FRACTION = 0.7


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


def pass_bytes(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int,
               start_layer: int = 0, prompt_chunk: Optional[int] = None) -> tuple[int, int]:
    """(fixed, per candidate) bytes of a batched pass from `start_layer`
    (`graph.n_layers`: the logits only), running `prompt_chunk` prompts at a
    time (default all)."""
    c, g = model.config, graph
    H, L = c.n_heads, c.n_layers
    sender = n_pos * c.d_model  # one sender's deviation for one prompt
    before = g.n_senders if start_layer >= L else g.n_senders_before_attn(start_layer)
    chunk = n_prompts if prompt_chunk is None else prompt_chunk
    # deviations, corrupted activations and XLA's copies, and the corrupted residual before each layer
    fixed = n_prompts * (4 * g.n_senders + L + 1) * sender
    if 0 < start_layer < L:  # the shared upstream sum over the later receivers, per prompt chunk
        fixed += chunk * 3 * ((L - start_layer - 1) * g._layer_columns + 1) * sender
    act = 0
    if start_layer < L:  # the last layer alone runs its queries and MLP at the metric positions only
        per_head = 12 if start_layer < L - 1 else 6
        act = 2 * (g.n_senders - before) * sender + per_head * H * sender + H * n_pos * n_pos + (3 if c.gated_mlp else 2) * n_pos * (c.d_mlp or 0)
    logits = 2 * n_out * c.d_vocab_out
    size = model.embed.W_E.dtype.itemsize
    per = HEADROOM * (chunk * act + n_prompts * logits) * size
    return int(fixed * size), int(per)


def layer_widths(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int, max_width: int,
                 prompt_chunk: Optional[int] = None, available: Optional[int] = None) -> list[int]:
    """The widest pass (a power of two <= max_width) that fits from each
    start layer 0 .. n_layers."""
    available = available_memory_bytes() if available is None else available
    widths = []
    for start in range(graph.n_layers + 1):
        fixed, per = pass_bytes(model, graph, n_prompts, n_pos, n_out, start, prompt_chunk)
        widths.append(choose_width(per, max_width, available=available, fixed=fixed))
    return widths


def plan_batch(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int, max_width: int,
               candidate_shards: int = 1, prompt_shards: int = 1, min_width: int = 8,
               available: Optional[int] = None) -> tuple[list[int], Optional[int]]:
    """(pass width for each start layer 0 .. n_layers, prompt chunk), per
    device when sharded (`layer_widths`). While the width from layer 0 is
    below `min_width`, the prompts are halved into chunks that a pass runs one
    after another, keeping only the logits of the others."""
    local = n_prompts // prompt_shards
    cap = max(1, max_width // candidate_shards)
    available = available_memory_bytes() if available is None else available
    chunk = local
    while True:
        widths = layer_widths(model, graph, local, n_pos, n_out, cap, None if chunk == local else chunk, available)
        if widths[0] >= min(min_width, cap) or chunk % 2 or prompt_shards > 1:
            break
        chunk //= 2
    return [w * candidate_shards for w in widths], None if chunk == local else chunk


def choose_width(per_candidate: int, max_width: int, budget_fraction: float = BUDGET_FRACTION,
                 available: Optional[int] = None, fixed: int = 0) -> int:
    """The largest power of two <= max_width whose candidates, with the
    pass's `fixed` bytes, fit in the budget (at least 1)."""
    available = available_memory_bytes() if available is None else available
    fit = max(1, int((budget_fraction * available - fixed) // max(per_candidate, 1)))
    width = 1
    while width * 2 <= min(fit, max_width):
        width *= 2
    return width


def grad_bytes(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int) -> int:
    """Bytes of the metric's gradient with respect to the masks (EAP, EAP-IG,
    HISP, edge pruning) over `n_prompts` prompts at once. The backward pass
    keeps, per prompt and layer, the senders' deviations going in and out of
    the layer's scan step and each head's inputs and intermediates (about 12
    sender-sized arrays per head), and the MLP's hidden layer; XLA's buffer
    assignment came to 0.4-0.7x this count (3-layer GPT-2-like and Llama-like
    models, and SmolLM2-135M; `tests/test_memory.py` checks it is never above)."""
    c = model.config
    rows = c.n_layers * (2 * graph.n_senders + 12 * c.n_heads + 3 * -(-(c.d_mlp or 0) // c.d_model))
    per_prompt = rows * n_pos * c.d_model * model.embed.W_E.dtype.itemsize + 3 * n_out * c.d_vocab_out * 4
    return int(HEADROOM * n_prompts * per_prompt)


def grad_prompt_chunk(model: Transformer, graph: CircuitGraph, n_prompts: int, n_pos: int, n_out: int,
                      available: Optional[int] = None) -> Optional[int]:
    """Prompts per step of a gradient (`dense.metric_of_mask`'s `chunk`):
    None when all fit in the budget, else the largest divisor of `n_prompts`
    that does (at least 1)."""
    available = available_memory_bytes() if available is None else available
    one = grad_bytes(model, graph, 1, n_pos, n_out)
    if n_prompts * one <= BUDGET_FRACTION * available:
        return None
    return _largest_divisor(n_prompts, int(BUDGET_FRACTION * available // one))


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (1 if none is)."""
    return max(d for d in range(1, min(max(1, at_most), n) + 1) if n % d == 0)


def default_max_width() -> int:
    """Wide batches pay off on accelerators; on a CPU the pass is compute-bound."""
    return 256 if jax.default_backend() != "cpu" else 16


def plan_task(model: Transformer, graph: CircuitGraph, task, max_width: Optional[int] = None,
              mesh=None) -> tuple[list[int], Optional[int]]:
    """`plan_batch` for `task`'s prompts over `mesh`'s shards (None: one
    device), at most `max_width` wide (default: `default_max_width`)."""
    if max_width is not None:
        max_width = check_whole(max_width, "max_width (the most candidates in one batched pass; leave it out for "
                                "the device's default)", 1)
    return plan_batch(model, graph, task.clean.shape[0], task.clean.shape[1], len(task.positions),
                      max_width or default_max_width(), candidate_shards(mesh), prompt_shards(mesh))


def xla_pass_bytes(scorer, start_layer: int, width: int, upstream: bool = False) -> Optional[dict]:
    """What XLA allocates for `scorer`'s vmapped batched pass (the program
    accelerators run) from `start_layer` at `width`, from the compiled
    executable's `memory_analysis()` (compiling it; nothing runs): its
    temporaries, and the cached deviations and corrupted activations it reads
    (the weights are already in use). With `upstream`, the pass recomputes one
    start-layer head and shares the cached senders' sum, as most passes after
    layer 0 do. None where the backend reports no analysis."""
    import jax.numpy as jnp

    from .dense import batch_metric, batch_metric_heads

    s = scorer
    masks = jnp.ones((width, s.graph.n_edges), s.model.embed.W_E.dtype)
    args = (s.model, s.graph, start_layer, s.corruption, s.metric, s.task, s.arrays, masks, s.tokens, s.deviations,
            s.positions)
    if upstream:
        n, pos = s.tokens.shape
        base = jnp.zeros((n, s.graph.n_heads, pos, s.model.config.d_model), masks.dtype)
        rows = (jnp.ones(s.graph.n_edges, masks.dtype), jnp.arange(2, dtype=jnp.int32))
        lowered = batch_metric_heads.lower(*args, base, jnp.zeros(1, jnp.int32), s.prompt_chunk, rows, False)
    else:
        lowered = batch_metric.lower(*args, s.prompt_chunk, None, False)
    compiled = lowered.compile()
    analysis = getattr(compiled, "compiled", compiled).memory_analysis()  # equinox wraps jax's Compiled
    if analysis is None:
        return None
    data = sum(x.nbytes for x in jax.tree_util.tree_leaves((s.deviations, s.corruption.acts)))
    return {"temp": int(analysis.temp_size_in_bytes), "data": int(data),
            "total": int(analysis.temp_size_in_bytes + data)}


CHUNK_BYTES = 5 << 19  # a layer's q/k/v inputs per step of a CPU pass (docs/performance.md, "Prompt chunks")


def cache_prompt_chunk(graph: CircuitGraph, n_prompts: int, n_pos: int, d_model: int, itemsize: int,
                       budget: Optional[int] = None) -> Optional[int]:
    """Prompts per step of a dense pass on one CPU device: the largest
    divisor of `n_prompts` whose layer of q/k/v inputs (the largest array a
    pass makes) fits in `budget` bytes (default ``ACDC_JAX_CPU_CHUNK_BYTES``
    if set, else `CHUNK_BYTES`), at least 1; None where all prompts fit."""
    if budget is None:
        budget = positive_setting("ACDC_JAX_CPU_CHUNK_BYTES", " of bytes") or CHUNK_BYTES
    one = 3 * graph.n_heads * n_pos * d_model * itemsize
    if n_prompts * one <= budget:
        return None
    return _largest_divisor(n_prompts, budget // one)

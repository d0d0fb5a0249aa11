"""Scoring candidate circuits: the metric of many edge masks in one pass.

`Scorer` caches every sender's clean deviation (act - corrupt) once. A batch
of candidate masks that only differ at receivers from some point of the
forward pass onwards starts there: senders before that point keep their cached
values, and only the rest of the model is recomputed, vmapped over the
candidates. Logits are computed only at the positions the metric reads.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .graph import CircuitGraph
from .model import Transformer
from .patching import Corruption, corruption_axes, example_corruption, patched_logits_and_deviations, run_from, senders_before
from .tasks.base import Task, TaskArrays, task_arrays


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
    return 256 if jax.default_backend() != "cpu" else 32


class Scorer:
    """Metric of candidate masks, for one model, graph, task and corruption.

    `task` must be bound (`Task.bind`); `static_task` is the object the metric
    sees for non-array attributes. Passing the same unbound task across runs
    lets them share compiled passes (the arrays are arguments, not constants).
    """

    def __init__(self, model: Transformer, graph: CircuitGraph, task: Task, corruption: Corruption, metric,
                 static_task: Optional[Task] = None):
        self.model, self.graph, self.corruption, self.metric = model, graph, corruption, metric
        self.task = static_task if static_task is not None else task
        self.tokens = jnp.asarray(task.clean)
        self.positions = tuple(int(p) for p in task.positions)
        self.arrays = task_arrays(task)
        ones = graph.ones().astype(self._dtype)
        self.deviations = _deviations(model, graph, self.tokens, ones, corruption)
        self.passes = 0

    @property
    def _dtype(self):
        return self.model.embed.W_E.dtype

    def full(self, mask) -> float:
        """Metric of one mask, from a pass over the whole model (no cache)."""
        self.passes += 1
        out = _full_metric(self.model, self.graph, self.corruption, self.metric, self.task, self.arrays,
                           jnp.asarray(mask, self._dtype), self.tokens, self.positions)
        return float(out)

    def batch(self, masks: np.ndarray, start_layer: int, width: int) -> np.ndarray:
        """Metrics of `masks` [n, n_edges] from a pass that starts at
        `start_layer`. Batches are padded to `width`, so at most n_layers + 1
        programs are compiled."""
        n = masks.shape[0]
        if n < width:
            masks = np.concatenate([masks, np.repeat(masks[-1:], width - n, axis=0)])
        self.passes += 1
        out = _batch_metric(self.model, self.graph, start_layer, self.corruption, self.metric, self.task, self.arrays,
                            jnp.asarray(masks, self._dtype), self.tokens, self.deviations, self.positions)
        return np.asarray(out)[:n]


@eqx.filter_jit
def _deviations(model, graph, tokens, masks, corruption):
    return patched_logits_and_deviations(model, graph, tokens, masks, corruption, out_positions=np.zeros((1,), np.int32))[1]


@eqx.filter_jit
def _full_metric(model, graph, corruption, metric, task, arrays, mask, tokens, positions):
    logits = patched_logits_and_deviations(model, graph, tokens, mask, corruption)[0][:, np.asarray(positions)]
    return metric(logits, TaskArrays(task, arrays))


@eqx.filter_jit
def _batch_metric(model, graph, start_layer, corruption, metric, task, arrays, masks, tokens, deviations, positions):
    n_up = senders_before(graph, start_layer)
    up_all = deviations[:, :n_up]
    out_positions = np.asarray(positions)

    def one_candidate(mask):
        m_add, m_dir = graph.dense_masks(mask)

        def one_example(tok, up, acts):
            corr = example_corruption(corruption, model, tok.shape[0], acts)
            _, _, pos_qk = model.embeddings(tok)
            return run_from(model, graph, start_layer, up, m_add, m_dir, corr, pos_qk, out_positions)[0]

        logits = jax.vmap(one_example, in_axes=(0, 0, corruption_axes(corruption)))(tokens, up_all, corruption.acts)
        return metric(logits, TaskArrays(task, arrays))

    return jax.vmap(one_candidate)(masks)

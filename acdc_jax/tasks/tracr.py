"""tracr-reverse and tracr-proportion, as in the ACDC paper, with ground truth
derived from the compiled weights.

Data follow the paper's code: reverse uses the six permutations of tokens
(1, 2, 3) after BOS, corrupted by a permutation of the rows without fixed
points; proportion uses 50 random length-4 strings over w/x/y/z with token ids
``ord(c) - ord('w')`` and no BOS (under tracr-pypi's encoder these ids are BOS,
pad, w and x), corrupted by a random permutation of the rows. In the corrupted
run the position embeddings are also permuted. The metric is the squared error
of the outputs at positions 1.. (all output dimensions for reverse, the single
numerical output for proportion). The graph has separate token and position
embedding senders.

Ground truth (`derive_ground_truth`): an edge is in the circuit when the
sender writes to a residual direction the receiver reads (non-zero columns of
W_E, W_pos, W_O, W_out against non-zero rows of W_Q, W_K, W_V, W_in, W_U) *and*
cutting that edge alone (zero ablation) changes the outputs at the metric
positions for some input. The second condition drops reads that tracr compiles
but that never matter for these inputs: the query and key of the
always-true selector behind ``length``, and the BOS fallback of the reverse
selector. A head's q/k/v step is in the circuit when its input has an edge in it.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ..graph import CircuitGraph
from ..model import Transformer
from ..patching import Corruption, patched_forward
from .base import Task, check_examples, predicted_logit, squared_error
from .tracr_programs import compile_tracr, compile_tracr_model

GRAPH_OPTIONS = {"split_embed": True}


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def reverse_task(seed: int = 0) -> tuple[Transformer, Task]:
    model = compile_tracr_model("reverse")
    assembled, _ = compile_tracr("reverse")
    enc = assembled.input_encoder.encoding_map
    rng = np.random.default_rng(seed)
    clean = np.array([[enc["BOS"], *(enc[v] for v in perm)] for perm in itertools.permutations([1, 2, 3])])
    task = Task(
        name="tracr-reverse",
        clean=clean,
        corrupted=clean[_derangement(len(clean), rng)],
        positions=np.arange(1, 4),
        metrics={"l2": squared_error, "logit": predicted_logit},
        default_metric="l2",
        graph_options=GRAPH_OPTIONS,
        corrupt_positions=rng.permutation(4),
        description="tracr reverse of (1, 2, 3) permutations; squared error of the outputs at positions 1-3 "
                    "('logit': minus the logit of the right token, for gradient methods).",
    )
    return model, _with_ground_truth(model, task)


def proportion_task(n_examples: int = 50, seed: int = 0) -> tuple[Transformer, Task]:
    check_examples("tracr-proportion", n_examples)
    model = compile_tracr_model("proportion")
    rng = np.random.default_rng(seed)
    strings = list(itertools.product("wxyz", repeat=4))
    order = rng.permutation(len(strings))[:n_examples]
    clean = np.array([[ord(c) - ord("w") for c in strings[i]] for i in order])
    task = Task(
        name="tracr-proportion",
        clean=clean,
        corrupted=clean[rng.permutation(n_examples)],
        positions=np.arange(1, 4),
        metrics={"l2": squared_error, "output": predicted_logit},
        default_metric="l2",
        graph_options=GRAPH_OPTIONS,
        corrupt_positions=rng.permutation(4),
        description="tracr frac_prevs(tokens == 'x'); squared error of output 0 at positions 1-3.",
    )
    return model, _with_ground_truth(model, task)


def _with_ground_truth(model: Transformer, task: Task) -> Task:
    import dataclasses

    graph = task.graph(model)
    return dataclasses.replace(task, canonical=derive_ground_truth(model, graph, task))


def _nonzero(a, axis) -> set[int]:
    return set(np.flatnonzero(np.abs(np.asarray(a)).sum(axis=axis) > 0).tolist())


def subspace_edges(model: Transformer, graph: CircuitGraph) -> set[str]:
    """Residual edges whose sender writes a direction the receiver reads, and
    q/k/v steps whose input reads anything."""
    b = model.blocks
    writes, reads = {}, {}
    for s in graph.senders:
        if s.kind == "tok_embed":
            writes[s.name] = _nonzero(model.embed.W_E, 0)
        elif s.kind == "pos_embed":
            writes[s.name] = _nonzero(model.embed.W_pos, 0)
        elif s.kind == "embed":
            writes[s.name] = _nonzero(model.embed.W_E, 0) | _nonzero(model.embed.W_pos, 0)
        elif s.kind == "head":
            writes[s.name] = _nonzero(b.attn.W_O[s.layer, s.head], 0)
        else:
            writes[s.name] = _nonzero(b.mlp.W_out[s.layer], 0) | _nonzero(b.mlp.b_out[s.layer][None], 0)
    for r in graph.receivers:
        if r.kind in ("q", "k", "v"):
            reads[r.name] = _nonzero(getattr(b.attn, f"W_{r.kind.upper()}")[r.layer, r.head], 1)
        elif r.kind == "attn_in":
            reads[r.name] = set().union(*(_nonzero(getattr(b.attn, f"W_{c}")[r.layer, r.head], 1) for c in "QKV"))
        elif r.kind == "mlp_in":
            reads[r.name] = _nonzero(b.mlp.W_in[r.layer], 1)
        else:
            reads[r.name] = _nonzero(model.unembed.W_U, 1)
    out = set()
    for e in graph.edges:
        if e.kind == "residual" and writes[e.sender.name] & reads[e.receiver.name]:
            out.add(e.name)
        elif e.kind == "qkv" and reads[e.sender.name]:
            out.add(e.name)
    return out


def derive_ground_truth(model: Transformer, graph: CircuitGraph, task: Task, tol: float = 1e-3) -> frozenset:
    candidates = sorted(subspace_edges(model, graph), key=graph.edge_index)
    tokens = jnp.asarray(task.clean)
    full = np.asarray(model(tokens))[:, task.positions]
    corruption = Corruption.zeros()

    def cut(index):
        return patched_forward(model, tokens, graph.ones().at[index].set(0.0), corruption, graph)[:, task.positions]

    idx = jnp.asarray([graph.edge_index(n) for n in candidates])
    outs = np.asarray(jax.vmap(cut)(idx))
    matters = np.abs(outs - full[None]).reshape(len(candidates), -1).max(axis=1) > tol
    residual = {n for n, m in zip(candidates, matters) if m and graph.edge(n).kind == "residual"}
    inputs_used = {graph.edge(n).receiver.name for n in residual}
    qkv = {n for n in candidates if graph.edge(n).kind == "qkv" and graph.edge(n).sender.name in inputs_used}
    return frozenset(residual | qkv)

"""How far the FLOPs of exact ACDC could fall: a count, on real runs, of what
a pass that recomputes less would cost. Nothing here is timed.

On the bench_acdc model and task, ACDC runs (batched; its decisions are the
sequential loop's) and every trial is replayed against the circuit it
started from. Per trial, in matrix-multiply FLOPs (`acdc_jax.flops`):

- ``loop``: the sequential loop's pass (every layer, logits at the metric
  positions);
- ``floor``: the floor of today's batched passes (`flops.sweep_floor`): from
  the receiver's layer, one head recomputed there, every later layer in full,
  the unembedding of the whole final residual;
- ``downstream``: only the senders the cut can reach through the circuit's
  kept edges recomputed (at every position where a key or value input reads
  them, else at the metric positions), each changed input re-mixing only the
  changed senders; the unembedding as before;
- ``low_rank``: as ``downstream``, and the final residual's change unembedded
  through each changed head's 64-dimensional output space (a precomputed
  d_head x vocab matrix per head; LayerNorm's scale is per candidate and
  cheap) instead of the full d_model x vocab product; the full product where
  a changed MLP writes to the logits or the rank would not be smaller.

The last two are passes this library does not run yet; the table says how
much building them could save, per tau, on this model.

    python benchmarks/bench_floor.py [--taus 0.02 0.1] [--n-prompts 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acdc import ATTN_ONLY_4L, model_and_task  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402

from acdc_jax.acdc import acdc  # noqa: E402
from acdc_jax.flops import attention_flops, forward_flops, mlp_flops, pass_flops  # noqa: E402


def _sender_key(node) -> tuple:
    """A receiver's or sender's model part: ("head", layer, head), ("mlp", layer), ("logits",) or ("embed",)."""
    if node.kind in ("q", "k", "v", "attn_in", "head", "q_out", "k_out", "v_out"):
        return ("head", node.layer, node.head)
    if node.kind in ("mlp", "mlp_in"):
        return ("mlp", node.layer)
    return ("logits",) if node.kind == "logits" else ("embed",)


def edge_parts(graph) -> list[tuple]:
    """(index, sender part, receiver part, receiver kind) of each residual edge."""
    return [(x.index, _sender_key(x.sender), _sender_key(x.receiver), x.receiver.kind) for x in graph.edges
            if x.kind == "residual"]


def trial_costs(graph, parts: list[tuple], mask: np.ndarray, edge: int, n_pos: int, n_out: int) -> dict:
    """FLOPs of one example's trial of `edge` from circuit `mask`, four ways (see
    the module docstring); `parts` from `edge_parts(graph)`."""
    c, L, H = graph.config, graph.n_layers, graph.n_heads
    e = graph.edges[edge]
    layer = e.receiver.layer
    m = mask.copy()
    m[edge] = 0.0
    readers = defaultdict(list)  # sender part -> (receiver part, receiver kind) over the kept edges
    for index, sender, receiver, kind in parts:
        if m[index]:
            readers[sender].append((receiver, kind))
    changed, stack = {_sender_key(e.receiver)}, [_sender_key(e.receiver)]
    while stack:
        for part, _ in readers[stack.pop()]:
            if part not in changed:
                changed.add(part)
                stack.append(part)
    order = sorted((p for p in changed if p[0] != "logits"), key=lambda p: (p[1], p[0] == "mlp"), reverse=True)
    all_positions = set()
    for p in order:  # latest first: a part is needed everywhere when a key/value (or an all-position query) reads it
        if any(kind in ("k", "v") or (kind in ("q", "mlp_in") and r in all_positions) for r, kind in readers[p]):
            all_positions.add(p)
    downstream = 0
    for p in order:
        n_q = n_pos if p in all_positions else n_out
        before = sum(1 for q in changed if q[0] != "logits" and (q[1], q[0] == "mlp") < (p[1], p[0] == "mlp"))
        if p[0] == "head":
            downstream += attention_flops(c, 1, n_pos, n_q) + 2 * before * (n_q + 2 * n_pos) * c.d_model
        else:
            downstream += mlp_flops(c, n_q) + 2 * before * n_q * c.d_model
    to_logits = [p for p in order if ("logits",) in (r for r, _ in readers[p])]
    downstream += 2 * len(to_logits) * n_out * c.d_model
    dense = 2 * n_out * c.d_model * c.d_vocab_out
    rank = c.d_head * len(to_logits)
    low = dense if any(p[0] == "mlp" for p in to_logits) or rank >= c.d_model else \
        2 * n_out * rank * (c.d_model + c.d_vocab_out)
    rows = 1 if 0 < layer < L else None
    return {"loop": pass_flops(graph, 0, H, n_pos, n_out)["total"],
            "floor": pass_flops(graph, layer, 1, n_pos, n_out, rows)["total"],
            "downstream": downstream + dense, "low_rank": downstream + low,
            "changed_heads": sum(p[0] == "head" for p in changed), "to_logits": len(to_logits)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--n-prompts", type=int, default=10)
    parser.add_argument("--n-pos", type=int, default=24)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_floor_") as tmp:  # the model's checkpoint is 200 MB
        model, task = model_and_task(Path(tmp), args.n_prompts, args.n_pos)
    fwd = forward_flops(model.config, args.n_pos)
    rows = []
    for tau in args.taus:
        circuit = acdc(model, task, tau, progress=False)
        graph, mask, sums, heads, to_logits = circuit.graph, np.ones(circuit.graph.n_edges, np.float32), defaultdict(int), [], []
        parts = edge_parts(graph)
        for d in circuit.decisions:
            if d.tried:
                cost = trial_costs(graph, parts, mask, d.index, args.n_pos, len(task.positions))
                for k in ("loop", "floor", "downstream", "low_rank"):
                    sums[k] += cost[k]
                heads.append(cost["changed_heads"])
                to_logits.append(cost["to_logits"])
            if not d.kept:
                mask[d.index] = 0.0
        n = graph.n_edges
        row = {"tau": tau, "edges": n, "tried": sum(d.tried for d in circuit.decisions), "kept": circuit.n_edges,
               "changed_heads_mean": float(np.mean(heads)), "changed_heads_max": int(max(heads)),
               "changed_to_logits_mean": float(np.mean(to_logits))}
        for k in ("loop", "floor", "downstream", "low_rank"):
            row[f"{k}_per_edge_over_forward"] = sums[k] / n / fwd
        for k in ("floor", "downstream", "low_rank"):
            row[f"loop_over_{k}"] = sums["loop"] / sums[k]
        rows.append(row)
        print(row, flush=True)
    print_table(rows, ["tau", "tried", "kept", "changed_heads_mean", "changed_to_logits_mean",
                       "loop_per_edge_over_forward", "floor_per_edge_over_forward",
                       "downstream_per_edge_over_forward", "low_rank_per_edge_over_forward",
                       "loop_over_floor", "loop_over_downstream", "loop_over_low_rank"])
    write_json("bench_floor", {
        "environment": environment(), "model": ATTN_ONLY_4L,
        "task": {"n_prompts": args.n_prompts, "n_pos": args.n_pos, "metric": "kl at the last position"},
        "note": "matrix-multiply FLOPs per example counted from shapes on the run's own trials; "
                "downstream and low_rank are passes not built yet",
        "rows": rows,
    })


if __name__ == "__main__":
    main()

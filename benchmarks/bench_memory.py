"""Memory of batched passes: the width plan against what XLA allocates.

GPT-2-small shape (random weights), 100 prompts x 16 tokens, KL at the last
position. `memory.plan_batch` picks a width per start layer (and maybe a
prompt chunk) from the free device memory; for several start layers this
compiles the vmapped pass at that width and reads XLA's buffer assignment
(`memory.xla_pass_bytes`: the pass with every head recomputed, and with one
head recomputed and the upstream sum shared), against the estimate
(`memory.pass_bytes`). On an accelerator it then runs each pass at its
planned width, ten single-edge cuts into the start layer's receivers, and
records the device's peak bytes in use, so an out-of-memory plan shows up
here and not in a sweep.

    python benchmarks/bench_memory.py [--n-prompts 100] [--dtype float32] [--run]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt2_sweep import gpt2_shaped, random_prompts_task  # noqa: E402
from common import GPT2_SMALL, environment, print_table, write_json  # noqa: E402

from acdc_jax.acdc import cast_for  # noqa: E402
from acdc_jax.algorithms.attribution import receiver_layers, setup  # noqa: E402
from acdc_jax.candidates import Candidates  # noqa: E402
from acdc_jax.memory import available_memory_bytes, default_max_width, pass_bytes, plan_batch, xla_pass_bytes  # noqa: E402

GB = 1e9


def _peak() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--n-pos", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--starts", type=int, nargs="+", default=[0, 4, 8, 11, 12])
    parser.add_argument("--run", action="store_true", help="also run each pass (default on accelerators)")
    args = parser.parse_args(argv)
    run = args.run or jax.default_backend() != "cpu"

    model = cast_for(gpt2_shaped(), args.dtype)
    task = random_prompts_task(args.n_prompts, args.n_pos)
    graph = task.graph(model)
    available = available_memory_bytes()
    widths, chunk = plan_batch(model, graph, args.n_prompts, args.n_pos, 1, default_max_width(), available=available)
    _, scorer, _ = setup(model, task, graph=graph, prompt_chunk=chunk)
    ones = np.ones(graph.n_edges, np.float32)
    layers = receiver_layers(graph)
    rows = []

    def save():  # after each start layer, so that a time limit keeps what was measured
        write_json(f"bench_memory-{args.dtype}", {
            "environment": environment(), "model": GPT2_SMALL.to_dict(), "dtype": args.dtype,
            "task": {"n_prompts": args.n_prompts, "n_pos": args.n_pos, "metric": "kl at the last position"},
            "available_bytes": available, "widths_per_start_layer": widths, "prompt_chunk": chunk,
            "note": "xla_*: temporaries of the compiled vmapped pass plus the deviations and corrupted activations it "
                    "reads (memory.xla_pass_bytes); peak_gb_so_far: the device's peak bytes in use after running the "
                    "passes so far (weights included)", "rows": rows})

    for start in args.starts:
        width = widths[start]
        fixed, per = pass_bytes(model, graph, args.n_prompts, args.n_pos, 1, start, chunk)
        full = xla_pass_bytes(scorer, start, width)
        shared = xla_pass_bytes(scorer, start, width, upstream=True) if 0 < start < graph.n_layers else None
        row = {"start_layer": start, "width": width, "prompt_chunk": chunk, "estimate_gb": (fixed + width * per) / GB,
               "xla_gb": None if full is None else full["total"] / GB,
               "xla_shared_upstream_gb": None if shared is None else shared["total"] / GB}
        measured = [m["total"] for m in (full, shared) if m is not None]
        row["estimate_over_xla"] = (fixed + width * per) / max(measured) if measured else None
        if run:
            cuts = np.flatnonzero(layers == start)[:10, None]
            scorer.batch(Candidates(ones, cuts), start, width)
            peak = _peak()
            row["ran"], row["peak_gb_so_far"] = True, None if peak is None else peak / GB
        rows.append(row)
        save()
    print(f"free memory {available / GB:.1f} GB; widths per start layer {widths}; prompt chunk {chunk}")
    print_table(rows, ["start_layer", "width", "prompt_chunk", "estimate_gb", "xla_gb", "xla_shared_upstream_gb",
                       "estimate_over_xla"] + (["peak_gb_so_far"] if run else []))


if __name__ == "__main__":
    main()

"""Single dense passes by start layer, against the loop's full pass.

GPT-2-small shape (random weights), random prompts, KL at the last position.
For each start layer it times one dense pass (every head recomputed, no
shared upstream sum) of `--width` candidates, each cutting one edge into that
layer's receivers, and one full pass over the whole model (what the
sequential loop runs per edge), in the same process: seconds per candidate,
its ratio to the full pass, and achieved FLOP/s against the device's peak.
Each is the best of `--repeats` calls after one that compiles it. This is
where a sweep's early layers spend their time (docs/performance.md, "The
sender stack's layout").

    python benchmarks/bench_pass.py [--n-prompts 10] [--width 8] [--layers 0 6 11 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt2_sweep import gpt2_shaped, random_prompts_task  # noqa: E402
from common import device_peak_flops, environment, print_table, write_json  # noqa: E402

from acdc_jax.algorithms.attribution import receiver_layers, setup  # noqa: E402
from acdc_jax.candidates import Candidates  # noqa: E402
from acdc_jax.precision import PRECISIONS, matmul_precision  # noqa: E402
from acdc_jax.programs import Shape, compile_seconds  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, its compiling included; best of `repeats` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=10)
    parser.add_argument("--n-pos", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 3, 6, 9, 11, 12])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="float32", choices=PRECISIONS)
    args = parser.parse_args(argv)

    model = gpt2_shaped()
    task = random_prompts_task(args.n_prompts, args.n_pos)
    with matmul_precision(args.precision):
        graph, scorer, _ = setup(model, task)
        ones = np.ones(graph.n_edges, np.float32)
        layers = receiver_layers(graph)
        peak, peak_source = device_peak_flops("float32", args.precision)
        full_first, full_s = timed(lambda: scorer.full(ones), args.repeats)
        full_flops = scorer.flops_of_pass(0, graph.n_heads)
        rows = [{"start_layer": "full", "width": 1, "first_s": full_first, "s": full_s, "s_per_candidate": full_s,
                 "over_full_pass": 1.0, "flops_per_s": full_flops / full_s, "fraction_of_peak": full_flops / full_s / peak}]
        for layer in args.layers:
            edges = np.nonzero(layers == layer)[0][: args.width]
            cands = Candidates(ones, edges[:, None])
            shape = Shape("pass", layer, args.width, None, None)
            before = compile_seconds()
            first, best = timed(lambda: scorer.batch(cands, layer, args.width, shape), args.repeats)
            flops = scorer.flops_of_program(shape)
            rows.append({"start_layer": layer, "width": args.width, "first_s": first, "s": best,
                         "compile_s": compile_seconds() - before, "s_per_candidate": best / args.width,
                         "over_full_pass": best / args.width / full_s, "flops_per_s": flops / best,
                         "fraction_of_peak": flops / best / peak})
    columns = ["start_layer", "width", "first_s", "s", "s_per_candidate", "over_full_pass", "flops_per_s",
               "fraction_of_peak"]
    print_table(rows, columns)
    write_json(f"bench_pass-{args.precision}", {
        "environment": environment(), "model": model.config.to_dict(), "precision": args.precision,
        "task": {"n_prompts": args.n_prompts, "n_pos": args.n_pos, "metric": "kl at the last position"},
        "timing": "best of --repeats calls after a first one that compiles; a pass: --width candidates, each one "
                  "edge cut into the start layer's receivers, every head recomputed, no shared upstream sum; "
                  "full: one pass over the whole model, the sequential loop's unit",
        "peak_flops_per_s": peak, "peak_source": peak_source, "rows": rows})


if __name__ == "__main__":
    main()

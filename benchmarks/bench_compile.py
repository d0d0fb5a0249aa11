"""Seconds to compile the programs of a GPT-2-small-shaped sweep, under this process's XLA flags.

On the first H200 lent to this project a pass program took 14-27 s to
compile, against milliseconds to run, so compiling decided both GPU figures
(benchmarks/README.md, "On a lent H200"). This benchmark compiles, and runs
once, the programs a sweep starts with: the reference full pass, the pass
from the logits, from the last layer and from layer 0 (as the width plan
gives them), and records each one's compile seconds (tracing, lowering and
XLA, from jax.monitoring) and its first run. `run_all.py` runs it as it is
and under XLA flags that switch GPU autotuning off (`compile-no-autotune`,
`compile-no-fusion-autotuner`); an unknown flag makes XLA abort, which the
summary shows as a failed run.

    python benchmarks/bench_compile.py [--n-prompts 100] [--n-pos 16] [--precision tensorfloat32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt2_sweep import gpt2_shaped, random_prompts_task  # noqa: E402
from common import GPT2_SMALL, block, environment, print_table, write_json  # noqa: E402

from acdc_jax.algorithms.attribution import receiver_layers, setup  # noqa: E402
from acdc_jax.candidates import Candidates  # noqa: E402
from acdc_jax.memory import default_max_width, plan_batch  # noqa: E402
from acdc_jax.precision import PRECISIONS, matmul_precision  # noqa: E402
from acdc_jax.programs import compile_seconds  # noqa: E402


def timed(fn):
    """(compile seconds, wall seconds) of `fn()`, its result fetched."""
    before, start = compile_seconds(), time.perf_counter()
    block(fn())
    return compile_seconds() - before, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--n-pos", type=int, default=16)
    parser.add_argument("--precision", default="tensorfloat32", choices=PRECISIONS)
    args = parser.parse_args(argv)
    model, task = gpt2_shaped(), random_prompts_task(args.n_prompts, args.n_pos)
    rows = []

    def save():
        write_json("bench_compile", {
            "environment": environment(), "model": GPT2_SMALL.to_dict(), "precision": args.precision,
            "task": {"n_prompts": args.n_prompts, "n_pos": args.n_pos, "metric": "kl at the last position"},
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "note": "compile_s: tracing, lowering and XLA compilation (jax.monitoring) of each program's first "
                    "call; wall_s: that call, compiling included", "rows": rows})

    with matmul_precision(args.precision):
        made, row = {}, {"program": "setup (corrupted run, deviations)"}
        row["compile_s"], row["wall_s"] = timed(lambda: made.setdefault("setup", setup(model, task)))
        rows.append(row)
        graph, scorer, _ = made["setup"]
        widths, _ = plan_batch(model, graph, args.n_prompts, args.n_pos, 1, default_max_width())
        ones, layers = np.ones(graph.n_edges, np.float32), receiver_layers(graph)
        row = {"program": "full pass"}
        row["compile_s"], row["wall_s"] = timed(lambda: scorer.full(ones))
        rows.append(row)
        save()
        for start in (graph.n_layers, graph.n_layers - 1, 0):
            cuts = np.flatnonzero(layers == start)[:widths[start], None]
            cands = Candidates(ones, cuts)
            program = scorer.choose(cands, start, widths[start])
            row = {"program": f"pass from {'the logits' if start == graph.n_layers else f'layer {start}'}",
                   "width": widths[start], "shape": str(program)}
            row["compile_s"], row["wall_s"] = timed(lambda: scorer.batch(cands, start, widths[start], shape=program))
            row["second_run_s"] = timed(lambda: scorer.batch(cands, start, widths[start], shape=program))[1]
            rows.append(row)
            save()
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    print_table(rows, ["program", "width", "compile_s", "wall_s", "second_run_s"])


if __name__ == "__main__":
    main()

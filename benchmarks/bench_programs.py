"""How many programs a GPT-2-small sweep compiles on an accelerator, and what they cost.

Every new pass shape (start layer, width, heads recomputed, cached senders
re-mixed) is an XLA compilation, seconds each, against passes of milliseconds
on a GPU; a 60 s sweep cannot afford dozens. This benchmark records the pass
shapes that a GPT-2-small-graph sweep needs, in order, from the synthetic
accelerator run of bench_host_overhead.py (the real acdc() loop with synthetic
passes), and replays them through the program chooser (`programs.Programs`)
with a given compile time and device FLOP rate, the FLOPs of each shape
counted for GPT-2 small with 100 prompts x 16 tokens, under four policies:
exact shapes (with ski rental); a cover (every head, no shared upstream sum)
as the first program from each layer; and one cover from layer 0 that every
layer's passes rent (as acdc-jax does on accelerators where the memory plan
gives the layers the same width, as in this replay); and the logits' pass,
that cover and then each layer's own compiled ahead by `--workers`
background threads (acdc-jax's default on accelerators since 2026-12-05:
`acdc_jax/compile_ahead.py`), a pass
waiting only for a program it needs that is not ready, on a clock; and the
same with the programs the rental buys later compiled by the next free
thread while the passes rent (the default since 2026-12-06). The
outputs are a replay under stated costs, not timings: the compile seconds and
FLOP rate are inputs, the threads are taken not to slow each other or the
device; bench_gpt2_sweep.py measures them.

    python benchmarks/bench_programs.py [--width 32] [--kept 0.05 0.5] [--compile-s 1 3 14] [--tflops 200]
                                        [--workers 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host_overhead import run  # noqa: E402
from common import GPT2_SMALL, print_table, write_json  # noqa: E402

from acdc_jax.graph import CircuitGraph  # noqa: E402
from acdc_jax.programs import Programs, Shape  # noqa: E402
from acdc_jax.scoring import Scorer, shape_flops  # noqa: E402

N_PROMPTS, N_POS = 100, 16


def shapes_needed(width: int, kept: float) -> list[Shape]:
    """The pass shapes a synthetic accelerator sweep asks for, in order."""
    needs, choose = [], Scorer.choose

    def record(self, cands, start_layer, w, **kwargs):
        needs.append(self.need(cands, start_layer, w))
        return choose(self, cands, start_layer, w, **kwargs)

    Scorer.choose = record
    try:
        run(width, kept)
    finally:
        Scorer.choose = choose
    return needs


POLICIES = {"exact": "exact shapes", "cover": "a cover per layer", "shared": "one cover from layer 0",
            "ahead": "covers compiled ahead", "buy": "and buys compiled ahead"}


def replay(needs: list[Shape], compile_s: float, flops_per_s: float, policy: str, workers: int = 4) -> dict:
    graph = CircuitGraph(GPT2_SMALL)
    flops = lambda s: float(shape_flops(graph, s, N_PROMPTS, N_POS, 1))  # as the Scorer counts them
    if policy in ("ahead", "buy"):
        return replay_ahead(needs, compile_s, flops_per_s, workers, graph, flops, buy=policy == "buy")

    programs = Programs()
    programs.compile_costs, programs.seconds_per_flop = {"pass": [compile_s]}, 1.0 / flops_per_s
    compiled, work, extra, cached_heads = 0, 0.0, 0.0, set()
    for need in needs:
        cover = None
        if policy != "exact" and need.start_layer < graph.n_layers:
            cover = need.cover(0 if policy == "shared" else None)
        shape = programs.choose(need, flops, cover)
        if shape not in programs.compiled:
            programs.compiled.add(shape)
            compiled += 1
        if shape.heads is not None:  # the layer's head cache runs a program of its own
            cached_heads.add(shape.start_layer)
        work += flops(need) / flops_per_s
        extra += (flops(shape) - flops(need)) / flops_per_s
    n = compiled + len(cached_heads)
    return {"policy": POLICIES[policy], "compile_s_each": compile_s,
            "tflops": flops_per_s / 1e12, "passes": len(needs), "pass_programs": compiled,
            "head_cache_programs": len(cached_heads), "compile_s": n * compile_s, "needed_work_s": work,
            "extra_work_s": extra, "total_s": n * compile_s + work + extra}


def replay_ahead(needs: list[Shape], compile_s: float, flops_per_s: float, workers: int, graph, flops,
                 buy: bool = False) -> dict:
    """The logits' pass, the shared cover from layer 0, then each later
    layer's own, latest first, compiled from time 0 by `workers` threads; the
    passes on a clock that waits for a program compiling ahead and stops for
    any other. `buy`: a program the rental buys (and its head cache) is
    compiled by the next free thread too, the passes renting meanwhile."""
    programs = Programs()
    programs.compile_costs, programs.seconds_per_flop = {"pass": [compile_s]}, 1.0 / flops_per_s
    width = max(n.width for n in needs if n.start_layer < graph.n_layers)
    # as compile_ahead.covers: the logits' pass (every sender re-mixed), the shared cover, each later layer's own
    ahead = [Shape("pass", layer, width, None, None)
             for layer in [graph.n_layers, 0, *range(graph.n_layers - 1, 0, -1)]]
    ready = {s: (i // workers + 1) * compile_s for i, s in enumerate(ahead)}
    free = sorted(ready.values())[-workers:]  # when each thread is next free
    clock = waited = blocked = work = extra = 0.0
    compiled, cached_heads, used, bought = 0, set(), set(), set()

    def buy_ahead(shape: Shape) -> bool:  # as compile_ahead.buy: the program, and the head cache its first run needs
        jobs = [shape]
        if shape.heads is not None and shape.start_layer not in cached_heads:
            jobs.append(Shape("heads", shape.start_layer, 1, None, None))
        for job in jobs:
            if job not in ready:
                free.sort()
                ready[job] = free[0] = max(free[0], clock) + compile_s
                bought.add(job)
        return True

    for need in needs:
        programs.compiled |= {s for s, at in ready.items() if at <= clock and s.kind == "pass"}
        cover = need.cover(0) if need.start_layer < graph.n_layers else None
        shape = programs.choose(need, flops, cover, buy_ahead=buy_ahead if buy else None)
        if shape not in programs.compiled:
            if shape in ready:
                waited += max(ready[shape] - clock, 0.0)
                clock = max(clock, ready[shape])
            else:
                clock, blocked, compiled = clock + compile_s, blocked + compile_s, compiled + 1
            programs.compiled.add(shape)
        if shape.heads is not None and shape.start_layer not in cached_heads:
            cached_heads.add(shape.start_layer)
            heads = Shape("heads", shape.start_layer, 1, None, None)
            if heads in ready:
                waited += max(ready[heads] - clock, 0.0)
                clock = max(clock, ready[heads])
            else:
                clock, blocked = clock + compile_s, blocked + compile_s
        used.add(shape)
        clock += flops(shape) / flops_per_s
        work += flops(need) / flops_per_s
        extra += (flops(shape) - flops(need)) / flops_per_s
    started = set(ahead) | {s for s in bought if s.kind == "pass"}
    return {"policy": POLICIES["buy" if buy else "ahead"], "compile_s_each": compile_s,
            "tflops": flops_per_s / 1e12, "passes": len(needs), "pass_programs": compiled + len(used & started),
            "head_cache_programs": len(cached_heads), "compiled_ahead": len(ahead) + len(bought),
            "compiled_ahead_and_run": len(used & started), "compile_s": blocked, "waited_s": waited,
            "needed_work_s": work, "extra_work_s": extra, "total_s": clock}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=32, help="pass width (an H100's plan: 8-32)")
    parser.add_argument("--kept", type=float, nargs="+", default=[0.05, 0.5])
    parser.add_argument("--compile-s", type=float, nargs="+", default=[1.0, 3.0, 14.0],
                        help="seconds per compilation (14: measured on an H200)")
    parser.add_argument("--tflops", type=float, default=200.0, help="achieved TFLOP/s of the passes")
    parser.add_argument("--workers", type=int, default=4, help="threads compiling ahead")
    args = parser.parse_args(argv)
    rows = []
    for kept in args.kept:
        needs = shapes_needed(args.width, kept)
        for compile_s in args.compile_s:
            for policy in POLICIES:
                rows.append({"target_kept": kept, **replay(needs, compile_s, args.tflops * 1e12, policy,
                                                            args.workers)})
    print_table(rows, ["target_kept", "policy", "compile_s_each", "passes", "pass_programs", "head_cache_programs",
                       "compile_s", "waited_s", "needed_work_s", "extra_work_s", "total_s"])
    write_json("bench_programs", {
        "graph": "GPT-2 small: 32,923 edges", "task": {"n_prompts": N_PROMPTS, "n_pos": N_POS},
        "width": args.width, "workers": args.workers,
        "shapes": "recorded from bench_host_overhead's synthetic accelerator sweep",
        "note": "a replay under the stated compile seconds and FLOP rate (inputs), not a timing; compile_s: "
                "seconds the passes stopped for compiling (ahead: not counting waits for programs compiled ahead, "
                "waited_s)",
        "rows": rows})


if __name__ == "__main__":
    main()

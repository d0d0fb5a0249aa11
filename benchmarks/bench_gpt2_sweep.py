"""Exact ACDC over a GPT-2-small-shaped model: every edge, one threshold.

GPT-2 small's shape (12 layers, 12 heads, d_model 768, d_mlp 3072, vocabulary
50257; 32,923 edges with split q/k/v inputs) with seeded random weights, scaled
so that the output distribution is not flat; 100 random prompts of 16 tokens,
random corrupted prompts, KL at the last position. The target is the whole
sweep in under 60 s on one H100.

On a CPU the sweep takes days, so ``--stop-after`` (default 300 s on CPU)
ends it early; the JSON then records the edges decided, edges per second and
a projection of the full sweep's time, labelled as such. Reported FLOPs are
the matrix-multiply FLOPs of the passes run (acdc_jax.flops), against the
model's forward FLOPs per edge and against the device's peak.

With ``--disk-cache DIR`` the compiled programs are kept in DIR (JAX's
persistent compilation cache, as the CLI does by default): a first run fills
it, and a second run in a fresh process with the same DIR loads its programs
instead of compiling them (the JSON's tag ends in ``-disk-cache-cold`` or
``-warm``, from whether DIR held programs before).

On accelerators acdc compiles each layer's cover program in background
threads while the first passes run; the JSON splits the compile seconds into
those the run itself spent compiling and waiting for them and the rest.
``--covers-ahead off`` compiles each when first needed, the baseline (tag
``-no-covers-ahead``).

    python benchmarks/bench_gpt2_sweep.py [--n-prompts 100] [--tau 0.001] [--stop-after S] [--dtype bfloat16]
                                          [--disk-cache DIR] [--covers-ahead off]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GPT2_SMALL, device_peak_flops, environment, print_table, result_path, write_json  # noqa: E402

from acdc_jax.acdc import acdc  # noqa: E402
from acdc_jax.cli import ON_OFF  # noqa: E402
from acdc_jax.precision import PRECISIONS  # noqa: E402
from acdc_jax.flops import forward_flops, sweep_floor  # noqa: E402
from acdc_jax.model import Transformer  # noqa: E402
from acdc_jax.programs import compile_seconds, thread_compile_seconds  # noqa: E402
from acdc_jax.tasks.base import Task, kl_divergence  # noqa: E402

def gpt2_shaped(seed: int = 0, config=GPT2_SMALL) -> Transformer:
    """Random GPT-2-small-shaped weights (or `config`'s); embeddings and
    unembedding scaled up so that the next-token distribution is peaked, as
    in a trained model."""
    import equinox as eqx

    model = Transformer(config, key=jax.random.PRNGKey(seed))
    model = eqx.tree_at(lambda m: m.embed.W_E, model, model.embed.W_E * 5.0)
    return eqx.tree_at(lambda m: m.unembed.W_U, model, model.unembed.W_U * 20.0)


def random_prompts_task(n_prompts: int, n_pos: int) -> Task:
    """Seeded random clean and corrupted prompts over GPT-2's vocabulary, KL at the last position."""
    rng = np.random.default_rng(0)
    shape = (n_prompts, n_pos)
    clean, corrupted = rng.integers(0, GPT2_SMALL.d_vocab, shape), rng.integers(0, GPT2_SMALL.d_vocab, shape)
    return Task("random-prompts", clean, corrupted, positions=np.array([n_pos - 1]), metrics={"kl": kl_divergence})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--n-pos", type=int, default=16)
    parser.add_argument("--tau", type=float, default=0.001)
    parser.add_argument("--stop-after", type=float, help="seconds (default: 300 on CPU, none elsewhere)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="float32 matmuls: full float32 (acdc's default) or TF32 tensor cores on NVIDIA GPUs")
    parser.add_argument("--mesh", default=None, help="'auto' or CxP to use several devices")
    parser.add_argument("--trace", help="write a jax.profiler trace here (open with TensorBoard or Perfetto)")
    parser.add_argument("--rescore-ties", choices=["on", "off"],
                        help="rescore trials within rounding of tau in full passes (default: on in full float32 only)")
    parser.add_argument("--disk-cache", metavar="DIR", help="keep compiled programs in DIR (and load those there)")
    parser.add_argument("--covers-ahead", choices=["on", "off"], default="on",
                        help="on accelerators, compile each layer's cover program in background threads (default) "
                             "or when first needed (off: the baseline)")
    args = parser.parse_args(argv)
    if args.covers_ahead == "off":
        os.environ["ACDC_JAX_COVERS_AHEAD"] = "0"
    cached_before = None
    if args.disk_cache:
        from acdc_jax.programs import use_disk_cache

        cached_before = sum(1 for p in Path(args.disk_cache).rglob("*") if p.is_file())
        use_disk_cache(args.disk_cache)
    stop = args.stop_after if args.stop_after is not None else (300.0 if jax.default_backend() == "cpu" else None)

    model = gpt2_shaped()
    task = random_prompts_task(args.n_prompts, args.n_pos)

    start, compiling, main_compiling = time.perf_counter(), compile_seconds(), thread_compile_seconds()
    with (jax.profiler.trace(args.trace) if args.trace else contextlib.nullcontext()):
        circuit = acdc(model, task, args.tau, progress=False, stop_after=stop, dtype=args.dtype,
                       precision=args.precision, mesh=args.mesh,
                       rescore_ties=ON_OFF[args.rescore_ties])
    seconds, compiling = time.perf_counter() - start, compile_seconds() - compiling
    main_compiling = thread_compile_seconds() - main_compiling
    n_edges = circuit.graph.n_edges
    decided = len(circuit.decisions)
    fwd = args.n_prompts * forward_flops(GPT2_SMALL, args.n_pos)
    flops = circuit.settings["flops"]
    peak, peak_source = device_peak_flops(args.dtype, args.precision)
    floor = args.n_prompts * sweep_floor(circuit.graph, args.n_pos, 1)  # every edge once, nothing wasted
    row = {"edges": n_edges, "decided": decided, "finished": circuit.settings["finished"], "seconds": seconds,
           "edges_per_s": decided / seconds, "projected_full_sweep_s": n_edges / (decided / seconds),
           "passes": circuit.settings["passes"], "full_passes": circuit.settings["full_passes"],
           "rescore_ties": circuit.settings["rescore_ties"], "rescored": circuit.settings["rescored"],
           "checked_programs": circuit.settings["checked_programs"], "width": circuit.settings["width"],
           "widths_per_start_layer": circuit.settings["widths"], "prompt_chunk": circuit.settings["prompt_chunk"],
           "compile_s": compiling, "disk_cache_files_before": cached_before,
           # the run's executables, compiled and read back from disk
           "programs_compiled": circuit.settings["programs_compiled"],
           "programs_loaded": circuit.settings["programs_loaded"],
           # compiling ahead: programs compiled in background threads, and the seconds the run itself spent
           # compiling and waiting for those (the rest of compile_s overlapped with passes or each other)
           "compiled_ahead": circuit.settings["compiled_ahead"], "bought_ahead": circuit.settings["bought_ahead"],
           "compiled_ahead_and_run": circuit.settings["compiled_ahead_and_run"], "compile_main_thread_s": main_compiling,
           "compile_wait_s": circuit.settings["compile_wait_seconds"],
           "programs": circuit.settings["programs"],
           "passes_in_larger_programs": circuit.settings["passes_in_larger_programs"],
           "kept_so_far": int(sum(d.kept for d in circuit.decisions)),
           "flops_per_edge": flops / decided, "forward_flops": fwd, "flops_per_edge_over_forward": flops / decided / fwd,
           "floor_flops_per_edge_over_forward": floor / n_edges / fwd, "floor_s_at_peak": floor / peak,
           "achieved_flops_per_s": flops / seconds, "peak_flops_per_s": peak,
           "fraction_of_peak": None if peak is None else flops / seconds / peak}
    codes = "".join("k" if d.kept else ("r" if d.tried else "p") for d in circuit.decisions)
    tag = args.dtype if args.dtype != "float32" or args.precision == "float32" else args.precision
    tag += {"on": "-rescoring", "off": "-no-rescoring", None: ""}[args.rescore_ties]
    tag += "-no-covers-ahead" if args.covers_ahead == "off" else ""
    if args.disk_cache and cached_before:  # the same decisions as the run that filled the cache, as far as both went
        cold = result_path(f"bench_gpt2_sweep-{tag}-disk-cache-cold")
        earlier = json.loads(cold.read_text()) if cold.exists() else {}
        if earlier.get("disk_cache") == args.disk_cache:  # the run that filled this directory
            before = earlier.get("decisions", "")
            n = min(len(before), len(codes))
            row.update(compared_with_cold=n, same_as_cold=before[:n] == codes[:n])
    print_table([row], ["edges", "decided", "finished", "seconds", "compile_s", "compile_main_thread_s",
                        "compile_wait_s", "programs", "programs_compiled", "programs_loaded", "passes", "full_passes",
                        "rescored", "edges_per_s",
                        "projected_full_sweep_s", "floor_s_at_peak",
                        "flops_per_edge_over_forward", "achieved_flops_per_s", "fraction_of_peak", "same_as_cold"])
    if args.disk_cache:
        tag += "-disk-cache-warm" if cached_before else "-disk-cache-cold"
    write_json(f"bench_gpt2_sweep-{tag}", {
        "environment": environment(), "model": GPT2_SMALL.to_dict(),
        "weights": "random (seeded), embeddings x5 and unembedding x20 for a peaked output",
        "task": {"n_prompts": args.n_prompts, "n_pos": args.n_pos, "metric": "kl at the last position", "tau": args.tau},
        "dtype": args.dtype, "precision": circuit.settings["precision"], "mesh": args.mesh, "stop_after_s": stop,
        "disk_cache": args.disk_cache, "peak_source": peak_source,
        "note": "projected_full_sweep_s extrapolates edges_per_s over all edges when the run was stopped early; "
                "FLOPs are matrix-multiply FLOPs counted by acdc_jax.flops; decisions: one letter per decision in "
                "ACDC's order (k kept, r removed, p pruned untried)",
        "decisions": codes, "rows": [row]})


if __name__ == "__main__":
    main()
    # A run stopped early may leave programs compiling in background threads for layers it never reached; a
    # normal exit waits for them (14-27 s each on an H200). Everything is written, so leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

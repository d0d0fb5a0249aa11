"""ACDC wall time: sequential loop vs batched (speculative) passes vs auto-circuit's ACDC.

One process, one model, one task, the same thresholds. The model has the shape
of attn-only-4l (the docstring model of the ACDC paper: 4 layers, 8 heads,
d_model 512, vocabulary 48262, shortformer positions) with random weights,
written as a TransformerLens checkpoint so that auto-circuit can load the very
same weights. The task is random clean and corrupted prompts, KL divergence at
the last position. The graph is auto-circuit's: q/k/v inputs split, no q/k/v
step edges, one embedding sender.

auto-circuit runs where its interpreter is given (``--auto-circuit-python``,
a venv made as auto_circuit_acdc.py says). Its ACDC visits
edges in its own order (all edges sorted by receiver layer, in Python set order
within a layer, with no skipping of receivers cut off from the output), so its
circuit need not equal the paper's ACDC; the table reports the overlap. To check
that both compute the same thing, acdc-jax is also run (batched) with
``order=`` auto-circuit's order, which must give auto-circuit's circuit.

    python benchmarks/bench_acdc.py [--taus 0.02 0.1] [--auto-circuit-python PATH]
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json  # noqa: E402

from acdc_jax.acdc import acdc  # noqa: E402
from acdc_jax.precision import PRECISIONS  # noqa: E402
from acdc_jax.flops import forward_flops, sweep_floor  # noqa: E402
from acdc_jax.programs import compile_seconds  # noqa: E402
from acdc_jax.tasks.base import Task, kl_divergence  # noqa: E402

ATTN_ONLY_4L = dict(n_layers=4, d_model=512, n_heads=8, d_head=64, d_vocab=48262, d_vocab_out=48262, n_ctx=64,
                    attn_only=True, normalization_type="LN", act_fn="gelu_new", positional_embedding_type="shortformer",
                    eps=1e-5, attention_dir="causal", d_mlp=None)


def random_tl_checkpoint(directory: Path, cfg: dict, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    L, D, H, K, V = cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_vocab"]
    r = lambda std, *s: (std * rng.standard_normal(s)).astype(np.float32)
    sd = {"embed.W_E": r(0.2, V, D), "pos_embed.W_pos": r(0.2, cfg["n_ctx"], D), "unembed.W_U": r(0.2, D, V),
          "unembed.b_U": r(0.2, V), "ln_final.w": 1 + r(0.2, D), "ln_final.b": r(0.2, D)}
    for l in range(L):
        p = f"blocks.{l}."
        for n in "QKV":
            sd[p + f"attn.W_{n}"], sd[p + f"attn.b_{n}"] = r(0.06, H, D, K), r(0.2, H, K)
        sd[p + "attn.W_O"], sd[p + "attn.b_O"] = r(0.06, H, K, D), r(0.2, D)
        sd[p + "ln1.w"], sd[p + "ln1.b"] = 1 + r(0.2, D), r(0.2, D)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))


def model_and_task(tmp: Path, n_prompts: int, n_pos: int):
    """The benchmark model (written to `tmp`/model as a TransformerLens checkpoint
    and converted from it) and its task: random clean and corrupted prompts
    (saved to `tmp`/prompts.npz), KL at the last position, auto-circuit's graph."""
    import converters

    random_tl_checkpoint(tmp / "model", ATTN_ONLY_4L)
    model = converters.convert(tmp / "model", format="transformer-lens")
    rng = np.random.default_rng(1)
    shape = (n_prompts, n_pos)
    clean, corrupted = rng.integers(0, ATTN_ONLY_4L["d_vocab"], shape), rng.integers(0, ATTN_ONLY_4L["d_vocab"], shape)
    np.savez(tmp / "prompts.npz", clean=clean, corrupted=corrupted)
    task = Task("random-prompts", clean, corrupted, positions=np.array([n_pos - 1]), metrics={"kl": kl_divergence},
                graph_options=dict(split_qkv=True, qkv_edges=False, split_embed=False))
    return model, task


def run_ours(model, task, tau, mode, order=None, precision="float32", sparse="auto"):
    start, compiling = time.perf_counter(), compile_seconds()
    circuit = acdc(model, task, tau, mode=mode, progress=False, order=order, precision=precision, sparse=sparse)
    circuit.settings["compile_s"] = compile_seconds() - compiling
    return time.perf_counter() - start, circuit


def run_auto_circuit(python: str, directory: Path, prompts: Path, tau: float):
    script = Path(__file__).with_name("auto_circuit_acdc.py")
    out = subprocess.run([python, str(script), str(directory), str(prompts), repr(tau)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--n-pos", type=int, default=24)
    parser.add_argument("--auto-circuit-python", default=None)
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="float32 matmuls: full float32 (acdc's default) or TF32 tensor cores on NVIDIA GPUs")
    parser.add_argument("--disk-cache", action="store_true",
                        help="also time batched runs in fresh processes: the first fills a compilation cache on "
                             "disk (acdc_jax.use_disk_cache), the second loads its programs from there")
    parser.add_argument("--sparse", default="auto", choices=["auto", "on", "off"],
                        help="the batched runs' sparse passes (acdc's sparse=; default auto)")
    parser.add_argument("--child", nargs=2, metavar=("TAU", "CACHE_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true",
                        help="also time a second run of each mode in the same process (compiled programs reused)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_acdc_"))
    atexit.register(shutil.rmtree, tmp, True)  # the model's checkpoint is 200 MB
    if args.child:  # one batched run in this fresh process, its programs cached on disk
        from acdc_jax.programs import use_disk_cache

        use_disk_cache(args.child[1])
        model, task = model_and_task(tmp, args.n_prompts, args.n_pos)
        seconds, circuit = run_ours(model, task, float(args.child[0]), "batched", precision=args.precision,
                                    sparse=args.sparse)
        print(json.dumps({"seconds": seconds, "compile_s": circuit.settings["compile_s"],
                          "programs_compiled": circuit.settings["programs_compiled"],
                          "programs_loaded": circuit.settings["programs_loaded"],
                          "mask": circuit.mask.astype(int).tolist()}))
        return
    model, task = model_and_task(tmp, args.n_prompts, args.n_pos)

    fwd = args.n_prompts * forward_flops(model.config, args.n_pos)  # the plain model, logits everywhere
    floor = args.n_prompts * sweep_floor(task.graph(model), args.n_pos, 1)  # every edge once, nothing wasted
    rows = []

    def save(partial=None):  # after each run, so that a time limit keeps what was measured
        write_json("bench_acdc" + ("" if args.precision == "float32" else f"-{args.precision}"), {
            "environment": environment(),
            "model": ATTN_ONLY_4L, "precision": args.precision, "weights": "random (seeded), TransformerLens layout",
            "task": {"n_prompts": args.n_prompts, "n_pos": args.n_pos, "metric": "kl at the last position",
                     "corruption": "random corrupted prompts"},
            "timing": "wall time of one acdc() call including compilation (compile_s: its tracing, lowering and XLA "
                      "compilation, from jax.monitoring); warm: a second call in the same process; sparse: the "
                      "batched calls' sparse= argument; disk_cached: the same call in a fresh process whose programs "
                      "a previous fresh process left in acdc_jax.use_disk_cache's directory; auto-circuit: its "
                      "acdc_prune_scores call",
            "rows": rows + ([partial] if partial else []), "complete": partial is None})

    for tau in args.taus:
        t_seq, seq = run_ours(model, task, tau, "sequential", precision=args.precision)
        n = seq.graph.n_edges
        row = {"tau": tau, "edges": n, "sequential_s": t_seq, "seq_passes": seq.settings["passes"],
               "seq_flops_per_edge_over_forward": seq.settings["flops"] / n / fwd,
               "seq_compile_s": seq.settings["compile_s"]}
        save(row)
        t_bat, bat = run_ours(model, task, tau, "batched", precision=args.precision, sparse=args.sparse)
        row.update({
            "kept": bat.n_edges, "batched_s": t_bat, "speedup": t_seq / t_bat, "bat_passes": bat.settings["passes"],
            "batched_edges_per_s": n / t_bat, "same_as_sequential": bool(np.array_equal(seq.mask, bat.mask)),
            "bat_flops_per_edge_over_forward": bat.settings["flops"] / n / fwd,
            "floor_flops_per_edge_over_forward": floor / n / fwd, "bat_compile_s": bat.settings["compile_s"],
            "bat_programs": bat.settings["programs"], "bat_rescored": bat.settings["rescored"],
            "bat_near_tie_scale": bat.settings["near_tie_scale"],
            "bat_passes_in_larger_programs": bat.settings["passes_in_larger_programs"],
            "sparse": args.sparse, "bat_sparse_passes": bat.settings["sparse_passes"]})
        save(row)
        if args.warm:
            row["sequential_warm_s"] = run_ours(model, task, tau, "sequential", precision=args.precision)[0]
            t_warm, warm = run_ours(model, task, tau, "batched", precision=args.precision, sparse=args.sparse)
            row.update(batched_warm_s=t_warm, speedup_warm=row["sequential_warm_s"] / t_warm,
                       warm_sparse_passes=warm.settings["sparse_passes"],
                       warm_same_as_sequential=bool(np.array_equal(seq.mask, warm.mask)))
            save(row)
        if args.disk_cache:
            cache = tmp / f"xla-{tau}"
            child = [sys.executable, __file__, "--child", repr(tau), str(cache), "--n-prompts", str(args.n_prompts),
                     "--n-pos", str(args.n_pos), "--precision", args.precision, "--sparse", args.sparse]
            fresh, cached = (json.loads(subprocess.run(child, capture_output=True, text=True, check=True)
                                        .stdout.strip().splitlines()[-1]) for _ in range(2))
            row.update(batched_fresh_process_s=fresh["seconds"], batched_disk_cached_s=cached["seconds"],
                       batched_disk_cached_compile_s=cached["compile_s"],
                       # the run's executables: compiled (and written) by the first child, read back by the second
                       fresh_programs_compiled=fresh["programs_compiled"],
                       disk_cached_programs_compiled=cached["programs_compiled"],
                       disk_cached_programs_loaded=cached["programs_loaded"],
                       speedup_disk_cached=t_seq / cached["seconds"],
                       disk_cached_same_circuit=fresh["mask"] == cached["mask"] == bat.mask.astype(int).tolist())
        save(row)
        if args.auto_circuit_python:
            ac = run_auto_circuit(args.auto_circuit_python, tmp / "model", tmp / "prompts.npz", tau)
            ours, theirs = set(bat.edges), set(ac["kept"])
            t_ord, in_their_order = run_ours(model, task, tau, "batched", order=ac["order"], precision=args.precision,
                                             sparse=args.sparse)
            row.update(auto_circuit_s=ac["seconds"], auto_circuit_kept=len(theirs), auto_circuit_edges=ac["n_edges"],
                       speedup_vs_auto_circuit=ac["seconds"] / t_bat, jaccard_acdc_vs_auto_circuit=len(ours & theirs)
                       / max(len(ours | theirs), 1), batched_in_their_order_s=t_ord,
                       same_circuit_in_their_order=set(in_their_order.edges) == theirs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    columns = ["tau", "edges", "kept", "sequential_s", "batched_s", "speedup", "seq_passes", "bat_passes",
               "same_as_sequential", "seq_flops_per_edge_over_forward", "bat_flops_per_edge_over_forward",
               "floor_flops_per_edge_over_forward",
               "bat_compile_s", "bat_programs"]
    if args.warm:
        columns += ["sequential_warm_s", "batched_warm_s", "speedup_warm", "warm_sparse_passes",
                    "warm_same_as_sequential"]
    if args.disk_cache:
        columns += ["batched_fresh_process_s", "batched_disk_cached_s", "batched_disk_cached_compile_s",
                    "disk_cached_programs_compiled", "disk_cached_programs_loaded", "speedup_disk_cached",
                    "disk_cached_same_circuit"]
    if args.auto_circuit_python:
        columns += ["auto_circuit_s", "speedup_vs_auto_circuit", "batched_in_their_order_s",
                    "same_circuit_in_their_order", "jaccard_acdc_vs_auto_circuit"]
    print_table(rows, columns)


if __name__ == "__main__":
    main()

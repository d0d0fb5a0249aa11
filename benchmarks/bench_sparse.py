"""Batched ACDC with sparse passes off, on, and auto (`acdc(..., sparse=...)`).

The benchmark model of bench_acdc.py (attn-only-4l's shape, random weights,
KL at the last position). Each (prompts, tau, sparse) runs in a fresh process:
a cold call (compiling its programs), then a second call in the same process.
The decisions of every call are compared with the first dense call's.

    python benchmarks/bench_sparse.py [--taus 0.02 0.1] [--n-prompts 10 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json  # noqa: E402

MODES = ("off", "on", "auto")


def child(n_prompts: int, n_pos: int, tau: float, sparse: str) -> dict:
    from bench_acdc import model_and_task

    from acdc_jax import acdc
    from acdc_jax.programs import compile_seconds

    with tempfile.TemporaryDirectory(prefix="bench_sparse_") as tmp:  # the model's checkpoint is 200 MB
        model, task = model_and_task(Path(tmp), n_prompts, n_pos)
    out = {}
    for name in ("cold", "warm"):
        start, compiling = time.perf_counter(), compile_seconds()
        circuit = acdc(model, task, tau, progress=False, sparse=sparse)
        out[name] = {"seconds": time.perf_counter() - start, "compile_s": compile_seconds() - compiling,
                     "passes": circuit.settings["passes"], "sparse_passes": circuit.settings["sparse_passes"],
                     "programs": circuit.settings["programs"], "flops": circuit.settings["flops"],
                     "kept": [d.kept for d in circuit.decisions]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--n-prompts", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--n-pos", type=int, default=24)
    parser.add_argument("--child", nargs=3, metavar=("N_PROMPTS", "TAU", "SPARSE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        n, tau, sparse = args.child
        print(json.dumps(child(int(n), args.n_pos, float(tau), sparse)))
        return

    rows = []
    for n in args.n_prompts:
        for tau in args.taus:
            runs = {}
            for sparse in MODES:
                cmd = [sys.executable, __file__, "--child", str(n), repr(tau), str(sparse), "--n-pos", str(args.n_pos)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[sparse] = json.loads(out.strip().splitlines()[-1])
            dense, sparse, auto = runs["off"], runs["on"], runs["auto"]
            ref = dense["cold"]["kept"]
            row = {"n_prompts": n, "tau": tau,
                   "dense_cold_s": dense["cold"]["seconds"], "sparse_cold_s": sparse["cold"]["seconds"],
                   "auto_cold_s": auto["cold"]["seconds"],
                   "dense_warm_s": dense["warm"]["seconds"], "sparse_warm_s": sparse["warm"]["seconds"],
                   "auto_warm_s": auto["warm"]["seconds"],
                   "cold_ratio": dense["cold"]["seconds"] / sparse["cold"]["seconds"],
                   "warm_ratio": dense["warm"]["seconds"] / sparse["warm"]["seconds"],
                   "auto_cold_ratio": dense["cold"]["seconds"] / auto["cold"]["seconds"],
                   "auto_warm_ratio": dense["warm"]["seconds"] / auto["warm"]["seconds"],
                   "dense_compile_s": dense["cold"]["compile_s"], "sparse_compile_s": sparse["cold"]["compile_s"],
                   "auto_compile_s": auto["cold"]["compile_s"],
                   "dense_programs": dense["cold"]["programs"], "sparse_programs": sparse["cold"]["programs"],
                   "sparse_passes": sparse["cold"]["sparse_passes"], "passes": sparse["cold"]["passes"],
                   "auto_sparse_passes": [auto[k]["sparse_passes"] for k in ("cold", "warm")],
                   "flops_ratio": dense["cold"]["flops"] / sparse["cold"]["flops"],
                   "same_decisions": all(r[k]["kept"] == ref for r in runs.values() for k in ("cold", "warm"))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, ["n_prompts", "tau", "dense_cold_s", "sparse_cold_s", "auto_cold_s", "dense_warm_s",
                       "sparse_warm_s", "auto_warm_s", "sparse_compile_s", "dense_compile_s", "auto_compile_s",
                       "sparse_passes", "auto_sparse_passes", "passes", "flops_ratio", "same_decisions"])
    write_json("bench_sparse", {
        "environment": environment(),
        "model": "bench_acdc.py's (attn-only-4l shape, random weights)",
        "task": {"n_pos": args.n_pos, "metric": "kl at the last position", "corruption": "random corrupted prompts"},
        "timing": "wall time of acdc() in a fresh process (cold: compiling its programs) and of a second call in "
                  "it (warm); dense: sparse='off', sparse: 'on', auto: 'auto' (the default); ratio: dense seconds over "
                  "sparse (or auto) seconds; flops_ratio: the cold calls' counted FLOPs, dense over sparse",
        "rows": rows,
    })


if __name__ == "__main__":
    main()

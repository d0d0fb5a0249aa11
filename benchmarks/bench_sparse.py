"""Batched ACDC with sparse passes off, on, and auto (`acdc(..., sparse=...)`).

The benchmark model of bench_acdc.py (attn-only-4l's shape, random weights,
KL at the last position). Each (prompts, tau, sparse) runs in a fresh process:
a cold call (compiling its programs), then a second call in the same process.
The decisions of every call are compared with the first mode's first call's.

    python benchmarks/bench_sparse.py [--taus 0.02 0.1] [--n-prompts 10 40] [--modes off on auto]
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
LABELS = {"off": "dense", "on": "sparse", "auto": "auto"}


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
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="acdc's sparse= values to time (default: all three)")
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
            for sparse in args.modes:
                cmd = [sys.executable, __file__, "--child", str(n), repr(tau), str(sparse), "--n-pos", str(args.n_pos)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[sparse] = json.loads(out.strip().splitlines()[-1])
            ref = runs[args.modes[0]]["cold"]["kept"]
            row = {"n_prompts": n, "tau": tau}
            for mode, r in runs.items():
                name = LABELS[mode]
                row.update({f"{name}_cold_s": r["cold"]["seconds"], f"{name}_warm_s": r["warm"]["seconds"],
                            f"{name}_compile_s": r["cold"]["compile_s"], f"{name}_programs": r["cold"]["programs"],
                            f"{name}_sparse_passes": [r[k]["sparse_passes"] for k in ("cold", "warm")],
                            f"{name}_passes": [r[k]["passes"] for k in ("cold", "warm")]})
                if mode != "off" and "off" in runs:  # dense seconds over this mode's
                    row[f"{name}_cold_ratio"] = runs["off"]["cold"]["seconds"] / r["cold"]["seconds"]
                    row[f"{name}_warm_ratio"] = runs["off"]["warm"]["seconds"] / r["warm"]["seconds"]
            if "off" in runs and "on" in runs:
                row["flops_ratio"] = runs["off"]["cold"]["flops"] / runs["on"]["cold"]["flops"]
            row["same_decisions"] = all(r[k]["kept"] == ref for r in runs.values() for k in ("cold", "warm"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = [LABELS[m] for m in args.modes]
    print_table(rows, ["n_prompts", "tau"] + [f"{m}_{k}" for k in ("cold_s", "warm_s") for m in names]
                + [f"{m}_{k}" for m in names for k in ("compile_s", "sparse_passes")]
                + (["flops_ratio"] if "flops_ratio" in rows[0] else []) + ["same_decisions"])
    write_json("bench_sparse" + ("" if set(args.modes) == set(MODES) else "-" + "-".join(args.modes)), {
        "environment": environment(),
        "model": "bench_acdc.py's (attn-only-4l shape, random weights)",
        "task": {"n_pos": args.n_pos, "metric": "kl at the last position", "corruption": "random corrupted prompts"},
        "timing": "wall time of acdc() in a fresh process (cold: compiling its programs) and of a second call in "
                  "it (warm); dense: sparse='off', sparse: 'on', auto: 'auto' (the default); ratio: dense seconds over "
                  "sparse (or auto) seconds; flops_ratio: the cold calls' counted FLOPs, dense over sparse; "
                  "[cold, warm] for the passes",
        "rows": rows,
    })


if __name__ == "__main__":
    main()

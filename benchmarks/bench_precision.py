"""How often bf16 weights and activations (float32 metric) change ACDC's decisions.

For each task and tau, ACDC runs in float32 and in bfloat16 on the same model
and prompts. Reported: the edges whose final status (kept or removed) differs,
the first decision where the runs part (after that, the runs see different
circuits, so later differences are partly knock-on), the Jaccard overlap of the
circuits, the largest metric difference before the runs part, and wall times.

    python benchmarks/bench_precision.py [--tasks induction tracr-reverse] [--taus ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json  # noqa: E402

from acdc_jax import tasks  # noqa: E402
from acdc_jax.acdc import acdc  # noqa: E402

TAUS = {"induction": [0.003, 0.01, 0.03], "tracr-reverse": [1e-3, 1e-2, 0.1], "tracr-proportion": [1e-3, 1e-2, 0.1]}


def compare(f32, b16) -> dict:
    a, b = [(d.edge, d.kept) for d in f32.decisions], [(d.edge, d.kept) for d in b16.decisions]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    upto = len(a) if first is None else first
    gaps = [abs(x.metric_after - y.metric_after) for x, y in zip(f32.decisions[:upto], b16.decisions[:upto])
            if x.tried and y.tried]
    ea, eb = set(f32.edges), set(b16.edges)
    return {"edges": f32.graph.n_edges, "kept_f32": len(ea), "kept_bf16": len(eb),
            "status_differs": int(np.sum(f32.mask != b16.mask)),
            "status_differs_frac": float(np.mean(f32.mask != b16.mask)),
            "first_divergence": first, "decisions": len(a),
            "jaccard": len(ea & eb) / max(len(ea | eb), 1),
            "max_metric_gap_before_divergence": max(gaps) if gaps else 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TAUS))
    parser.add_argument("--taus", type=float, nargs="+", help="default: three per task")
    args = parser.parse_args(argv)
    rows = []
    for name in args.tasks:
        model, task = tasks.get(name)
        for tau in args.taus or TAUS[name]:
            t0 = time.perf_counter()
            f32 = acdc(model, task, tau, progress=False)
            t1 = time.perf_counter()
            b16 = acdc(model, task, tau, progress=False, dtype="bfloat16")
            t2 = time.perf_counter()
            row = {"task": name, "tau": tau, **compare(f32, b16), "f32_s": t1 - t0, "bf16_s": t2 - t1}
            rows.append(row)
            print(row, flush=True)
    print_table(rows, ["task", "tau", "edges", "kept_f32", "kept_bf16", "status_differs", "first_divergence",
                       "jaccard", "max_metric_gap_before_divergence", "f32_s", "bf16_s"])
    write_json("bench_precision", {"environment": environment(), "rows": rows,
                                   "note": "bf16 weights and activations, metric (log-softmax, KL/L2) in float32"})


if __name__ == "__main__":
    main()

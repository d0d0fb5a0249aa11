"""ACDC over nodes on a real pretrained model (the Hugging Face directory
`scripts/gguf_to_hf.py` writes), on IOI: SmolLM2-135M's 270 heads and 30
MLPs, where edge-level ACDC (124,021 edges) is a GPU job, or Gemma 3 270M's
72 heads and 18 MLPs.

    python benchmarks/pretrained_nodes.py --checkpoint smollm2/ [--examples 40] [--tau 0.02]
    python benchmarks/pretrained_nodes.py --model gemma3 --checkpoint gemma3/

In one process and on the same prompts: the batched walk, then the plain
sequential loop (one full pass per node; the baseline), their wall times
and passes, whether they made the same decisions, the heads and MLPs kept,
and each circuit's KL and logit difference IO - S against the full model's
and the empty circuit's. Prints tables and writes
benchmarks/results/MODEL_nodes-<backend>-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PRETRAINED, pretrained_args, print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pretrained_args(parser)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--skip-sequential", action="store_true", help="only the batched walk")
    args = parser.parse_args()

    from acdc_jax.algorithms import acdc_nodes
    from acdc_jax.evaluate import faithfulness
    from acdc_jax.tasks import get

    about = PRETRAINED[args.model]
    model, task = get("ioi", checkpoint=args.checkpoint, n_examples=args.examples, bos=about["bos"])
    runs = {}
    for mode in ("batched",) + (() if args.skip_sequential else ("sequential",)):
        t = time.perf_counter()
        circuit = acdc_nodes(model, task, args.tau, mode=mode, progress=False)
        seconds = time.perf_counter() - t
        runs[mode] = {"circuit": circuit, "seconds": seconds, "passes": circuit.settings["passes"],
                      "rescored": circuit.settings["rescored"]}
    circuit = runs["batched"]["circuit"]
    same = None
    if "sequential" in runs:
        seq = runs["sequential"]["circuit"]
        same = [(d.edge, d.kept) for d in seq.decisions] == [(d.edge, d.kept) for d in circuit.decisions]
    measures = {name: faithfulness(model, task, circuit, metric=name) for name in ("kl", "logit_diff")}
    kept = circuit.settings["nodes"]
    result = {
        "model": about["source"],
        "task": {"name": "ioi", "prompts": list(np.asarray(task.clean).shape), "metric": "kl", "tau": args.tau},
        "shapes": {"n_layers": model.config.n_layers, "n_heads": model.config.n_heads,
                   "nodes": circuit.settings["n_nodes"], "edges": circuit.graph.n_edges},
        "runs": {mode: {k: v for k, v in r.items() if k != "circuit"} for mode, r in runs.items()},
        "speedup_over_sequential": (runs["sequential"]["seconds"] / runs["batched"]["seconds"]
                                    if "sequential" in runs else None),
        "same_decisions": same,
        "nodes_kept": kept,
        "edges_kept": circuit.n_edges,
        "faithfulness": measures,
    }
    print(f"ACDC over nodes, {about['name']}, IOI {result['task']['prompts']}, tau {args.tau} (KL)")
    print_table([dict(mode=m, seconds=r["seconds"], passes=r["passes"], rescored=r["rescored"])
                 for m, r in result["runs"].items()], ["mode", "seconds", "passes", "rescored"])
    print(f"same decisions: {same}; speed-up {result['speedup_over_sequential']}")
    print(f"kept {len(kept)} of {circuit.settings['n_nodes']} nodes ({circuit.n_edges} edges): {' '.join(kept)}")
    print_table([dict(metric=name, circuit=f["circuit"], full=f["full"], empty=f["empty"], normalized=f["normalized"])
                 for name, f in measures.items()], ["metric", "circuit", "full", "empty", "normalized"])
    write_json(f"{args.model}_nodes", result)


if __name__ == "__main__":
    main()

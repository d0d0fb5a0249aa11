"""Edge-level ACDC on a real pretrained model on a CPU (SmolLM2-135M or Gemma 3
270M) on IOI, in two stages: ACDC over its nodes, then exact ACDC over the
edges among the kept nodes only (`acdc(..., start=node_circuit)`).

    python benchmarks/pretrained_edges.py [--model gemma3] --checkpoint smollm2/ [--examples 10] \\
        [--node-tau 0.02] [--tau 0.005] [--nodes runs/x/circuit.json | --all-edges] [--sequential-seconds 600]

In one process and on the same prompts: the node stage (batched; or a
saved node circuit), the edge stage batched to the end, then the plain
sequential loop from the same start for `--sequential-seconds` (the
baseline; the whole loop is an hour here), with whether its decisions
equal the batched run's first ones and both runs' seconds per trial.
Faithfulness (KL and logit difference IO - S) of the node and the edge
circuit against the full model and the empty circuit. Writes both
circuits (JSON, DOT and a picture) under --out, prints tables and writes
benchmarks/results/MODEL_edges-<backend>-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PRETRAINED, pretrained_args, print_table, write_json  # noqa: E402


def _decisions(circuit) -> list:
    return [(d.edge, d.tried, d.kept) for d in circuit.decisions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pretrained_args(parser)
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--node-tau", type=float, default=0.02)
    parser.add_argument("--tau", type=float, default=0.005, help="the edge stage's threshold")
    parser.add_argument("--nodes", help="a saved node circuit (circuit.json) instead of the node stage")
    parser.add_argument("--all-edges", action="store_true",
                        help="no node stage: ACDC over every edge of the model (Gemma 3 270M's 10,558 run here)")
    parser.add_argument("--sequential-seconds", type=float, default=600.0,
                        help="stop the sequential baseline after this many seconds (0: skip it)")
    parser.add_argument("--out", help="where the circuits are written (default runs/MODEL-edges)")
    args = parser.parse_args()

    from acdc_jax import Circuit
    from acdc_jax.acdc import acdc
    from acdc_jax.algorithms import acdc_nodes
    from acdc_jax.draw import render
    from acdc_jax.evaluate import faithfulness, nodes_of
    from acdc_jax.tasks import get

    about = PRETRAINED[args.model]
    model, task = get("ioi", checkpoint=args.checkpoint, n_examples=args.examples, bos=about["bos"])
    out = Path(args.out or f"runs/{args.model}-edges")
    t = time.perf_counter()
    node_seconds = None
    if args.all_edges:
        nodes = None
    elif args.nodes:
        nodes = Circuit.load(args.nodes)
    else:
        nodes = acdc_nodes(model, task, args.node_tau, progress=False)
        node_seconds = time.perf_counter() - t
        nodes.save(out / "nodes" / "circuit.json")
        render(nodes, out / "nodes" / "circuit", title=f"{about['name']} IOI, nodes, tau {args.node_tau}")

    t = time.perf_counter()
    stamps = []  # seconds at each decision, to compare with the loop over the same decisions
    edges = acdc(model, task, args.tau, start=nodes, log_path=out / "edges" / "decisions.jsonl", progress=False,
                 callback=lambda d: stamps.append(time.perf_counter() - t))
    edge_seconds = time.perf_counter() - t
    edges.save(out / "edges" / "circuit.json")
    within = "every edge" if nodes is None else "edges within the nodes"
    render(edges, out / "edges" / "circuit", title=f"{about['name']} IOI, {within}, tau {args.tau}")
    trials = sum(d.tried for d in edges.decisions)
    runs = {"batched": {"seconds": edge_seconds, "passes": edges.settings["passes"],
                        "programs": edges.settings["programs"], "compile_seconds": edges.settings["compile_seconds"],
                        "rescored": edges.settings["rescored"],
                        "decisions": len(edges.decisions), "trials": trials, "finished": edges.settings["finished"],
                        "seconds_per_trial": edge_seconds / max(trials, 1)}}
    same_prefix = None
    if args.sequential_seconds > 0:
        t = time.perf_counter()
        seq = acdc(model, task, args.tau, start=nodes, mode="sequential", stop_after=args.sequential_seconds,
                   progress=False)
        seconds = time.perf_counter() - t
        seq_trials = sum(d.tried for d in seq.decisions)
        same_prefix = _decisions(seq) == _decisions(edges)[:len(seq.decisions)]
        runs["sequential"] = {"seconds": seconds, "passes": seq.settings["passes"], "decisions": len(seq.decisions),
                              "trials": seq_trials, "finished": seq.settings["finished"],
                              "seconds_per_trial": seconds / max(seq_trials, 1),
                              "batched_seconds_to_the_same_decisions": stamps[len(seq.decisions) - 1],
                              "projected_seconds_for_all_trials": seconds / max(seq_trials, 1) * trials}

    measures = {}
    for name, circuit in (("nodes", nodes), ("edges", edges)):
        if circuit is not None:  # no node stage with --all-edges
            measures[name] = {m: faithfulness(model, task, circuit, metric=m) for m in ("kl", "logit_diff")}
    touched = sorted(nodes_of(edges.graph, edges.edges))
    result = {
        "model": about["source"],
        "task": {"name": "ioi", "prompts": list(np.asarray(task.clean).shape), "metric": "kl",
                 "node_tau": None if nodes is None else nodes.settings.get("tau"), "tau": args.tau},
        "shapes": {"n_layers": model.config.n_layers, "n_heads": model.config.n_heads, "edges": edges.graph.n_edges},
        "node_stage": None if nodes is None else {
            "seconds": node_seconds, "from_file": args.nodes, "nodes_kept": nodes.settings.get("nodes"),
            "nodes": nodes.settings.get("n_nodes"), "edges": nodes.n_edges},
        "edge_stage": runs,
        # the same decisions: the loop's seconds over the batched run's seconds to reach them
        "speedup_over_sequential_same_decisions": (runs["sequential"]["seconds"]
                                                   / runs["sequential"]["batched_seconds_to_the_same_decisions"]
                                                   if "sequential" in runs else None),
        # the whole run: the loop's seconds per trial times the trials, over the batched run's seconds
        "speedup_over_sequential_projected": (runs["sequential"]["projected_seconds_for_all_trials"] / edge_seconds
                                              if "sequential" in runs else None),
        "sequential_same_as_batched_prefix": same_prefix,
        "edges_kept": edges.n_edges,
        "nodes_in_edge_circuit": touched,
        "faithfulness": measures,
    }
    print(f"{about['name']}, IOI {result['task']['prompts']}: "
          + ("every edge" if nodes is None else f"nodes (tau {result['task']['node_tau']}) then edges")
          + f" (tau {args.tau}), KL")
    if nodes is not None:
        print(f"node stage: {len(nodes.settings.get('nodes', []))} of {nodes.settings.get('n_nodes')} nodes, "
              f"{nodes.n_edges} of {edges.graph.n_edges} edges, "
              f"{node_seconds if node_seconds is None else round(node_seconds, 1)} s")
    print_table([dict(mode=m, **{k: r[k] for k in ("seconds", "decisions", "trials", "passes", "finished",
                                                   "seconds_per_trial")}) for m, r in runs.items()],
                ["mode", "seconds", "decisions", "trials", "passes", "finished", "seconds_per_trial"])
    print(f"sequential decisions equal the batched run's first ones: {same_prefix}; speed-up over the loop on "
          f"those decisions {result['speedup_over_sequential_same_decisions']}, over the whole run (projected "
          f"from the loop's seconds per trial) {result['speedup_over_sequential_projected']}")
    print(f"edge circuit: {edges.n_edges} edges, {len(touched)} heads and MLPs")
    print_table([dict(circuit=c, metric=m, value=f["circuit"], full=f["full"], empty=f["empty"],
                      normalized=f["normalized"]) for c, by in measures.items() for m, f in by.items()],
                ["circuit", "metric", "value", "full", "empty", "normalized"])
    write_json(f"{args.model}_{'all_edges' if nodes is None else 'edges'}", result)


if __name__ == "__main__":
    main()

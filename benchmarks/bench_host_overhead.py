"""Host-side cost of batched ACDC per pass, on the GPT-2-small graph, with the device work left out.

On an accelerator a pass of many candidates takes milliseconds, so the Python
around it (planning the speculative tree, working out which heads and cached
senders the candidates change, padding to a compiled shape, making the masks)
decides whether a 32,923-edge sweep can finish in a minute. This benchmark
runs the real `acdc()` loop with accelerator settings (a fixed pass width, the
vmapped pass rather than the CPU's candidate loop, dense masks made on the
device from the cut edges, a covering program first from each layer) on a model with GPT-2
small's graph (12 layers x 12 heads with MLPs; the widths are tiny, since no
pass runs), and replaces each pass by a synthetic metric of the masks: every
cut edge adds a fixed random effect, counted only while its receiver still
reaches the output (as in a real model, where cutting the inputs of a node
that no longer reaches the logits changes nothing). The threshold sets the
fraction of tried edges kept. Host seconds are the loop's wall time minus the
time spent waiting for those synthetic passes and minus compilation. Passes
count batched and full ones; the full passes rescore trials within float32
rounding of tau, a band relative to the metric, which here grows with every
cut edge's effect (about one trial in twenty where half are kept).

    python benchmarks/bench_host_overhead.py [--widths 16 64 256] [--kept 0.05 0.5] [--no-probes-too]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accelerator_path, print_table, write_json  # noqa: E402

from acdc_jax.graph import CircuitGraph  # noqa: E402
from acdc_jax.model import Transformer, TransformerConfig  # noqa: E402
from acdc_jax.programs import compile_seconds  # noqa: E402
from acdc_jax.tasks.base import Task, kl_divergence  # noqa: E402

# GPT-2 small's graph (32,923 edges) on a model too narrow to cost anything
GRAPH_OF_GPT2 = TransformerConfig(n_layers=12, d_model=16, n_heads=12, d_head=2, d_vocab=64, n_ctx=16, d_mlp=16)
N_PROMPTS = 8  # few, so that the memory estimate never narrows the widths asked for


def synthetic_metric(graph: CircuitGraph, effect: np.ndarray):
    """masks [n, n_edges] -> [n]: the summed effects of the cut edges whose
    receiver reaches the output (the node it feeds has a kept outgoing edge,
    and a q/k/v input's step edge is kept)."""
    E, slot = graph.n_edges, {s.name: i for i, s in enumerate(graph.senders)}
    out_edges, owner = [], []
    for e in graph.edges:
        if e.kind == "residual":
            out_edges.append(e.index)
            owner.append(slot[e.sender.name])
    step = {e.sender.name: e.index for e in graph.edges if e.kind == "qkv"}
    gate, through = np.full(E, graph.n_senders), np.full(E, E)  # defaults: always reaches, no step
    for e in graph.edges:
        r = e.receiver
        if r.kind == "mlp_in":
            gate[e.index] = slot[f"blocks.{r.layer}.hook_mlp_out"]
        elif r.kind != "logits":  # a head's input, or its q/k/v step
            gate[e.index] = slot[f"blocks.{r.layer}.attn.hook_result[{r.head}]"]
            through[e.index] = step.get(r.name, E)
    out_edges, owner = jnp.asarray(out_edges), jnp.asarray(owner)
    gate, through, effect = jnp.asarray(gate), jnp.asarray(through), jnp.asarray(effect, jnp.float32)

    @jax.jit
    def metric(masks):
        ext = jnp.concatenate([masks, jnp.ones((masks.shape[0], 1), masks.dtype)], axis=1)
        alive = jax.ops.segment_max(ext[:, out_edges].T, owner, num_segments=graph.n_senders).T
        alive = jnp.concatenate([alive, jnp.ones((masks.shape[0], 1), masks.dtype)], axis=1)
        reach = alive[:, gate] * ext[:, through]
        return ((1.0 - masks) * reach) @ effect

    return metric


def run(width: int, kept: float, probes: bool = True, seed: int = 0) -> dict:
    """One ACDC sweep of the GPT-2 graph at a fixed pass width with synthetic
    passes, with the plan's probes ahead (the accelerators' default) or not."""
    scoring = importlib.import_module("acdc_jax.scoring")
    decide = importlib.import_module("acdc_jax.decide")
    acdc_module = importlib.import_module("acdc_jax.acdc")
    model = Transformer(GRAPH_OF_GPT2, key=jax.random.PRNGKey(seed))
    graph = CircuitGraph(GRAPH_OF_GPT2)
    rng = np.random.default_rng(seed)
    effect = rng.exponential(1.0, graph.n_edges)
    tau = float(np.quantile(effect, 1.0 - kept))
    metric = synthetic_metric(graph, effect)
    waited = [0.0]

    def fetch(x):
        start = time.perf_counter()
        out = np.asarray(jax.device_get(x))
        waited[0] += time.perf_counter() - start
        return out

    fused_kl = importlib.import_module("acdc_jax.fused_kl")  # `exact` fetches a pass's metrics
    dense = importlib.import_module("acdc_jax.dense")  # the pass programs
    saved = [(module, name, getattr(module, name)) for module, name in
             [(scoring, "fetch"), (fused_kl, "fetch")] + [(dense, name) for name in
              ("batch_metric", "batch_metric_heads", "full_metric", "layer_heads", "deviations")]]
    scoring.fetch = fused_kl.fetch = fetch
    saved.append((decide, "PROBE_BELOW", decide.PROBE_BELOW))
    decide.PROBE_BELOW = decide.PROBE_BELOW if probes else 0.0
    dense.batch_metric = lambda model, graph, start, corr, metric_fn, task, arrays, masks, *a, **k: (
        metric(masks), True)
    dense.batch_metric_heads = dense.batch_metric
    dense.full_metric = lambda model, graph, corr, metric_fn, task, arrays, mask, *a: metric(mask[None])[0]
    dense.layer_heads = lambda model, graph, layer, corr, mask, tokens, dev, heads: jnp.zeros((1, len(heads), 1, 1))
    dense.deviations = lambda *a: None
    try:
        tokens = rng.integers(0, GRAPH_OF_GPT2.d_vocab, (N_PROMPTS, 16))
        task = Task("synthetic", tokens, tokens, positions=np.array([15]), metrics={"kl": kl_divergence})
        with accelerator_path():
            start, compiling = time.perf_counter(), compile_seconds()
            circuit = acdc_module.acdc(model, task, tau, progress=False, max_width=width)
            wall, compiling = time.perf_counter() - start, compile_seconds() - compiling
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    tried = [d for d in circuit.decisions if d.tried]
    passes, full = circuit.settings["passes"], circuit.settings["full_passes"]
    if set(circuit.settings["widths"]) != {width}:
        raise RuntimeError(f"The pass widths became {circuit.settings['widths']}, not {width} from every layer.")
    host = wall - waited[0] - compiling
    return {"width": width, "target_kept": kept, "probes": probes, "edges": graph.n_edges, "tried": len(tried),
            "kept": sum(d.kept for d in tried), "passes": passes, "batched_passes": passes - full, "full_passes": full,
            "decisions_per_pass": len(circuit.decisions) / passes,
            "wall_s": wall, "synthetic_pass_s": waited[0], "compile_s": compiling, "host_s": host,
            "host_ms_per_pass": 1e3 * host / passes, "host_us_per_edge": 1e6 * host / graph.n_edges}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--kept", type=float, nargs="+", default=[0.05, 0.5],
                        help="fractions of tried edges to keep (each sets tau)")
    parser.add_argument("--no-probes-too", action="store_true",
                        help="also run each case without the plan's probes ahead (the baseline before them)")
    args = parser.parse_args(argv)
    rows = []

    def save():  # after each run, so that a time limit keeps what was measured
        write_json("bench_host_overhead", {
            "graph": "GPT-2 small (12 layers x 12 heads, MLPs, split q/k/v with steps): 32,923 edges",
            "task": {"n_prompts": N_PROMPTS, "n_pos": 16},
            "passes": "synthetic: summed random per-edge effects of the cut edges whose receiver reaches the output",
            "host_s": "wall time of acdc() minus waiting for the synthetic passes minus compilation",
            "rows": rows})

    for kept in args.kept:
        for width in args.widths:
            for probes in (True, False) if args.no_probes_too else (True,):
                rows.append(run(width, kept, probes))
                print(rows[-1], flush=True)
                save()
    print_table(rows, ["width", "target_kept", "probes", "tried", "kept", "passes", "batched_passes", "full_passes",
                       "decisions_per_pass", "wall_s",
                       "synthetic_pass_s", "compile_s", "host_s", "host_ms_per_pass", "host_us_per_edge"])


if __name__ == "__main__":
    main()

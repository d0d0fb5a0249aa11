"""How many passes and candidates batched ACDC scores per decision, guessing
outcomes from each kind of edge's removal rate alone (`kind`), from the
scores that earlier passes left for the edge (`scores`, `speculate.Forecast`),
and from those scores with the spare width of a pass probing edges ahead
(`probes`, the default on accelerators: `speculate.plan`).

Passes run as on an accelerator (every pass as wide as `--widths` allows,
vmapped), so the counts are those a GPU would run; the device only sets the
seconds. Models: the shipped induction model and two small random ones
(attention-only 4 x 8 heads; 4 x 4 heads with MLPs), at taus where about half
or most of the tried edges are kept, the hard case for guessing, and a model
with GPT-2 small's graph (12 x 12 heads with MLPs, 32,923 edges; tiny widths,
scaled embeddings as in bench_gpt2_sweep.py), whose runs stop after
`--stop-after` seconds and are compared by tried edges per pass. Every run is
checked against the sequential loop's decisions (for the stopped runs, over
the decisions both made). Passes count the batched passes; full passes (the
reference, the trials rescored within rounding of tau, the first pass of each
program checked against one) are listed apart.

    python benchmarks/bench_speculation.py [--widths 64 256] [--stop-after 60] [--skip-gpt2-graph]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt2_sweep import gpt2_shaped  # noqa: E402
from common import accelerator_path, environment, print_table, write_json  # noqa: E402

from acdc_jax.acdc import acdc  # noqa: E402
from acdc_jax.model import Transformer, TransformerConfig  # noqa: E402
from acdc_jax.tasks import get  # noqa: E402
from acdc_jax.tasks.base import Task, kl_divergence  # noqa: E402

decide, scoring, speculate = (importlib.import_module(f"acdc_jax.{m}") for m in ("decide", "scoring", "speculate"))
RANDOM = {"attn4-small": (dict(n_layers=4, n_heads=8, d_model=64, d_head=8, d_vocab=300, n_ctx=32), 8, 12),
          "mlp4-small": (dict(n_layers=4, n_heads=4, d_model=32, d_head=8, d_mlp=128, d_vocab=200, n_ctx=32), 8, 10)}


GPT2_GRAPH = dict(n_layers=12, d_model=32, n_heads=12, d_head=4, d_vocab=128, n_ctx=16, d_mlp=64)
GUESSES = ("kind", "scores", "probes")


def cases(gpt2_graph: bool):
    """(name, model, task, taus, stopped): stopped runs end after --stop-after seconds."""
    model, task = get("induction")
    yield "induction", model, task, [3e-3, 1e-2], False
    for name, (cfg, n, pos) in RANDOM.items():
        yield name, Transformer(TransformerConfig(**cfg), key=jax.random.PRNGKey(1)), random_task(name, cfg, n, pos), \
            [1e-6, 1e-5], False
    if gpt2_graph:
        model = gpt2_shaped(0, TransformerConfig(**GPT2_GRAPH))
        yield "gpt2-graph", model, random_task("gpt2-graph", GPT2_GRAPH, 8, 16, seed=0), [1e-5, 2e-6], True


def random_task(name, cfg, n, pos, seed=0):
    rng = np.random.default_rng(seed)
    vocab = cfg["d_vocab"]
    return Task(name, rng.integers(0, vocab, (n, pos)), rng.integers(0, vocab, (n, pos)),
                positions=np.array([pos - 1]), metrics={"kl": kl_divergence})


def run(model, task, tau, width, guess, stop_after=None):
    counts = {"candidates": 0, "passes": 0}
    batch, forecast_p, probe = scoring.Scorer.batch, speculate.Forecast.p, decide.PROBE_BELOW

    def counted(self, cands, *a, **k):
        counts["candidates"] += len(cands)
        counts["passes"] += 1
        return batch(self, cands, *a, **k)

    scoring.Scorer.batch = counted
    if guess == "kind":
        speculate.Forecast.p = lambda self, edge: self.rate.p(edge)
    if guess != "probes":
        decide.PROBE_BELOW = 0.0
    try:
        with accelerator_path():
            start = time.perf_counter()
            circuit = acdc(model, task, tau, progress=False, max_width=width, stop_after=stop_after)
            seconds = time.perf_counter() - start
    finally:
        scoring.Scorer.batch, speculate.Forecast.p, decide.PROBE_BELOW = batch, forecast_p, probe
    return circuit, counts, seconds


def same_decisions(a: list, b: list, stopped: bool) -> bool:
    n = min(len(a), len(b)) if stopped else max(len(a), len(b))
    return a[:n] == b[:n]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--stop-after", type=float, default=60.0, help="seconds for each run on the GPT-2 graph")
    parser.add_argument("--skip-gpt2-graph", action="store_true")
    args = parser.parse_args(argv)
    rows = []

    def save():  # after each row, so that a time limit keeps what was measured
        complete = [r for r in rows if r["stopped_after_s"] is None]
        total = {g: sum(r[f"{g}_passes"] for r in complete) for g in GUESSES}
        write_json("bench_speculation", {"environment": environment(), "passes_total": total,
                                         "passes_ratio_total": total["scores"] / max(total["kind"], 1),
                                         "probes_passes_ratio_total": total["probes"] / max(total["scores"], 1),
                                         "rows": rows})

    for name, model, task, taus, stopped in cases(not args.skip_gpt2_graph):
        stop = args.stop_after if stopped else None
        for tau in taus:
            seq = acdc(model, task, tau, mode="sequential", progress=False, stop_after=stop)
            loop = [(d.index, d.kept) for d in seq.decisions]
            for width in args.widths[-1:] if stopped else args.widths:
                row = {"model": name, "tau": tau, "edges": seq.graph.n_edges, "width": width,
                       "stopped_after_s": stop, "sequential_decided": len(loop)}
                if not stopped:
                    tried = [d for d in seq.decisions if d.tried]
                    row.update(tried=len(tried), kept=sum(d.kept for d in tried))
                for guess in GUESSES[1:] if stopped else GUESSES:
                    circuit, counts, seconds = run(model, task, tau, width, guess, stop)
                    tried = [d for d in circuit.decisions if d.tried]
                    row.update({f"{guess}_passes": counts["passes"], f"{guess}_candidates": counts["candidates"],
                                f"{guess}_full_passes": circuit.settings["passes"] - counts["passes"],
                                f"{guess}_decided": len(circuit.decisions), f"{guess}_tried": len(tried),
                                f"{guess}_kept": sum(d.kept for d in tried),
                                f"{guess}_tried_per_pass": len(tried) / max(counts["passes"], 1),
                                f"{guess}_candidates_per_tried_edge": counts["candidates"] / max(len(tried), 1),
                                f"{guess}_same_as_sequential": same_decisions(
                                    [(d.index, d.kept) for d in circuit.decisions], loop, stopped),
                                f"{guess}_s": seconds})
                if not stopped:
                    row["passes_ratio"] = row["scores_passes"] / row["kind_passes"]
                row["probes_per_tried_ratio"] = row["scores_tried_per_pass"] / row["probes_tried_per_pass"]
                rows.append(row)
                print(row, flush=True)
                save()
    print_table(rows, ["model", "tau", "tried", "kept", "width", "kind_passes", "scores_passes", "probes_passes",
                       "scores_tried_per_pass", "probes_tried_per_pass", "probes_per_tried_ratio",
                       "scores_full_passes", "probes_full_passes", "kind_same_as_sequential",
                       "scores_same_as_sequential", "probes_same_as_sequential"])


if __name__ == "__main__":
    main()

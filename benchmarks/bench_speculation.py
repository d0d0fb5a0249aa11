"""How many candidates batched ACDC scores per decision, guessing outcomes
from each kind of edge's removal rate alone (before) or from the scores that
earlier passes left for the edge (`speculate.Forecast`, now).

Passes run as on an accelerator (every pass as wide as `--widths` allows,
vmapped), so the counts are those a GPU would run; the device only sets the
seconds. Models: the shipped induction model and two small random ones
(attention-only 4 x 8 heads; 4 x 4 heads with MLPs), at taus where about half
or most of the tried edges are kept, the hard case for guessing. Every run is
checked against the sequential loop's decisions. Passes count the batched
passes; full passes (the reference, the trials rescored within rounding of
tau, the first pass of each program checked against one) are listed apart.

    python benchmarks/bench_speculation.py [--widths 64 256]
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
from common import accelerator_path, environment, print_table, write_json  # noqa: E402

from acdc_jax.acdc import acdc  # noqa: E402
from acdc_jax.model import Transformer, TransformerConfig  # noqa: E402
from acdc_jax.tasks import get  # noqa: E402
from acdc_jax.tasks.base import Task, kl_divergence  # noqa: E402

scoring, speculate = (importlib.import_module(f"acdc_jax.{m}") for m in ("scoring", "speculate"))
RANDOM = {"attn4-small": (dict(n_layers=4, n_heads=8, d_model=64, d_head=8, d_vocab=300, n_ctx=32), 8, 12),
          "mlp4-small": (dict(n_layers=4, n_heads=4, d_model=32, d_head=8, d_mlp=128, d_vocab=200, n_ctx=32), 8, 10)}


def cases():
    model, task = get("induction")
    yield "induction", model, task, [3e-3, 1e-2]
    for name, (cfg, n, pos) in RANDOM.items():
        config = TransformerConfig(**cfg)
        rng = np.random.default_rng(0)
        task = Task(name, rng.integers(0, config.d_vocab, (n, pos)), rng.integers(0, config.d_vocab, (n, pos)),
                    positions=np.array([pos - 1]), metrics={"kl": kl_divergence})
        yield name, Transformer(config, key=jax.random.PRNGKey(1)), task, [1e-6, 1e-5]


def run(model, task, tau, width, guess):
    counts = {"candidates": 0, "passes": 0}
    batch, forecast_p = scoring.Scorer.batch, speculate.Forecast.p

    def counted(self, cands, *a, **k):
        counts["candidates"] += len(cands)
        counts["passes"] += 1
        return batch(self, cands, *a, **k)

    scoring.Scorer.batch = counted
    if guess == "kind":
        speculate.Forecast.p = lambda self, edge: self.rate.p(edge)
    try:
        with accelerator_path():
            start = time.perf_counter()
            circuit = acdc(model, task, tau, progress=False, max_width=width)
            seconds = time.perf_counter() - start
    finally:
        scoring.Scorer.batch, speculate.Forecast.p = batch, forecast_p
    return circuit, counts, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args(argv)
    rows = []
    for name, model, task, taus in cases():
        for tau in taus:
            seq = acdc(model, task, tau, mode="sequential", progress=False)
            loop = [(d.index, d.kept) for d in seq.decisions]
            tried = [d for d in seq.decisions if d.tried]
            for width in args.widths:
                row = {"model": name, "tau": tau, "edges": seq.graph.n_edges, "tried": len(tried),
                       "kept": sum(d.kept for d in tried), "width": width}
                for guess in ("kind", "scores"):
                    circuit, counts, seconds = run(model, task, tau, width, guess)
                    row.update({f"{guess}_passes": counts["passes"], f"{guess}_candidates": counts["candidates"],
                                f"{guess}_full_passes": circuit.settings["passes"] - counts["passes"],
                                f"{guess}_candidates_per_tried_edge": counts["candidates"] / max(len(tried), 1),
                                f"{guess}_same_as_sequential": [(d.index, d.kept) for d in circuit.decisions] == loop,
                                f"{guess}_s": seconds})
                row["passes_ratio"] = row["scores_passes"] / row["kind_passes"]
                rows.append(row)
                print(row, flush=True)
    print_table(rows, ["model", "tau", "tried", "kept", "width", "kind_passes", "scores_passes", "passes_ratio",
                       "kind_candidates_per_tried_edge", "scores_candidates_per_tried_edge",
                       "kind_same_as_sequential", "scores_same_as_sequential", "scores_full_passes"])
    total = {g: sum(r[f"{g}_passes"] for r in rows) for g in ("kind", "scores")}
    write_json("bench_speculation", {"environment": environment(), "passes_total": total,
                                     "passes_ratio_total": total["scores"] / total["kind"], "rows": rows})


if __name__ == "__main__":
    main()

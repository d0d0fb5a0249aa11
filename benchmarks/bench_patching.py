"""Patched-forward throughput: one mask set per call vs a vmapped batch of mask sets.

Each mask set is one candidate circuit (one edge removal to score), so mask
sets per second is "edges scored per second". The baseline is the same jitted
patched forward called once per mask set.

    python benchmarks/bench_patching.py [--models tiny gpt2-small] [--prompts 20] [--pos 16]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from common import GPT2_SMALL, print_table, timeit, write_json

from acdc_jax import CircuitGraph, Corruption, Transformer, TransformerConfig, patched_forward

MODELS = {
    "tiny": TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=512, n_ctx=64, d_mlp=256),
    "gpt2-small": GPT2_SMALL,
}


def run(name: str, n_prompts: int, n_pos: int, widths: list[int], repeats: int) -> list[dict]:
    config = MODELS[name]
    model = Transformer(config, key=jax.random.PRNGKey(0))
    graph = CircuitGraph(config)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, config.d_vocab, (n_prompts, n_pos)))
    corruption = Corruption.from_prompts(model, jnp.asarray(rng.integers(0, config.d_vocab, (n_prompts, n_pos))))
    masks = jnp.asarray(rng.uniform(size=(max(widths), graph.n_edges)) > 0.1, jnp.float32)

    single = eqx.filter_jit(lambda m: patched_forward(model, clean, m, corruption, graph))
    batched = eqx.filter_jit(jax.vmap(lambda m: patched_forward(model, clean, m, corruption, graph)))
    t_single = timeit(lambda: single(masks[0]), repeats=repeats)
    rows = [dict(model=name, edges=graph.n_edges, prompts=f"{n_prompts}x{n_pos}", width=1, mode="single",
                 seconds=t_single, edges_per_s=1 / t_single, ratio=1.0)]
    for w in widths:
        t = timeit(lambda: batched(masks[:w]), repeats=repeats)
        rows.append(dict(model=name, edges=graph.n_edges, prompts=f"{n_prompts}x{n_pos}", width=w, mode="vmapped",
                         seconds=t, edges_per_s=w / t, ratio=(w / t) * t_single))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        rows += run(name, args.prompts, args.pos, args.widths, args.repeats if name == "tiny" else 1)
        print_table(rows, ["model", "edges", "prompts", "mode", "width", "seconds", "edges_per_s", "ratio"])
        write_json("bench_patching", {  # after each model, so that a time limit keeps what was measured
            "benchmark": "bench_patching", "shapes": {"prompts": args.prompts, "pos": args.pos},
            "baseline": "jitted patched_forward, one mask set per call", "rows": rows})


if __name__ == "__main__":
    main()

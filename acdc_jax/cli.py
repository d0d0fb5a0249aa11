"""The ``acdc-jax`` command."""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .errors import CheckpointError, ConfigError, MetricError, TaskError


def _load_model(path: str):
    import converters

    return converters.convert(path)


def cmd_patch(args) -> int:
    """Effect of cutting single edges, on random prompts, for a converted checkpoint."""
    from .graph import CircuitGraph
    from .patching import Corruption, patched_forward

    model = _load_model(args.checkpoint)
    graph = CircuitGraph(model.config)
    rng = np.random.default_rng(args.seed)
    shape = (args.prompts, min(args.pos, model.config.n_ctx))
    clean = jnp.asarray(rng.integers(0, model.config.d_vocab, shape))
    corruption = Corruption.from_prompts(model, jnp.asarray(rng.integers(0, model.config.d_vocab, shape)))
    base = jax.nn.log_softmax(model(clean)[:, -1])
    print(f"{graph!r}")
    names = args.edges or list(graph.edge_names[-args.n:])
    for name in names:
        masks = graph.ones().at[graph.edge_index(name)].set(0.0)
        logp = jax.nn.log_softmax(patched_forward(model, clean, masks, corruption, graph)[:, -1])
        kl = float((jnp.exp(base) * (base - logp)).sum(-1).mean())
        print(f"  KL(full || edge cut) = {kl:.3e}   {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acdc-jax", description="Automatic circuit discovery in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("patch", help=cmd_patch.__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory or file (any format `python -m converters` reads)")
    p.add_argument("--edges", nargs="*", help="edge names (default: the last --n edges)")
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--pos", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_patch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, TaskError, MetricError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

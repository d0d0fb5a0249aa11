"""python -m converters SRC --out DIR [--format FORMAT]

Converts a local checkpoint into an acdc-jax model directory (config.json +
model.safetensors) that ``acdc_jax.load(DIR)`` and ``acdc-jax discover
--checkpoint DIR`` read.
"""

from __future__ import annotations

import argparse
import sys

from acdc_jax.checkpoint import save
from acdc_jax.errors import CheckpointError, ConfigError

from . import FORMATS, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters", description=__doc__.split("\n\n")[1])
    parser.add_argument("src", help="checkpoint directory or weights file, or tracr:reverse / tracr:proportion")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=sorted(FORMATS), help="skip format detection")
    args = parser.parse_args(argv)
    try:
        model = convert(args.src, args.format)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save(model, args.out)
    c = model.config
    print(
        f"wrote {out}: {c.n_layers} layers x {c.n_heads} heads, d_model={c.d_model}, "
        f"{'attention-only' if c.attn_only else f'd_mlp={c.d_mlp}'}, vocab {c.d_vocab}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

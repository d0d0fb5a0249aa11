"""Train the shipped 2-layer attention-only induction model.

Sequences are BOS and 29 random tokens in which a random segment of 5 to 10
tokens appears twice, at random places, so only matching on content (not on
position) predicts the second copy. The model learns next-token prediction
with optax. Afterwards each head's previous-token
score (layer 0: attention from position i to i-1) and induction score (layer 1:
attention from a repeated token to the token after its first occurrence) are
measured and written with the checkpoint, in TransformerLens layout, to
acdc_jax/tasks/data/induction/. The induction task reads those scores to name
its ground-truth heads.

A head counts as a previous-token head when its previous-token score is at
least PREVIOUS_THRESHOLD (about 4x what uniform causal attention gives at
these lengths, ~0.10), and as an induction head when its induction score is
at least INDUCTION_THRESHOLD.

    python scripts/train_induction.py [--steps 20000] [--lr 2e-3] [--seed 0]
    python scripts/train_induction.py --rescore   # re-measure the shipped model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file

from acdc_jax import Transformer, TransformerConfig
from acdc_jax.tasks.induction import LENGTH, MAX_REPEAT, MIN_REPEAT, N_RANDOM, repeated_sequences
from converters.transformer_lens import to_transformer_lens

OUT = Path(__file__).resolve().parents[1] / "acdc_jax" / "tasks" / "data" / "induction"
CONFIG = TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=N_RANDOM + 1, n_ctx=32,
                           d_mlp=None, act_fn="gelu_new", normalization="LN", positional="shortformer")
PREVIOUS_THRESHOLD, INDUCTION_THRESHOLD = 0.4, 0.5


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def head_scores(model: Transformer, tokens: np.ndarray, source: np.ndarray) -> dict:
    """Mean attention to the previous position (over all positions), and from
    each repeated position to the token after its first occurrence."""
    pats = np.asarray(eqx.filter_jit(lambda m, t: m.attention_patterns(t))(model, jnp.asarray(tokens)))
    pats = pats.transpose(1, 0, 2, 3, 4)  # [layer, batch, head, q, k]
    q = np.arange(1, tokens.shape[1])
    prev = pats[:, :, :, q, q - 1].mean(axis=(1, 3))  # [layer, head]
    rows, cols = np.nonzero(source >= 0)
    induction = pats[:, rows, :, cols, source[rows, cols]].mean(axis=0)  # [layer, head]
    return {"previous_token": prev.round(4).tolist(), "induction": induction.round(4).tolist()}


def measure(model: Transformer) -> dict:
    """Accuracy on the repeated half, head scores, and the heads they select."""
    eval_tokens, eval_source = repeated_sequences(np.random.default_rng(12345), 256)
    pred = np.asarray(model(jnp.asarray(eval_tokens)).argmax(-1))[:, :-1]
    acc = float((pred == eval_tokens[:, 1:])[eval_source[:, :-1] >= 0].mean())
    scores = head_scores(model, eval_tokens, eval_source)
    prev_heads = [[0, h] for h in range(CONFIG.n_heads) if scores["previous_token"][0][h] >= PREVIOUS_THRESHOLD]
    induction_heads = [[1, h] for h in range(CONFIG.n_heads) if scores["induction"][1][h] >= INDUCTION_THRESHOLD]
    print(f"repeated-half top-1 accuracy {acc:.3f}; previous-token heads {prev_heads}; induction heads {induction_heads}")
    return {
        "eval": {"examples": 256, "repeated_half_top1": acc},
        "scores": scores,
        "thresholds": {"previous_token": PREVIOUS_THRESHOLD, "induction": INDUCTION_THRESHOLD},
        "previous_token_heads": prev_heads,
        "induction_heads": induction_heads,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rescore", action="store_true", help="only re-measure the shipped model's head scores")
    args = parser.parse_args(argv)
    if args.rescore:
        from acdc_jax.tasks.induction import load_induction_model

        meta = json.loads((OUT / "scores.json").read_text())
        meta.update(measure(load_induction_model(OUT)))
        (OUT / "scores.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"rescored {OUT}")
        return

    model = Transformer(CONFIG, key=jax.random.PRNGKey(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(500, args.steps // 10), args.steps, args.lr / 20)
    opt = optax.adamw(schedule, weight_decay=args.weight_decay)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, tokens):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, tokens)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for i in range(args.steps):
        model, state, loss = step(model, state, jnp.asarray(repeated_sequences(rng, args.batch)[0]))
        if i % 500 == 0 or i == args.steps - 1:
            print(f"step {i:5d}  loss {float(loss):.4f}")
    measured = measure(model)
    OUT.mkdir(parents=True, exist_ok=True)
    sd, tl_cfg = to_transformer_lens(model)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(OUT / "model.safetensors"))
    (OUT / "config.json").write_text(json.dumps(tl_cfg, indent=2) + "\n")
    meta = {
        "data": {"bos": 0, "random_tokens": [1, N_RANDOM], "length": LENGTH, "repeat_length": [MIN_REPEAT, MAX_REPEAT]},
        "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "optimizer": f"optax.adamw, warmup-cosine schedule to lr {args.lr}, weight_decay {args.weight_decay}", "seconds": round(time.time() - t0, 1),
                     "final_loss": float(loss)},
        **measured,
    }
    (OUT / "scores.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

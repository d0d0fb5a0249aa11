"""Pictures of circuits: Graphviz DOT text, rendered to SVG by ``dot`` when it is
installed, otherwise drawn to PNG with networkx and matplotlib.

Nodes are model parts (embedding, heads ``a{layer}.{head}``, MLPs ``m{layer}``,
logits); an edge is drawn for each kept residual edge, labelled and coloured by
the input it enters (q, k, v; MLP and logits edges are grey). Given a canonical
circuit, edges outside it are drawn red and thick, and canonical edges the
circuit missed are drawn grey and dashed. Large circuits are drawn in bounded
time (`MANY`, `CROWDED`, `DOT_SECONDS`).
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .circuit import Circuit
from .graph import CircuitGraph, component_order

COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "attn_in": "#8c564b", "mlp_in": "#7f7f7f", "logits": "#7f7f7f"}
LEGEND = "into q blue, k green, v purple"
EXTRA = "#e41a1c"  # kept, but not in the canonical circuit
# Graphviz's crossing minimisation and ranking grow faster than the edges do (GPT-2 small, random circuits: 965
# drawn edges 5 s, 1,434 28 s, 3,302 over 10 min); past MANY edges they are cut short (0.8 s, 2.7 s; all 32,491
# unlabelled, straight 31 s), and past CROWDED the q/k/v letters, each one more node to place, give way to a
# legend and the edges are straight
MANY, CROWDED = 500, 1500
DOT_SECONDS = 300  # then the picture is drawn with matplotlib instead


def _fill(component: str) -> str:
    if component.startswith("a"):
        return "#dbe9f6"
    if component.startswith("m"):
        return "#e8e8e8"
    return "#fff2ae"


def drawn_edges(graph: CircuitGraph, names: Iterable[str]) -> dict[tuple[str, str, str], str]:
    """(sender part, receiver part, input letter) -> an example edge name, for residual edges."""
    out = {}
    for name in names:
        e = graph.edge(name)
        if e.kind != "residual":
            continue
        letter = e.receiver.kind if e.receiver.kind in ("q", "k", "v") else ""
        out.setdefault((e.sender.component, e.receiver.component, letter), name)
    return out


def to_dot(circuit: Circuit, canonical: Optional[Iterable[str]] = None, title: str = "") -> str:
    g = circuit.graph
    kept = drawn_edges(g, circuit.edges)
    truth = drawn_edges(g, canonical) if canonical is not None else None
    nodes = {n for s, r, _ in kept for n in (s, r)} | ({n for s, r, _ in truth for n in (s, r)} if truth else set())
    drawn = len(set(kept) | set(truth or ()))
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    if drawn > MANY:
        lines.append("  mclimit=0.1; nslimit=1;")
    letters = drawn <= CROWDED
    if not letters:  # straight lines: routing thousands of splines is a fifth of the time
        lines.append("  splines=line;")
        title = f"{title} ({LEGEND})".strip()
    if title:
        lines.append(f'  labelloc="t"; label="{title}";')
    by_rank: dict[int, list[str]] = {}
    for n in sorted(nodes, key=component_order):
        by_rank.setdefault(_rank(n, g.n_layers), []).append(n)
        lines.append(f'  "{n}" [fillcolor="{_fill(n)}"];')
    for rank in sorted(by_rank):
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in by_rank[rank]) + " }")
    for (s, r, letter) in sorted(kept):
        color = COLORS.get(letter or ("mlp_in" if r.startswith("m") else "logits"))
        width = 1.0
        if truth is not None and (s, r, letter) not in truth:
            color, width = EXTRA, 2.5
        label = f', label="{letter}"' if letters else ""
        lines.append(f'  "{s}" -> "{r}" [color="{color}", fontcolor="{color}", penwidth={width}{label}];')
    if truth is not None:
        for (s, r, letter) in sorted(set(truth) - set(kept)):
            label = f', label="{letter}"' if letters else ""
            lines.append(f'  "{s}" -> "{r}" [color="#aaaaaa", style=dashed{label}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _rank(component: str, n_layers: int) -> int:
    if component in ("embed", "pos"):
        return 0
    if component == "logits":
        return 2 * n_layers + 1
    if component.startswith("m"):
        return 2 * int(component[1:]) + 2
    return 2 * int(component[1:].split(".")[0]) + 1


def render(circuit: Circuit, out_base: str | Path, canonical: Optional[Iterable[str]] = None, title: str = "") -> list[Path]:
    """Write ``out_base.dot`` and ``out_base.svg`` (Graphviz) or ``out_base.png``
    (matplotlib: where ``dot`` is missing, or takes over DOT_SECONDS)."""
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    dot_path = out_base.with_suffix(".dot")
    dot_path.write_text(to_dot(circuit, canonical, title))
    written = [dot_path]
    if shutil.which("dot"):
        svg = out_base.with_suffix(".svg")
        try:
            subprocess.run(["dot", "-Tsvg", str(dot_path), "-o", str(svg)], check=True, timeout=DOT_SECONDS)
            return written + [svg]
        except subprocess.TimeoutExpired:
            svg.unlink(missing_ok=True)
            warnings.warn(f"Graphviz took over {DOT_SECONDS} s to lay out {dot_path}; drawing a PNG with matplotlib "
                          "instead (the .dot file is written: try `sfdp -Tsvg` on it).", stacklevel=2)
    return written + [_matplotlib_png(circuit, out_base.with_suffix(".png"), canonical, title)]


def _matplotlib_png(circuit: Circuit, path: Path, canonical, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = circuit.graph
    kept = drawn_edges(g, circuit.edges)
    truth = drawn_edges(g, canonical) if canonical is not None else {}
    dg = nx.MultiDiGraph()
    groups: dict[tuple, list] = {}  # edges drawn alike, drawn in one call: one call per edge took 5 min for GPT-2
    for (s, r, letter) in kept:
        color = COLORS.get(letter or ("mlp_in" if r.startswith("m") else "logits"))
        width = 1.0
        if canonical is not None and (s, r, letter) not in truth:
            color, width = EXTRA, 2.5
        dg.add_edge(s, r)
        groups.setdefault((color, "solid", width), []).append((s, r, letter))
    for (s, r, letter) in set(truth) - set(kept):
        dg.add_edge(s, r)
        groups.setdefault(("#aaaaaa", "dashed", 1.0), []).append((s, r, letter))
    crowded = dg.number_of_edges() > CROWDED
    ranks: dict[int, list[str]] = {}
    for n in dg.nodes:
        ranks.setdefault(_rank(n, g.n_layers), []).append(n)
    pos = {}
    for rank, names in ranks.items():
        for i, n in enumerate(sorted(names, key=component_order)):
            pos[n] = (i - (len(names) - 1) / 2, rank)
    width = max(6.0, 1.2 * max((len(v) for v in ranks.values()), default=1))
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.9 * len(ranks)))
    # crowded: straight lines without arrow heads, one collection per group (the ranks read bottom to top)
    arrows = {"arrows": False} if crowded else {"arrows": True, "connectionstyle": "arc3,rad=0.08"}
    for (color, style, line_width), edges in groups.items():
        nx.draw_networkx_edges(dg, pos, edgelist=[(u, v) for u, v, _ in edges], edge_color=color, style=style, ax=ax,
                               width=line_width, node_size=900, **arrows)
        for u, v, letter in ([] if crowded else edges):
            if letter:
                (x0, y0), (x1, y1) = pos[u], pos[v]
                ax.text(x0 + 0.8 * (x1 - x0), y0 + 0.8 * (y1 - y0), letter, color=color, fontsize=8)
    nx.draw_networkx_nodes(dg, pos, node_color=[_fill(n) for n in dg.nodes], node_size=900, edgecolors="#555555", ax=ax)
    nx.draw_networkx_labels(dg, pos, font_size=8, ax=ax)
    ax.set_title((title or f"{circuit.n_edges} of {g.n_edges} edges") + (f" ({LEGEND})" if crowded else ""))
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_roc(points_by_label: dict, path: str | Path, title: str = "") -> Path:
    """ROC curves: {label: [(fpr, tpr), ...]} -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import auc

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, points in points_by_label.items():
        pts = sorted({(0.0, 0.0), (1.0, 1.0), *map(tuple, points)})
        xs, ys = np.array(pts).T
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} (AUC {auc(points):.3f})")
    ax.plot([0, 1], [0, 1], color="#cccccc", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)

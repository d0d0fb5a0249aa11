"""Interactive views of a circuit's edges, for notebooks and browsers.

The residual edges form a sender x receiver matrix. `edge_matrix` lays out
the circuit's kept edges or its scores (ACDC: the metric change when the edge
was tried) that way; `named` wraps it as a penzai named array (axes "sender"
and "receiver"), and `figure` renders both matrices with penzai's treescope
renderer: every row and column is labelled, hovering shows the edge and its
value, and a GPT-2-small graph (157 senders x 445 receivers) fits on one
screen. `show` displays it in a notebook; `write_html` writes a standalone
page (`acdc-jax discover` writes `edges.html`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .circuit import Circuit
from .graph import Node

VIEWS = ("kept", "score")


def _label(receiver: Node) -> str:
    """'a1.2.q', 'm0.in', 'a1.2.in' (an undivided head input), 'logits'."""
    if receiver.kind in ("q", "k", "v"):
        return f"{receiver.component}.{receiver.kind}"
    return receiver.component if receiver.kind == "logits" else f"{receiver.component}.in"


def edge_matrix(circuit: Circuit, view: str = "kept") -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(values [n_senders, n_receivers], valid [same shape], sender names,
    receiver names) over the residual edges. `view`: "kept" (1 kept, 0 removed)
    or "score" (`circuit.scores`; invalid where the edge has none, as for
    edges ACDC dropped without trying). Pairs that are not edges are invalid."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}.")
    g = circuit.graph
    if view == "score" and circuit.scores is None:
        raise ValueError("This circuit has no scores; use view='kept'.")
    senders = [s.component for s in g.senders]
    receivers = [_label(r) for r in g.receivers]
    row = {s.name: i for i, s in enumerate(g.senders)}
    col = {r.name: j for j, r in enumerate(g.receivers)}
    values = np.zeros((len(senders), len(receivers)))
    valid = np.zeros(values.shape, bool)
    per_edge = np.asarray(circuit.mask, np.float64) if view == "kept" else np.asarray(circuit.scores, np.float64)
    for e in g.edges:
        if e.kind == "residual":
            i, j = row[e.sender.name], col[e.receiver.name]
            values[i, j] = per_edge[e.index]
            valid[i, j] = np.isfinite(per_edge[e.index])
    return np.where(valid, values, 0.0), valid, senders, receivers


def named(circuit: Circuit, view: str = "kept"):
    """`edge_matrix` as penzai named arrays (values, valid), axes "sender" and "receiver"."""
    return _named(*edge_matrix(circuit, view)[:2])


def _named(values: np.ndarray, valid: np.ndarray):
    from penzai import pz

    return pz.nx.wrap(values).tag("sender", "receiver"), pz.nx.wrap(valid).tag("sender", "receiver")


def _title(circuit: Circuit) -> str:
    s, g = circuit.settings, circuit.graph
    qkv = [e for e in g.edges if e.kind == "qkv"]
    kept_qkv = sum(circuit.mask[e.index] > 0.5 for e in qkv)
    how = s.get("method", "acdc") + (f", tau={s['tau']}" if "tau" in s else "")
    line = f"{s.get('task', 'circuit')} ({how}): {circuit.n_edges} of {g.n_edges} edges kept"
    return line + (f", {kept_qkv} of {len(qkv)} q/k/v steps" if qkv else "")


def figure(circuit: Circuit):
    """A treescope figure: the title, the kept edges and (if the circuit has
    scores) the scores, each a labelled sender x receiver matrix."""
    from penzai import pz

    parts = [pz.ts.bolded(_title(circuit))]
    for view in VIEWS if circuit.scores is not None else VIEWS[:1]:
        values, valid, senders, receivers = edge_matrix(circuit, view)
        values, valid = _named(values, valid)
        caption = "kept edges (1 kept, 0 removed)" if view == "kept" else (
            "scores (metric change when the edge was tried; blank: not tried)")
        parts += [pz.ts.inline(caption), pz.ts.render_array(
            values, valid_mask=valid, rows=["sender"], columns=["receiver"], around_zero=view == "score",
            axis_item_labels={"sender": senders, "receiver": receivers}, truncate=False, maximum_size=10 ** 6,
            cutoff_size_per_axis=4096, pixels_per_cell=max(4, min(16, 1200 // len(receivers))))]
    return pz.ts.inline(*[x for p in parts for x in (p, "\n")])


def show(circuit: Circuit) -> None:
    """Display `figure` in a notebook (IPython)."""
    from penzai import pz

    try:
        pz.show(figure(circuit))
    except RuntimeError as e:
        raise RuntimeError(f"{e} Outside a notebook, write the page with "
                           "acdc_jax.explore.write_html(circuit, 'edges.html') and open it in a browser.") from e


def write_html(circuit: Circuit, path: Union[str, Path]) -> Path:
    """A standalone HTML page with `figure` (no network needed to view it)."""
    from treescope import lowering

    path = Path(path)
    # uncompressed: browsers opening a local file may not run treescope's decompression
    body = lowering.render_to_html_as_root(figure(circuit).treescope_part, compressed=False)
    title = _title(circuit).replace("&", "&amp;").replace("<", "&lt;")
    path.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>\n"
                    f"<body>\n{body}\n</body></html>\n")
    return path

"""Circuits against a canonical circuit (ROC over a threshold sweep, edges and
nodes) and faithfulness (the circuit's metric between the empty and the full
model)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .circuit import Circuit
from .graph import CircuitGraph
from .model import Transformer
from .tasks.base import Task


@dataclasses.dataclass
class RocResult:
    taus: list
    edge_points: list  # (fpr, tpr) per tau
    node_points: list
    edge_auc: float
    node_auc: float
    circuits: list

    def to_json(self) -> dict:
        return {
            "taus": self.taus,
            "edge": {"points": self.edge_points, "auc": self.edge_auc},
            "node": {"points": self.node_points, "auc": self.node_auc},
            "n_edges": [c.n_edges for c in self.circuits],
        }


def rates(found: set, canonical: set, universe: set) -> tuple[float, float]:
    """(false positive rate, true positive rate) of `found` against `canonical`."""
    positives, negatives = canonical & universe, universe - canonical
    tpr = len(found & positives) / max(len(positives), 1)
    fpr = len(found & negatives) / max(len(negatives), 1)
    return fpr, tpr


def auc(points: Iterable[tuple[float, float]]) -> float:
    """Area under the ROC curve through the points, plus (0, 0) and (1, 1).
    Points are joined in order of FPR (then TPR), as a step-free polyline."""
    pts = sorted({(0.0, 0.0), (1.0, 1.0), *((float(f), float(t)) for f, t in points)})
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def nodes_of(graph: CircuitGraph, edges: Iterable[str]) -> set[str]:
    """Heads and MLPs touched by the edges (embedding and logits excluded)."""
    out = set()
    for name in edges:
        e = graph.edge(name)
        for n in (e.sender, e.receiver):
            if n.kind not in ("embed", "tok_embed", "pos_embed", "logits"):
                out.add(n.component)
    return out


def all_nodes(graph: CircuitGraph) -> set[str]:
    return {s.component for s in graph.senders if s.kind in ("head", "mlp")}


def roc_from_circuits(circuits: Sequence[Circuit], canonical: Iterable[str], taus: Optional[list] = None) -> RocResult:
    graph = circuits[0].graph
    canonical = set(canonical)
    universe = set(graph.edge_names)
    node_universe, node_truth = all_nodes(graph), nodes_of(graph, canonical)
    edge_points, node_points = [], []
    for c in circuits:
        kept = set(c.edges)
        edge_points.append(rates(kept, canonical, universe))
        node_points.append(rates(nodes_of(graph, kept), node_truth, node_universe))
    taus = taus if taus is not None else [c.settings.get("tau") for c in circuits]
    return RocResult(list(taus), edge_points, node_points, auc(edge_points), auc(node_points), list(circuits))


def sweep(model: Transformer, task: Task, taus: Sequence[float], *, method: Callable = None, **kwargs) -> list[Circuit]:
    """One circuit per threshold (ACDC unless `method` is given)."""
    if method is None:
        from .acdc import acdc as method
    return [method(model, task, tau, **kwargs) for tau in taus]


def roc(model: Transformer, task: Task, taus: Sequence[float], **kwargs) -> RocResult:
    """ACDC at each tau, scored against ``task.canonical``."""
    if task.canonical is None:
        raise ValueError(f"Task {task.name} has no canonical circuit to compare with.")
    circuits = sweep(model, task, taus, **kwargs)
    return roc_from_circuits(circuits, task.canonical, list(taus))


def faithfulness(model: Transformer, task: Task, circuit: Circuit, *, metric=None, corruption=None) -> dict:
    """The circuit's metric next to the full model's and the empty circuit's.
    ``normalized`` = (empty - circuit) / (empty - full): 1 is as good as the
    full model, 0 as bad as cutting every edge."""
    from .acdc import resolve_corruption, resolve_metric
    from .scoring import Scorer

    _, metric_fn = resolve_metric(task, metric if metric is not None else circuit.settings.get("metric"))
    _, corr = resolve_corruption(model, task, corruption if corruption is not None else circuit.settings.get("corruption"))
    scorer = Scorer(model, circuit.graph, task.bind(model), corr, metric_fn, static_task=task)
    full = scorer.full(np.ones(circuit.graph.n_edges, np.float32))
    empty = scorer.full(np.zeros(circuit.graph.n_edges, np.float32))
    value = scorer.full(np.asarray(circuit.mask, np.float32))
    span = empty - full
    return {"circuit": value, "full": full, "empty": empty,
            "normalized": float((empty - value) / span) if span != 0 else float("nan")}

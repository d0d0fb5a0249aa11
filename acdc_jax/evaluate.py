"""Circuits against a canonical circuit (ROC over a threshold sweep, edges and
nodes) and faithfulness (the circuit's metric between the empty and the full
model)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .circuit import Circuit
from .errors import FlatMetricWarning, MetricFallsWarning, TaskError, check_finite
from .graph import CircuitGraph, component_order
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


def overlap(first: Circuit, second: Circuit) -> dict:
    """Where two circuits over the same graph agree: for edges and for heads
    and MLPs (`Circuit.nodes`: those on residual edges), those in both, in the first only and in the second only, and the
    Jaccard index |both| / |either| (1 for two empty circuits)."""
    first.graph.check_same_edges(second.graph, "The second circuit")
    g = first.graph
    sets = {"edges": (set(first.edges), set(second.edges), g.edge_names),
            "nodes": (set(first.nodes), set(second.nodes), sorted(all_nodes(g), key=component_order))}
    out = {}
    for kind, (a, b, order) in sets.items():
        either = a | b
        out[kind] = {"both": [n for n in order if n in a & b], "only_first": [n for n in order if n in a - b],
                     "only_second": [n for n in order if n in b - a],
                     "jaccard": len(a & b) / len(either) if either else 1.0}
    return out


def all_nodes(graph: CircuitGraph) -> set[str]:
    return {s.component for s in graph.senders if s.kind in ("head", "mlp")}


def roc_from_circuits(circuits: Sequence[Circuit], canonical: Iterable[str], taus: Optional[list] = None) -> RocResult:
    if not circuits:
        raise ValueError("No circuits to make an ROC curve of.")
    graph = circuits[0].graph
    canonical = set(canonical)
    universe = set(graph.edge_names)
    unknown = sorted(canonical - universe)
    if unknown:  # the rates would count them as missed by every circuit
        raise TaskError(
            f"The canonical circuit names {len(unknown)} edge(s) not in the circuits' {graph!r}, e.g. "
            f"{unknown[:3]}; compare circuits found on the task's own graph (task.graph(model))."
        )
    node_universe, node_truth = all_nodes(graph), nodes_of(graph, canonical)
    edge_points, node_points = [], []
    for c in circuits:
        kept = set(c.edges)
        edge_points.append(rates(kept, canonical, universe))
        node_points.append(rates(nodes_of(graph, kept), node_truth, node_universe))
    taus = taus if taus is not None else [c.settings.get("tau") for c in circuits]
    return RocResult(list(taus), edge_points, node_points, auc(edge_points), auc(node_points), list(circuits))


def sweep(model: Transformer, task: Task, taus: Sequence[float], *, method: Callable = None, out=None,
          resume: bool = False, **kwargs) -> list[Circuit]:
    """One circuit per threshold (ACDC unless `method` is given: a function
    like `acdc` that takes ``log_path`` and ``resume``, such as `acdc_nodes`).
    With `out`, each circuit and its decision log go to ``out/tau-T/`` as it
    is found; with `resume`, those saved are read back (refused if another
    model, other prompts or another method made them) and an unfinished one
    continues from its log."""
    from .acdc import check_tau

    taus = [check_tau(tau) for tau in taus]  # all of them before a long sweep
    if not taus:
        raise ValueError("No thresholds (taus) to sweep; give at least one.")
    seen = {}
    for tau in taus:  # a repeated tau would run twice, and with `out` overwrite its own directory
        name = tau_dir("", tau).name
        if name in seen:
            raise ValueError(f"The taus {seen[name]!r} and {tau!r} are the same to 6 digits ({name}); give each "
                             "threshold once.")
        seen[name] = tau
    if method is None:
        from .acdc import acdc as method
    lowest = min(taus)

    def run(tau, **more):  # warn that every edge may go only at the lowest tau: above it that is the sweep's end
        with warnings.catch_warnings():
            if tau != lowest:  # and the metric's direction once
                warnings.simplefilter("ignore", FlatMetricWarning)
                warnings.simplefilter("ignore", MetricFallsWarning)
            return method(model, task, tau, **kwargs, **more)

    if out is None:
        return [run(tau) for tau in taus]
    from .runlog import differing, model_fingerprint, task_fingerprint

    circuits, made = [], None
    for tau in taus:
        where = tau_dir(out, tau)
        done, log = where / "circuit.json", where / "decisions.jsonl"
        if resume and done.is_file():
            circuit = Circuit.load(done)
            if made is None:  # what a saved circuit must have been made with (hashing the weights once)
                made = {"model": model_fingerprint(model), "prompts": task_fingerprint(task)}
                if getattr(method, "__name__", None) in ("acdc", "acdc_nodes"):  # a wrapper may record either
                    made["method"] = method.__name__
            differ = differing(circuit.settings, {"tau": tau, **made})
            if differ:
                raise ValueError(f"Cannot resume the sweep with {done}: it differs (saved, now): {differ}. Use "
                                 "another output directory, or the sweep's own model, prompts and method.")
        else:
            where.mkdir(parents=True, exist_ok=True)
            again = resume and log.is_file()
            circuit = run(tau, log_path=None if again else log, resume=log if again else None)
            circuit.save(done)
        circuits.append(circuit)
    return circuits


def tau_dir(out, tau: float) -> Path:
    """Where a sweep into `out` keeps the circuit and decision log of `tau`."""
    return Path(out) / f"tau-{tau:g}"


def roc(model: Transformer, task: Task, taus: Sequence[float], **kwargs) -> RocResult:
    """ACDC at each tau (or `method`, `out`, `resume`: as for `sweep`),
    scored against ``task.canonical``."""
    if task.canonical is None:
        raise ValueError(f"Task {task.name} has no canonical circuit to compare with. {task.description}")
    circuits = sweep(model, task, taus, **kwargs)
    return roc_from_circuits(circuits, task.canonical, list(taus))


def faithfulness(model: Transformer, task: Task, circuit: Circuit, *, metric=None, corruption=None) -> dict:
    """The circuit's metric next to the full model's and the empty circuit's.
    ``normalized`` = (empty - circuit) / (empty - full): 1 is as good as the
    full model, 0 as bad as cutting every edge. The metric, corruption and
    matmul precision are the circuit's own unless given."""
    from .acdc import resolve_corruption, resolve_metric
    from .precision import matmul_precision
    from .scoring import Scorer

    if not isinstance(circuit, Circuit):
        raise TypeError(f"faithfulness takes a Circuit (acdc's result, or Circuit.load(path)), got "
                        f"{type(circuit).__name__}.")
    circuit.graph.check_config(model.config)  # before the metric: another model's circuit names other metrics too
    if metric is None:
        metric = circuit.settings.get("metric")
        if metric is not None and metric not in task.metrics:
            raise TaskError(f"The circuit was found with the metric {metric!r}, which task {task.name} does not "
                            f"name (a callable?); pass it: faithfulness(..., metric=f).")
    _, metric_fn = resolve_metric(task, metric)
    _, corr = resolve_corruption(model, task, corruption if corruption is not None else circuit.settings.get("corruption"))
    with matmul_precision(circuit.settings.get("precision")):
        scorer = Scorer(model, circuit.graph, task.bind(model), corr, metric_fn, static_task=task)
        full = _finite_metric(scorer, np.ones(circuit.graph.n_edges), "the full model")
        empty = _finite_metric(scorer, np.zeros(circuit.graph.n_edges), "the empty circuit")
        value = _finite_metric(scorer, circuit.mask, "the circuit")
    span = empty - full
    return {"circuit": value, "full": full, "empty": empty,
            "normalized": float((empty - value) / span) if span != 0 else float("nan")}


def ranking_auc(importance: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of ranking by `importance` (ties count one half): the chance that
    a true item outranks a false one."""
    importance, truth = np.asarray(importance, np.float64), np.asarray(truth, bool)
    n_pos, n_neg = truth.sum(), (~truth).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(importance, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average ranks, 1-based
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_from_scores(circuit: Circuit, canonical: Iterable[str], max_points: int = 200,
                    rank: Optional[str] = None) -> RocResult:
    """ROC of a scored circuit: edges ranked by |score|, or by the signed
    score (`rank`, default: the circuit's own ``settings["rank"]``, else
    "abs"; nodes by their best edge), against `canonical`. AUCs are exact;
    `max_points` thresholds are kept for plotting."""
    from .algorithms import edge_ranking

    if circuit.settings.get("finished") is False:
        raise ValueError(f"The circuit comes from a {circuit.settings.get('method')} run that was stopped before its "
                         "scores were complete; resume it (resume=) before ranking its edges.")
    graph = circuit.graph
    canonical = set(canonical)
    importance = edge_ranking(circuit.scores, rank or circuit.settings.get("rank", "abs"))
    truth = np.array([n in canonical for n in graph.edge_names])
    node_names = sorted(all_nodes(graph))
    node_truth_set = nodes_of(graph, canonical)
    node_best = {n: -np.inf for n in node_names}
    for e, s in zip(graph.edges, importance):
        for n in (e.sender, e.receiver):
            if n.component in node_best:
                node_best[n.component] = max(node_best[n.component], s)
    node_imp = np.array([node_best[n] for n in node_names])
    node_truth = np.array([n in node_truth_set for n in node_names])
    thresholds = np.unique(importance)[::-1]
    if len(thresholds) > max_points:
        thresholds = thresholds[np.linspace(0, len(thresholds) - 1, max_points).astype(int)]
    edge_points = [(float((importance[~truth] >= t).mean()), float((importance[truth] >= t).mean())) for t in thresholds]
    node_points = [(float((node_imp[~node_truth] >= t).mean()) if (~node_truth).any() else 0.0,
                    float((node_imp[node_truth] >= t).mean()) if node_truth.any() else 0.0) for t in thresholds]
    return RocResult([float(t) for t in thresholds], edge_points, node_points, ranking_auc(importance, truth),
                     ranking_auc(node_imp, node_truth), [circuit])


FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ACDC_TAUS = (1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def _curve_area(points: Sequence[tuple[float, float]], f: Callable[[float], float]) -> float:
    pts = sorted(points)
    xs = np.array([p[0] for p in pts])
    ys = np.array([f(p[1]) for p in pts])
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def _finite_metric(scorer, mask, what: str) -> float:
    """The metric of the circuit `mask` in a full pass, refused unless finite."""
    return check_finite(scorer.full(np.asarray(mask, np.float32)), f"The metric of {what}")


def faithfulness_curve(model: Transformer, task: Task, masks: Sequence[np.ndarray], *, metric=None,
                       corruption=None) -> list[tuple[float, float]]:
    """(fraction of edges kept, normalised faithfulness) for each mask; MIB's
    CPR is the area under this curve (higher is better) and CMD the area
    between it and 1 (lower is better)."""
    from .acdc import resolve_corruption, resolve_metric
    from .scoring import Scorer

    graph = task.graph(model)
    _, metric_fn = resolve_metric(task, metric)
    _, corr = resolve_corruption(model, task, corruption)
    scorer = Scorer(model, graph, task.bind(model), corr, metric_fn, static_task=task)
    full = _finite_metric(scorer, np.ones(graph.n_edges), "the full model")
    empty = _finite_metric(scorer, np.zeros(graph.n_edges), "the empty circuit")
    span = empty - full if empty != full else float("nan")
    values = [_finite_metric(scorer, m, f"the circuit keeping {int(np.sum(np.asarray(m) > 0.5))} edges") for m in masks]
    return [(float(np.mean(m > 0.5)), float((empty - v) / span)) for m, v in zip(masks, values)]


def top_fraction_masks(scores: np.ndarray, fractions: Sequence[float] = FRACTIONS,
                       rank: str = "abs") -> list[np.ndarray]:
    """Masks keeping the top fraction of edges by |score|, or by the signed
    score (`rank`; ties broken by index)."""
    from .algorithms import edge_ranking

    order = np.argsort(-edge_ranking(scores, rank), kind="stable")
    masks = []
    for f in fractions:
        m = np.zeros(len(order), np.float32)
        m[order[: int(round(f * len(order)))]] = 1.0
        masks.append(m)
    return masks


def compare(methods: dict, tasks: dict, *, taus: Sequence[float] = ACDC_TAUS, corruption=None,
            metric=None, fractions: Sequence[float] = FRACTIONS) -> list[dict]:
    """Each method on each task: edge and node ROC AUC against the canonical
    circuit, the faithfulness curve with CPR and CMD, and the wall time.

    methods: name -> callable(model, task, corruption=...) returning a scored
    Circuit; the name "acdc" (value None) runs ACDC over `taus` instead.
    tasks: name -> (model, task) with a canonical circuit.
    metric: a metric name for every task, or a dict task name -> metric name
    (default: each task's).
    """
    import time

    lacking = [name for name, (_, task) in tasks.items() if task.canonical is None]
    if lacking:  # before hours of runs, not after the first method
        raise ValueError(f"compare needs a canonical circuit for each task; {lacking} have none.")
    rows = []
    for task_name, (model, task) in tasks.items():
        task_metric = metric.get(task_name) if isinstance(metric, dict) else metric
        for name, method in methods.items():
            start = time.perf_counter()
            if method is None:
                result = roc(model, task, list(taus), corruption=corruption, metric=task_metric, progress=False)
                masks = [c.mask for c in result.circuits]
            else:
                circuit = method(model, task, corruption=corruption, metric=task_metric)
                result = roc_from_scores(circuit, task.canonical)
                masks = top_fraction_masks(circuit.scores, fractions, circuit.settings.get("rank", "abs"))
            seconds = time.perf_counter() - start
            curve = faithfulness_curve(model, task, masks, corruption=corruption, metric=task_metric)
            if method is None:
                curve = sorted({(0.0, 0.0), (1.0, 1.0), *curve})
            rows.append({
                "task": task_name, "method": name, "metric": task_metric or task.default_metric, "edge_auc": result.edge_auc, "node_auc": result.node_auc,
                "cpr": _curve_area(curve, lambda y: y), "cmd": _curve_area(curve, lambda y: abs(1.0 - y)),
                "seconds": seconds, "curve": curve, "edge_points": result.edge_points,
            })
    return rows

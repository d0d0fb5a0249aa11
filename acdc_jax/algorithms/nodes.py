"""ACDC over nodes: the same greedy walk as ACDC, one whole head or MLP at a time.

Removing a node cuts every edge it sends, so each receiver reads the node's
output from the corrupted run: the node is resample-ablated (or zero- or
mean-ablated, with that corruption). Nodes are visited from the output back:
layers last to first, in each layer the MLP before the heads (heads in
`head_order`). A node is removed when ``metric_new - metric_current < tau``
(``abs(...)`` with ``abs_value``). Every node writes to the logits directly,
so none loses its path to the output, and every node is tried. The
embedding is always kept.

A model has edges in the thousands to hundreds of thousands but nodes in the
hundreds (SmolLM2-135M: 124,021 edges, 300 nodes), so this finds a coarser
circuit where edge-level ACDC is out of reach. The returned circuit keeps
every edge between the nodes it keeps.

``mode="batched"`` scores chains of cumulative removals (n1, n1+n2, ...) in
one vmapped pass from about the earliest layer they change
(`_Nodes.pass_start`); a chain ends at its first rejection. A result within
rounding of tau is rescored in full passes, as ``mode="sequential"`` (one
full pass per node) scores it, so both make the same decisions.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np

from ..acdc import check_run, progress_bar, starting_metric, warn_if_flat
from ..decide import PassOutOfMemory, TieBand, narrow, score_pass, tie_band
from ..candidates import Candidates
from ..circuit import Circuit, Decision
from ..errors import MetricError
from ..graph import CircuitGraph
from ..memory import plan_task
from ..precision import takes_precision
from ..programs import program_counts, programs_since
from ..runlog import RunLog, closed_on_error, model_fingerprint, task_fingerprint
from ..sharding import parse_mesh
from ..speculate import trial_result
from .attribution import receiver_layers, setup


def node_order(graph: CircuitGraph, head_order: str = "ascending") -> list[str]:
    """The nodes ACDC over nodes visits, in order ('m3', 'a3.0', 'a3.1', ..., 'a0.7')."""
    if head_order not in ("ascending", "descending"):
        raise ValueError(f"head_order must be 'ascending' or 'descending', got {head_order!r}.")
    heads = range(graph.n_heads) if head_order == "ascending" else range(graph.n_heads - 1, -1, -1)
    order = []
    for layer in range(graph.n_layers - 1, -1, -1):
        order += [f"m{layer}"] if graph.has_mlp else []
        order += [f"a{layer}.{h}" for h in heads]
    return order


class _Nodes:
    """Each node's outgoing edges and the layer a pass must start at to cut them."""

    def __init__(self, graph: CircuitGraph, order: list[str]):
        self.order = order
        self.sender_of = np.array([e.sender.component for e in graph.edges])
        self.receiver_of = np.array([e.receiver.component for e in graph.edges])
        residual = np.array([e.kind == "residual" for e in graph.edges])
        self.out = {n: np.flatnonzero(residual & (self.sender_of == n)) for n in order}
        layers = receiver_layers(graph)
        self.start = {n: int(layers[self.out[n]].min()) for n in order}
        self.grid = -(-(graph.n_layers + 1) // 8)

    def pass_start(self, chain: list[str]) -> int:
        """The layer a pass cutting `chain` starts at: the earliest layer they
        change, rounded down to one of about 8 layers, so that a deep model
        compiles (and checks, `_calibrate`) few programs; the layers in
        between are recomputed unchanged."""
        start = min(self.start[n] for n in chain)
        return start // self.grid * self.grid

    def circuit_mask(self, removed: set) -> np.ndarray:
        """Every edge kept except those into or out of a removed node."""
        gone = np.isin(self.sender_of, list(removed)) | np.isin(self.receiver_of, list(removed))
        return (~gone).astype(np.float32)


def _chain_width(p_remove: float, cap: int, cpu: bool) -> int:
    """How many cumulative removals to score at once. On accelerators a wider
    pass costs little more, so the cap. On a CPU each candidate costs about a
    pass: the width of 1, 4 or 16 with the most expected decisions (a chain
    is useful up to its first rejection) per candidate, plus one for the pass."""
    if not cpu:
        return cap
    widths = [w for w in (1, 4, 16) if w <= cap] or [1]  # few widths: few programs to compile
    return max(widths, key=lambda w: sum(p_remove ** j for j in range(w)) / (1 + w))


@takes_precision
def acdc_nodes(model, task, tau: float, *, metric=None, corruption=None, mode: str = "batched",
               abs_value: bool = False, head_order: str = "ascending", graph: Optional[CircuitGraph] = None,
               max_width: Optional[int] = None, log_path=None, resume=None, progress: bool = True,
               mesh=None, rescore_ties: Optional[bool] = None, stop_after: Optional[float] = None) -> Circuit:
    """ACDC over whole heads and MLPs (see the module doc). Returns a Circuit
    whose mask keeps the edges between the kept nodes; ``decisions`` name
    nodes ('a3.5', 'm2'), in the order tried, ``settings["nodes"]`` lists the
    kept ones, and each removed or kept node's metric change is the score of
    its outgoing edges. `log_path` / `resume`: a JSON-lines decision log, and
    `mesh` (a Mesh, "auto" or "CxP"): candidates and prompts spread over
    devices, `rescore_ties` (default: on in full float32 only) and
    `stop_after` (seconds; nodes not yet tried stay in), as for `acdc`."""
    import jax

    tau = check_run(tau, mode, abs_value, rescore_ties, stop_after, log_path, resume)
    start_time, programs_before = time.perf_counter(), program_counts()
    graph = task.graph_for(model, graph)
    mesh = parse_mesh(mesh)
    caps, chunk = [1] * (graph.n_layers + 1), None
    if mode == "batched":
        caps, chunk = plan_task(model, graph, task, max_width, mesh)
    graph, scorer, settings = setup(model, task, metric, corruption, graph, prompt_chunk=chunk, mesh=mesh,
                                    ahead=True)
    nodes = _Nodes(graph, node_order(graph, head_order))
    band = tie_band(rescore_ties, settings["precision"])
    settings.update(method="acdc_nodes", tau=tau, abs_value=bool(abs_value), head_order=head_order,
                    model=model_fingerprint(model), prompts=task_fingerprint(task), rescore_ties=bool(band.scale))
    mask = np.ones(graph.n_edges, np.float32)
    full_metric = starting_metric(scorer, mask, settings["metric"])
    log = RunLog.open(resume or log_path, settings, full_metric, resume=resume is not None)
    run = _Run(nodes, scorer, mask, full_metric, tau, abs_value, band)
    with closed_on_error(log):
        run.replay(log.logged)
        warn_if_flat(scorer, full_metric, settings["metric"], tau, abs_value=abs_value, stacklevel=4)
    bar = progress_bar(progress, len(nodes.order), len(run.decisions), desc="ACDC nodes", unit="node")
    try:
        while run.next < len(nodes.order):
            made = run.step(mode, caps, jax.default_backend() == "cpu")
            log.write(made)
            bar.update(len(made))
            bar.set_postfix(removed=len(run.removed), metric=f"{run.metric:.4g}")
            if stop_after is not None and time.perf_counter() - start_time > stop_after:
                break
    finally:
        bar.close()
        log.close()
    kept = [n for n in nodes.order if n not in run.removed]
    final = nodes.circuit_mask(run.removed)
    scores = np.full(graph.n_edges, np.nan)
    for d in run.decisions:
        scores[nodes.out[d.edge]] = d.result
    settings.update(mode=mode, nodes=kept, n_nodes=len(nodes.order), passes=scorer.passes, rescored=run.rescored,
                    narrowed=run.narrowed, seconds=round(time.perf_counter() - start_time, 3),
                    finished=run.next == len(nodes.order))
    metric = scorer.full(final)
    settings.update(programs_since(programs_before))
    return Circuit(graph, final, metric, run.decisions, settings, scores)


class _Run:
    """The walk's state: the current mask and metric, the decisions so far."""

    def __init__(self, nodes: _Nodes, scorer, mask: np.ndarray, metric: float, tau: float, abs_value: bool,
                 band: TieBand):
        self.nodes, self.scorer, self.mask, self.metric = nodes, scorer, mask, metric
        self.tau, self.abs_value = tau, abs_value
        self.removed: set = set()
        self.decisions: list[Decision] = []
        self.next = 0
        self.p_remove = 0.5  # recent share of trials that removed their node (sets the chain width)
        self.tie_band, self.gaps, self.rescored = band, {}, 0
        self.narrowed: list[dict] = []  # passes that ran out of device memory

    def _apply(self, d: Decision) -> None:
        name = d.edge
        if not d.kept:
            self.removed.add(name)
            self.mask[self.nodes.out[name]] = 0.0
            self.metric = d.metric_after
        self.p_remove = 0.8 * self.p_remove + 0.2 * (not d.kept)
        self.decisions.append(d)
        self.next += 1

    def replay(self, logged: list[Decision]) -> None:
        for i, d in enumerate(logged):
            name = self.nodes.order[self.next] if self.next < len(self.nodes.order) else None
            if d.edge != name or not d.tried:
                raise ValueError(f"Decision {i} of the log ({d.edge}, tried={d.tried}) is not what ACDC over nodes "
                                 f"does next ({name}); the log belongs to another run.")
            self._apply(d)

    def step(self, mode: str, caps: list, cpu: bool) -> list[Decision]:
        """Decide the next node, or a chain of them in one pass."""
        order, made = self.nodes.order, []
        if mode == "sequential":
            chain = order[self.next:self.next + 1]
            metrics = [self.scorer.full(self._cut(chain))]
        else:
            chain = order[self.next:self.next + _chain_width(self.p_remove, max(caps), cpu)]
            while len(chain) > 1 and len(chain) > caps[self.nodes.pass_start(chain)]:
                chain = chain[:-1]
            start = self.nodes.pass_start(chain)
            cuts = [np.concatenate([self.nodes.out[n] for n in chain[:k + 1]]) for k in range(len(chain))]
            try:
                metrics = score_pass(self.scorer, Candidates(self.mask, cuts), start, len(chain))
            except PassOutOfMemory as oom:  # nothing decided: narrower passes, and the caller steps again
                self.narrowed.append(narrow(caps, self.scorer, oom))
                return made
            if self.tie_band.scale:
                self._calibrate((start, len(chain)), chain[0], float(metrics[0]))
        for k, name in enumerate(chain):
            before, new = self.metric, float(metrics[k])
            if not math.isfinite(new):
                raise MetricError(f"The metric is {new} after removing node {name}; it must stay finite.")
            result = trial_result(before, new, self.abs_value)
            if mode == "batched" and abs(result - self.tau) < self.tie_band(before, new):
                before, new = self.scorer.full(self.mask), self.scorer.full(self._cut([name]))
                result = trial_result(before, new, self.abs_value)
                self.rescored += 1
            keep = not result < self.tau
            made.append(Decision(name, self.next, tried=True, kept=keep, metric_before=before, metric_after=new))
            self._apply(made[-1])
            if keep:  # the chain's later candidates assumed this node removed
                break
        return made

    def _cut(self, chain: list[str]) -> np.ndarray:
        mask = self.mask.copy()
        for n in chain:
            mask[self.nodes.out[n]] = 0.0
        return mask

    def _calibrate(self, program, first: str, metric: float) -> None:
        """The first time a (start layer, width) program runs, score its first
        candidate in a full pass too and widen the band to the gap."""
        if program in self.gaps:
            return
        full = self.scorer.full(self._cut([first]))
        self.gaps[program] = gap = 2 * abs(metric - full)
        self.tie_band.widen(gap, self.metric, full)


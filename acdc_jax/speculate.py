"""Which candidate circuits a batched ACDC pass scores.

ACDC's trials depend on each other: the circuit edge e2 is tried against
contains e1 or not, depending on e1's outcome. A batched pass scores trials
ahead of time by guessing the earlier outcomes, and a score is used only when
every guess it rests on was right, so the decisions are exactly the loop's.

The possible futures form a binary tree: each trial node has a "removed" and
a "kept" child (the next trial after the edge is cut or restored, with any
receivers that the cut disconnects skipped on the way). `plan` picks the
nodes most likely to be reached, given an estimate of how likely each trial
removes its edge (`Forecast`: from scores earlier passes left for the edge,
else `RemovalRate`, per kind of edge). With every guess "removed" the plan is the
chain of cumulative removals e1, e1+e2, ...; with every guess "kept" it is
single-edge removals from the current circuit; in between it branches.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from typing import Callable, Optional

import numpy as np

from .candidates import Candidates
from .graph import CircuitGraph
from .schedule import Event, Schedule


@dataclasses.dataclass
class TrialNode:
    prunes: list[Event]  # receivers skipped (edges dropped untried) before this trial
    trial: Event
    plan_mask: np.ndarray  # the circuit the plan starts from
    cut: tuple[int, ...]  # the edges cut from it (guessed removals, prunes) before this trial
    prob: float  # estimated probability that the run reaches this node
    # the earliest receiver layer at which the candidate differs from the start circuit: a pass starts
    # there at the latest, as the senders before it are read from the start circuit's cached deviations
    first_layer: int
    children: dict = dataclasses.field(default_factory=dict)  # removed (bool) -> index in the plan

    @property
    def mask(self) -> np.ndarray:
        """The circuit the trial starts from, after the prunes."""
        m = self.plan_mask.copy()
        m[list(self.cut)] = 0.0
        return m

    def candidate(self) -> np.ndarray:
        """The circuit whose metric decides this trial: `mask` without the trial's edge."""
        m = self.mask
        m[self.trial.edge] = 0.0
        return m


def plan(schedule: Schedule, mask: np.ndarray, cursor, width: int, p_remove: Callable[[int], float],
         probe_below: float = 0.0) -> list[TrialNode]:
    """Up to `width` trial nodes, most probable first; node 0 is the next
    trial from (`mask`, `cursor`). A node's parent always comes before it.
    `p_remove(edge)` estimates how likely a trial of `edge` removes it. Empty
    when no trial is left.

    Once the likeliest node left is less likely than `probe_below`, the rest
    of the width is one chain of probes from it, each guessing its parent's
    likelier outcome, as far as the layers the pass already starts from. A
    probe is rarely reached, but it scores an edge ahead on a circuit near
    the one the run will reach, so that the next passes can guess that edge
    (`Forecast`) and follow the likely path far instead of branching at every
    unscored edge."""
    nodes: list[TrialNode] = []
    heap = [(-1.0, 0, None, False, cursor, ())]  # a child's cuts are its parent's, and its edge if removed
    mask = mask.copy()  # the nodes' reference, whatever the caller does with its own later
    scratch = mask.copy()  # a node's circuit: `mask` with its cuts applied, then restored
    count, floor = 1, schedule.cut_layer(mask)
    probing, lowest = False, None  # lowest: the earliest layer the pass starts from when probing begins
    while heap and len(nodes) < width:
        if not probing and -heap[0][0] < probe_below:
            probing, lowest, heap = True, min(n.first_layer for n in nodes), heap[:1]  # the likeliest entry
        neg, _, parent, removed, cur, cut = heapq.heappop(heap)
        if removed:
            cut = cut + (nodes[parent].trial.edge,)
        scratch[list(cut)] = 0.0
        prunes, _, trial = schedule.next_trial(scratch, cur, in_place=True)
        cut = cut + tuple(ev.edge for ev in prunes)
        undo = list(cut)
        scratch[undo] = mask[undo]
        if trial is None:
            continue
        inherited = floor if parent is None else nodes[parent].first_layer
        first_layer = min([ev.layer for ev in prunes] + [trial.layer, inherited])
        if probing and first_layer < lowest:  # a probe would make the pass start earlier
            break
        if parent is not None:
            nodes[parent].children[removed] = len(nodes)
        nodes.append(TrialNode(prunes, trial, mask, cut, -neg, first_layer))
        p = p_remove(trial.edge)
        for outcome, q in ((True, p), (False, 1.0 - p)):
            if not probing or outcome == (p >= 0.5):
                heapq.heappush(heap, (neg * q, count, len(nodes) - 1, outcome, trial.cursor, cut))
            count += 1
    return nodes


def candidates(nodes: list[TrialNode], mask: np.ndarray) -> Candidates:
    """Each node's candidate circuit, as cuts from the plan's circuit `mask`."""
    return Candidates(mask, [n.cut + (n.trial.edge,) for n in nodes])


class RemovalRate:
    """How often recent trials removed their edge, per kind of edge: the
    receiver's kind and layer and the sender's layer (a layer's q inputs from
    layer-0 heads, say), blended with the rate over all recent trials. In
    ACDC's order these groups come in runs (a layer's heads one after another)
    and their outcomes are alike. Laplace-smoothed, so never 0 or 1."""

    def __init__(self, graph: CircuitGraph, window: int = 32, group_window: int = 16, prior_weight: float = 1.0):
        keys = [(e.receiver.kind, e.receiver.layer, e.sender.layer) for e in graph.edges]
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.group = np.array([index[k] for k in keys])
        self.recent: collections.deque = collections.deque(maxlen=window)
        self.by_group = [collections.deque(maxlen=group_window) for _ in index]
        self.prior_weight = prior_weight
        self._removed = [0] * len(index)  # removals in each group's window
        self._overall = 0.5


    def update(self, decisions) -> None:
        touched = set()
        for d in decisions:
            if d.tried:
                g = self.group[d.index]
                self.recent.append(not d.kept)
                self.by_group[g].append(not d.kept)
                touched.add(g)
        for g in touched:
            self._removed[g] = sum(self.by_group[g])
        self._overall = (sum(self.recent) + 1) / (len(self.recent) + 2)

    def p(self, edge: int) -> float:
        g = self.group[edge]
        return (self._removed[g] + self.prior_weight * self._overall) / (len(self.by_group[g]) + self.prior_weight)


def trial_result(before, after, abs_value: bool):
    """What ACDC compares with tau: the metric's rise when the edge is cut
    (its size with `abs_value`); numbers or arrays."""
    return abs(after - before) if abs_value else after - before


def node_effects(nodes: list[TrialNode], metrics, current: float, abs_value: bool) -> np.ndarray:
    """Each scored node's metric rise (ACDC's result) over the circuit it
    starts from: its "removed" parent's candidate, or the circuit its "kept"
    parent started from (`current` at node 0); prunes change no metric."""
    start = np.empty(len(nodes))
    start[0] = current
    for i, node in enumerate(nodes):
        for removed, j in node.children.items():
            if j < len(nodes):
                start[j] = float(metrics[i]) if removed else start[i]
    return trial_result(start, np.asarray(metrics[:len(nodes)], np.float64), abs_value)


class Forecast:
    """How likely a trial removes its edge, for `plan`. A pass scores trials
    on guessed circuits; most guesses turn out wrong, but each such score is
    still the edge's effect on a circuit close to the one the run reaches.
    Where an edge has one, the guess is P(effect < tau) under the spread of
    such scores around the true results of the edges decided since;
    otherwise the kind's removal rate (`RemovalRate`). Where about half the
    edges are kept, the kind alone guesses little and a pass branches at every
    edge; with the scores it can follow the likely path far. Which trials a
    pass scores changes, never a decision."""

    def __init__(self, graph: CircuitGraph, tau: float, abs_value: bool = False, window: int = 64,
                 floor: float = 0.01):
        self.tau, self.abs_value, self.floor = tau, abs_value, floor
        self.rate = RemovalRate(graph)
        self.effect = np.full(graph.n_edges, np.nan)  # the latest score of each undecided edge
        self.errors: collections.deque = collections.deque(maxlen=window)
        self.spread = max(tau, 1e-12)  # until errors are measured

    def update(self, decisions, nodes: Optional[list[TrialNode]] = None, effects: Optional[np.ndarray] = None) -> None:
        """Learn from a pass: its decisions against the scores held for them, then its other scores."""
        self.rate.update(decisions)
        for d in decisions:
            if d.tried and not np.isnan(self.effect[d.index]):
                result = trial_result(d.metric_before, d.metric_after, self.abs_value)
                self.errors.append(abs(result - self.effect[d.index]))
            self.effect[d.index] = np.nan
        if len(self.errors) >= 4:
            self.spread = max(1.5 * float(np.median(self.errors)), 1e-6 * self.tau, 1e-12)
        decided = {d.index for d in decisions}
        for node, effect in zip(nodes or [], [] if effects is None else effects):
            e = node.trial.edge
            if e not in decided:  # nodes come most probable first: keep that one's score
                decided.add(e)
                self.effect[e] = effect

    def p(self, edge: int) -> float:
        effect = self.effect[edge]
        if np.isnan(effect):
            return self.rate.p(edge)
        z = min(max((self.tau - effect) / self.spread, -50.0), 50.0)
        return min(max(1.0 / (1.0 + math.exp(-z)), self.floor), 1.0 - self.floor)

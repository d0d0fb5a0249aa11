"""Which candidate circuits a batched ACDC pass scores.

ACDC's trials depend on each other: the circuit edge e2 is tried against
contains e1 or not, depending on e1's outcome. A batched pass scores trials
ahead of time by guessing the earlier outcomes, and a score is used only when
every guess it rests on was right, so the decisions are exactly the loop's.

The possible futures form a binary tree: each trial node has a "removed" and
a "kept" child (the next trial after the edge is cut or restored, with any
receivers that the cut disconnects skipped on the way). `plan` picks the
nodes most likely to be reached, given an estimate of how often a trial
removes its edge (`RemovalRate`, per kind of edge). With every guess "removed" the plan is the
chain of cumulative removals e1, e1+e2, ...; with every guess "kept" it is
single-edge removals from the current circuit; in between it branches.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Callable, Optional

import numpy as np

from .graph import CircuitGraph
from .schedule import Event, Schedule


@dataclasses.dataclass
class TrialNode:
    prunes: list[Event]  # receivers skipped (edges dropped untried) before this trial
    trial: Event
    mask: np.ndarray  # the circuit the trial starts from, after the prunes
    prob: float  # estimated probability that the run reaches this node
    children: dict = dataclasses.field(default_factory=dict)  # removed (bool) -> index in the plan

    def candidate(self) -> np.ndarray:
        """The circuit whose metric decides this trial: `mask` without the trial's edge."""
        m = self.mask.copy()
        m[self.trial.edge] = 0.0
        return m

    def layers(self) -> list[int]:
        return [ev.layer for ev in self.prunes] + [self.trial.layer]


def plan(schedule: Schedule, mask: np.ndarray, cursor, width: int, p_remove: Callable[[int], float]) -> list[TrialNode]:
    """Up to `width` trial nodes, most probable first; node 0 is the next
    trial from (`mask`, `cursor`). A node's parent always comes before it.
    `p_remove(edge)` estimates how likely a trial of `edge` removes it. Empty
    when no trial is left."""
    nodes: list[TrialNode] = []
    heap = [(-1.0, 0, None, False, mask, cursor)]  # a child's mask is its parent's, cut when popped
    count = 1
    while heap and len(nodes) < width:
        neg, _, parent, removed, m, cur = heapq.heappop(heap)
        if removed:
            m = m.copy()
            m[nodes[parent].trial.edge] = 0.0
        prunes, m, trial = schedule.next_trial(m, cur)
        if trial is None:
            continue
        if parent is not None:
            nodes[parent].children[removed] = len(nodes)
        nodes.append(TrialNode(prunes, trial, m, -neg))
        p = p_remove(trial.edge)
        for outcome, q in ((True, p), (False, 1.0 - p)):
            heapq.heappush(heap, (neg * q, count, len(nodes) - 1, outcome, m, trial.cursor))
            count += 1
    return nodes


def candidates(nodes: list[TrialNode]) -> np.ndarray:
    """Each node's candidate circuit, stacked [n, n_edges]."""
    masks = np.stack([n.mask for n in nodes])
    masks[np.arange(len(nodes)), [n.trial.edge for n in nodes]] = 0.0
    return masks


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

    def update(self, decisions) -> None:
        for d in decisions:
            if d.tried:
                self.recent.append(not d.kept)
                self.by_group[self.group[d.index]].append(not d.kept)

    def p(self, edge: int) -> float:
        overall = (sum(self.recent) + 1) / (len(self.recent) + 2)
        seen = self.by_group[self.group[edge]]
        return (sum(seen) + self.prior_weight * overall) / (len(seen) + self.prior_weight)

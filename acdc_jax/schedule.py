"""The order in which ACDC visits receivers and tries edges (Conmy et al. 2023).

Units are visited in the reverse of the order their TransformerLens hooks fire:
the logits first, then for each layer from the last: the MLP input; with q/k/v
steps, each head's v, k and q step (heads from last to first); then each head's
v, k and q input (heads from last to first). Within a residual receiver, the
senders go latest layer first, a layer's MLP before its heads, heads in
``head_order`` (ascending by default, the original's "reverse" indices mode),
and the embedding(s) last.

A unit whose output no longer reaches the logits is not tried: all its incoming
edges are dropped ("pruned"). A head reaches the logits while any of its
outgoing edges is kept; an input with a q/k/v step reaches it while that step
is kept; an MLP input while the MLP has a kept outgoing edge.

A `start` circuit restricts the schedule to its edges: the others are
removed before the walk and never tried.

An explicit `order` (every edge once) replaces all of this: each edge is tried
in that order and nothing is skipped, which reproduces other implementations'
runs (auto-circuit tries edges by receiver layer, last first, with no
skipping).

`simulate` looks ahead: the events (prunes and trials) the sequential
algorithm would produce if every trial removed its edge; `speculate.plan`
builds on it to look ahead along any guessed outcomes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .graph import CircuitGraph, Node


@dataclasses.dataclass(frozen=True)
class Unit:
    name: str
    candidates: tuple[int, ...]  # edge indices in trial order
    prune_order: tuple[int, ...]  # the same edges in the order the original drops them (heads descending)
    layer: int  # the layer whose inputs these edges enter (n_layers for the logits)
    head: Optional[tuple[int, int]]  # the head whose output must be used, if any
    mlp: Optional[int]  # the MLP whose output must be used, if any
    qkv_step: Optional[int]  # the q/k/v step edge that must be kept, if any


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # "trial" or "prune"
    edge: int
    layer: int
    cursor: tuple[int, int]  # where the schedule stands after this event


class Schedule:
    def __init__(self, graph: CircuitGraph, head_order: str = "ascending", order: Optional[list] = None,
                 start: Optional[np.ndarray] = None):
        if head_order not in ("ascending", "descending"):
            raise ValueError(f"head_order must be 'ascending' or 'descending', got {head_order!r}.")
        self.graph = graph
        self.head_order = head_order
        slot = {s.name: i for i, s in enumerate(graph.senders)}
        self._outgoing: list[list[int]] = [[] for _ in graph.senders]
        incoming: dict[str, list[int]] = {r.name: [] for r in graph.receivers}
        self._qkv_edge: dict[str, int] = {}
        for e in graph.edges:
            if e.kind == "residual":
                self._outgoing[slot[e.sender.name]].append(e.index)
                incoming[e.receiver.name].append(e.index)
            else:
                self._qkv_edge[e.sender.name] = e.index
        self._receiver_layer = np.array([e.receiver.layer for e in graph.edges])
        self._head_slot = {(s.layer, s.head): i for i, s in enumerate(graph.senders) if s.kind == "head"}
        self._mlp_slot = {s.layer: i for i, s in enumerate(graph.senders) if s.kind == "mlp"}
        self.start = np.ones(graph.n_edges, np.float32) if start is None else np.asarray(start, np.float32)
        units = self._units(incoming) if order is None else self._explicit(order)
        self.units = units if start is None else self._within(units)

    def _within(self, units: list[Unit]) -> list[Unit]:
        """The units restricted to the start circuit's edges (units left without any dropped)."""
        keep = lambda edges: tuple(e for e in edges if self.start[e] > 0.5)
        return [dataclasses.replace(u, candidates=keep(u.candidates), prune_order=keep(u.prune_order))
                for u in units if keep(u.candidates)]

    def _explicit(self, order: list) -> list[Unit]:
        """One unit per edge, in the given order, never skipped."""
        g = self.graph
        index = [g.edge_index(e) for e in order]
        if sorted(index) != list(range(g.n_edges)):
            raise ValueError(f"order must name every one of the graph's {g.n_edges} edges exactly once, "
                             f"got {len(index)} entries ({len(set(index))} distinct).")
        return [Unit(g.edge_names[i], (i,), (i,), g.edges[i].receiver.layer, None, None, None) for i in index]

    def _sender_rank(self, sender: Node, head_order: str) -> tuple:
        """Sort key: latest layer first, MLP before heads, embeddings last."""
        if sender.kind in ("embed", "tok_embed", "pos_embed"):
            return (1, 0, 0 if sender.kind != "pos_embed" else 1)
        within = 0 if sender.kind == "mlp" else 1
        h = sender.head or 0
        return (0, -sender.layer, within, h if head_order == "ascending" else -h)

    def _units(self, incoming) -> list[Unit]:
        g, L, H = self.graph, self.graph.n_layers, self.graph.n_heads
        by_name = {r.name: r for r in g.receivers}

        def receiver_unit(r: Node) -> Unit:
            order = tuple(sorted(incoming[r.name], key=lambda i: self._sender_rank(g.edges[i].sender, self.head_order)))
            drop = tuple(sorted(incoming[r.name], key=lambda i: self._sender_rank(g.edges[i].sender, "descending")))
            if r.kind == "logits":
                return Unit(r.name, order, drop, L, None, None, None)
            if r.kind == "mlp_in":
                return Unit(r.name, order, drop, r.layer, None, r.layer, None)
            step = self._qkv_edge.get(r.name)
            head = None if step is not None else (r.layer, r.head)
            return Unit(r.name, order, drop, r.layer, head, None, step)

        units = [receiver_unit(g.receivers[-1])]
        for l in reversed(range(L)):
            if g.has_mlp:
                units.append(receiver_unit(by_name[f"blocks.{l}.hook_mlp_in"]))
            if not g.split_qkv:
                units += [receiver_unit(by_name[f"blocks.{l}.hook_attn_in[{h}]"]) for h in reversed(range(H))]
                continue
            if g.qkv_edges:
                for c in "vkq":
                    for h in reversed(range(H)):
                        e = self._qkv_edge[f"blocks.{l}.hook_{c}_input[{h}]"]
                        units.append(Unit(g.edges[e].receiver.name, (e,), (e,), l, (l, h), None, None))
            for c in "vkq":
                units += [receiver_unit(by_name[f"blocks.{l}.hook_{c}_input[{h}]"]) for h in reversed(range(H))]
        return units

    def connected(self, unit: Unit, mask: np.ndarray) -> bool:
        if unit.qkv_step is not None:
            return bool(mask[unit.qkv_step] > 0.5)
        if unit.head is not None:
            return bool((mask[self._outgoing[self._head_slot[unit.head]]] > 0.5).any())
        if unit.mlp is not None:
            return bool((mask[self._outgoing[self._mlp_slot[unit.mlp]]] > 0.5).any())
        return True

    def cut_layer(self, mask: np.ndarray) -> int:
        """The earliest receiver layer with an edge that `mask` cuts from the
        start circuit (n_layers + 1 if none). In ACDC's order every cut lies
        at or after the receivers still to come; an explicit `order` may cut
        earlier edges first."""
        cut = self._receiver_layer[(np.asarray(mask) < 0.5) & (self.start > 0.5)]
        return int(cut.min()) if cut.size else self.graph.n_layers + 1

    def simulate(self, mask: np.ndarray, cursor: tuple[int, int], max_trials: int) -> list[Event]:
        """Events from `cursor` on, assuming every trial is accepted, up to
        `max_trials` trials (and the prunes that follow the last one)."""
        mask = mask.copy()
        events: list[Event] = []
        for trials in range(max_trials + 1):
            prunes, mask, trial = self.next_trial(mask, cursor)
            events += prunes
            if trial is None or trials == max_trials:
                break
            mask[trial.edge] = 0.0  # ours: copied above, or a fresh copy from next_trial
            events.append(trial)
            cursor = trial.cursor
        return events

    def next_trial(self, mask: np.ndarray, cursor: tuple[int, int], in_place: bool = False
                   ) -> tuple[list[Event], np.ndarray, Optional[Event]]:
        """From `cursor`: the prunes before the next trial, the mask after them
        (`mask` itself when nothing is pruned; changed in place only with
        `in_place`), and that trial (None when the schedule ends first)."""
        u, j = cursor
        prunes: list[Event] = []
        while u < len(self.units):
            unit = self.units[u]
            if j == 0 and not self.connected(unit, mask):
                for e in unit.prune_order:
                    if mask[e] > 0.5:
                        mask = mask.copy() if not (prunes or in_place) else mask
                        mask[e] = 0.0
                        prunes.append(Event("prune", e, unit.layer, (u + 1, 0)))
                u += 1
                continue
            e = unit.candidates[j]
            after = (u, j + 1) if j + 1 < len(unit.candidates) else (u + 1, 0)
            return prunes, mask, Event("trial", e, unit.layer, after)
        return prunes, mask, None

    def finished(self, cursor: tuple[int, int]) -> bool:
        return cursor[0] >= len(self.units)

    def layer_at(self, cursor: tuple[int, int]) -> int:
        """The receiver layer of the unit at `cursor` (n_layers, the logits', once finished)."""
        return self.units[cursor[0]].layer if cursor[0] < len(self.units) else self.graph.n_layers

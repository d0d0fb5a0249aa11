"""Circuits in another tool's format: the graph JSON of the EAP-IG library
(github.com/hannamw/EAP-IG, ``Graph.from_json``), which MIB's circuit
localisation track also reads.

That graph has one ``input`` node, heads ``a{layer}.h{head}``, MLPs
``m{layer}`` and ``logits``; its edges are the residual ones, named
``sender->receiver``, with ``<q>``, ``<k>`` or ``<v>`` after a head receiver.
It has no q/k/v step edges, so a residual edge into a head's q input counts
as in the circuit only where that head's q step is kept too: with the step
cut, the input is corrupted whatever reaches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .circuit import Circuit, dumps
from .graph import Node


def _eap_name(node: Node) -> str:
    if node.kind == "embed":
        return "input"
    if node.kind in ("head", "q", "k", "v"):
        name = f"a{node.layer}.h{node.head}"
        return name if node.kind == "head" else f"{name}<{node.kind}>"
    return node.component  # m{layer}, logits


def _check_granularity(graph) -> None:
    """EAP-IG's graph has ours at its default granularity, and no other."""
    if not graph.split_qkv:
        raise ValueError("EAP-IG graphs have separate q, k and v edges into each head; use a graph with "
                         "split_qkv=True (the default).")
    if graph.split_embed:
        raise ValueError("EAP-IG graphs have one input node; use a graph with split_embed=False (the default for "
                         "all but the tracr tasks).")


def to_eap_ig(circuit: Circuit) -> dict:
    """The circuit as an EAP-IG graph dict: ``cfg``, ``nodes`` (a head, MLP or
    the input is in the graph when it sends a kept edge; the logits always)
    and ``edges`` (``score``: the circuit's score, 0 where it has none;
    ``in_graph``)."""
    g = circuit.graph
    _check_granularity(g)
    kept = np.asarray(circuit.mask) > 0.5
    scores = np.zeros(g.n_edges) if circuit.scores is None else np.nan_to_num(np.asarray(circuit.scores, float))
    steps = {(e.sender.layer, e.sender.head, e.sender.kind): kept[e.index] for e in g.edges if e.kind == "qkv"}
    edges, sending = {}, set()
    for e in g.edges:
        if e.kind != "residual":
            continue
        step = steps.get((e.receiver.layer, e.receiver.head, e.receiver.kind), True)
        on = bool(kept[e.index] and step)
        edges[f"{_eap_name(e.sender)}->{_eap_name(e.receiver)}"] = {"score": float(scores[e.index]), "in_graph": on}
        if on:
            sending.add(_eap_name(e.sender))
    c = g.config
    names = ["input"] + [f"a{l}.h{h}" for l in range(c.n_layers) for h in range(c.n_heads)]
    names += [] if c.attn_only else [f"m{l}" for l in range(c.n_layers)]
    nodes = {n: {"in_graph": n in sending} for n in names}
    nodes["logits"] = {"in_graph": True}
    cfg = {"n_layers": c.n_layers, "n_heads": c.n_heads, "parallel_attn_mlp": bool(c.parallel_attn_mlp),
           "d_model": c.d_model}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_eap_ig(circuit: Circuit, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(to_eap_ig(circuit)) + "\n")
    return path


def from_eap_ig(data: dict, graph) -> Circuit:
    """A circuit over `graph` from an EAP-IG graph dict (as `to_eap_ig` writes
    it, or as that library's ``Graph.to_json`` does): its in-graph edges, with
    every q/k/v step kept, and its scores."""
    if not (isinstance(data, dict) and {"cfg", "edges"} <= set(data)):
        raise ValueError("Not an EAP-IG graph: it needs 'cfg' and 'edges' (eap.graph.Graph.to_json writes them).")
    _check_eap_fields(data)
    c, cfg = graph.config, data["cfg"]
    mine = {"n_layers": c.n_layers, "n_heads": c.n_heads, "parallel_attn_mlp": bool(c.parallel_attn_mlp)}
    differ = {k: (cfg.get(k), v) for k, v in mine.items() if cfg.get(k) != v}
    if differ:
        raise ValueError(f"The EAP-IG graph is for another model (graph, this model): {differ}.")
    _check_granularity(graph)
    index = {f"{_eap_name(e.sender)}->{_eap_name(e.receiver)}": e.index for e in graph.edges if e.kind == "residual"}
    mask = np.array([float(e.kind == "qkv") for e in graph.edges], np.float32)
    scores = np.full(graph.n_edges, np.nan)
    for name, edge in data["edges"].items():
        if name not in index:
            if edge.get("in_graph") or not (c.attn_only and _is_mlp_edge(name)):
                raise ValueError(f"The EAP-IG graph names an edge this model's graph lacks: {name!r}.")
            continue
        mask[index[name]] = float(bool(edge.get("in_graph")))
        if edge.get("score") is not None:
            scores[index[name]] = float(edge["score"])
    return Circuit(graph, mask, settings={"method": "eap-ig-graph"}, scores=scores)


def _check_eap_fields(data: dict) -> None:
    """Field types, so that an edited graph fails by name ("false" in quotes would read as kept)."""
    edges = data["edges"]
    bad = [] if isinstance(data["cfg"], dict) else ["cfg (an object)"]
    if not isinstance(edges, dict):
        bad.append("edges (edge name -> {in_graph, score})")
    else:
        for name, edge in edges.items():
            if not (isinstance(edge, dict) and isinstance(edge.get("in_graph", False), bool) and (
                    edge.get("score") is None or (isinstance(edge["score"], (int, float))
                                                   and not isinstance(edge["score"], bool)))):
                bad.append(f"edges[{name!r}] (in_graph true or false, score a number or null; got {edge!r:.80})")
                break
    if bad:
        raise ValueError(f"Malformed field(s) in the EAP-IG graph: {'; '.join(bad)}.")


def _is_mlp_edge(name: str) -> bool:
    """An edge from or into an MLP, which EAP-IG graphs of attention-only models still list."""
    sender, receiver = name.split("->")
    return sender.startswith("m") or receiver.startswith("m")

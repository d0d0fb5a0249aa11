"""A plain re-implementation of the original ACDC loop (TLACDCExperiment, as
described in DESIGN.md), used only as an independent reference in the tests.

It rebuilds the original correspondence -- nodes keyed by TransformerLens hook
name and head index, edges typed ADDITION / DIRECT_COMPUTATION / PLACEHOLDER,
inserted in the original's order -- visits nodes in the reverse of the hooks'
firing order, and applies the original's connectivity rule before each node.
It shares nothing with acdc_jax.schedule; metrics come from a callable that
takes the set of present edges.
"""

from __future__ import annotations

from collections import OrderedDict

ADD, DIRECT, PLACEHOLDER = "addition", "direct", "placeholder"


class _Edge:
    def __init__(self, kind):
        self.kind, self.present = kind, True


def _build(n_layers, n_heads, attn_only, split_embed):
    graph = OrderedDict()  # name -> OrderedDict(index -> incoming edge type)
    edges = OrderedDict()  # child (name, idx) -> OrderedDict(parent name -> OrderedDict(parent idx -> _Edge))

    def node(name, idx, incoming):
        graph.setdefault(name, OrderedDict())[idx] = incoming

    def edge(parent, child, kind):
        edges.setdefault(child, OrderedDict()).setdefault(parent[0], OrderedDict())[parent[1]] = _Edge(kind)

    logits = (f"blocks.{n_layers - 1}.hook_resid_post", None)
    node(*logits, ADD)
    downstream = [logits]
    for l in reversed(range(n_layers)):
        if not attn_only:
            mlp_out, mlp_in = (f"blocks.{l}.hook_mlp_out", None), (f"blocks.{l}.hook_mlp_in", None)
            node(*mlp_out, PLACEHOLDER)
            for r in downstream:
                edge(mlp_out, r, ADD)
            node(*mlp_in, ADD)
            edge(mlp_in, mlp_out, PLACEHOLDER)
            downstream.append(mlp_in)
        new = []
        for h in reversed(range(n_heads)):
            result = (f"blocks.{l}.attn.hook_result", h)
            node(*result, PLACEHOLDER)
            for r in downstream:
                edge(result, r, ADD)
            for c in "qkv":
                act, inp = (f"blocks.{l}.attn.hook_{c}", h), (f"blocks.{l}.hook_{c}_input", h)
                node(*act, DIRECT)
                node(*inp, ADD)
                edge(act, result, PLACEHOLDER)
                edge(inp, act, DIRECT)
                new.append(inp)
        downstream.extend(new)
    embeds = [("hook_embed", None), ("hook_pos_embed", None)] if split_embed else [("blocks.0.hook_resid_pre", None)]
    for e in embeds:
        node(*e, PLACEHOLDER)
        for r in downstream:
            edge(e, r, ADD)
    return graph, edges


def _fire_order(n_layers, attn_only, split_embed):
    """Hook names in the order TransformerLens 1.6 fires them."""
    names = ["hook_embed", "hook_pos_embed"] if split_embed else []
    for l in range(n_layers):
        names += [f"blocks.{l}.hook_resid_pre"] if (l == 0 and not split_embed) else []
        names += [f"blocks.{l}.hook_{c}_input" for c in "qkv"]
        names += [f"blocks.{l}.attn.hook_{c}" for c in "qkv"] + [f"blocks.{l}.attn.hook_result"]
        if not attn_only:
            names += [f"blocks.{l}.hook_mlp_in", f"blocks.{l}.hook_mlp_out"]
    return names + [f"blocks.{n_layers - 1}.hook_resid_post"]


def _our_name(parent, child, kind):
    def fmt(name, idx):
        return name if idx is None else f"{name}[{idx}]"

    return f"{fmt(*parent)}->{fmt(*child)}"


def reference_acdc(config, metric_of, tau, *, split_embed=False, abs_value=False, indices_mode="reverse",
                   start=None):
    """Decisions [(edge name, tried, kept)] of the original algorithm.

    ``metric_of(present)`` returns the metric of the circuit whose removable
    edges are the set of names ``present``. With ``start`` (a set of names),
    the other removable edges are absent from the beginning and never tried.
    """
    L, H, attn_only = config.n_layers, config.n_heads, config.attn_only
    graph, edges = _build(L, H, attn_only, split_embed)
    order = [n for n in reversed(_fire_order(L, attn_only, split_embed)) if n in graph]
    nodes = [(name, idx) for name in order for idx in graph[name]]

    def present_names():
        out = set()
        for child, by_name in edges.items():
            for pname, by_idx in by_name.items():
                for pidx, e in by_idx.items():
                    if e.present and e.kind != PLACEHOLDER:
                        out.add(_our_name((pname, pidx), child, e.kind))
        return out

    def connected(node):
        for by_name in edges.values():
            e = by_name.get(node[0], {}).get(node[1])
            if e is not None and e.present:
                return True
        return False

    if start is not None:
        for child, by_name in edges.items():
            for pname, by_idx in by_name.items():
                for pidx, e in by_idx.items():
                    if e.kind != PLACEHOLDER and _our_name((pname, pidx), child, e.kind) not in start:
                        e.present = False
    decisions = []
    current = metric_of(present_names())
    for node in nodes:
        if node[0] in ("blocks.0.hook_resid_pre", "hook_embed", "hook_pos_embed"):
            continue
        if node is not nodes[0] and not connected(node):
            for pname, by_idx in edges.get(node, {}).items():
                for pidx, e in by_idx.items():
                    if e.present:
                        e.present = False
                        if e.kind != PLACEHOLDER:
                            decisions.append((_our_name((pname, pidx), node, e.kind), False, False))
            continue
        for pname, by_idx in edges.get(node, {}).items():
            indices = list(by_idx)
            if indices_mode == "reverse":
                indices.reverse()
            for pidx in indices:
                e = by_idx[pidx]
                if e.kind == PLACEHOLDER or not e.present:
                    continue
                e.present = False
                new = metric_of(present_names())
                result = new - current
                if abs_value:
                    result = abs(result)
                name = _our_name((pname, pidx), node, e.kind)
                if result < tau:
                    current = new
                    decisions.append((name, True, False))
                else:
                    e.present = True
                    decisions.append((name, True, True))
    return decisions

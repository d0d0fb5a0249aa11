"""The computational graph at ACDC's granularity, and the edge index.

Senders write to the residual stream: the embedding (``blocks.0.hook_resid_pre``;
with ``split_embed``, ``hook_embed`` and ``hook_pos_embed`` separately), each
head's output (``blocks.L.attn.hook_result[H]``) and each MLP's output
(``blocks.L.hook_mlp_out``). Receivers read it: each head's query, key and
value input (``blocks.L.hook_q_input[H]`` ...; with ``split_qkv=False`` one
``blocks.L.hook_attn_in[H]`` per head), each MLP's input
(``blocks.L.hook_mlp_in``) and the logits (``blocks.{n-1}.hook_resid_post``).

A *residual* edge joins a sender to a receiver strictly downstream of it (a
head's output reaches the same layer's MLP, not the same layer's heads). With
``qkv_edges`` each head's input -> q/k/v step is a removable edge as well
(``blocks.L.hook_q_input[H]->blocks.L.attn.hook_q[H]``), as in the original
ACDC; cutting it feeds the head its corrupted input.

Edge count, with ``e`` embedding senders, ``H`` heads, ``L`` layers, ``m = 1``
if the model has MLPs else 0, and ``r = 3`` (split q/k/v) or 1::

    residual = sum_l [ r*H*(e + l*(H+m)) + m*(e + l*(H+m) + H) ] + e + L*(H+m)
    qkv      = 3*H*L   (only with qkv_edges)

GPT-2 small (e=1, H=12, L=12, m=1): 32,491 residual edges (auto-circuit's
count), 32,923 with the q/k/v steps (the ACDC paper's count), 11,611 with
q/k/v unsplit. attn-only-4l: 1,281 and 1,377.

Edge indices are stable: residual edges ordered by receiver, then by sender,
both in forward order; the q/k/v edges follow, by layer, letter and head.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Iterable, Optional, Sequence, Union

import jax.numpy as jnp
import networkx as nx
import numpy as np
from jaxtyping import Array, Float

from .config import TransformerConfig
from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Node:
    """A sender, a receiver, or (for q/k/v edges) a head's q/k/v activation.

    ``kind``: embed, tok_embed, pos_embed, head, mlp (senders); q, k, v,
    attn_in, mlp_in, logits (receivers); q_out, k_out, v_out.
    ``layer`` is -1 for embeddings and n_layers for the logits.
    """

    name: str
    kind: str
    layer: int
    head: Optional[int] = None

    @property
    def component(self) -> str:
        """Short label of the model part: 'embed', 'pos', 'a3.5', 'm2', 'logits'."""
        if self.kind in ("embed", "tok_embed"):
            return "embed"
        if self.kind == "pos_embed":
            return "pos"
        if self.kind in ("mlp", "mlp_in"):
            return f"m{self.layer}"
        if self.kind == "logits":
            return "logits"
        return f"a{self.layer}.{self.head}"


def component_order(component: str) -> tuple:
    """A sort key for `Node.component` labels in the model's order: the
    embeddings, then by layer a0.1 < a0.2 < a0.10 < m0 < a1.0, then the logits."""
    if component in ("embed", "pos", "logits"):
        return (-1 if component != "logits" else float("inf"), False, 0, component)
    layer, _, head = component[1:].partition(".")
    return (int(layer), component[0] == "m", int(head or 0), "")


@dataclasses.dataclass(frozen=True)
class Edge:
    index: int
    sender: Node
    receiver: Node
    kind: str  # "residual" or "qkv"

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"


EdgeRef = Union[str, int, Edge]


class CircuitGraph:
    """All edges of a model's computational graph, with stable indices.

    Equal configs and options give equal (and equally hashed) graphs, so a graph
    can be a static argument of jitted functions.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        split_qkv: bool = True,
        qkv_edges: Optional[bool] = None,
        split_embed: bool = False,
    ):
        if qkv_edges is None:
            qkv_edges = split_qkv
        if qkv_edges and not split_qkv:
            raise ValueError("qkv_edges=True needs split_qkv=True (the q/k/v steps are per input).")
        self.config = config
        self.split_qkv = bool(split_qkv)
        self.qkv_edges = bool(qkv_edges)
        self.split_embed = bool(split_embed)

    # --- identity -------------------------------------------------------------
    def _key(self):
        return (self.config, self.split_qkv, self.qkv_edges, self.split_embed)

    def __eq__(self, other) -> bool:
        return isinstance(other, CircuitGraph) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def check_config(self, config: TransformerConfig) -> None:
        """Raise unless this graph was built for a model with `config` (a
        circuit of another model would be read with the wrong edges)."""
        if config != self.config:
            differ = {f.name: (getattr(self.config, f.name), getattr(config, f.name))
                      for f in dataclasses.fields(config) if getattr(self.config, f.name) != getattr(config, f.name)}
            raise ConfigError(
                f"The graph (or circuit) was built for another model: config fields (graph's, model's) {differ}. "
                "Use this model's graph: task.graph(model) or CircuitGraph(model.config)."
            )

    def check_same_edges(self, other: "CircuitGraph", what: str) -> None:
        """Raise unless `other` (the graph of `what`, a circuit read beside one
        over this graph) has this graph's edges in this graph's order."""
        if other.edge_names != self.edge_names:
            raise ValueError(f"{what} is over another graph ({other!r}) than {self!r}; use circuits found on models "
                             "of the same shape with the same graph options (split_qkv, qkv_edges, split_embed).")

    def __repr__(self) -> str:
        return (
            f"CircuitGraph({self.n_edges} edges: {self.n_residual_edges} residual"
            f"{f' + {self.n_edges - self.n_residual_edges} q/k/v' if self.qkv_edges else ''}; "
            f"split_qkv={self.split_qkv}, split_embed={self.split_embed})"
        )

    # --- nodes ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def has_mlp(self) -> bool:
        return not self.config.attn_only

    @cached_property
    def embed_senders(self) -> tuple[Node, ...]:
        if not self.split_embed:
            return (Node("blocks.0.hook_resid_pre", "embed", -1),)
        nodes = [Node("hook_embed", "tok_embed", -1)]
        if self.config.positional == "learned":
            nodes.append(Node("hook_pos_embed", "pos_embed", -1))
        return tuple(nodes)

    @property
    def n_embed(self) -> int:
        return len(self.embed_senders)

    @cached_property
    def senders(self) -> tuple[Node, ...]:
        """Senders in forward order; a sender's position is its slot in the
        deviation stack of the patched forward."""
        out = list(self.embed_senders)
        for l in range(self.n_layers):
            out += [Node(f"blocks.{l}.attn.hook_result[{h}]", "head", l, h) for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(Node(f"blocks.{l}.hook_mlp_out", "mlp", l))
        return tuple(out)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @cached_property
    def receivers(self) -> tuple[Node, ...]:
        """Residual receivers in forward order (q, k, v per head, or attn_in; mlp_in; logits)."""
        out = []
        for l in range(self.n_layers):
            letters = "qkv" if self.split_qkv else ("attn_in",)
            for letter in letters:
                hook = f"hook_{letter}_input" if self.split_qkv else "hook_attn_in"
                out += [Node(f"blocks.{l}.{hook}[{h}]", letter, l, h) for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(Node(f"blocks.{l}.hook_mlp_in", "mlp_in", l))
        out.append(Node(f"blocks.{self.n_layers - 1}.hook_resid_post", "logits", self.n_layers))
        return tuple(out)

    def senders_into(self, receiver: Node) -> tuple[Node, ...]:
        """The senders upstream of a residual receiver, in forward order."""
        if receiver.kind == "logits":
            return self.senders
        n = self.n_senders_before_mlp(receiver.layer) if receiver.kind == "mlp_in" else self.n_senders_before_attn(receiver.layer)
        return self.senders[:n]

    # --- edges ----------------------------------------------------------------
    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        out: list[Edge] = []
        for r in self.receivers:
            for s in self.senders_into(r):
                out.append(Edge(len(out), s, r, "residual"))
        if self.qkv_edges:
            by_name = {n.name: n for n in self.receivers}
            for l in range(self.n_layers):
                for letter in "qkv":
                    for h in range(self.n_heads):
                        src = by_name[f"blocks.{l}.hook_{letter}_input[{h}]"]
                        dst = Node(f"blocks.{l}.attn.hook_{letter}[{h}]", f"{letter}_out", l, h)
                        out.append(Edge(len(out), src, dst, "qkv"))
        return tuple(out)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @cached_property
    def n_residual_edges(self) -> int:
        return sum(e.kind == "residual" for e in self.edges)

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.edges)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    def edge_index(self, edge: EdgeRef) -> int:
        if isinstance(edge, Edge):
            return edge.index
        if isinstance(edge, (int, np.integer)):
            if not 0 <= edge < self.n_edges:
                raise IndexError(f"Edge index {edge} out of range [0, {self.n_edges}).")
            return int(edge)
        try:
            return self._index[edge]
        except KeyError:
            raise KeyError(
                f"No edge named {edge!r} in {self!r}. Names look like "
                f"{self.edge_names[0]!r}; list them with graph.edge_names."
            ) from None

    def edge(self, ref: EdgeRef) -> Edge:
        return self.edges[self.edge_index(ref)]

    # --- masks ----------------------------------------------------------------
    def ones(self) -> Float[Array, " n_edges"]:
        return jnp.ones((self.n_edges,), jnp.float32)

    def mask(self, edges: Iterable[EdgeRef]) -> Float[Array, " n_edges"]:
        """1 on the given edges, 0 elsewhere."""
        m = np.zeros((self.n_edges,), np.float32)
        m[[self.edge_index(e) for e in edges]] = 1.0
        return jnp.asarray(m)

    def edges_in(self, mask) -> list[str]:
        """Names of the edges whose mask value is above 0.5."""
        return [self.edge_names[i] for i in np.flatnonzero(np.asarray(mask) > 0.5)]

    # --- layout of the patched forward ----------------------------------------
    def n_senders_before_attn(self, layer: int) -> int:
        return self.n_embed + layer * (self.n_heads + int(self.has_mlp))

    def n_senders_before_mlp(self, layer: int) -> int:
        """The senders an MLP reads: with parallel attention and MLP, not its own layer's heads."""
        return self.n_senders_before_attn(layer) + (0 if self.config.parallel_attn_mlp else self.n_heads)

    @property
    def _layer_columns(self) -> int:
        return 3 * self.n_heads + int(self.has_mlp)

    @property
    def n_columns(self) -> int:
        """Dense receiver columns: q, k, v per head (always split) and mlp_in per layer, then the logits."""
        return self.n_layers * self._layer_columns + 1

    def qkv_columns(self, layer: int) -> np.ndarray:
        start = layer * self._layer_columns
        return np.arange(start, start + 3 * self.n_heads)

    def mlp_column(self, layer: int) -> int:
        return layer * self._layer_columns + 3 * self.n_heads

    @property
    def logits_column(self) -> int:
        return self.n_columns - 1

    def _columns_of(self, r: Node) -> list[int]:
        if r.kind == "logits":
            return [self.logits_column]
        if r.kind == "mlp_in":
            return [self.mlp_column(r.layer)]
        base = r.layer * self._layer_columns
        letters = "qkv" if r.kind == "attn_in" else r.kind
        return [base + "qkv".index(c) * self.n_heads + r.head for c in letters]

    @cached_property
    def _gather(self) -> tuple[np.ndarray, np.ndarray]:
        E = self.n_edges
        add = np.full((self.n_senders, self.n_columns), E, np.int32)
        direct = np.full((self.n_columns,), E + 1, np.int32)
        slot = {s.name: i for i, s in enumerate(self.senders)}
        for e in self.edges:
            if e.kind == "residual":
                add[slot[e.sender.name], self._columns_of(e.receiver)] = e.index
            else:
                direct[self._columns_of(e.sender)] = e.index
        return add, direct

    @cached_property
    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each edge sits in the dense masks, one row per place, sorted
        by edge: (edge, sender row or -1 for a q/k/v step edge, column). An
        unsplit head input has three places (its q, k and v columns)."""
        add, direct = self._gather
        rows, cols = np.nonzero(add < self.n_edges)
        steps = np.flatnonzero(direct < self.n_edges)
        edge = np.concatenate([add[rows, cols], direct[steps]])
        order = np.argsort(edge, kind="stable")
        return (edge[order], np.concatenate([rows, np.full(len(steps), -1)])[order],
                np.concatenate([cols, steps])[order])

    def places(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sender rows, columns) of the dense-mask places of `edges`."""
        edge, rows, cols = self._entries
        start, stop = np.searchsorted(edge, edges), np.searchsorted(edge, edges, side="right")
        n = stop - start
        at = np.arange(n.sum()) + np.repeat(start - (np.cumsum(n) - n), n)
        return rows[at], cols[at]

    def dense_masks(
        self, masks: Float[Array, " n_edges"]
    ) -> tuple[Float[Array, "n_senders n_columns"], Float[Array, " n_columns"]]:
        """Scatter flat edge masks into the sender x receiver-column matrix and
        the per-column q/k/v multiplier used by the patched forward."""
        add, direct = self._gather
        ext = jnp.concatenate([masks, jnp.zeros((1,), masks.dtype), jnp.ones((1,), masks.dtype)])
        return ext[add], ext[direct]

    # --- views ----------------------------------------------------------------
    def to_networkx(self, mask=None) -> nx.DiGraph:
        """A DiGraph of all nodes. Edges carry ``index``, ``kind`` ("residual",
        "qkv", or "internal" for the always-present step from a head's or MLP's
        input to its output) and ``present`` (mask > 0.5; True without a mask)."""
        g = nx.DiGraph()
        values = None if mask is None else np.asarray(mask)
        for e in self.edges:
            for n in (e.sender, e.receiver):
                g.add_node(n.name, kind=n.kind, layer=n.layer, head=n.head, component=n.component)
            present = True if values is None else bool(values[e.index] > 0.5)
            g.add_edge(e.sender.name, e.receiver.name, index=e.index, kind=e.kind, name=e.name, present=present)
        for s in self.senders:
            g.add_node(s.name, kind=s.kind, layer=s.layer, head=s.head, component=s.component)
            for node in self._inputs_of(s):
                g.add_edge(node, s.name, index=None, kind="internal", name=None, present=True)
        return g

    def _inputs_of(self, sender: Node) -> Sequence[str]:
        l, h = sender.layer, sender.head
        if sender.kind == "mlp":
            return [f"blocks.{l}.hook_mlp_in"]
        if sender.kind != "head":
            return []
        if not self.split_qkv:
            return [f"blocks.{l}.hook_attn_in[{h}]"]
        if self.qkv_edges:
            return [f"blocks.{l}.attn.hook_{c}[{h}]" for c in "qkv"]
        return [f"blocks.{l}.hook_{c}_input[{h}]" for c in "qkv"]


def expected_edge_count(
    config: TransformerConfig, *, split_qkv: bool = True, qkv_edges: Optional[bool] = None, split_embed: bool = False
) -> int:
    """The closed-form edge count from the module docstring."""
    qkv_edges = split_qkv if qkv_edges is None else qkv_edges
    e = 1
    if split_embed and config.positional == "learned":
        e = 2
    H, L, m = config.n_heads, config.n_layers, 0 if config.attn_only else 1
    r = 3 if split_qkv else 1
    residual = sum(r * H * (e + l * (H + m)) + m * (e + l * (H + m) + H) for l in range(L)) + e + L * (H + m)
    return residual + (3 * H * L if qkv_edges else 0)


def with_sentinels(masks: np.ndarray) -> np.ndarray:
    """Masks [..., n_edges] (numpy) with the two entries the graph's gather
    indices point past the edges: 0 (no edge there) and 1 (no q/k/v step
    edge); `CircuitGraph.dense_masks` does the same on traced arrays."""
    pad = np.ones(masks.shape[:-1] + (1,), np.float32)
    return np.concatenate([np.asarray(masks, np.float32), np.zeros_like(pad), pad], axis=-1)

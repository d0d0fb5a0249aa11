"""The result of a circuit search: kept edges, decisions, scores, settings; JSON I/O."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .graph import CircuitGraph
from .config import TransformerConfig

CIRCUIT_FORMAT = "acdc-jax-circuit"


def finite_json(value):
    """`value` as plain JSON data, with every NaN or infinite number as None:
    JSON has no such numbers, and strict readers (JavaScript, jq) refuse the
    NaN and Infinity that Python would write."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return finite_json(value.tolist())
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def dumps(value, **kw) -> str:
    """JSON text that any reader accepts (`finite_json`)."""
    return json.dumps(finite_json(value), allow_nan=False, **kw)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One ACDC step. ``tried=False`` marks an edge dropped without a trial
    because its receiver no longer reaches the output."""

    edge: str
    index: int
    tried: bool
    kept: bool
    metric_before: Optional[float] = None
    metric_after: Optional[float] = None

    @property
    def result(self) -> Optional[float]:
        if self.metric_before is None or self.metric_after is None:
            return None
        return self.metric_after - self.metric_before

    def to_json(self) -> dict:
        return {"edge": self.edge, "index": self.index, "tried": self.tried, "kept": self.kept,
                "metric_before": self.metric_before, "metric_after": self.metric_after}

    @classmethod
    def from_json(cls, d: dict) -> "Decision":
        return cls(d["edge"], int(d["index"]), bool(d["tried"]), bool(d["kept"]), d.get("metric_before"), d.get("metric_after"))


def made_with() -> dict:
    """The versions that made a result, for whoever reads it later."""
    import jax

    from . import __version__

    return {"acdc_jax": __version__, "jax": jax.__version__, "backend": jax.default_backend()}


@dataclasses.dataclass
class Circuit:
    """A subgraph: ``mask[i] = 1`` keeps edge i of ``graph``.

    ``scores`` are per-edge numbers from the method that found the circuit
    (ACDC: the metric change when the edge was tried; NaN if never tried).
    """

    graph: CircuitGraph
    mask: np.ndarray
    metric: Optional[float] = None
    decisions: list = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)
    scores: Optional[np.ndarray] = None

    def __post_init__(self):
        n = self.graph.n_edges
        for name, value in (("mask", self.mask), ("scores", self.scores)):
            if value is not None and np.shape(value) != (n,):
                raise ValueError(f"A circuit's {name} holds one value per edge of its graph ({n}); got shape "
                                 f"{np.shape(value)}.")

    @property
    def edges(self) -> list[str]:
        return self.graph.edges_in(self.mask)

    @property
    def nodes(self) -> list[str]:
        """The heads and MLPs on the circuit's residual edges ('a1.4', 'm2'),
        in the graph's order; a head's q/k/v step alone does not put it in."""
        from .evaluate import nodes_of
        from .graph import component_order

        residual = [e for e in self.edges if self.graph.edge(e).kind == "residual"]
        return sorted(nodes_of(self.graph, residual), key=component_order)

    @property
    def n_edges(self) -> int:
        return int((np.asarray(self.mask) > 0.5).sum())

    def __contains__(self, edge: str) -> bool:
        return bool(np.asarray(self.mask)[self.graph.edge_index(edge)] > 0.5)

    def __repr__(self) -> str:
        return f"Circuit({self.n_edges} of {self.graph.n_edges} edges, metric={self.metric})"

    def to_json(self) -> dict[str, Any]:
        g = self.graph
        out = {
            "format": CIRCUIT_FORMAT,
            "version": 1,
            "made_with": made_with(),
            "model_config": g.config.to_dict(),
            "graph": {"split_qkv": g.split_qkv, "qkv_edges": g.qkv_edges, "split_embed": g.split_embed,
                      "n_edges": g.n_edges},
            "settings": self.settings,
            "metric": self.metric,
            "n_kept": self.n_edges,
            "edges": self.edges,
            "decisions": [d.to_json() for d in self.decisions],
        }
        if self.scores is not None:
            out["scores"] = {name: (None if not np.isfinite(s) else float(s)) for name, s in zip(g.edge_names, np.asarray(self.scores))}
        return out

    @classmethod
    def from_json(cls, d: dict, source=None) -> "Circuit":
        """The circuit of `d`; its errors name `source` (the file it came from), if given."""
        try:
            return cls._from_json(d)
        except ValueError as e:
            if source is None:
                raise
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def _from_json(cls, d: dict) -> "Circuit":
        if not isinstance(d, dict) or d.get("format") != CIRCUIT_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"Not an acdc-jax circuit file (format={found!r}).")
        missing = [k for k in ("model_config", "graph", "edges") if k not in d]
        if missing:
            raise ValueError(f"The circuit file lacks {missing}: it was cut short or edited; write it again with "
                             "Circuit.save.")
        _check_fields(d)
        opts = d["graph"]
        graph = CircuitGraph(TransformerConfig.from_dict(d["model_config"]), split_qkv=opts["split_qkv"],
                             qkv_edges=opts["qkv_edges"], split_embed=opts["split_embed"])
        if opts.get("n_edges", graph.n_edges) != graph.n_edges:
            raise ValueError(f"The circuit file's graph has {opts['n_edges']} edges, but its model config and "
                             f"options make {graph!r}: it was edited or made by another version; write it again "
                             "with Circuit.save.")
        named = list(d["edges"]) + list(d.get("scores") or {})
        unknown = sorted(set(named) - set(graph.edge_names))
        if unknown:
            raise ValueError(f"The circuit file names {len(unknown)} edge(s) that its own graph ({graph!r}) lacks, "
                             f"e.g. {unknown[:2]}: it was edited or belongs to another model; write it again with "
                             "Circuit.save.")
        mask = np.asarray(graph.mask(d["edges"]))
        scores = None
        if "scores" in d:
            scores = np.array([np.nan if d["scores"].get(n) is None else d["scores"][n] for n in graph.edge_names])
        try:
            decisions = [Decision.from_json(x) for x in d.get("decisions", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"The circuit file's decisions are malformed ({type(e).__name__}: {e}); each is "
                             "{'edge', 'index', 'tried', 'kept', ...}, as Circuit.save writes them.") from None
        return cls(graph, mask, d.get("metric"), decisions, d.get("settings", {}), scores)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Circuit":
        """Read a circuit.json, or the one in a run's output directory."""
        path, d = read_json(path)
        return cls.from_json(d, source=path)


def _check_fields(d: dict) -> None:
    """The types of a circuit file's fields, so that an edited file fails here
    by name rather than later, or not at all."""
    def number(x):
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))

    opts, decisions = d["graph"], d.get("decisions", [])
    checks = {
        "graph (split_qkv, qkv_edges and split_embed: true or false)": isinstance(opts, dict) and all(
            isinstance(opts.get(k), bool) for k in ("split_qkv", "qkv_edges", "split_embed")),
        "edges (a list of edge names)": isinstance(d["edges"], list) and all(isinstance(e, str) for e in d["edges"]),
        "scores (edge name -> number or null)": d.get("scores") is None or (
            isinstance(d["scores"], dict) and all(map(number, d["scores"].values()))),
        "decisions (a list of objects)": isinstance(decisions, list) and all(isinstance(x, dict) for x in decisions),
        "settings (an object)": isinstance(d.get("settings", {}), dict),
        "metric (a number or null)": number(d.get("metric"))}
    wrong = [field for field, fine in checks.items() if not fine]
    if wrong:
        raise ValueError(f"Malformed field(s) in the circuit file: {'; '.join(wrong)}. It was edited; write it "
                         "again with Circuit.save.")


def read_json(path) -> tuple[Path, Any]:
    """The JSON of a circuit file, or of the circuit.json in a run's output
    directory, and the file's path."""
    path = Path(path)
    if path.is_dir() and (path / "circuit.json").is_file():
        path = path / "circuit.json"
    if not path.is_file():
        raise FileNotFoundError(f"No circuit file at {path}; give the circuit.json a run wrote, or its directory.")
    try:
        return path, json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file was cut short or is not a circuit; "
                         "write it again with Circuit.save.") from e


def start_mask(graph: CircuitGraph, start) -> np.ndarray:
    """The 0/1 mask [n_edges] of a circuit to start a search from: a `Circuit`
    (or the path of its circuit.json, or of the run directory holding it)
    over the same graph, a mask, or edge names."""
    if isinstance(start, (str, Path)) and (Path(start).suffix == ".json" or (Path(start) / "circuit.json").is_file()):
        start = Circuit.load(start)
    if isinstance(start, Circuit):
        graph.check_same_edges(start.graph, "The start circuit")
        start = start.mask
    if isinstance(start, str):
        raise TypeError(f"start must be a Circuit, the path of a circuit.json (or of its run directory), a mask or "
                        f"edge names; got {start!r}.")
    array = np.asarray(start)
    if array.dtype.kind not in "fiub" or not array.size:  # edge names (or none)
        return np.asarray(graph.mask(list(start)), np.float32)
    if array.shape != (graph.n_edges,):
        raise ValueError(f"A start mask must have shape [{graph.n_edges}] (one value per edge), got {array.shape}.")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("A start mask must hold only 0 and 1 (1 keeps the edge).")
    return array.astype(np.float32)

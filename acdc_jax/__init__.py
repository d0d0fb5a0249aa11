"""acdc-jax: automatic circuit discovery for transformers, in JAX."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("acdc-jax")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"

from .xla_cpu import set_flags

set_flags()  # before JAX starts: the YNN guard (wrong large reductions on CPUs) and faster CPU compiling

from .checkpoint import load, save
from .errors import (CheckpointError, ConfigError, FlatMetricWarning, MetricAtMinimumWarning, MetricError,
                     MetricFallsWarning, TaskError)
from .graph import CircuitGraph, Edge, Node, expected_edge_count
from .model import SenderActivations, Transformer, TransformerConfig
from .corruption import Corruption
from .patching import patched_forward
from .circuit import Circuit, Decision
from .acdc import acdc
from .programs import use_disk_cache
from . import algorithms, draw, evaluate, explore

__all__ = [
    "Circuit", "Decision", "acdc", "algorithms", "draw", "evaluate", "explore",
    "CheckpointError", "CircuitGraph", "ConfigError", "Corruption", "Edge", "FlatMetricWarning",
    "MetricAtMinimumWarning", "MetricError", "MetricFallsWarning", "Node", "SenderActivations", "TaskError",
    "Transformer", "TransformerConfig", "expected_edge_count", "load", "patched_forward", "save", "use_disk_cache",
]

"""The Task type and the metrics.

A metric is ``f(logits, task) -> scalar`` and is *minimised*: task metrics that
measure how well the behaviour is kept (logit difference, probability
difference) are negated. ``logits`` are the circuit's logits at
``task.positions`` only, shape [batch, n_positions, d_vocab_out]. Metrics that
compare with the full model read ``task.reference`` (the full model's logits at
the same positions), which `Task.bind` fills in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import MetricError, TaskError, check_whole
from ..graph import CircuitGraph
from ..model import Transformer, check_token_values
from ..patching import Corruption

# how many prompts each task can make: induction's corrupted prompts are other prompts' sequences, and
# tracr-proportion draws distinct strings of 4 letters from 4
EXAMPLES = {"induction": (2, None), "tracr-proportion": (1, 4 ** 4)}


def check_examples(name: str, n_examples) -> None:
    """Refuse a number of prompts the named task cannot make (None: its default)."""
    if n_examples is None:
        return
    if name == "tracr-reverse":
        raise TaskError("tracr-reverse runs on all 6 orderings of its input, always; do not pass n_examples "
                        "(--examples).")
    low, high = EXAMPLES.get(name, (1, None))
    check_whole(n_examples, f"Task {name}: n_examples (--examples)", low, high, error=TaskError)


Metric = Callable[[jax.Array, "Task"], jax.Array]


def _weighted_mean(values: jax.Array, task: "Task") -> jax.Array:
    if task.weights is None:
        return values.mean()
    w = jnp.asarray(task.weights, values.dtype)
    return (values * w).sum() / w.sum()


def kl_divergence(logits: jax.Array, task: "Task") -> jax.Array:
    """KL(full model || circuit) of the next-token distribution, averaged over
    the task's (weighted) examples and positions."""
    ref = jax.nn.log_softmax(jnp.asarray(task.reference, logits.dtype), axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return _weighted_mean(jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1), task)


def squared_error(logits: jax.Array, task: "Task") -> jax.Array:
    """Mean squared difference from the full model's outputs (tracr's L2)."""
    return _weighted_mean(jnp.mean((logits - jnp.asarray(task.reference, logits.dtype)) ** 2, axis=-1), task)


def predicted_logit(logits: jax.Array, task: "Task") -> jax.Array:
    """Minus the logit of the full model's top token: unlike KL and L2, its
    gradient does not vanish at the full model, so gradient methods (EAP) see it."""
    ref = jnp.asarray(task.reference, logits.dtype)
    picked = jnp.take_along_axis(logits, jnp.argmax(ref, axis=-1)[..., None], axis=-1)[..., 0]
    return -_weighted_mean(picked, task)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Clean and corrupted prompts, the positions and metrics, and the canonical circuit.

    ``labels`` holds task-specific arrays the metrics read (answer tokens and
    the like); those named in ``vocab_labels`` hold output token ids, which
    `bind` checks against the model's vocabulary (a metric's gather would
    clamp an id outside it without a word). ``canonical`` is a set of edge
    names in ``graph(model)``.
    ``corrupt_positions``, if set, permutes the position embedding in the
    corrupted run (the ACDC paper's corruption for tracr tasks).
    """

    name: str
    clean: np.ndarray
    corrupted: Optional[np.ndarray]
    positions: np.ndarray
    metrics: Mapping[str, Metric]
    default_metric: str = "kl"
    weights: Optional[np.ndarray] = None
    labels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    canonical: Optional[frozenset] = None
    graph_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    corruption: str = "prompts"
    corrupt_positions: Optional[np.ndarray] = None
    reference: Optional[np.ndarray] = None
    description: str = ""
    vocab_labels: tuple = ()

    def __post_init__(self):
        clean = np.asarray(self.clean)
        if clean.ndim != 2 or not np.issubdtype(clean.dtype, np.integer):
            raise TaskError(f"Task {self.name}: clean tokens must be an int array [batch, pos], got {clean.dtype} {clean.shape}.")
        if clean.shape[0] == 0 or clean.shape[1] == 0:
            raise TaskError(f"Task {self.name} has no prompts (clean tokens of shape {clean.shape}): give at least "
                            "one prompt of at least one token (--examples N with N >= 1).")
        object.__setattr__(self, "clean", clean.astype(np.int32))
        if self.corrupted is not None:
            corrupted = np.asarray(self.corrupted)
            if corrupted.shape != clean.shape:
                raise TaskError(
                    f"Task {self.name}: clean prompts have shape {clean.shape} but corrupted prompts have shape "
                    f"{corrupted.shape}. Give one corrupted prompt per clean prompt, of equal token length "
                    "(pad or regenerate the prompts so they tokenize to the same length)."
                )
            object.__setattr__(self, "corrupted", corrupted.astype(np.int32))
        positions = np.asarray(self.positions, np.int32).reshape(-1)
        if positions.size == 0 or positions.min() < 0 or positions.max() >= clean.shape[1]:
            raise TaskError(f"Task {self.name}: positions {positions.tolist()} are outside 0..{clean.shape[1] - 1}.")
        object.__setattr__(self, "positions", positions)
        if self.weights is not None and np.shape(self.weights) != (clean.shape[0], positions.size):
            raise TaskError(f"Task {self.name}: weights must have shape {(clean.shape[0], positions.size)}.")
        if self.default_metric not in self.metrics:
            raise TaskError(f"Task {self.name}: default metric {self.default_metric!r} is not in {sorted(self.metrics)}.")
        if self.corruption not in ("prompts", "zeros", "mean"):
            raise TaskError(f"Task {self.name}: unknown corruption {self.corruption!r}.")
        if self.corruption == "prompts" and self.corrupted is None:
            raise TaskError(f"Task {self.name}: corruption 'prompts' needs corrupted prompts.")
        missing = sorted(set(self.vocab_labels) - set(self.labels))
        if missing:
            raise TaskError(f"Task {self.name}: vocab_labels {missing} are not among the labels {sorted(self.labels)}.")

    # --- per-model views --------------------------------------------------------
    def graph(self, model: Transformer) -> CircuitGraph:
        return CircuitGraph(model.config, **self.graph_options)

    def graph_for(self, model: Transformer, graph: Optional[CircuitGraph] = None) -> CircuitGraph:
        """The graph a method runs on: `graph`, or the task's own. The
        canonical circuit is checked against the task's own graph, where it
        is named, so that another granularity may be asked for."""
        own = self.graph(model)
        self.check_canonical(own)
        return graph or own

    def bind(self, model: Transformer) -> "Task":
        """A copy whose ``reference`` holds this model's logits at the task positions."""
        if self.clean.shape[1] > model.config.n_ctx:
            raise TaskError(f"Task {self.name}: prompts of {self.clean.shape[1]} tokens exceed n_ctx={model.config.n_ctx}.")
        for what, tokens in (("clean prompts", self.clean), ("corrupted prompts", self.corrupted)):
            if tokens is not None:
                check_token_values(tokens, model.config.d_vocab, f"Task {self.name}, {what}", TaskError)
        for key in self.vocab_labels:
            check_token_values(self.labels[key], model.config.d_vocab_out, f"Task {self.name}, label {key!r}",
                               TaskError)
        logits = np.asarray(_forward(model, jnp.asarray(self.clean)))[:, self.positions]
        return dataclasses.replace(self, reference=logits)

    def make_corruption(self, model: Transformer, kind: Optional[str] = None) -> Corruption:
        kind = kind or self.corruption
        if kind == "zeros":
            return Corruption.zeros()
        if kind == "mean":
            return Corruption.mean(model, jnp.asarray(self.clean))
        if kind != "prompts":
            raise TaskError(f"Unknown corruption {kind!r}; use prompts, zeros or mean.")
        if self.corrupted is None:
            raise TaskError(f"Task {self.name} has no corrupted prompts; use corruption 'zeros' or 'mean'.")
        source = model
        if self.corrupt_positions is not None:
            import equinox as eqx

            perm = jnp.asarray(self.corrupt_positions)
            shuffled = model.embed.W_pos.at[: perm.shape[0]].set(model.embed.W_pos[perm])
            source = eqx.tree_at(lambda m: m.embed.W_pos, model, shuffled)
        return Corruption.from_prompts(source, jnp.asarray(self.corrupted))

    def metric(self, name: Optional[str] = None) -> Metric:
        name = name or self.default_metric
        if name not in self.metrics:
            raise TaskError(f"Task {self.name} has no metric {name!r}; choose from {sorted(self.metrics)}.")
        return self.metrics[name]

    def check_canonical(self, graph: CircuitGraph) -> None:
        if self.canonical is None:
            return
        unknown = sorted(set(self.canonical) - set(graph.edge_names))
        if unknown:
            raise TaskError(
                f"Task {self.name}: the canonical circuit names {len(unknown)} edge(s) not in {graph!r}, "
                f"e.g. {unknown[:3]}. Check the graph options (split_qkv, split_embed) and the model size."
            )


def with_paper_circuit(task: Task, model: Transformer, paper_model: str, shape: tuple[int, int, bool],
                       build: Callable[[], frozenset]) -> Task:
    """`task` with the paper's canonical circuit, `build()`, when `model` has
    the paper model's shape (n_layers, n_heads, attention-only). On another
    model those head indices name other heads (or none), and ROC against
    them would score the wrong edges, so the task then has no canonical
    circuit and its description says why."""
    c = model.config
    if (c.n_layers, c.n_heads, c.attn_only) == shape:
        return dataclasses.replace(task, canonical=build())
    kind = lambda attn_only: "attention-only" if attn_only else "with MLPs"
    note = (f" No canonical circuit: the paper's is of {paper_model} ({shape[0]} layers x {shape[1]} heads, "
            f"{kind(shape[2])}), and this model has {c.n_layers} x {c.n_heads}, {kind(c.attn_only)}.")
    return dataclasses.replace(task, description=task.description + note)


class TaskArrays:
    """A Task as seen inside jitted code: the same attributes, except that
    ``reference``, ``weights`` and ``labels`` are traced arrays passed in as
    arguments rather than baked-in constants."""

    def __init__(self, task: Task, arrays: Mapping[str, Any]):
        self._task = task
        self.reference = arrays["reference"]
        self.weights = arrays["weights"]
        self.labels = arrays["labels"]

    def __getattr__(self, name):
        return getattr(self._task, name)


def apply_metric(metric: Callable, logits, task: Task, arrays: Mapping[str, Any]):
    """`metric(logits, task)` in float32, refused (while it is traced) unless
    it is one number: a metric that returns one value per prompt would
    otherwise fail deep in JAX or be compared with tau element by element."""
    value = metric(logits.astype(jnp.float32), TaskArrays(task, arrays))
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    name = getattr(metric, "__name__", repr(metric))
    if isinstance(value, (bool, str)) or (shape is None and not isinstance(value, (int, float))):
        raise MetricError(f"The metric {name} returned {type(value).__name__}; it must return one float (a scalar "
                          "array) for the batch of prompts.")
    if shape not in (None, ()) or (dtype is not None and not jnp.issubdtype(dtype, jnp.number)):
        raise MetricError(f"The metric {name} returned an array of shape {shape} ({dtype}); it must return one float "
                          "for the batch of prompts: average (or sum) over prompts and positions, e.g. with .mean().")
    return value


def task_arrays(task: Task) -> dict:
    """The arrays a metric may read, as a pytree to pass into jitted code."""
    return {
        "reference": None if task.reference is None else jnp.asarray(task.reference),
        "weights": None if task.weights is None else jnp.asarray(task.weights),
        "labels": {k: jnp.asarray(v) for k, v in task.labels.items()},
    }


@eqx.filter_jit
def _forward(model, tokens):
    """The model's logits: one program per model shape, kept across binds (a
    threshold sweep binds its task once per run)."""
    return model(tokens)

"""Scoring candidate circuits: the metric of many edge masks in one pass.

`Scorer` caches every sender's clean deviation (act - corrupt) once. A batch
of candidates (`Candidates`: a base circuit with some edges cut) that cut only
edges into receivers from some layer onwards starts there: senders before
that layer keep their cached values; in that layer only the heads whose
inputs a candidate changes are recomputed per candidate (the others are
computed once, under the base mask); the later layers run vmapped over the
candidates. The logits, and the last layer's queries and MLP, are computed
only at the positions the metric reads.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import compile_ahead, dense, xla_cpu
from .candidates import Candidates
from .corruption import Corruption
from .flops import base_heads_flops, pass_flops, upstream_flops
from .fused_kl import exact, reference_arrays
from .graph import CircuitGraph, with_sentinels
from .memory import cache_prompt_chunk, grad_prompt_chunk
from .model import Transformer
from .programs import Shape, shared
from .program_record import label
from .patching import senders_before, upstream_offset
from .sharding import check_prompts, fetch, put_candidates, put_prompts, put_replicated, round_width
from .receivers import cache_flops
from .sparse import sparse_flops
from .sparse_passes import SparsePasses
from .tasks.base import Task, kl_divergence, task_arrays


class Scorer:
    """Metric of candidate masks, for one model, graph, task and corruption.

    `task` must be bound (`Task.bind`); `static_task` is the object the metric
    sees for non-array attributes. Passing the same unbound task across runs
    lets them share compiled passes (the arrays are arguments, not constants).
    `mesh` (see `sharding.make_mesh`) spreads candidates and prompts over
    devices; `prompt_chunk` runs a batched pass that many prompts at a time.
    `sparse` ("auto", "on" or "off"): attention-only models score a pass in a
    sparse program (`sparse.py`) where that costs fewer FLOPs ("auto": and
    pays for its compiling; see `sparse_passes.py`). `ahead`: where
    programs compile ahead (accelerators, `compile_ahead.py`), start compiling
    the full pass's and, with `widths`, the covers' before the deviations'
    (for callers whose first pass is a full one).
    """

    def __init__(self, model: Transformer, graph: CircuitGraph, task: Task, corruption: Corruption, metric,
                 static_task: Optional[Task] = None, mesh=None, prompt_chunk: Optional[int] = None,
                 sparse: Union[bool, str] = "auto", start: Optional[np.ndarray] = None,
                 widths: Optional[Sequence[int]] = None, ahead: bool = False):
        graph.check_config(model.config)
        check_prompts(mesh, task.clean.shape[0])
        xla_cpu.check()
        if prompt_chunk is not None and task.clean.shape[0] % prompt_chunk:
            raise ValueError(f"prompt_chunk={prompt_chunk} must divide the {task.clean.shape[0]} prompts.")
        self.mesh = mesh
        if mesh is not None:
            model = put_replicated(model, mesh)
            acts = put_prompts(corruption.acts, mesh) if corruption.kind == "prompts" else put_replicated(
                corruption.acts, mesh)
            corruption = Corruption(corruption.kind, acts)
        self.model, self.graph, self.corruption, self.metric = model, graph, corruption, metric
        self.task = static_task if static_task is not None else task
        self.tokens = put_prompts(jnp.asarray(task.clean), mesh)
        self.positions = tuple(int(p) for p in task.positions)
        self.arrays = put_replicated(task_arrays(task), mesh)
        self.prompt_chunk = prompt_chunk  # prompts per step inside a batched pass (None: all)
        self.sparse = SparsePasses(self, sparse)
        self.passes = 0
        self.full_passes = 0  # of those, passes over the whole model (`full`)
        self.flops = 0  # matrix-multiply FLOPs of every pass so far (see flops.py)
        self._heads_cache = None
        settings = (metric, corruption.kind, tuple(self.tokens.shape), self.positions, prompt_chunk,
                    str(model.embed.W_E.dtype), jax.config.jax_default_matmul_precision)
        self.programs = shared((graph, self.task, mesh) + settings, label=label(
            graph.config, graph.split_qkv, graph.qkv_edges, graph.split_embed, type(self.task).__qualname__,
            None if mesh is None else dict(mesh.shape), *settings))
        accelerator = self._on_accelerator()
        # on one CPU device a pass that runs full layers loops over its candidates (`dense.candidates_metric`)
        self.loop = mesh is None and not accelerator
        # and runs its prompts in chunks small enough that each layer's inputs stay in cache (`full_chunk`)
        self.dense_chunk = prompt_chunk
        if self.loop and prompt_chunk is None:
            self.dense_chunk = cache_prompt_chunk(graph, *self.tokens.shape, model.config.d_model,
                                                  self._dtype.itemsize)
        if self.loop and metric is kl_divergence:  # what streamed KL reads of the reference, made once
            self.arrays = reference_arrays(self.model, self.arrays)
        # on one accelerator only the base and the cut edges cross, and the dense masks are made there
        self.cuts_to_device = mesh is None and accelerator
        # the first pass program a layer needs is a cover that every pass from it can rent (`Programs.choose`),
        # from the earliest layer whose passes are as wide (`widths`: the widest pass from each start layer)
        self.cover_first = accelerator
        # and (`ahead`) the full pass and the covers compile in background threads while the device computes
        # (`compile_ahead.py`; ACDC_JAX_COVERS_AHEAD=0 compiles each when first needed, =1 ahead on CPUs too)
        self.covers_ahead = compile_ahead.enabled(accelerator)
        self.widths = None if widths is None else list(widths)
        self.shapes: set[Shape] = set()  # the programs this Scorer ran
        self.reused = 0  # passes run in a larger program than they needed
        self.start = start = np.asarray(graph.ones() if start is None else start, np.float32)
        self.ahead: list[Shape] = []  # the programs it started compiling ahead (`compile_ahead.py`)
        self.bought_ahead = 0  # of those, bought by the ski rental while renting (`compile_ahead.buy`)
        ahead = ahead and self.covers_ahead and self.programs.adaptive
        if ahead:  # the first pass, then the covers, while this thread compiles the deviations
            compile_ahead.full_pass(self)
            if mesh is None and not self.sparse.ok and compile_ahead.covers(self):  # they read only its shape
                like = eqx.filter_eval_shape(dense.deviations, model, graph, self.tokens, self._rep(start), corruption)
                compile_ahead.start(self, jnp.zeros(like.shape, like.dtype))
        # the senders' deviations under the start circuit (default: the full model); a pass from a layer
        # reads those before it, so its candidates must agree with the start on every edge into earlier layers
        self.setup_waited = compile_ahead.wait("deviations")  # where `compile_ahead.setup` compiles them
        if self.sparse.ok:  # and the heads' z at the metric positions, from which sparse passes start
            self.deviations, z = dense.deviations(model, graph, self.tokens, self._rep(start), corruption,
                                                  self.positions)
            self.sparse.start(start, z)
        else:
            self.deviations = dense.deviations(model, graph, self.tokens, self._rep(start), corruption)
        if ahead:
            compile_ahead.start(self)  # where the covers needed the deviations themselves (none left otherwise)

    @staticmethod
    def _on_accelerator() -> bool:
        """Whether passes take the accelerators' path (vmapped candidates, masks
        made on the device, covers first, compiled ahead): on a GPU or TPU."""
        return jax.default_backend() != "cpu"

    @property
    def full_chunk(self) -> Optional[int]:
        """Prompts per step of a full pass: the dense passes' on one CPU
        device; elsewhere all at once (docs/performance.md, "Prompt chunks")."""
        return self.dense_chunk if self.loop else None

    @property
    def _dtype(self):
        return self.model.embed.W_E.dtype

    def _rep(self, masks, ndim: int = 1) -> jax.Array:
        """Masks in the model's dtype, on every device of the mesh; `ndim` 1
        for one mask, 2 for a stack of them."""
        masks = np.asarray(masks, np.float32)
        if masks.ndim != ndim or masks.shape[-1] != self.graph.n_edges:  # JAX's gathers would clamp, silently
            raise ValueError(f"A mask holds one value per edge of the graph ({self.graph.n_edges}); expected "
                             f"{'one mask' if ndim == 1 else 'a stack of masks'}, got an array of shape {masks.shape}.")
        return put_replicated(jnp.asarray(masks, self._dtype), self.mesh)

    def flops_of_pass(self, start_layer: int, heads: int, upstream_rows: Optional[int] = None) -> int:
        """Matrix-multiply FLOPs of one candidate over the task's prompts, in a
        pass from `start_layer` recomputing `heads` heads there (`flops.pass_flops`)."""
        n_prompts, n_pos = self.tokens.shape
        return n_prompts * pass_flops(self.graph, start_layer, heads, n_pos, len(self.positions),
                                      upstream_rows)["total"]

    def candidate_flops(self, start_layer: int) -> int:
        """FLOPs of one candidate in a pass from `start_layer` that recomputes one head there."""
        return self.flops_of_pass(start_layer, 1)

    def full(self, mask) -> float:
        """Metric of one mask, from a pass over the whole model (no cache)."""
        self.passes += 1
        self.full_passes += 1
        flops = self.flops_of_pass(0, self.graph.n_heads)
        return self._run(Shape("full", 0, 1, None, None), flops, lambda: float(fetch(dense.full_metric(
            self.model, self.graph, self.corruption, self.metric, self.task, self.arrays, self._rep(mask), self.tokens,
            self.positions, self.full_chunk))))

    @property
    def grad_chunk(self) -> Optional[int]:
        """Prompts per step of a gradient: `prompt_chunk` if given, else as
        many as fit in one device's memory (`memory.grad_prompt_chunk`, counting
        every prompt as if on one device; None: all)."""
        if self.prompt_chunk is not None:
            return self.prompt_chunk
        n_prompts, n_pos = self.tokens.shape
        return grad_prompt_chunk(self.model, self.graph, n_prompts, n_pos, len(self.positions))

    def value_and_grads(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Metric and its gradient with respect to the edge masks, for each of
        `masks` [n, n_edges] (one forward and one backward pass each)."""
        self.passes += len(masks)
        self.flops += 3 * len(masks) * self.flops_of_pass(0, self.graph.n_heads)  # backward ~ 2x forward
        values, grads = dense.metric_grads(self.model, self.graph, self.corruption, self.metric, self.task, self.arrays,
                                           self._rep(masks, 2), self.tokens, self.positions, self.grad_chunk)
        return np.asarray(fetch(values), np.float64), np.asarray(fetch(grads), np.float64)

    def _head_columns(self, mask: np.ndarray, layer: int) -> np.ndarray:
        """Each head's dense q/k/v input columns of `layer` under `mask`, [H, n_senders + 1, 3]."""
        add, direct = self.graph._gather
        ext = with_sentinels(mask)
        H, first = self.graph.n_heads, layer * self.graph._layer_columns
        cols = first + np.arange(3 * H).reshape(3, H).T  # [H, 3]: q, k, v columns of each head
        return np.concatenate([ext[add[:, cols]].transpose(1, 0, 2), ext[direct[cols]][:, None]], axis=1)

    def _base_heads(self, base: np.ndarray, layer: int, skip: set) -> jax.Array:
        """The start layer's head results under `base` [batch, H, pos, d_model],
        cached: only heads whose inputs changed since they were computed (and
        that the pass recomputes per candidate anyway: `skip`) are computed again."""
        H, now = self.graph.n_heads, self._head_columns(base, layer)
        cached = self._heads_cache if self._heads_cache and self._heads_cache[0] == layer else None
        if cached is None:
            stale, results, cols = list(range(H)), None, now
        else:
            _, results, cols = cached
            stale = [h for h in range(H) if h not in skip and not np.array_equal(cols[h], now[h])]
        if stale:
            need = Shape("heads", layer, 1, _pow2(len(stale), H), None)
            shape = need if results is None else self._choose(need)
            heads = _pad_heads(stale, shape.heads, H)
            flops = self.flops_of_program(shape)
            fresh = self._run(shape, flops, lambda: dense.layer_heads(
                self.model, self.graph, layer, self.corruption, self._rep(base), self.tokens, self.deviations,
                put_replicated(jnp.asarray(heads), self.mesh)))
            results = fresh if results is None or len(heads) == H else results.at[:, heads].set(fresh)
            cols = np.where(np.isin(np.arange(H), heads)[:, None, None], now, cols)
        self._heads_cache = (layer, results, cols)
        return results

    def changed_heads(self, cands: Candidates, layer: int) -> list[int]:
        """Heads of `layer` whose q/k/v inputs some candidate changes."""
        _, cols = cands.places(self.graph)
        first, H = layer * self.graph._layer_columns, self.graph.n_heads
        cols = cols[(cols >= first) & (cols < first + 3 * H)]
        return sorted(set(((cols - first) % H).tolist()))

    def upstream_rows(self, cands: Candidates, start_layer: int, size: Optional[int] = None) -> Optional[np.ndarray]:
        """The senders before `start_layer` whose edges into receivers after it
        some candidate cuts (unchanged ones pad the count to a power of 4, or
        to `size`); None where sharing the upstream sum saves nothing."""
        g = self.graph
        if start_layer >= g.n_layers:
            return None
        n_up = senders_before(g, start_layer)
        rows, cols = cands.places(g)
        differ = np.zeros(n_up, bool)
        differ[rows[(rows >= 0) & (rows < n_up) & (cols >= upstream_offset(g, start_layer))]] = True
        changed = np.flatnonzero(differ)
        k = 1
        while k < len(changed):
            k *= 4
        if size is not None:
            k = size
        elif 2 * k > n_up:
            return None
        if len(changed) > k:
            raise ValueError(f"{len(changed)} changed upstream senders do not fit in {k} rows.")
        return np.concatenate([changed, np.flatnonzero(~differ)[:k - len(changed)]]).astype(np.int32)

    def flops_of_program(self, shape: Shape) -> float:
        """FLOPs of one run of the program `shape` over the task's prompts (`shape_flops`)."""
        return shape_flops(self.graph, shape, *self.tokens.shape, len(self.positions))

    def need(self, cands: Candidates, start_layer: int, width: int) -> Shape:
        """The smallest program shape that scores `cands` from `start_layer`
        (heads padded to a power of two, upstream rows to a power of 4, at
        least `width` candidates)."""
        heads = rows = None
        if start_layer < self.graph.n_layers:
            touched = self.changed_heads(cands, start_layer) or [0]
            k = _pow2(len(touched), self.graph.n_heads)
            # a query/key norm across heads (OLMo 2) reads every head: no head cache
            heads = k if k < self.graph.n_heads and not self.model.config.qk_norm_across_heads else None
            up = self.upstream_rows(cands, start_layer)
            rows = None if up is None else len(up)
        return Shape("pass", start_layer, round_width(max(width, len(cands)), self.mesh), heads, rows)

    def choose(self, cands: Candidates, start_layer: int, width: int, max_width: Optional[int] = None) -> Shape:
        """The program that will score `cands`: their own shape, or a larger
        one already compiled (at most `max_width` wide, default `width`) while
        that is cheaper (see `programs.py`)."""
        need = self.need(cands, start_layer, width)
        dense_cap = max(need.width, max_width or width)
        sparse = self.sparse.need(cands, start_layer, width)
        saved = None if sparse is None else self.sparse.saving(sparse, need, cands.base)
        if saved is not None and (saved > 0 or self._rent_sparse(sparse, need, -saved, dense_cap)):
            shape = self._choose(sparse, max(sparse.width, max_width or width))
            # a larger compiled one may cost more than the dense pass: then the dense pass, where its program is
            # compiled (else compiling it weighs as compiling `sparse` would). A program to compile (`sparse`, or a
            # cover of it) is weighed as `sparse`. Auto mode also counts the compiling of the sparse family (`pays`).
            weigh = shape if shape in self.programs.compiled else sparse
            cheaper = saved > 0 if weigh == sparse else self.sparse.cheaper(weigh, need, cands.base)
            if (not self.programs.has(need, dense_cap) or cheaper) and self.sparse.pays(weigh, need, cands.base):
                return shape
        return self._choose(need, dense_cap)

    def _rent_sparse(self, sparse: Shape, need: Shape, extra_flops: float, dense_cap: int) -> bool:
        """Whether to try the sparse program `sparse`, which costs
        `extra_flops` more than the dense pass `need`: where a compiled sparse
        program can run it and the dense pass's is not compiled, while the
        seconds paid for not compiling it stay below its compile time
        (`Programs.rent`)."""
        p = self.programs
        if p.seconds_per_flop is None or p.has(need, dense_cap) or not p.has(sparse):
            return False
        return p.rent(("dense", need), extra_flops * p.seconds_per_flop, p.estimate_compile(need.kind, need))

    def cover_start(self, need: Shape) -> int:
        """The earliest layer from which a pass as wide as `need` fits in
        memory at every start layer up to `need`'s, so that one cover serves them all."""
        layer = need.start_layer
        while self.widths is not None and layer > 0 and self.widths[layer - 1] >= need.width:
            layer -= 1
        return layer

    def _choose(self, need: Shape, max_width: Optional[int] = None) -> Shape:
        first = self.cover_first and need.kind == "pass" and need.start_layer < self.graph.n_layers
        cover = need.cover(self.cover_start(need)) if first else None
        if need.kind == "sparse":
            cover = self.sparse.cover(need)
        shape = self.programs.choose(need, self.flops_of_program, cover, max_width, self._buy_ahead)
        self.reused += shape != need
        return shape

    def _buy_ahead(self, shape: Shape) -> bool:
        return compile_ahead.buy(self, shape)

    def _run(self, shape: Shape, flops: float, fn):
        """Run the program `shape` (`fn`, `flops` FLOPs), and count it once it has
        run (a pass out of memory is retried narrower: `decide.narrow`)."""
        out = self.programs.run(shape, flops, fn)
        self.shapes.add(shape)
        self.flops += flops
        return out

    def fits(self, cands: Candidates, start_layer: int, shape: Shape) -> bool:
        if shape.kind == "sparse":
            need = self.sparse.need(cands, start_layer, 1)
            return need is not None and shape.covers(need)
        return shape.covers(self.need(cands, start_layer, 1))

    def batch(self, cands: Candidates, start_layer: int, width: int, shape: Optional[Shape] = None) -> np.ndarray:
        """Metrics of `cands` from a pass that starts at `start_layer`: the
        candidates may cut only edges into that layer's receivers or later
        ones (the senders before it keep their cached deviations). The start
        layer's heads that no candidate changes come from a cache kept under
        `cands.base`, only the changed heads are computed per candidate, and
        the cached senders' share of the later receivers' inputs is summed
        once under the base (`upstream_mix`). The program is `shape` (from
        `choose`, which it does by default; a shape without heads or rows uses
        neither cache): batches are padded to its width, the changed heads to
        its head count and the upstream rows to its row count, so few programs
        are compiled."""
        n = len(cands)
        _, cols = cands.places(self.graph)
        if cols.size and cols.min() < start_layer * self.graph._layer_columns:
            raise ValueError(f"The candidates cut edges into receivers before layer {start_layer}, where this pass "
                             "starts; start it at the earliest receiver layer they cut.")
        shape = shape or self.choose(cands, start_layer, width)
        if not self.fits(cands, start_layer, shape):
            raise ValueError(f"The program {shape} cannot score these {n} candidates from layer {start_layer}.")
        masks = self._masks(cands, shape.width)
        if shape.kind == "sparse":
            out = self.sparse.batch(cands, start_layer, shape, masks)[:n]
            self.passes += 1  # counted once it ran (a pass out of memory is retried: `decide.narrow`)
            return out
        base, heads, rows, base_results = cands.base, None, None, None
        if shape.heads is not None:
            touched = self.changed_heads(cands, start_layer) or [0]
            heads = _pad_heads(touched, shape.heads, self.graph.n_heads)
            base_results = self._base_heads(base, start_layer, set(touched))
        if shape.rows is not None:
            rows = self.upstream_rows(cands, start_layer, size=shape.rows)
        flops = self.flops_of_program(shape)
        upstream = None if rows is None else (self._rep(base), put_replicated(jnp.asarray(rows), self.mesh))
        program, args = self._dense_pass(shape, start_layer, masks, heads, base_results, upstream)
        out = self._run(shape, flops, lambda: exact(lambda running_max: program(*args, running_max)))[:n]
        self.passes += 1  # counted once it ran (a pass out of memory is retried: `decide.narrow`)
        return out

    def _masks(self, cands: Candidates, width: int) -> jax.Array:
        if self.cuts_to_device:
            return cands.on_device(width, self._dtype)
        return put_candidates(np.asarray(cands.masks(width), self._dtype), self.mesh)

    def _dense_pass(self, shape: Shape, start_layer: int, masks, heads=None, base_results=None, upstream=None,
                    deviations=None):
        """The jitted pass that runs the program `shape` from `start_layer`, and
        its arguments but the last (`running_max`, `fused_kl.exact`)."""
        first = min(start_layer, shape.start_layer)  # a cover from an earlier layer recomputes from there
        loop = self.loop and shape.width > 1 and first < self.graph.n_layers - 1
        deviations = self.deviations if deviations is None else deviations
        common = (self.corruption, self.metric, self.task, self.arrays, masks, self.tokens, deviations,
                  self.positions)
        if heads is None:
            return dense.batch_metric, (self.model, self.graph, first, *common, self.dense_chunk, upstream, loop)
        heads = put_replicated(jnp.asarray(heads), self.mesh)
        return dense.batch_metric_heads, (self.model, self.graph, start_layer, *common, base_results, heads,
                                          self.dense_chunk, upstream, loop)


def shape_flops(graph: CircuitGraph, shape: Shape, n_prompts: int, n_pos: int, n_out: int) -> int:
    """FLOPs of one run of the program `shape` (all its candidates, and the
    shared upstream sum or the head cache's heads) over `n_prompts` prompts."""
    H = graph.n_heads
    if shape.kind == "receivers":
        return n_prompts * cache_flops(graph, shape.start_layer, n_pos)
    if shape.kind in ("sparse", "rebase"):
        return shape.width * n_prompts * sparse_flops(graph, shape.start_layer, shape.reach, n_pos, n_out, shape.kind)
    if shape.kind == "heads":
        return n_prompts * base_heads_flops(graph, shape.start_layer, shape.heads or H, n_pos)
    total = shape.width * n_prompts * pass_flops(graph, shape.start_layer, shape.heads or H, n_pos, n_out,
                                                 shape.rows)["total"]
    if shape.rows is not None:
        total += n_prompts * upstream_flops(graph, shape.start_layer, n_pos)
    return total


def _pow2(n: int, n_heads: int) -> int:
    """`n` heads rounded up to a power of two, at most all of them."""
    return min(1 << (n - 1).bit_length(), n_heads)


def _pad_heads(heads: list[int], size: Optional[int], n_heads: int) -> np.ndarray:
    """`heads` padded (by repeating the last) to `size`, or all heads."""
    if size is None or size >= n_heads:
        return np.arange(n_heads, dtype=np.int32)
    return np.asarray(heads + heads[-1:] * (size - len(heads)), np.int32)

"""A `Scorer`'s sparse passes (`sparse.py`): the base state they start
from, the moves that keep it at the circuit being scored, the receiver
caches and head maps, and the choice between a sparse and a dense pass.

The choice counts FLOPs. In the default "auto" mode a run also weighs,
once, at its first sparse pass, what going sparse would cost in compiling
(`entry_cost`) against the seconds it would save (the saving of a pass
like this one, as wide as its layer allows, once for each pass likely to
come, plus what earlier runs in the process would have saved: a sweep's
later runs can go sparse where its first did not).
Entering midway would pay for both families of programs. On a small model
or a short run it stays dense and compiles no sparse program. Once the
process has a sparse program, every pass that costs fewer FLOPs sparse
runs sparse: the sparse programs come as a family (moves, receiver caches,
head maps), and paying for some of them and then running dense would be
the worst of both."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from .fused_kl import exact
from .programs import Shape
from .receivers import ReceiverCache, receiver_cache
from .sparse import (BaseState, diff_columns, eligible, head_maps, initial_state, low_rank, padded, reach, rebase,
                     sizes, sparse_flops, sparse_metric)


def _mode(sparse) -> str:
    """`sparse` as "auto", "on" or "off" (True and False stand for the last two)."""
    return {True: "on", False: "off"}.get(sparse, sparse)


def taken(sparse, graph, mesh=None, prompt_chunk: Optional[int] = None) -> bool:
    """Whether a Scorer with these settings scores passes sparsely where they
    pay (and so computes every head's z at the metric positions with its deviations)."""
    return _mode(sparse) != "off" and eligible(graph) and mesh is None and prompt_chunk is None


class SparsePasses:
    """A `Scorer`'s sparse passes: the base state they start from, kept at
    the last base scored, the receiver caches of the last two start layers,
    and the head maps (made at the first pass)."""

    REFRESH = 4  # moves through the maps between two dense ones

    MODES = ("auto", "on", "off")

    def __init__(self, scorer, sparse):
        mode = _mode(sparse)
        if mode not in self.MODES:
            raise ValueError(f"sparse must be one of {self.MODES} (or True / False for 'on' / 'off'), got {mode!r}.")
        self.scorer = scorer
        self.auto = mode == "auto"
        self.ok = taken(mode, scorer.graph, scorer.mesh, scorer.prompt_chunk)
        self.entered: Optional[bool] = None  # auto: whether this run goes sparse (decided at its first sparse pass)
        self.mask: Optional[np.ndarray] = None  # the circuit `state` belongs to
        self.state: Optional[BaseState] = None
        self.start_mask: Optional[np.ndarray] = None  # the Scorer's start circuit, and its heads' z (`start`)
        self.start_z = None
        self._logits_edges = None  # (edge, head) of each head's edge into the logits
        self.rebases = 0
        self.unmoved = 0  # passes that left the state where it was (`_unmoved`)
        self.updates = 0  # moves through the maps since the last dense one
        self.caches: dict[int, ReceiverCache] = {}  # start layer -> its receiver cache under the state
        self.passes = 0

    def start(self, mask: np.ndarray, z) -> None:
        """The start circuit of the Scorer's deviations, and every head's z
        under it at the metric positions: the first state is made from them."""
        self.start_mask, self.start_z = np.array(mask, np.float32), z

    def _reach(self, cands, start_layer: int):
        g = self.scorer.graph
        if not self.ok or start_layer >= g.n_layers:
            return None
        cols = np.unique(cands.places(g)[1])
        if cols.size and (cols.max() >= g.logits_column or cols.min() < start_layer * g._layer_columns):
            return None
        return reach(g, cands.base, cols, start_layer)

    def need(self, cands, start_layer: int, width: int) -> Optional[Shape]:
        """The sparse program that scores `cands`, or None where there is none."""
        found = self._reach(cands, start_layer)
        if found is None:
            return None
        return Shape("sparse", start_layer, max(width, len(cands)), None, None, sizes(*found, self.scorer.graph))

    def cover(self, need: Shape) -> Shape:
        """The sparse program to compile when none runs `need`: at least two
        heads wherever `need` has one, so that the passes still to come from
        its layer can rent it (a receiver's cuts reach one head, a node's
        speculation over the next receiver two). As wide as `need`: wider
        covers saved a program or two on a first call, but their rent made
        second calls with 10 prompts 1.5x slower (docs/performance.md)."""
        g = self.scorer.graph
        most = (g.n_heads,) * (len(need.reach) - 1) + (g.n_layers * g.n_heads,)
        reach = tuple(min(max(k, 2), m) if k else 0 for k, m in zip(need.reach, most))
        return Shape("sparse", need.start_layer, need.width, None, None, reach)

    def _rebase_plan(self, base: np.ndarray):
        """(shape, heads per layer, dense) of the move of the state to `base`,
        or None if it is there. Dense (the residual unembedded again) after an
        edge into the logits changed and every `REFRESH` moves (so that float
        rounding cannot pile up); else the heads' change goes through the maps.
        The first move starts from the start circuit's deviations, and makes
        the unembedded numerator (dense) even where `base` is that circuit.
        A layer's head count is padded to 2 or all heads: moves are cheap, and
        few shapes are few programs to compile."""
        g = self.scorer.graph
        if self.mask is not None and np.array_equal(self.mask, base):
            return None
        cols = diff_columns(g, self.start_mask if self.state is None else self.mask, base)
        start = min(int(cols.min()) // g._layer_columns, g.n_layers - 1) if cols.size else g.n_layers - 1
        heads, _ = reach(g, base, cols, start)
        dense = (self.state is None or self.updates >= self.REFRESH
                 or bool(cols.size and cols.max() >= g.logits_column))
        size = tuple(0 if not hs else min(2, g.n_heads) if len(hs) <= 2 else g.n_heads for hs in heads) + (0,)
        dense = dense or not low_rank(sum(size), g.config)
        return Shape("rebase", start, 1, None, None, size), heads, dense

    def _move_flops(self, shape: Shape, dense: bool) -> float:
        n_prompts, n_pos = self.scorer.tokens.shape
        return n_prompts * sparse_flops(self.scorer.graph, shape.start_layer, shape.reach, n_pos,
                                        len(self.scorer.positions), "rebase" if dense else "update")

    def cheaper(self, shape: Shape, dense: Shape, base: np.ndarray) -> bool:
        """Whether the sparse program `shape`, with the move of the state to
        `base`, costs fewer FLOPs than the dense pass `dense`. FLOPs, not
        measured seconds: a choice that does not drift with the timings
        compiles the same programs in every run (measured seconds per FLOP
        made later runs choose, and compile, other shapes)."""
        return self.saving(shape, dense, base) > 0

    def saving(self, shape: Shape, dense: Shape, base: np.ndarray) -> float:
        """FLOPs that the sparse program `shape`, with the move of the state
        to `base`, saves against the dense pass `dense` (negative: it costs more)."""
        plan = None if self.state is None else self._rebase_plan(base)  # the first move: `_first_move_flops`
        move = 0.0 if plan is None else self._move_flops(plan[0], plan[2])
        return self.scorer.flops_of_program(dense) - self.scorer.flops_of_program(shape) - move

    def _first_move_flops(self, base: np.ndarray) -> float:
        """FLOPs of making the state (every head) for the run's first sparse pass: paid once, like compiling."""
        plan = self._rebase_plan(base) if self.state is None else None
        return 0.0 if plan is None else self._move_flops(plan[0], plan[2])

    def pays(self, shape: Shape, dense: Shape, base: np.ndarray) -> bool:
        """Whether to run the sparse program `shape` instead of the dense pass
        `dense` (already found cheaper in FLOPs). Always, unless in auto mode
        the process has no sparse program yet: then, decided at the run's
        first sparse pass, only if the seconds that sparse passes would have
        saved in earlier runs (`Programs.forgone`, kept for the later runs of
        a sweep), with the saving of a pass like this one as wide as its
        layer allows counted once for each pass likely to come
        (`passes_left`; a layer's first passes are often narrow), cover the
        compiling it would add (`entry_cost`) and the first move."""
        programs = self.scorer.programs
        if not self.auto or any(c.kind == "sparse" for c in programs.compiled):
            return True
        if programs.seconds_per_flop is None:  # nothing measured yet: the dense pass measures it
            return False
        saved = self.saving(shape, dense, base) * programs.seconds_per_flop
        programs.forgone += saved
        if self.entered is None:  # decided once per run: entering midway would pay for both families of programs
            widths = self.scorer.widths
            wide = max(shape.width, widths[shape.start_layer] if widths is not None else 0)
            typical = self.saving(dataclasses.replace(shape, width=wide), dataclasses.replace(dense, width=wide),
                                  base) * programs.seconds_per_flop
            left = self.passes_left(shape.start_layer) - 1
            first_move = self._first_move_flops(base) * programs.seconds_per_flop
            self.entered = programs.forgone + left * typical >= self.entry_cost(shape, dense) + first_move
        return self.entered

    def entry_cost(self, shape: Shape, dense: Shape) -> float:
        """Seconds of compiling that going sparse at `shape` would add: the
        sparse programs, a receiver cache and a move of the state per layer
        from its start layer back (1 + 2 per layer, each at the process's mean
        compile time), less what staying dense would compile instead. Where
        exact shapes come first (a CPU), that is a pass program and a head
        cache for each of those layers that has none yet; where covers come
        first (an accelerator), the dense pass's program, if none covers it.
        The benchmark model (10 prompts, tau 0.1) compiled 24 programs
        sparse, 12 s, against 17 dense, 12.7 s: counting only the sparse side
        put the choice on a knife edge (dense in 3 of 9 fresh runs, 30 s against 19-21 s).
        A layer's programs that an earlier process left on disk (its record,
        `program_record.py`) cost loading, so that a later process goes the
        way the first went and loads what it compiled."""
        s, programs = self.scorer, self.scorer.programs
        family = (shape.kind, "rebase", "receivers")  # estimated alike, at the sparse programs' compile seconds
        cost = programs.estimate_from(family, shape.start_layer)
        cost += 2 * sum(programs.estimate_from(family, l) for l in range(shape.start_layer + 1))
        if s.cover_first:
            if not any(c.covers(dense) for c in programs.compiled):
                cost -= programs.estimate_compile(dense.kind)
            return cost
        for kind in ("pass", "heads"):
            have = {c.start_layer for c in programs.compiled if c.kind == kind}
            cost -= sum(programs.estimate_from((kind,), l) for l in range(shape.start_layer + 1) if l not in have)
        return cost

    def passes_left(self, start_layer: int) -> int:
        """A guess at the sparse passes still to come: one per receiver from
        `start_layer` back (ACDC visits the later layers first). The
        benchmark model has 96 (4 layers x 8 heads' q, k, v); its runs at tau
        0.1 took 88-121 sparse passes."""
        return (start_layer + 1) * self.scorer.graph._layer_columns

    def _move_to(self, base: np.ndarray) -> None:
        plan = self._rebase_plan(base)
        if plan is None:
            return
        s, g = self.scorer, self.scorer.graph
        need, heads, dense = plan
        shape = s._choose(need)
        layers = padded(heads, [], shape.reach, g)[0]
        changed = np.concatenate([(shape.start_layer + i) * g.n_heads + hs for i, hs in enumerate(layers)]).astype(np.int32)
        state = self.state if self.state is not None else initial_state(
            g, s.deviations, self.start_z, s.positions, s.model.config.d_vocab_out)
        self.updates = 0 if dense else self.updates + 1
        flops = self._move_flops(shape, dense)
        self.state = s._run(shape, flops, lambda: jax.block_until_ready(rebase(
            s.model, g, shape.start_layer, s.corruption, s.tokens, state, s._rep(base), layers, changed, s.positions,
            self._maps(base), np.asarray(dense))))
        self.mask = np.array(base, np.float32)
        self.rebases += 1
        moved = [shape.start_layer + i for i, hs in enumerate(layers) if len(hs)]
        if moved:  # the heads recomputed are senders of every later layer
            self.caches = {l: c for l, c in self.caches.items() if l <= moved[0]}

    def _cache(self, l: int) -> ReceiverCache:
        """Layer `l`'s receiver cache under the state (made if missing; two are kept)."""
        if l not in self.caches:
            s = self.scorer
            shape = Shape("receivers", l, 1, None, None)
            flops = s.flops_of_program(shape)
            cache = s._run(shape, flops, lambda: jax.block_until_ready(receiver_cache(
                s.model, s.graph, l, s.corruption, s.tokens, self.state.mid)))
            self.caches = {k: c for k, c in list(self.caches.items())[-1:]}
            self.caches[l] = cache
        return self.caches[l]

    def _maps(self, base: np.ndarray):
        """Head maps with those of the heads that have an edge into the
        logits in `base` (`head_maps` keeps the maps made, and makes them
        again, with more heads, only for a circuit that has others: ACDC's
        later circuits have no more such edges than its first move's)."""
        g = self.scorer.graph
        if self._logits_edges is None:
            edge, rows, cols = g._entries
            at = (cols == g.logits_column) & (rows >= g.n_embed)
            self._logits_edges = edge[at], rows[at] - g.n_embed
        edge, head = self._logits_edges
        return head_maps(self.scorer.model, np.unique(head[np.asarray(base)[edge] != 0]))

    def _unmoved(self, cands, start_layer: int, shape: Shape):
        """The heads to recompute (as `reach` gives them) where the program
        `shape` can score `cands` from the state where it is, without moving
        it to their base: the heads whose inputs differ between the state's
        circuit and the base are recomputed for each candidate along with
        those the cuts reach, and fit in the program (the next pass at the
        same receiver, after the last one's removals). None where not."""
        if self.state is None:
            return None
        g = self.scorer.graph
        diff = diff_columns(g, self.mask, cands.base)
        if not diff.size or diff.max() >= g.logits_column or diff.min() < start_layer * g._layer_columns:
            return None
        found = reach(g, cands.base, np.union1d(np.unique(cands.places(g)[1]), diff), start_layer)
        if any(a > b for a, b in zip(sizes(*found, g), shape.reach)):
            return None
        return found

    def batch(self, cands, start_layer: int, shape: Shape, masks) -> np.ndarray:
        s, g = self.scorer, self.scorer.graph
        found = self._unmoved(cands, start_layer, shape)
        if found is None:
            self._move_to(cands.base)
            found = self._reach(cands, start_layer)
        else:
            self.unmoved += 1
        layers, pick, glob, valid = padded(*found, shape.reach, g)
        cache = self._cache(start_layer)
        flops = s.flops_of_program(shape)
        program = lambda running_max: sparse_metric(
            s.model, g, start_layer, s.corruption, s.metric, s.task, s.arrays, masks, s.tokens, self.state,
            self._maps(cands.base), cache, layers, pick, glob, valid, s.positions, s.loop, running_max)
        out = s._run(shape, flops, lambda: exact(program))
        self.passes += 1  # counted once it ran (a pass out of memory is retried: `decide.narrow`)
        return out

"""The programs a run's first passes need, compiled ahead in background threads.

On an accelerator a pass takes milliseconds and a compilation seconds (14-27 s
each on an H200), so a cold run waits mostly for the compiler, one program
after another as the walk reaches them. Which programs come first is known
before any pass: the full pass, the logits' pass (its first pass tries every
edge into the logits, so it re-mixes every sender: no upstream rows), one
cover per run of layers that the memory plan gives the same width, and each
layer's own cover, which its passes take over from a shared one once ready
(`programs.py`). A Scorer made with ``ahead=True`` starts compiling them in
`Programs`' threads (`jax.jit(f).lower(...).compile()`, whose executable a
later call of `f` with arguments of those shapes and placement reuses),
before it compiles its own deviations; a pass waits for one still compiling
(`Programs.run`). See docs/performance.md, "Compiling ahead".
"""

from __future__ import annotations

import functools
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from . import dense
from .candidates import Candidates
from .programs import Shape
from .sharding import round_width


def covers(scorer) -> list[Shape]:
    """The logits' pass, then the cover that the walk's first pass from each
    layer compiles (`Scorer._choose`), the latest layer first, as the walk
    needs them; then each layer's own cover where that is a shared one from an
    earlier layer, which its passes rent (recomputing the layers between)
    until their own is compiled. Empty where nothing compiles ahead."""
    s = scorer
    if not (s.covers_ahead and s.cover_first and s.programs.adaptive and s.widths):
        return []
    shared, own = [Shape("pass", s.graph.n_layers, round_width(s.widths[-1], s.mesh), None, None)], []
    for layer in reversed(range(s.graph.n_layers)):
        need = Shape("pass", layer, round_width(s.widths[layer], s.mesh), None, None)
        cover = need.cover(s.cover_start(need))
        if cover not in shared:
            shared.append(cover)
        if cover != need:
            own.append(need)
    return shared + own


def start(scorer, deviations=None) -> list[Shape]:
    """Start compiling `covers(scorer)`. `deviations`: an array shaped and
    placed as the Scorer's, before it has its own (dropped once it has: the
    deviations of GPT-2 small over 100 prompts take 0.8 GB). Returns those started."""
    like = [deviations]

    def compile_cover(shape: Shape) -> None:
        own = getattr(scorer, "deviations", None)
        if own is not None:
            like[0] = None
        program, args = scorer._dense_pass(shape, shape.start_layer,
                                           scorer._masks(Candidates(scorer.start, [[]]), shape.width),
                                           deviations=like[0] if own is None else own)
        program.lower(*args, False).compile()

    started = [shape for shape in covers(scorer) if scorer.programs.compile_ahead(
        shape, in_this_context(functools.partial(compile_cover, shape)))]
    scorer.ahead += started
    return started


def full_pass(scorer) -> None:
    """Start compiling the full pass (`Scorer.full`)."""
    s, shape = scorer, Shape("full", 0, 1, None, None)
    if s.programs.compile_ahead(shape, in_this_context(lambda: dense.full_metric.lower(
            s.model, s.graph, s.corruption, s.metric, s.task, s.arrays, s._rep(s.start), s.tokens,
            s.positions).compile())):
        s.ahead.append(shape)


def buy(scorer, shape: Shape) -> bool:
    """Compile `shape`, which the ski rental has decided to buy, in a
    background thread while the passes rent the program they ran in (its
    arguments lowered as zeros of their shapes). True where it is compiling
    (now or already). Dense passes (their own cover, or with a head cache and
    a shared upstream sum) and head caches on one device; others compile when run."""
    s, p = scorer, scorer.programs
    if shape in p.ahead:
        return True
    if not (s.covers_ahead and p.adaptive and s.mesh is None and shape.kind in ("pass", "heads")):
        return False
    H = s.graph.n_heads
    if shape.kind == "pass" and shape.heads is not None:  # its first run computes the layer's head cache
        buy(s, Shape("heads", shape.start_layer, 1, H, None))

    def compile_program() -> None:
        base = s._rep(s.start)
        heads = None if shape.heads is None else jnp.arange(shape.heads, dtype=jnp.int32) % H
        if shape.kind == "heads":
            program, args = dense.layer_heads, (s.model, s.graph, shape.start_layer, s.corruption, base, s.tokens,
                                                s.deviations, heads)
            program.lower(*args).compile()
            return
        results = None
        if heads is not None:
            like = eqx.filter_eval_shape(dense.layer_heads, s.model, s.graph, shape.start_layer, s.corruption, base,
                                         s.tokens, s.deviations, jnp.arange(H, dtype=jnp.int32))
            results = jnp.zeros(like.shape, like.dtype)
        upstream = None if shape.rows is None else (base, jnp.arange(shape.rows, dtype=jnp.int32))
        masks = s._masks(Candidates(s.start, [[]]), shape.width)
        program, args = s._dense_pass(shape, shape.start_layer, masks, heads, results, upstream)
        program.lower(*args, False).compile()

    if not p.compile_ahead(shape, in_this_context(compile_program)):
        return False
    s.ahead.append(shape)
    s.bought_ahead += 1
    return True


def in_this_context(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn`, to run in a worker thread under this thread's JAX settings that
    are part of a program's key (matmul precision, default device, x64, ...:
    JAX keeps them per thread). Where they still differ there (a context JAX
    keeps otherwise, such as a mesh), it compiles nothing: the pass would not
    find the program, and compiles its own."""
    try:  # JAX's own list of them
        from jax._src import config
        states = [config.config_states[n] for n in config.trace_context_names() if n in config.config_states]
        settings, context = [(state, state.get_local()) for state in states], config.trace_context()
    except (AttributeError, ImportError, NotImplementedError):  # a JAX without it: the precision alone
        config, context = None, None
        settings = jax.config.jax_default_matmul_precision

    def run():
        if config is None:
            with jax.default_matmul_precision(settings):
                return fn()
        saved = [state.swap_local(value) for state, value in settings]
        try:
            if config.trace_context() != context:
                raise RuntimeError("JAX settings this thread cannot enter: not compiled ahead")
            return fn()
        finally:
            for (state, _), value in zip(settings, saved):
                state.set_local(value)

    return run

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
(`Programs.run`). Before the Scorer, `setup` starts the run's reference
logits and deviations while the run compiles its corrupted run; later, `buy`
compiles what the rental buys while the passes rent. See
docs/performance.md, "Compiling ahead".
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import dense
from .candidates import Candidates
from .corruption import Corruption, _senders, with_resid
from .programs import Shape, submit
from .sharding import round_width
from .tasks.base import _forward


def enabled(accelerator: bool) -> bool:
    """Whether programs compile ahead: on accelerators, unless
    ``ACDC_JAX_COVERS_AHEAD=0``; ``=1`` turns it on for CPUs too (tests)."""
    setting = os.environ.get("ACDC_JAX_COVERS_AHEAD")
    return setting == "1" or (setting != "0" and accelerator)


_setup: dict[str, concurrent.futures.Future] = {}  # the latest run's setup programs compiling ahead


def setup(model, graph, task, corruption, start: Optional[np.ndarray], mesh=None, sparse="auto",
          prompt_chunk: Optional[int] = None) -> None:
    """Where programs compile ahead, start compiling those a run on one
    device needs before its first pass, but the corrupted run's, which this
    thread compiles meanwhile: the full model's logits (`Task.bind`) and the
    senders' deviations under `start` (as the run's `Scorer` asks for them,
    given its `sparse` and `prompt_chunk`), lowered with zeros shaped as the
    corrupted activations (corruption "prompts" or "zeros", by name). `wait`
    before the call that reuses one."""
    from .scoring import Scorer  # its accelerator check, which tests patch
    from .sparse_passes import taken

    if isinstance(corruption, Corruption) or mesh is not None or jax.process_count() > 1 \
            or not enabled(Scorer._on_accelerator()):
        return
    corruption = corruption or task.corruption
    z_at = tuple(int(p) for p in task.positions) if taken(sparse, graph, mesh, prompt_chunk) else None
    start = graph.ones() if start is None else start
    tokens = jnp.asarray(task.clean)
    masks = jnp.asarray(np.asarray(start, np.float32), model.embed.W_E.dtype)  # as `Scorer._rep` on one device

    def deviations() -> None:
        if corruption == "zeros":
            corrupted = Corruption.zeros()
        else:
            like = eqx.filter_eval_shape(lambda m, t: with_resid(m, _senders(m, t)), model, jnp.asarray(task.corrupted))
            corrupted = Corruption("prompts", jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), like))
        args = (model, graph, tokens, masks, corrupted) + (() if z_at is None else (z_at,))
        dense.deviations.lower(*args).compile()

    _setup["forward"] = submit(in_this_context(lambda: _forward.lower(model, tokens).compile()))
    if corruption == "zeros" or (corruption == "prompts" and task.corrupted is not None):
        _setup["deviations"] = submit(in_this_context(deviations))


def wait(name: str) -> float:
    """Wait for the setup program `name` ("forward", "deviations") if it is
    compiling ahead, so that this thread does not compile it too. Returns the seconds waited."""
    job = _setup.pop(name, None)
    if job is None:
        return 0.0
    start = time.perf_counter()
    concurrent.futures.wait([job])
    return time.perf_counter() - start


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
            s.positions, s.full_chunk).compile())):
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

"""ACDC (Conmy et al. 2023), exact, with batched evaluation.

For each unit of the schedule (see `schedule.py`) and each of its edges in
order: remove the edge, compute the metric of the whole current circuit, and
keep the removal when ``metric_new - metric_current < tau`` (``abs(...)`` with
``abs_value``); then ``metric_current = metric_new``. Otherwise restore it.

``mode="sequential"`` runs that loop literally, one full forward pass per edge.
``mode="batched"`` (default) scores several future trials in one vmapped
pass that starts at the earliest layer they touch, from cached upstream
activations (in that layer only the heads they change are recomputed). Which
trials: the outcome of a trial decides the circuit the next one starts from,
so the pass guesses outcomes (`speculate.py`): the chain of cumulative
removals e1, e1+e2, ... when most trials remove their edge, single removals
when most keep it, a tree of both in between (on accelerators, past the
likely nodes, a chain of probes that scores the edges ahead for the next
passes' guesses). A score is used only when the
guesses before it were right, so every decision is the one the loop makes;
a trial whose metric change lies within rounding of tau is rescored in the
loop's own full passes (`decide.rescore`), so that rounding in another
program cannot decide it otherwise; the width of that band is measured
against full passes as the run goes (`decide.calibrate`).

On accelerators a wider pass costs little more, so each pass is as wide as
memory allows. On a CPU each candidate costs about a pass of its own, and the
width is the one that decides the most edges per unit of work.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import compile_ahead
from .circuit import Circuit, Decision, start_mask
from .corruption import Corruption
from .decide import PassOutOfMemory, State, apply_prunes, decide, narrow, probe_below, tie_band
from .errors import FlatMetricWarning, MetricError, MetricFallsWarning, check_number, check_stop_after
from .graph import CircuitGraph
from .model import Transformer, cast
from .programs import compile_seconds, program_counts, programs_since
from .precision import PRECISIONS, check_precision, matmul_precision  # noqa: F401 (PRECISIONS: re-exported)
from .runlog import RunLog, closed_on_error, model_fingerprint, task_fingerprint
from .schedule import Schedule
from .speculate import Forecast, plan
from .memory import plan_task
from .scoring import Scorer
from .sharding import parse_mesh
from .tasks.base import Task

MetricArg = Union[None, str, Callable]
UNLOGGED_EDGES = 1000  # a run over more edges without a log warns: docstring's 1,281 take minutes on a CPU


def check_tau(tau) -> float:
    try:
        return check_number(tau, "tau", 0)
    except ValueError as e:
        raise ValueError(f"{e} ACDC removes an edge when the metric rises by less than tau.") from None


def check_run(tau, mode: str, abs_value, rescore_ties, stop_after, log_path, resume) -> float:
    """The settings ACDC over edges and over nodes share, checked before any
    work; returns tau. A string where a flag belongs ("off") would read as
    True, and a log_path beside another resume log would go unwritten."""
    tau = check_tau(tau)
    check_stop_after(stop_after)
    if mode not in ("batched", "sequential"):
        raise ValueError(f"mode must be 'batched' or 'sequential', got {mode!r}.")
    for name, value, none in (("abs_value", abs_value, False), ("rescore_ties", rescore_ties, True)):
        if not (isinstance(value, (bool, np.bool_)) or (none and value is None)):
            raise ValueError(f"{name} must be True or False{' (or None: the default)' if none else ''}, got "
                             f"{value!r}.")
    if log_path is not None and resume is not None and Path(log_path).resolve() != Path(resume).resolve():
        raise ValueError(f"Give log_path (start a new log) or resume (continue a log, appending to it), not both: "
                         f"{log_path} and {resume} differ.")
    return tau


def starting_metric(scorer: Scorer, mask: np.ndarray, metric_name: str, what: str = "full model") -> float:
    """The metric of the circuit a run starts from, which must be finite."""
    full = scorer.full(mask)
    if not math.isfinite(full):
        raise MetricError(f"The metric {metric_name!r} of the {what} is {full}; it must be a finite number.")
    return full


def warn_if_flat(scorer: Scorer, full: float, metric_name: str, tau: float, what: str = "full model",
                 abs_value: bool = False, stacklevel: int = 3) -> None:
    """Warn when cutting every edge at once moves the metric by less than tau,
    as when the corrupted prompts are the clean ones: such a run is likely to
    remove every edge; or lowers it by tau or more (unless `abs_value`), as a
    higher-is-better metric does, which ACDC would walk the wrong way. (After
    the run's other checks: errors come first.)"""
    empty = scorer.full(np.zeros(scorer.graph.n_edges, np.float32))
    if abs(empty - full) < tau:
        # more than float32 rounding: the metric may be higher-is-better as well as flat
        falls = not abs_value and full - empty > 1e-5 * max(1.0, abs(full))
        warnings.warn(f"Cutting every edge at once changes the metric {metric_name!r} by only {empty - full:.3g} "
                      f"(from {full:.4g} for the {what} to {empty:.4g}), less than tau={tau:g}, so this run is likely "
                      "to remove every edge. Check that the corrupted prompts (or the corruption) differ from the "
                      "clean ones where the metric looks, and the metric itself; or lower tau." +
                      (" It also falls, as a higher-is-better metric does, and ACDC takes a lower metric as better: "
                       "if it is one, negate it (or pass abs_value=True)." if falls else ""), FlatMetricWarning,
                      stacklevel=stacklevel)
    elif not abs_value:
        warn_if_metric_falls(scorer, metric_name, "ACDC", "it keeps an edge only where cutting it raises the metric "
                             "by tau or more, and so keeps the edges that work against the task",
                             ", or pass abs_value=True (--abs-value) to compare the size of each change", full, empty,
                             what, stacklevel)


def warn_if_metric_falls(scorer: Scorer, metric_name: str, method: str, consequence: str, fix: str = "",
                         full: Optional[float] = None, empty: Optional[float] = None, what: str = "full model",
                         stacklevel: int = 3) -> None:
    """Warn where cutting every edge lowers the metric (`empty` < `full`,
    each a full pass where not given): `method`, which minimises it, then
    does `consequence`. `stacklevel` counts from the caller, as
    warnings.warn's does from its caller."""
    n = scorer.graph.n_edges
    full = scorer.full(np.ones(n, np.float32)) if full is None else full
    empty = scorer.full(np.zeros(n, np.float32)) if empty is None else empty
    if empty < full:
        warnings.warn(f"Cutting every edge at once lowers the metric {metric_name!r} by {full - empty:.3g} (from "
                      f"{full:.4g} for the {what} to {empty:.4g}). {method} takes a lower metric as better, so with a "
                      f"higher-is-better metric (a logit difference that is not negated, say) {consequence}. Negate "
                      f"the metric (the tasks' logit_diff is negated){fix}; or check that the corrupted prompts do "
                      "not do the task better than the clean ones.", MetricFallsWarning, stacklevel=stacklevel + 1)


def resolve_metric(task: Task, metric: MetricArg) -> tuple[str, Callable]:
    if metric is None or isinstance(metric, str):
        name = metric or task.default_metric
        return name, task.metric(name)
    if not callable(metric):
        raise TypeError(f"metric must be a name, a callable f(logits, task) -> scalar, or None; got {metric!r}.")
    return getattr(metric, "__name__", repr(metric)), metric


def resolve_corruption(model: Transformer, task: Task, corruption) -> tuple[str, Corruption]:
    if isinstance(corruption, Corruption):
        dtype = model.embed.W_E.dtype
        return corruption.kind, Corruption(corruption.kind, jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                                                                 corruption.acts))
    kind = corruption or task.corruption
    return kind, task.make_corruption(model, kind)


def acdc(
    model: Transformer,
    task: Task,
    tau: float,
    *,
    metric: MetricArg = None,
    corruption: Union[None, str, Corruption] = None,
    mode: str = "batched",
    abs_value: bool = False,
    head_order: str = "ascending",
    order: Optional[list] = None,
    graph: Optional[CircuitGraph] = None,
    max_width: Optional[int] = None,
    mesh=None,
    prompt_chunk: Optional[int] = None,
    dtype: str = "float32",
    precision: str = "float32",
    log_path: Union[None, str, Path] = None,
    resume: Union[None, str, Path] = None,
    progress: bool = True,
    stop_after: Optional[float] = None,
    callback: Optional[Callable[[Decision], None]] = None,
    sparse: Union[bool, str] = "auto",
    start=None,
    rescore_ties: Optional[bool] = None,
) -> Circuit:
    """Find the circuit for `task` in `model` at threshold `tau`.

    metric: a name from ``task.metrics`` (default ``task.default_metric``, KL to
      the full model for language tasks) or a callable ``f(logits, task)`` that
      is minimised; logits are at ``task.positions``.
    corruption: "prompts" (the task's corrupted prompts), "zeros", "mean", or a
      `Corruption`; default ``task.corruption``.
    head_order: order of a layer's heads within a receiver's senders.
    order: instead of ACDC's schedule, try every edge (names or indices) in
      this order, skipping none (to reproduce another implementation's run).
    max_width: most candidates per batched pass (default: 256 on accelerators,
      16 on CPU), lowered to fit in half the free memory.
    mesh: a `jax.sharding.Mesh` from `sharding.make_mesh` (or "auto": every
      device) to split candidates and prompts over devices and hosts.
    prompt_chunk: prompts per step inside a batched pass (default: all, or
      fewer when memory would otherwise allow fewer than 8 candidates; on one
      CPU device dense passes run in cache-sized chunks, `memory.cache_prompt_chunk`).
    dtype: "float32", or "bfloat16" for bf16 weights and activations (the
      metric is still computed in float32); see benchmarks/bench_precision.py
      for how often that changes decisions.
    precision: how float32 matrix products are multiplied (`jax.default_matmul_precision`
      for the whole run, the full model's reference logits included):
      "float32" (default) in full float32, as PyTorch does; "tensorfloat32"
      allows NVIDIA tensor cores' TF32 (10-bit mantissas, several times the
      throughput on an A100/H100); "default" is JAX's platform default (TF32 on
      NVIDIA GPUs, one bf16 pass on TPUs). The same on CPUs.
    log_path: JSON-lines decision log, written as the run goes (a run over
      more than UNLOGGED_EDGES edges without one warns that a crash would
      lose its decisions).
    resume: a log from an interrupted run with the same settings; the run
      continues from its last decision (and appends to it).
    stop_after: stop after the first pass that ends this many seconds in and return the circuit so far
      (``settings["finished"]`` is False; edges not yet tried count as kept);
      with `log_path`, a later call with `resume=` carries on.
    callback: called with each Decision as it is made.
    sparse: attention-only models score a pass in a sparse program (`sparse.py`:
      only the heads the cuts reach, a low-rank unembedding) where that costs
      fewer FLOPs: "on" (or True); "auto" (default) once the seconds saved
      cover compiling the sparse programs (`sparse_passes.py`); "off" (or
      False) never. Decisions are the same either way (tested; timings in benchmarks/README.md).
    start: search within this circuit (a `Circuit` over the same graph, such
      as `acdc_nodes`' result, the path of its circuit.json, a mask or edge
      names): its other edges are removed from the start and never tried, and
      the metric starts at the start circuit's. Default: the full model.
    rescore_ties: score the trials whose result lies within rounding of tau
      again in the loop's own full passes, so that the decisions are exactly
      the sequential loop's. Default: on in full float32, off in bf16 and in
      TF32 ("tensorfloat32", "default"), whose rounding band holds many
      trials: on an H200 in TF32 one trial in six was rescored, a full pass
      each, and those passes took 87% of the GPU's time (benchmarks/README.md).
      Off, a decision can differ from the loop's only where the trial's result
      is within that rounding of tau.
    """
    tau = check_run(tau, mode, abs_value, rescore_ties, stop_after, log_path, resume)
    programs_before = program_counts()  # the call's, its setup included
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function of each Decision, got {callback!r}.")
    model = cast_for(model, dtype)
    check_precision(precision)
    precision = precision if dtype == "float32" else None  # bf16 operands leave nothing to choose
    band = tie_band(rescore_ties, precision)
    with matmul_precision(precision):
        graph = task.graph_for(model, graph)
        mesh = parse_mesh(mesh)
        metric_name, metric_fn = resolve_metric(task, metric)
        start_edges = None if start is None else start_mask(graph, start)
        caps, chunk = [1] * (graph.n_layers + 1), None  # the widest pass from each start layer
        if mode == "batched":
            caps, chunk = plan_task(model, graph, task, max_width, mesh)
            chunk = prompt_chunk if prompt_chunk is not None else chunk
        # on accelerators the reference logits' and the deviations' programs compile while this thread
        # compiles the corrupted run
        compile_ahead.setup(model, graph, task, corruption, start_edges, mesh, sparse, chunk)
        corruption_kind, corruption_obj = resolve_corruption(model, task, corruption)
        setup_waited = compile_ahead.wait("forward")
        unbound, task = task, task.bind(model)
        schedule = Schedule(graph, head_order, order, start_edges)
        scorer = Scorer(model, graph, task, corruption_obj, metric_fn, static_task=unbound, mesh=mesh,
                        prompt_chunk=chunk, sparse=sparse, start=start_edges,
                        widths=caps if mode == "batched" else None, ahead=True)
        setup_waited += scorer.setup_waited
        waited = scorer.programs.waited
        settings = {
            "method": "acdc", "task": task.name, "tau": tau, "metric": metric_name, "corruption": corruption_kind,
            "dtype": dtype, "precision": precision, "rescore_ties": bool(band.scale),
            "abs_value": bool(abs_value), "head_order": head_order,
            "order": None if order is None else [graph.edge_names[graph.edge_index(e)] for e in order],
            "n_prompts": int(task.clean.shape[0]),
            "n_pos": int(task.clean.shape[1]), "graph": {"split_qkv": graph.split_qkv, "qkv_edges": graph.qkv_edges,
                                                         "split_embed": graph.split_embed},
            "model": model_fingerprint(model), "prompts": task_fingerprint(task),
            "start": None if start_edges is None else {
                "edges": int(start_edges.sum()), "sha256": hashlib.sha256(start_edges.tobytes()).hexdigest()[:16]},
        }

        mask = schedule.start.copy()
        what = "full model" if start is None else "start circuit"
        full_metric = starting_metric(scorer, mask, metric_name, what)
        state = State(mask=mask, cursor=(0, 0), metric=full_metric, decisions=[],
                       tie_band=band)
        log = RunLog.open(resume or log_path, settings, full_metric, resume=resume is not None,
                          write=jax.process_index() == 0)
        if resume is not None:
            with closed_on_error(log):  # a log of another run: unlocked for the next try
                log.replay(schedule, state)
        elif log_path is None and schedule.start.sum() > UNLOGGED_EDGES:
            warnings.warn(f"This ACDC run over {int(schedule.start.sum())} edges keeps no decision log, so a crash "
                          "would lose its decisions: pass log_path='decisions.jsonl' (and, after a crash, resume= "
                          "that file).", stacklevel=2)
        with closed_on_error(log):
            warn_if_flat(scorer, full_metric, metric_name, tau, what, abs_value)

        bar = progress_bar(progress, int(schedule.start.sum()), len(state.decisions))
        forecast = Forecast(graph, tau, abs_value)
        forecast.update(state.decisions)
        start, compiled = time.perf_counter(), compile_seconds()
        narrowed = []  # the passes that ran out of device memory
        try:
            while not schedule.finished(state.cursor):
                width = caps[schedule.layer_at(state.cursor)]
                nodes = plan(schedule, state.mask, state.cursor, width, forecast.p, probe_below())
                if nodes:
                    try:
                        new, nodes, effects = decide(nodes, state, scorer, tau, abs_value, graph, mode, caps)
                    except PassOutOfMemory as oom:  # narrower passes from its layer, and plan again
                        narrowed.append(narrow(caps, scorer, oom))
                        continue
                    forecast.update(new, nodes, effects)
                else:  # the schedule ends with skipped receivers
                    new = apply_prunes(schedule.next_trial(state.mask, state.cursor)[0], state, graph)
                    forecast.update(new)
                log.write(new)
                for d in new:
                    if callback is not None:
                        callback(d)
                if progress:  # the postfix costs a pass over the decisions
                    bar.update(len(new))
                    bar.set_postfix(unit=f"{min(state.cursor[0], len(schedule.units))}/{len(schedule.units)}",
                                    removed=sum(not d.kept for d in state.decisions), metric=f"{state.metric:.4g}")
                if stop_after is not None and time.perf_counter() - start > stop_after:
                    break
        finally:
            scorer.programs.cancel_ahead()
            bar.close()
            log.close()

        settings.update(mode=mode, width=max(caps), widths=caps, narrowed=narrowed, prompt_chunk=scorer.prompt_chunk,
                        dense_prompt_chunk=scorer.dense_chunk,
                        passes=scorer.passes, full_passes=scorer.full_passes, programs=len(scorer.shapes),
                        passes_in_larger_programs=scorer.reused,
                        flops=scorer.flops, finished=schedule.finished(state.cursor),
                        rescored=state.rescored, checked_programs=len(state.calibrated),
                        near_tie_scale=state.tie_band.scale,
                        sparse_passes=scorer.sparse.passes,
                        rebases=scorer.sparse.rebases, unmoved_passes=scorer.sparse.unmoved,
                        seconds=round(time.perf_counter() - start, 3),
                        compile_seconds=round(compile_seconds() - compiled, 3),
                        **programs_since(programs_before),
                        compiled_ahead=len(scorer.ahead),
                        bought_ahead=scorer.bought_ahead, compiled_ahead_and_run=len(set(scorer.ahead) & scorer.shapes),
                        compile_wait_seconds=round(setup_waited + scorer.programs.waited - waited, 3),
                        mesh=None if mesh is None else dict(mesh.shape))
        scores = np.full(graph.n_edges, np.nan)
        for d in state.decisions:
            if d.tried:
                scores[d.index] = d.result
        return Circuit(graph, state.mask.copy(), state.metric, list(state.decisions), settings, scores)


def cast_for(model: Transformer, dtype: str) -> Transformer:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    return cast(model, jnp.bfloat16) if dtype == "bfloat16" else model


def progress_bar(enabled: bool, total: int, done: int = 0, desc: str = "ACDC edges", unit: str = "edge"):
    """A tqdm bar; turned off, it prints nothing and its methods do nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)

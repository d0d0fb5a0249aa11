"""Edge scores from the patched forward: exact single-edge patching, edge
attribution patching (EAP), EAP with integrated gradients, and the head
importance score (HISP).

Every score estimates the same quantity: how much the metric (minimised)
rises when the edge is cut, ``metric(all edges but e) - metric(all edges)``.
Because a mask multiplies ``act_s - corrupt_s``, the gradient of the metric
with respect to the mask of edge s -> r is ``(act_s - corrupt_s) . dmetric/dx_r``,
so EAP's ``(corrupt_s - act_s) . dmetric/dx_r`` is minus that gradient.

Every method takes ``precision="float32"`` (`acdc_jax.precision`): it runs in
full float32 matmuls, as ACDC does, unless given "tensorfloat32" or "default".
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from .. import compile_ahead
from ..candidates import Candidates
from ..circuit import Circuit
from ..decide import PassOutOfMemory, narrow, score_pass
from ..errors import MetricAtMinimumWarning, check_finite, check_stop_after, check_whole
from ..graph import CircuitGraph
from ..memory import plan_task
from ..precision import takes_precision
from ..scoring import Scorer
from ..sharding import parse_mesh
from ..tasks.base import kl_divergence, squared_error
from .saved import load_state, lock_state, run_settings, save_state, state_path


def setup(model, task, metric=None, corruption=None, graph: Optional[CircuitGraph] = None,
          prompt_chunk: Optional[int] = None, mesh=None, gradient: bool = False, widths=None,
          ahead: bool = False):
    """The graph, a Scorer (over `mesh`, a `jax.sharding.Mesh`, "auto" or
    "CxP", if given; `widths`: the widest pass from each start layer) and the
    settings shared by the methods. A `gradient` method scores one mask at a
    time, so its "auto" mesh spreads the prompts."""
    from ..acdc import resolve_corruption, resolve_metric

    graph = task.graph_for(model, graph)
    mesh = parse_mesh(mesh, task.clean.shape[0] if gradient else None)
    metric_name, metric_fn = resolve_metric(task, metric)
    if ahead:  # on accelerators, the reference logits and the deviations compile beside the corrupted run
        compile_ahead.setup(model, graph, task, corruption, None, mesh, prompt_chunk=prompt_chunk)
    corruption_kind, corr = resolve_corruption(model, task, corruption)
    compile_ahead.wait("forward")
    scorer = Scorer(model, graph, task.bind(model), corr, metric_fn, static_task=task, prompt_chunk=prompt_chunk,
                    mesh=mesh, widths=widths, ahead=ahead)
    settings = {"task": task.name, "metric": metric_name, "corruption": corruption_kind,
                "mesh": None if mesh is None else dict(mesh.shape),
                "n_prompts": int(task.clean.shape[0]), "n_pos": int(task.clean.shape[1]),
                "graph": {"split_qkv": graph.split_qkv, "qkv_edges": graph.qkv_edges, "split_embed": graph.split_embed},
                "dtype": str(model.embed.W_E.dtype),
                "precision": jax.config.jax_default_matmul_precision}  # in effect (None: JAX's platform default)
    return graph, scorer, settings


TIES = ("refuse", "more", "fewer", "index")


def top_k_threshold(importance: np.ndarray, k: int) -> float:
    """The smallest threshold t with exactly k edges at or above it; ties at
    the boundary are an error (see `top_k_mask` for the ways round one)."""
    return top_k_mask(importance, k)[1]


def top_k_mask(importance: np.ndarray, k: int, ties: str = "refuse") -> tuple[np.ndarray, float]:
    """The k edges of highest importance, as a 0/1 mask, and the k-th
    importance. Where edges tie at the k-th value (many scores of exactly zero,
    say) no threshold keeps exactly k: then `ties` "refuse" (default) raises,
    "more" keeps every tied edge, "fewer" none of them, and "index" the tied
    edges earliest in the graph's order, as `evaluate.top_fraction_masks` does."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}.")
    importance = np.asarray(importance, np.float64)
    k = check_whole(k, "n_edges (the number of edges to keep, --n-edges)", 0, len(importance))
    if k == 0:
        return np.zeros(len(importance), bool), np.inf
    kth = float(np.sort(importance)[::-1][k - 1])
    above, tied = int((importance > kth).sum()), int((importance == kth).sum())
    if above + tied == k or ties == "more":
        return importance >= kth, kth
    if ties == "fewer":
        return importance > kth, kth
    if ties == "index":
        mask = importance > kth
        mask[np.flatnonzero(importance == kth)[: k - above]] = True
        return mask, kth
    raise ValueError(f"{tied} edges tie at the score of the {k}-th edge ({kth:.6g}), so no threshold keeps exactly "
                     f"{k}: {above} edges rank above it. Choose how to break the tie: ties='more' keeps "
                     f"{above + tied} edges, ties='fewer' keeps {above}, ties='index' keeps {k} (the tied edges "
                     "earliest in the graph's order); on the command line, --ties more|fewer|index. Or keep by "
                     "score with a threshold (--tau).")


RANKS = ("abs", "signed")


def edge_ranking(scores: np.ndarray, rank: str = "abs") -> np.ndarray:
    """What edges are ranked by: |score| (``"abs"``: edges whose cut moves the
    metric either way), or the score itself (``"signed"``: edges whose cut
    raises the minimised metric most, that is, the edges that help the task;
    those that work against it rank last). NaN ranks last."""
    if rank not in RANKS:
        raise ValueError(f"rank={rank!r} is not one of {RANKS}.")
    scores = np.asarray(scores, np.float64)
    return np.nan_to_num(np.abs(scores) if rank == "abs" else scores, nan=-np.inf)


def check_keep(n_edges, threshold, rank: str, ties: str, n_total: Optional[int] = None) -> None:
    """Refuse a bad choice of which edges to keep before a long scoring run, not after it."""
    if n_edges is not None and threshold is not None:
        raise ValueError(f"Give n_edges (keep the {n_edges} edges ranked highest) or threshold (keep those ranked >= "
                         f"{threshold}), not both; on the command line, --n-edges or --tau.")
    if n_edges is not None:
        check_whole(n_edges, "n_edges (the number of edges to keep, --n-edges)", 0, n_total)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))
                                  or np.isnan(threshold)):
        raise ValueError(f"threshold (--tau for a scoring method) must be a number, got {threshold!r}.")
    if rank not in RANKS:
        raise ValueError(f"rank={rank!r} is not one of {RANKS}.")
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}.")


def circuit_from_scores(graph: CircuitGraph, scores: np.ndarray, settings: dict, *, n_edges: Optional[int] = None,
                        threshold: Optional[float] = None, metric: Optional[float] = None,
                        rank: str = "abs", ties: str = "refuse") -> Circuit:
    """Keep the `n_edges` edges ranked highest, or those ranked at or above
    `threshold` (default: every edge ranked above 0), by |score| or, with
    ``rank="signed"``, by the score itself. `ties`: what to do where edges
    tie at the `n_edges`-th rank (`top_k_mask`)."""
    check_keep(n_edges, threshold, rank, ties, graph.n_edges)
    ranked = edge_ranking(scores, rank)
    if n_edges is not None:
        mask, threshold = top_k_mask(ranked, n_edges, ties)
    elif threshold is not None:
        mask = ranked >= threshold
    else:
        mask = ranked > 0
    settings = dict(settings, n_edges=n_edges, threshold=threshold, rank=rank)
    if n_edges is not None:
        settings["ties"] = ties
    return Circuit(graph, mask.astype(np.float32), metric, [], settings, np.asarray(scores, np.float64))


def _done(graph, scores, settings, start, scorer, complete: bool = True, **keep) -> Circuit:
    if complete and keep.get("rank") == "signed":  # the sign's meaning rests on a lower-is-better metric
        from ..acdc import warn_if_metric_falls

        method = {"eap": "EAP", "eap_ig": "EAP-IG", "exact_patching": "Exact patching", "hisp": "HISP"}.get(
            settings["method"], settings["method"])
        warn_if_metric_falls(scorer, settings["metric"], method, "rank='signed' puts first the edges whose cut "
                             "lowers the metric, the ones working against the task",
                             ", or rank by size (rank='abs', the default)", full=settings.get("full_metric"),
                             stacklevel=4)
    settings.update(seconds=round(time.perf_counter() - start, 3), passes=scorer.passes)
    if not complete:  # a stopped scoring run has no ranking yet: keep every edge, as ACDC keeps those not tried
        return Circuit(graph, np.ones(graph.n_edges, np.float32), None, [], dict(settings, **keep), scores)
    return circuit_from_scores(graph, scores, settings, **keep)


def receiver_layers(graph: CircuitGraph) -> np.ndarray:
    """The layer of each edge's receiver (n_layers for the logits)."""
    return np.array([e.receiver.layer for e in graph.edges])


SAVE_EVERY = 30.0  # seconds between saved states of a long exact-patching run


@takes_precision
def exact_patching(model, task, *, metric=None, corruption=None, graph=None, max_width: Optional[int] = None,
                   n_edges=None, threshold=None, rank: str = "abs", ties: str = "refuse", progress: bool = True,
                   mesh=None, checkpoint=None, resume=None, stop_after: Optional[float] = None) -> Circuit:
    """The true effect of cutting each edge alone, in vmapped batches that
    start at the edge's receiver layer (with a progress bar unless `progress`
    is False). `mesh` (a Mesh, "auto" or "CxP"): the candidates and prompts
    of each batch are spread over devices, as in `acdc`. `checkpoint`: a path
    (.npz) the scores so far are saved to every 30 s and when it ends or is interrupted; `resume`:
    continue from one, in the same batches, to the scores of a run never
    stopped; `stop_after`: stop after the pass that ends this many seconds in
    (``settings["finished"]`` is False, the edges not scored yet score NaN,
    and the circuit keeps every edge until the ranking is complete)."""
    from ..acdc import progress_bar

    start = time.perf_counter()
    graph = task.graph_for(model, graph)
    mesh = parse_mesh(mesh)
    check_keep(n_edges, threshold, rank, ties, graph.n_edges)
    check_stop_after(stop_after)
    widths, chunk = plan_task(model, graph, task, max_width, mesh)
    graph, scorer, settings = setup(model, task, metric, corruption, graph, prompt_chunk=chunk, mesh=mesh,
                                    widths=widths, ahead=True)  # on accelerators: programs compiled ahead
    run = run_settings(model, task, settings, "exact_patching", n_edges=graph.n_edges)
    scores, done = np.zeros(graph.n_edges), np.zeros(graph.n_edges, bool)
    if resume is not None:  # the saved widths, so that the rest runs in the batches it would have
        _, saved, _ = load_state(Path(resume), run, "exact patching state")
        scores, done, widths = saved["scores"], saved["done"], [int(w) for w in saved["widths"]]
    write = state_path(checkpoint, resume)

    def save():
        if write is not None:
            save_state(write, run, int(done.sum()), {"scores": scores, "done": done, "widths": np.array(widths)}, [])

    ones = np.ones(graph.n_edges, np.float32)
    full = check_finite(scorer.full(ones), "The metric of the full model")
    layers = receiver_layers(graph)
    lock = lock_state(write, "exact patching state")
    bar = progress_bar(progress, graph.n_edges, int(done.sum()), desc="exact patching")
    narrowed = []  # passes that ran out of device memory (then narrower ones: `decide.narrow`)
    saved_at, stopped = time.perf_counter(), False
    try:
        for layer in sorted(set(layers.tolist())):
            edges = np.nonzero((layers == layer) & ~done)[0]
            i = 0
            while i < len(edges) and not stopped:
                width = widths[layer]
                chunk = edges[i:i + width]
                try:
                    result = score_pass(scorer, Candidates(ones, chunk[:, None]), int(layer), width)
                except PassOutOfMemory as oom:
                    narrowed.append(narrow(widths, scorer, oom))
                    continue
                if not np.isfinite(result).all():
                    first = int(np.flatnonzero(~np.isfinite(result))[0])
                    check_finite(result[first], f"The metric after cutting {graph.edge_names[chunk[first]]}")
                scores[chunk] = result - full
                done[chunk] = True
                i += len(chunk)
                bar.update(len(chunk))
                stopped = stop_after is not None and time.perf_counter() - start > stop_after
                if stopped or time.perf_counter() - saved_at > SAVE_EVERY:
                    save()
                    saved_at = time.perf_counter()
    finally:  # Ctrl-C too: a pass's scores and done flags are set before it counts as done
        bar.close()
        scorer.programs.cancel_ahead()
        save()
        lock.close()
    settings.update(method="exact_patching", full_metric=full, widths=widths, narrowed=narrowed,
                    compiled_ahead=len(scorer.ahead), finished=bool(done.all()), edges_done=int(done.sum()))
    return _done(graph, np.where(done, scores, np.nan), settings, start, scorer, complete=bool(done.all()),
                 n_edges=n_edges, threshold=threshold, rank=rank, ties=ties)


AT_MINIMUM = (kl_divergence, squared_error)  # distances to the full model: zero there, and flat


def warn_at_minimum(method: str, task, scorer: Scorer, metric_name: str) -> None:
    """Warn where `method`, which takes the gradient at the full model, is
    given a metric minimised there: its scores would rank edges by rounding."""
    if scorer.metric not in AT_MINIMUM:
        return
    others = [name for name, fn in task.metrics.items() if fn not in AT_MINIMUM]
    use = f"a metric of the task's behaviour (metric={others[0]!r}; --metric {others[0]})" if others else \
        "a metric of the task's behaviour (a function f(logits, task))"
    warnings.warn(f"{method} takes the metric's gradient at the full model, where {metric_name!r} (a distance to the "
                  "full model) is at its minimum, so that gradient is zero up to float rounding and the scores rank "
                  f"edges by rounding noise. Use {use}, or eap_ig, whose path starts at the corrupted run.",
                  MetricAtMinimumWarning, stacklevel=4)  # the caller of the method (under takes_precision)


def _gradient(scorer: Scorer, masks: np.ndarray, where: str):
    """The metric and its gradient with respect to the masks, both finite."""
    value, grads = scorer.value_and_grads(masks)
    check_finite(value, f"The metric {where}")
    check_finite(grads, f"The metric's gradient with respect to the masks {where}")
    return value, grads


@takes_precision
def eap(model, task, *, metric=None, corruption=None, graph=None, n_edges=None, threshold=None,
        rank: str = "abs", ties: str = "refuse", mesh=None) -> Circuit:
    """Edge attribution patching (Syed et al. 2023): one gradient with respect
    to the masks at the full model (a clean and a corrupted forward pass and
    one backward pass). `mesh` (a Mesh, "auto" or "CxP"): the prompts are
    spread over its prompt axis (a gradient has no candidates to spread, so
    "auto" puts the devices on prompts; a CxP mesh holds C copies)."""
    check_keep(n_edges, threshold, rank, ties)
    start = time.perf_counter()
    graph, scorer, settings = setup(model, task, metric, corruption, graph, mesh=mesh, gradient=True)
    warn_at_minimum("EAP", task, scorer, settings["metric"])
    value, grads = _gradient(scorer, np.ones((1, graph.n_edges), np.float32), "at the full model")
    settings.update(method="eap", full_metric=float(value[0]))
    return _done(graph, -grads[0], settings, start, scorer, n_edges=n_edges, threshold=threshold, rank=rank,
                 ties=ties)


@takes_precision
def eap_ig(model, task, steps: int = 16, *, metric=None, corruption=None, graph=None, n_edges=None,
           threshold=None, rank: str = "abs", ties: str = "refuse", mesh=None, progress: bool = True, checkpoint=None,
           resume=None, stop_after: Optional[float] = None) -> Circuit:
    """EAP with integrated gradients (Hanna et al. 2024) along the path of
    masks alpha * 1 from the corrupted run (alpha = 0) to the clean run
    (alpha = 1), with `steps` midpoint samples, one gradient each (with a
    progress bar unless `progress` is False). The scores add up to the
    effect of cutting every edge, ``metric(empty) - metric(full)``, up to an
    O(1/steps^2) error. `mesh`: as for `eap`. `checkpoint`, `resume` and
    `stop_after`: as for `exact_patching` (the sum of gradients is saved; a
    stopped run has no scores yet)."""
    from ..acdc import progress_bar

    steps = check_whole(steps, "steps (interpolation steps, --steps)", 1)
    check_keep(n_edges, threshold, rank, ties)
    check_stop_after(stop_after)
    start = time.perf_counter()
    graph, scorer, settings = setup(model, task, metric, corruption, graph, mesh=mesh, gradient=True)
    run = run_settings(model, task, settings, "eap_ig", steps=steps)
    total, done = np.zeros(graph.n_edges), 0
    if resume is not None:
        last, saved, _ = load_state(Path(resume), run, "EAP-IG state")
        total, done = saved["total"], last + 1
    write = state_path(checkpoint, resume)
    ones = np.ones((1, graph.n_edges), np.float32)
    lock = lock_state(write, "EAP-IG state")
    bar = progress_bar(progress, steps, done, desc="EAP-IG", unit="step")
    # (the sum of gradients, the last step in it), stored as one object so that Ctrl-C never splits them
    summed = (total, done - 1)
    saved_at, saved_step = time.perf_counter(), done - 1

    def save():
        nonlocal saved_at, saved_step
        if write is not None and summed[1] > saved_step:
            save_state(write, run, summed[1], {"total": summed[0]}, [])
            saved_at, saved_step = time.perf_counter(), summed[1]

    try:
        for i in range(done, steps):
            alpha = (i + 0.5) / steps  # the same program every step
            summed = (summed[0] + _gradient(scorer, alpha * ones, f"at alpha={alpha:g}")[1][0], i)
            bar.update(1)
            stop = stop_after is not None and time.perf_counter() - start > stop_after
            if stop or time.perf_counter() - saved_at > SAVE_EVERY:
                save()
            if stop:
                break
    finally:  # the end, a stop, Ctrl-C or an error: the steps summed since the last save are kept
        bar.close()
        save()
        lock.close()
    total, last = summed
    complete = last + 1 == steps  # no scores until the integral is
    settings.update(method="eap_ig", steps=steps, finished=complete, steps_done=last + 1)
    return _done(graph, -total / steps if complete else np.full(graph.n_edges, np.nan), settings, start, scorer,
                 complete=complete, n_edges=n_edges, threshold=threshold, rank=rank, ties=ties)


def node_scores_to_edges(graph: CircuitGraph, node_score: dict) -> np.ndarray:
    """An edge scores the smaller of its two ends' node scores; the embedding,
    the logits and a head's own q/k/v steps do not limit it."""
    def score(node):
        if node.kind in ("head", "mlp", "mlp_in"):
            return node_score[node.component]
        if node.kind in ("q", "k", "v", "attn_in", "q_out", "k_out", "v_out"):
            return node_score[f"a{node.layer}.{node.head}"]
        return np.inf

    return np.array([min(score(e.sender), score(e.receiver)) for e in graph.edges])


def sender_groups(graph: CircuitGraph) -> dict:
    """Each head's and MLP's outgoing residual edges, by component name."""
    groups: dict = {}
    for e in graph.edges:
        if e.kind == "residual" and e.sender.kind in ("head", "mlp"):
            groups.setdefault(e.sender.component, []).append(e.index)
    return groups


@takes_precision
def hisp(model, task, *, metric=None, corruption=None, graph=None, n_edges=None, threshold=None,
         rank: str = "abs", ties: str = "refuse", mesh=None) -> Circuit:
    """Head importance scores (Michel et al. 2019, as the ACDC paper uses them):
    |d metric / d gate| for a gate on each head's (and MLP's) output,
    interpolating it towards the corruption. A gate scales all of a node's
    outgoing edges, so its gradient is the sum of their mask gradients. The
    metric is taken over the whole batch. Edges score as their weaker end.
    `mesh`: as for `eap`."""
    check_keep(n_edges, threshold, rank, ties)
    start = time.perf_counter()
    graph, scorer, settings = setup(model, task, metric, corruption, graph, mesh=mesh, gradient=True)
    warn_at_minimum("HISP", task, scorer, settings["metric"])
    _, grads = _gradient(scorer, np.ones((1, graph.n_edges), np.float32), "at the full model")
    nodes = {name: float(abs(grads[0, idx].sum())) for name, idx in sender_groups(graph).items()}
    settings.update(method="hisp", node_scores=nodes)
    return _done(graph, node_scores_to_edges(graph, nodes), settings, start, scorer, n_edges=n_edges,
                 threshold=threshold, rank=rank, ties=ties)

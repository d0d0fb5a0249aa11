"""Optimised masks: Edge Pruning (Bhaskar et al. 2024) over edges and
subnetwork probing (SP, as in the ACDC paper) over heads and MLPs.

Both learn hard-concrete gates (Louizos et al. 2018) with optax, minimising
``metric(sampled mask) + l1 * gap + l2 * gap**2`` with ``gap = expected
density - target``, where the Lagrange multipliers l1, l2 follow gradient
ascent (as in Edge Pruning), so training ends near the requested sparsity.
The learned log-alphas, shifted to start at 0, are the scores; the final circuit keeps exactly the k
highest (threshold found by binary search).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..dense import metric_of_mask
from ..errors import check_finite, check_number, check_stop_after, check_whole
from ..precision import takes_precision
from .attribution import _done, node_scores_to_edges, sender_groups, setup
from .saved import load_state, lock_state, run_settings, save_state, state_path

if TYPE_CHECKING:
    from ..circuit import Circuit

BETA, LEFT, RIGHT = 2.0 / 3.0, -0.1, 1.1
INIT = 5.0  # initial log-alpha: gates start open, so training starts from the full model


def hard_concrete(log_alpha, key):
    """A sample of the stretched, clipped hard-concrete gate."""
    u = jax.random.uniform(key, log_alpha.shape, minval=1e-6, maxval=1 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (RIGHT - LEFT) + LEFT, 0.0, 1.0)


def expected_density(log_alpha):
    """The expected fraction of gates that are nonzero."""
    return jax.nn.sigmoid(log_alpha - BETA * np.log(-LEFT / RIGHT)).mean()


def _check(sparsity: float, steps: int, lr: float, lambda_lr: float, seed: int, stop_after) -> None:
    """Refuse bad training settings before any compiling."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.number)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity (the fraction of gates removed, --sparsity) must be in [0, 1), got {sparsity!r}.")
    check_whole(steps, "steps (training steps, --steps)", 1)
    check_number(lr, "lr (the gates' learning rate)", 0, above=True)
    check_number(lambda_lr, "lambda_lr (the sparsity multiplier's learning rate)", 0)
    check_whole(seed, "seed", 0)
    check_stop_after(stop_after)


def _warn_if_none_kept(sparsity: float, n: int, what: str) -> None:
    """Warn, before training, where `sparsity` keeps none of the `n` gates (its rounding)."""
    if round((1.0 - sparsity) * n) == 0:
        most = 1 - 0.5 / n  # round(0.5) is 0 in Python: keeping one needs (1 - sparsity) * n above 0.5
        warnings.warn(f"sparsity={sparsity:g} keeps round({1 - sparsity:.3g} x {n}) = 0 of the {n} {what}, so the "
                      f"circuit will be empty whatever the training finds; a sparsity below {most:.4g} keeps at least "
                      "one.", stacklevel=4)


def _train(scorer, n_params: int, to_edges, sparsity: float, steps: int, lr: float, lambda_lr: float, seed: int,
           progress: bool = True, desc: str = "edge pruning", run: Optional[dict] = None, checkpoint=None,
           resume=None, stop_after: Optional[float] = None):
    """Learn log-alphas [n_params]; `to_edges` maps gates to edge masks. The
    state is saved to `checkpoint` (if given) at each history row and when
    the training ends, stops or is interrupted; `resume` continues from such a state, made with the
    same `run` settings, to the same log-alphas as a run never stopped.
    `stop_after` (seconds) stops after the step that passes it."""
    from ..acdc import progress_bar, warn_if_metric_falls

    target = 1.0 - sparsity
    s = scorer
    warn_if_metric_falls(s, (run or {}).get("metric", "metric"), desc[0].upper() + desc[1:],
                         "it trains the gates to break the task rather than to keep it", stacklevel=4)
    args = (s.model, s.graph, s.corruption, s.metric, s.task, s.arrays)
    opt = optax.adam(lr)
    key = jax.random.PRNGKey(seed)
    key, init = jax.random.split(key)
    # gates start mostly open; the small spread breaks ties between gates the metric never tells apart. The
    # gates train in float32 whatever the model's dtype: in bf16, log-alphas near 5 tie in hundreds
    log_alpha = INIT + 0.01 * jax.random.normal(init, (n_params,), jnp.float32)
    state = opt.init(log_alpha)
    chunk = s.grad_chunk

    @eqx.filter_jit
    def step(log_alpha, state, lam, key, args, tokens):
        def loss(la):
            gates = hard_concrete(la, key)
            value = metric_of_mask(*args, to_edges(gates), tokens, s.positions, chunk)
            gap = expected_density(la) - target
            return value + lam[0] * gap + lam[1] * gap ** 2, (value, gap)

        (_, (value, gap)), grad = jax.value_and_grad(loss, has_aux=True)(log_alpha)
        updates, state = opt.update(grad, state)
        lam = lam + lambda_lr * jnp.stack([gap, gap ** 2])  # ascent on the multipliers
        return optax.apply_updates(log_alpha, updates), state, lam, value, gap

    lam = jnp.zeros((2,), jnp.float32)
    history, done = [], 0
    leaves, treedef = jax.tree_util.tree_flatten((log_alpha, state, lam, key))
    if resume is not None:
        last, saved, history = load_state(Path(resume), run, "training state")
        leaves = [jnp.asarray(saved[str(j)], leaf.dtype) for j, leaf in enumerate(leaves)]
        log_alpha, state, lam, key = jax.tree_util.tree_unflatten(treedef, leaves)
        done = last + 1
    write = state_path(checkpoint, resume)
    # (the training state, its last step, the history) as one object, so that Ctrl-C never splits them
    trained = ((log_alpha, state, lam, key), done - 1, history)
    saved_step = done - 1

    def save():
        nonlocal saved_step
        carry, i, rows = trained
        # a NaN state (Ctrl-C between the checks) would only fail again on resume
        if write is not None and i > saved_step and bool(jnp.isfinite(carry[0]).all()):
            flat = jax.tree_util.tree_leaves(carry)
            save_state(write, run, i, {str(j): np.asarray(leaf) for j, leaf in enumerate(flat)}, rows)
            saved_step = i

    began = time.perf_counter()
    lock = lock_state(write, "training state")
    bar = progress_bar(progress, steps, done, desc=desc, unit="step")
    try:
        for i in range(done, steps):
            (log_alpha, state, lam, key), _, history = trained
            key, sub = jax.random.split(key)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with int32 step counts
                log_alpha, state, lam, value, gap = step(log_alpha, state, lam, sub, args, s.tokens)
            stop = stop_after is not None and time.perf_counter() - began > stop_after
            row = i % max(1, steps // 20) == 0 or i == steps - 1
            if row or stop:  # a NaN metric or gradient makes every gate NaN from its step on: refuse to save that
                check_finite(value, f"The metric at training step {i} (sampled gates)")
                check_finite(log_alpha, f"A gate's log-alpha after training step {i} (the metric's gradient?)")
            if row:
                history = history + [{"step": i, "metric": float(value), "density": float(gap) + target,
                                      "lambda": float(lam[0])}]
            trained = ((log_alpha, state, lam, key), i, history)
            bar.update(1)
            if row:
                bar.set_postfix(metric=f"{history[-1]['metric']:.4g}", density=f"{history[-1]['density']:.3f}")
                save()
            if stop:
                break
    finally:  # the end, a stop, Ctrl-C or an error: the steps trained since the last save are kept
        bar.close()
        save()
        lock.close()
    (log_alpha, _, _, _), i, history = trained
    s.passes += i + 1 - done
    log_alpha = np.asarray(log_alpha, np.float64)
    # scores must be >= 0 and rank like log-alpha: circuits and ROC rank by |score|
    return (log_alpha - log_alpha.min(), float(expected_density(jnp.asarray(log_alpha))), history,
            {"steps_done": i + 1, "finished": i + 1 == steps})


@takes_precision
def edge_pruning(model, task, *, sparsity: float = 0.95, steps: int = 1500, lr: float = 0.05,
                 lambda_lr: float = 0.01, seed: int = 0, metric=None, corruption=None, graph=None,
                 progress: bool = True, mesh=None, checkpoint=None, resume=None,
                 stop_after: Optional[float] = None) -> "Circuit":
    """Hard-concrete edge masks trained to `sparsity` (the fraction of edges
    removed); the circuit keeps exactly round((1 - sparsity) * n_edges) edges.
    A progress bar shows the steps unless `progress` is False. `mesh` (a Mesh,
    "auto" or "CxP"): each step's prompts are spread over its prompt axis, as in `eap`.
    `checkpoint`: a path (.npz) the training state is saved to as it goes;
    `resume`: continue from one, to the gates of a run never stopped;
    `stop_after`: stop after this many seconds of training
    (``settings["finished"]`` is False) and resume later."""
    _check(sparsity, steps, lr, lambda_lr, seed, stop_after)
    start = time.perf_counter()
    graph, scorer, settings = setup(model, task, metric, corruption, graph, mesh=mesh, gradient=True)
    _warn_if_none_kept(sparsity, graph.n_edges, "edges")
    run = run_settings(model, task, settings, "edge_pruning", n_params=graph.n_edges, sparsity=sparsity, steps=steps,
                       lr=lr, lambda_lr=lambda_lr, seed=seed)
    log_alpha, density, history, status = _train(scorer, graph.n_edges, lambda g: g, sparsity, steps, lr, lambda_lr,
                                                 seed, progress, run=run, checkpoint=checkpoint, resume=resume,
                                                 stop_after=stop_after)
    k = int(round((1.0 - sparsity) * graph.n_edges))
    settings.update(method="edge_pruning", sparsity=sparsity, steps=steps, lr=lr, expected_density=density,
                    history=history, **status)
    return _done(graph, log_alpha, settings, start, scorer, n_edges=k) if k else _done(
        graph, log_alpha, settings, start, scorer, threshold=np.inf)


@takes_precision
def subnetwork_probing(model, task, *, sparsity: float = 0.5, steps: int = 1500, lr: float = 0.05,
                       lambda_lr: float = 0.01, seed: int = 0, metric=None, corruption=None, graph=None,
                       progress: bool = True, mesh=None, checkpoint=None, resume=None,
                       stop_after: Optional[float] = None) -> "Circuit":
    """Hard-concrete gates on each head's and MLP's output (all its outgoing
    edges), trained to `sparsity` (the fraction of nodes removed). Edges score
    as their weaker end; the circuit keeps the edges between kept nodes.
    `mesh`, `checkpoint`, `resume` and `stop_after`: as for `edge_pruning`."""
    _check(sparsity, steps, lr, lambda_lr, seed, stop_after)
    start = time.perf_counter()
    graph, scorer, settings = setup(model, task, metric, corruption, graph, mesh=mesh, gradient=True)
    groups = sender_groups(graph)
    names = sorted(groups)
    _warn_if_none_kept(sparsity, len(names), "heads and MLPs")
    owner = np.full(graph.n_edges, len(names), np.int32)  # edges not out of a head/MLP: gate index n (always 1)
    for i, name in enumerate(names):
        owner[groups[name]] = i
    owner = jnp.asarray(owner)

    def to_edges(gates):
        return jnp.concatenate([gates, jnp.ones((1,), gates.dtype)])[owner]

    run = run_settings(model, task, settings, "subnetwork_probing", n_params=len(names), sparsity=sparsity,
                       steps=steps, lr=lr, lambda_lr=lambda_lr, seed=seed)
    log_alpha, density, history, status = _train(scorer, len(names), to_edges, sparsity, steps, lr, lambda_lr, seed,
                                                 progress, "subnetwork probing", run=run, checkpoint=checkpoint,
                                                 resume=resume, stop_after=stop_after)
    nodes = dict(zip(names, log_alpha.tolist()))
    k_nodes = int(round((1.0 - sparsity) * len(names)))
    kept = set(sorted(names, key=lambda n: -nodes[n])[:k_nodes])
    settings.update(method="subnetwork_probing", sparsity=sparsity, steps=steps, lr=lr, expected_density=density,
                    node_scores=nodes, kept_nodes=sorted(kept), history=history, **status)
    scores = node_scores_to_edges(graph, nodes)
    threshold = min((nodes[n] for n in kept), default=np.inf)
    return _done(graph, scores, settings, start, scorer, threshold=threshold)

"""ACDC against independent references: a plain re-implementation of the
original loop (tests/reference_acdc.py), the sequential mode, and tracr's
compiled ground truth."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import Corruption, MetricError, TaskError, patched_forward
from acdc_jax.acdc import acdc
from acdc_jax.candidates import Candidates
from acdc_jax.evaluate import faithfulness
from acdc_jax.tasks.base import Task, kl_divergence

from .helpers import force_accelerator_path, random_hf_gpt2
from .reference_acdc import reference_acdc


@pytest.fixture(scope="module")
def tracr_reverse():
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr import reverse_task

    return reverse_task()


def _decisions(circuit):
    return [(d.edge, d.tried, d.kept) for d in circuit.decisions]


def _reference(model, task, tau, corruption, **kw):
    graph = task.graph(model)
    bound = task.bind(model)
    tokens = jnp.asarray(task.clean)
    metric = task.metric()

    def metric_of(present):
        logits = patched_forward(model, tokens, graph.mask(present), corruption, graph)[:, task.positions]
        return float(metric(logits, bound))

    return reference_acdc(model.config, metric_of, tau, split_embed=graph.split_embed, **kw)


@pytest.mark.parametrize("tau", [0.0005, 0.002, 0.005])
def test_matches_reference_implementation_gpt2(small_gpt2, tau):
    model, task = small_gpt2
    ref = _reference(model, task, tau, task.make_corruption(model))
    for mode in ("sequential", "batched"):
        ours = acdc(model, task, tau, mode=mode, progress=False, max_width=8)
        assert _decisions(ours) == ref
    assert any(kept for _, _, kept in ref) and any(not kept for _, tried, kept in ref if tried)


def test_matches_reference_with_abs_value_and_descending_heads(small_gpt2):
    model, task = small_gpt2
    ref = _reference(model, task, 0.005, task.make_corruption(model), abs_value=True, indices_mode="normal")
    ours = acdc(model, task, 0.005, abs_value=True, head_order="descending", progress=False, max_width=4)
    assert _decisions(ours) == ref


def test_an_explicit_order_tries_every_edge_in_it(small_gpt2):
    """`order=` (another implementation's edge order) against a plain loop:
    cut each edge in turn from the current circuit, keep the cut if the
    metric rises by less than tau."""
    model, task = small_gpt2
    graph, corruption, tau = task.graph(model), task.make_corruption(model), 0.002
    bound, tokens = task.bind(model), jnp.asarray(task.clean)
    order = [graph.edge_names[i] for i in np.random.default_rng(1).permutation(graph.n_edges)]

    def metric_of(mask):
        logits = patched_forward(model, tokens, jnp.asarray(mask), corruption, graph)[:, task.positions]
        return float(task.metric()(logits, bound))

    mask = np.ones(graph.n_edges, np.float32)
    current, ref = metric_of(mask), []
    for name in order:
        mask[graph.edge_index(name)] = 0.0
        new = metric_of(mask)
        removed = new - current < tau
        if removed:
            current = new
        else:
            mask[graph.edge_index(name)] = 1.0
        ref.append((name, True, not removed))
    assert 0 < sum(kept for *_, kept in ref) < len(ref)
    for mode in ("sequential", "batched"):
        ours = acdc(model, task, tau, mode=mode, order=order, progress=False, max_width=8)
        assert _decisions(ours) == ref
    with pytest.raises(ValueError, match="must name every one of the graph's .* edges exactly once"):
        acdc(model, task, tau, order=order[:-1] + order[:1], progress=False)


def test_an_explicit_order_with_sparse_passes():
    from acdc_jax.tasks import get

    model, task = get("induction")
    graph = task.graph(model)
    order = [graph.edge_names[i] for i in np.random.default_rng(2).permutation(graph.n_edges)]
    seq = acdc(model, task, 0.003, mode="sequential", order=order, progress=False)
    ours = acdc(model, task, 0.003, order=order, progress=False, sparse="on")
    assert ours.settings["sparse_passes"] > 0
    assert _decisions(ours) == _decisions(seq)


@pytest.mark.parametrize("options", [dict(split_qkv=False), dict(qkv_edges=False), dict(split_embed=True)])
def test_other_graph_granularities_make_the_loops_decisions(small_gpt2, options):
    """ACDC on a coarser or finer graph than the task's own: batched (dense
    passes with MLPs, sparse passes without) decides as the sequential loop;
    the canonical circuit, named in the task's graph, cannot score it."""
    from acdc_jax import CircuitGraph
    from acdc_jax.evaluate import roc_from_circuits
    from acdc_jax.tasks import get

    induction = get("induction")
    for (model, task), sparse in ((small_gpt2, "auto"), (induction, "on")):
        graph = CircuitGraph(model.config, **options)
        seq = acdc(model, task, 0.003, mode="sequential", graph=graph, progress=False)
        ours = acdc(model, task, 0.003, graph=graph, progress=False, sparse=sparse)
        assert ours.graph == graph and _decisions(ours) == _decisions(seq)
    with pytest.raises(TaskError, match="canonical circuit names .* not in the circuits'"):
        roc_from_circuits([ours], induction[1].canonical)


@pytest.mark.parametrize("corruption", ["zeros", "prompts"])
def test_matches_reference_tracr(tracr_reverse, corruption):
    model, task = tracr_reverse
    ref = _reference(model, task, 1e-3, task.make_corruption(model, corruption))
    ours = acdc(model, task, 1e-3, corruption=corruption, progress=False)
    assert _decisions(ours) == ref


def test_tracr_zero_ablation_recovers_compiled_circuit(tracr_reverse):
    model, task = tracr_reverse
    circuit = acdc(model, task, 1e-3, corruption="zeros", progress=False)
    assert set(circuit.edges) == set(task.canonical)
    assert circuit.metric < 1e-3


def test_a_corruption_object_is_used_as_given(small_gpt2):
    """A Corruption made by the caller from the task's corrupted prompts makes
    the named corruption's decisions; another (the mean of the corrupted
    prompts' activations, which decides otherwise here) makes the plain
    reference loop's decisions under that corruption."""
    model, task = small_gpt2
    named = acdc(model, task, 0.004, progress=False, max_width=4)
    given = acdc(model, task, 0.004, progress=False, max_width=4,
                 corruption=Corruption.from_prompts(model, jnp.asarray(task.corrupted)))
    assert given.settings["corruption"] == named.settings["corruption"] == "prompts"
    assert _decisions(given) == _decisions(named)
    assert np.array_equal(given.mask, named.mask)
    other = Corruption.mean(model, jnp.asarray(task.corrupted))
    mean = acdc(model, task, 0.004, progress=False, max_width=4, corruption=other)
    assert mean.settings["corruption"] == "mean" and _decisions(mean) != _decisions(named)
    assert _decisions(mean) == _reference(model, task, 0.004, other)


def test_prompt_chunks_make_the_same_decisions(small_gpt2):
    model, task = small_gpt2
    seq = acdc(model, task, 0.004, progress=False, mode="sequential")
    for chunk in (2, 3):
        bat = acdc(model, task, 0.004, progress=False, max_width=4, prompt_chunk=chunk)
        assert bat.settings["prompt_chunk"] == chunk
        assert _decisions(bat) == _decisions(seq)
        np.testing.assert_allclose([d.metric_after for d in bat.decisions if d.tried],
                                   [d.metric_after for d in seq.decisions if d.tried], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="must divide"):
        acdc(model, task, 0.004, progress=False, prompt_chunk=4)


def test_cache_sized_prompt_chunks_make_the_same_decisions(small_gpt2, monkeypatch):
    """On one CPU device dense passes and the loop's full passes run their
    prompts in chunks that fit in the cache budget; a budget of one prompt's
    q/k/v inputs gives chunks of 1, and the decisions stay those of the loop
    without chunks."""
    model, task = small_gpt2
    seq = acdc(model, task, 0.004, progress=False, mode="sequential")
    assert seq.settings["dense_prompt_chunk"] is None  # this small model's prompts all fit
    c = model.config
    monkeypatch.setenv("ACDC_JAX_CPU_CHUNK_BYTES", str(3 * c.n_heads * task.clean.shape[1] * c.d_model * 4))
    for mode in ("sequential", "batched"):
        run = acdc(model, task, 0.004, progress=False, mode=mode, max_width=4)
        assert run.settings["dense_prompt_chunk"] == 1 and run.settings["prompt_chunk"] is None
        assert _decisions(run) == _decisions(seq)
        np.testing.assert_allclose([d.metric_after for d in run.decisions if d.tried],
                                   [d.metric_after for d in seq.decisions if d.tried], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["prompts", "mean", "zeros"])
def test_full_pass_in_prompt_chunks(small_gpt2, kind):
    """A full pass run in chunks of prompts (the unembedding once over all)
    gives the unchunked metric, with per-prompt, shared and no corrupted activations."""
    from acdc_jax.algorithms.attribution import setup
    from acdc_jax.dense import full_metric

    model, task = small_gpt2
    corruption = {"prompts": lambda: None, "mean": lambda: Corruption.mean(model, jnp.asarray(task.corrupted)),
                  "zeros": Corruption.zeros}[kind]()
    _, s, _ = setup(model, task, corruption=corruption)
    rng = np.random.default_rng(0)
    for mask in (s.graph.ones(), (rng.random(s.graph.n_edges) < 0.7).astype(np.float32)):
        args = (s.model, s.graph, s.corruption, s.metric, s.task, s.arrays, s._rep(mask), s.tokens, s.positions)
        whole = float(full_metric(*args))
        for chunk in (1, 2):
            np.testing.assert_allclose(float(full_metric(*args, chunk)), whole, rtol=1e-5, atol=1e-7)


def test_cache_prompt_chunk_is_the_largest_divisor_that_fits(monkeypatch):
    from types import SimpleNamespace

    from acdc_jax.memory import cache_prompt_chunk

    G = SimpleNamespace(n_heads=4)
    one = 3 * 4 * 10 * 32 * 4  # q/k/v inputs of one prompt: 3 x heads x positions x d_model x bytes

    for n, budget in [(12, 12 * one), (12, 5 * one), (12, 4 * one), (7, 6 * one), (12, one // 2), (40, 3 * one)]:
        got = cache_prompt_chunk(G, n, 10, 32, 4, budget)
        fits = [d for d in range(1, n + 1) if n % d == 0 and d * one <= budget]
        assert got == (None if n * one <= budget else max(fits or [1]))
        assert got is None or (n % got == 0 and (got == 1 or got * one <= budget))
    monkeypatch.setenv("ACDC_JAX_CPU_CHUNK_BYTES", str(5 * one))
    assert cache_prompt_chunk(G, 12, 10, 32, 4) == 4
    for bad in ("2.5MB", "0", "-1"):
        monkeypatch.setenv("ACDC_JAX_CPU_CHUNK_BYTES", bad)
        with pytest.raises(ValueError, match="ACDC_JAX_CPU_CHUNK_BYTES must be a positive whole number"):
            cache_prompt_chunk(G, 12, 10, 32, 4)


def test_plan_batch_chunks_prompts_when_memory_is_short(small_gpt2):
    from acdc_jax.memory import pass_bytes, plan_batch

    model, task = small_gpt2
    graph = task.graph(model)
    fixed, per = pass_bytes(model, graph, 6, 7, 2)
    assert plan_batch(model, graph, 6, 7, 2, 32, available=10 * (fixed + 100 * per)) == ([32] * 3, None)
    budget = 4 * per + fixed  # 70% of it: about 2.8 candidates from layer 0
    widths, chunk = plan_batch(model, graph, 6, 7, 2, 32, available=budget)
    assert chunk == 3  # halved once: 6 is even, 3 is not
    c_fixed, c_per = pass_bytes(model, graph, 6, 7, 2, 0, prompt_chunk=3)
    w = widths[0]  # the largest power of two whose pass fits in 70% of the memory
    assert w & (w - 1) == 0 and c_fixed + w * c_per <= 0.7 * budget < c_fixed + 2 * w * c_per
    assert widths == sorted(widths)  # passes from later layers hold more candidates
    assert plan_batch(model, graph, 6, 7, 2, 32, available=budget, prompt_shards=2)[1] is None


def test_widths_per_start_layer_bound_every_pass(small_gpt2, monkeypatch):
    """With a narrower pass allowed from earlier layers, no pass holds more
    candidates than its start layer allows (nor runs in a wider program
    compiled before), and the decisions stay the loop's."""
    import sys

    from acdc_jax.scoring import Scorer

    acdc_module = sys.modules["acdc_jax.acdc"]  # the package's `acdc` attribute is the function

    model, task = small_gpt2
    for tau in (0.0005, 0.005):  # wide programs from every layer, compiled and there to rent
        acdc(model, task, tau, progress=False, max_width=8)
    widths = [1, 2, 8]
    monkeypatch.setattr(acdc_module, "plan_task", lambda *a, **k: (list(widths), None))
    seen = []
    batch = Scorer.batch

    def spy(self, cands, start_layer, width, shape=None):
        seen.append((start_layer, len(cands), width))
        return batch(self, cands, start_layer, width, shape)

    monkeypatch.setattr(Scorer, "batch", spy)
    for tau in (0.0005, 0.005):
        seq = acdc(model, task, tau, mode="sequential", progress=False)
        bat = acdc(model, task, tau, progress=False)
        assert _decisions(bat) == _decisions(seq)
        assert bat.settings["widths"] == widths and bat.settings["width"] == 8
    assert seen and all(n <= widths[start] and w <= widths[start] for start, n, w in seen)
    assert {start for start, _, _ in seen} >= {0, 2} and max(n for start, n, _ in seen if start == 2) > 2


def test_accelerator_path_makes_the_same_decisions(small_gpt2, monkeypatch):
    """On one accelerator a pass vmaps over its candidates (no CPU loop),
    only the base and the cut edges cross to the device, where the dense
    masks are made, and the first program from each layer covers every pass
    from it; forced here on the CPU, that path decides as the loop."""
    import collections

    from acdc_jax import programs
    from acdc_jax.scoring import Scorer

    model, task = small_gpt2
    seq = acdc(model, task, 0.002, mode="sequential", progress=False)
    force_accelerator_path(monkeypatch)
    densified, ran = [], []
    on_device = Candidates.on_device
    monkeypatch.setattr(Candidates, "on_device", lambda self, *a: densified.append(len(self)) or on_device(self, *a))
    run = Scorer._run
    monkeypatch.setattr(Scorer, "_run", lambda self, shape, *a: ran.append(shape) or run(self, shape, *a))
    monkeypatch.setattr(programs, "_shared", collections.OrderedDict())  # no shape compiled by earlier tests
    bat = acdc(model, task, 0.002, progress=False, max_width=8)
    assert densified and max(densified) > 1
    first = {}
    for shape in ran:
        if shape.kind == "pass" and shape.start_layer < model.config.n_layers:
            first.setdefault(shape.start_layer, shape)
    assert first and all(s.heads is None and s.rows is None for s in first.values())  # each layer's cover
    assert _decisions(bat) == _decisions(seq)
    np.testing.assert_allclose([d.metric_after for d in bat.decisions if d.tried],
                               [d.metric_after for d in seq.decisions if d.tried], rtol=1e-5, atol=1e-7)


def test_one_cover_serves_several_layers_on_an_accelerator(tmp_path, monkeypatch):
    """Where passes from several start layers are equally wide, the first
    program any of them needs is a cover from the earliest of those layers,
    which the passes from the later layers rent (recomputing the layers
    between): fewer programs than a cover per layer, and the loop's decisions."""
    import collections
    import importlib

    from acdc_jax import programs
    from acdc_jax.scoring import Scorer

    _, model = random_hf_gpt2(tmp_path, n_layer=4, n_embd=16, n_head=2, vocab=31, seed=7)
    rng = np.random.default_rng(3)
    task = Task("random-kl", rng.integers(0, 31, (6, 7)), rng.integers(0, 31, (6, 7)), positions=np.array([6]),
                metrics={"kl": kl_divergence})
    seq = acdc(model, task, 3e-4, mode="sequential", progress=False)
    monkeypatch.setattr(importlib.import_module("acdc_jax.decide"), "adaptive_width", lambda: False)
    force_accelerator_path(monkeypatch)
    run = Scorer._run

    def batched(cover_start=None):
        ran = []
        with monkeypatch.context() as m:
            m.setattr(programs, "_shared", collections.OrderedDict())  # nothing compiled yet
            # compiling as dear as on a GPU next to these passes, so that renting is always the choice (on a CPU
            # the measured costs are close enough that a busy machine's timings would tip some layers into buying)
            m.setattr(programs.Programs, "estimate_compile", lambda self, kind, shape=None: 1e6)
            m.setattr(Scorer, "_run", lambda self, shape, *a: ran.append(shape) or run(self, shape, *a))
            if cover_start:
                m.setattr(Scorer, "cover_start", cover_start)
            circuit = acdc(model, task, 3e-4, progress=False, max_width=8)
        return circuit, [s for s in ran if s.kind == "pass" and s.start_layer < model.config.n_layers]

    shared, passes = batched()
    per_layer, own = batched(cover_start=lambda self, need: need.start_layer)
    assert shared.settings["widths"][:4] == [8] * 4
    assert {s.start_layer for s in passes} == {0}  # one cover from layer 0 for every layer's passes
    assert len({s.start_layer for s in own}) >= 3
    assert shared.settings["programs"] < per_layer.settings["programs"]
    assert _decisions(shared) == _decisions(per_layer) == _decisions(seq)
    np.testing.assert_allclose([d.metric_after for d in shared.decisions if d.tried],
                               [d.metric_after for d in seq.decisions if d.tried], rtol=1e-4, atol=1e-7)  # rounding


def test_precision_applies_to_every_program_of_the_run(small_gpt2):
    """The matmul precision holds while each pass is traced (the metric is
    traced inside every pass program), is recorded, and is not left behind."""
    import jax

    model, task = small_gpt2
    seen = []

    def kl_noting_precision(logits, t):
        seen.append(jax.config.jax_default_matmul_precision)
        return kl_divergence(logits, t)

    def kl_noting_again(logits, t):  # another function: traced afresh, not taken from the jit cache
        return kl_noting_precision(logits, t)

    circuit = acdc(model, task, 0.002, metric=kl_noting_precision, precision="tensorfloat32", progress=False,
                   max_width=4)
    assert circuit.settings["precision"] == "tensorfloat32"
    assert len(seen) >= 2 and set(seen) == {"tensorfloat32"}  # the full pass and the batched ones
    # in TF32 near ties are not rescored by default: no program checked against full passes, no trial rescored
    assert circuit.settings["rescore_ties"] is False
    assert circuit.settings["checked_programs"] == circuit.settings["rescored"] == 0
    seen.clear()
    faithfulness(model, task, circuit, metric=kl_noting_again)  # at the circuit's precision
    assert seen and set(seen) == {"tensorfloat32"}
    seen.clear()
    circuit = acdc(model, task, 0.002, metric=kl_noting_precision, mode="sequential", progress=False)
    assert circuit.settings["precision"] == "float32" and seen and set(seen) == {"float32"}  # the default
    assert circuit.settings["rescore_ties"] is True
    assert jax.config.jax_default_matmul_precision is None
    seen.clear()
    circuit = acdc(model, task, 0.002, metric=kl_noting_precision, dtype="bfloat16", mode="sequential",
                   progress=False)
    assert circuit.settings["precision"] is None and seen and set(seen) == {None}
    with pytest.raises(ValueError, match="precision must be one of"):
        acdc(model, task, 0.002, precision="highest", progress=False)


@pytest.mark.parametrize("tau", [-0.1, math.nan, math.inf, "0.1"])
def test_bad_tau(small_gpt2, tau):
    model, task = small_gpt2
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        acdc(model, task, tau, progress=False)


@pytest.mark.parametrize("method", ["acdc", "acdc_nodes"])
def test_nan_metric_is_an_error(small_gpt2, method):
    from acdc_jax.algorithms import acdc_nodes

    model, task = small_gpt2
    run = {"acdc": acdc, "acdc_nodes": acdc_nodes}[method]

    def nan_after_cut(logits, t):
        return jnp.where(jnp.abs(logits - t.reference).max() > 1e-4, jnp.nan, 0.0)

    with pytest.raises(MetricError, match="metric is nan after removing"):
        run(model, task, 0.1, metric=nan_after_cut, progress=False)
    with pytest.raises(MetricError, match="full model is nan"):
        run(model, task, 0.1, metric=lambda logits, t: jnp.nan * logits.sum(), progress=False)


def test_task_input_errors(small_gpt2):
    model, task = small_gpt2
    with pytest.raises(TaskError, match="clean prompts have shape .* corrupted prompts have shape"):
        Task("t", task.clean, task.clean[:, :-1], positions=[1], metrics={"kl": kl_divergence})
    import dataclasses

    bad = dataclasses.replace(task, canonical=frozenset({"blocks.9.attn.hook_result[0]->blocks.9.hook_resid_post"}))
    with pytest.raises(TaskError, match="canonical circuit names 1 edge"):
        acdc(model, bad, 0.1, progress=False)
    with pytest.raises(TaskError, match="corrupted tokens must have shape"):
        Corruption.from_prompts(model, jnp.zeros((3,), jnp.int32))  # not [batch, pos]

"""The full pass and the cover programs compiled ahead in background threads
(accelerators' default, taken here on the CPU): a pass that needs one runs it
without compiling on its own thread, and batched ACDC makes the sequential
loop's decisions, in full float32 and in TF32 (whose matmul setting the
threads must trace under), as exact patching scores each edge alone."""

import threading

import jax
import numpy as np
import pytest

from acdc_jax import compile_ahead
from acdc_jax.acdc import acdc
from acdc_jax.candidates import Candidates
from acdc_jax.model import TransformerConfig
from acdc_jax.corruption import Corruption
from acdc_jax.programs import Shape
from acdc_jax.precision import matmul_precision
from acdc_jax.scoring import Scorer
from acdc_jax.tasks.base import kl_divergence

from .helpers import force_accelerator_path, peaked_random_model_and_task

CONFIG = TransformerConfig(n_layers=3, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=31, n_ctx=8)


@pytest.fixture(scope="module")
def small():
    return peaked_random_model_and_task(CONFIG, seed=5, prompt_seed=1, n_prompts=4)


@pytest.fixture
def backend_compiles():
    """The name of the thread of each XLA compile from now on (but JAX's
    lifting of a numpy array, `jnp.asarray`: a trivial program per shape)."""
    seen = []

    def listen(event, duration, fun_name=None, **_):
        if event.endswith("backend_compile_duration") and fun_name != "jit(stage)":
            seen.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("precision", [None, "tensorfloat32"])
def test_a_cover_compiled_ahead_runs_without_compiling_again(small, monkeypatch, backend_compiles, precision):
    model, task = small
    force_accelerator_path(monkeypatch, covers_ahead=True)
    graph = task.graph_for(model)
    with matmul_precision(precision):
        widths = [3, 3, 5, 7]  # pass(0, 3) covers layers 0 and 1 until layer 1's own; pass(2, 5) covers layer 2
        scorer = Scorer(model, graph, task.bind(model), Corruption.from_prompts(model, task.corrupted), kl_divergence,
                        static_task=task, widths=widths, ahead=True)
        covers = compile_ahead.covers(scorer)
        assert [(s.start_layer, s.width) for s in covers] == [(3, 7), (2, 5), (0, 3), (1, 3)]  # 3: the logits
        # started before the deviations compiled, the covers from an array shaped as theirs
        assert scorer.ahead == [Shape("full", 0, 1, None, None), *covers]
        for shape in scorer.ahead:
            scorer.programs.collect(wait_for=shape)
        assert set(scorer.ahead) <= scorer.programs.compiled and not scorer.programs.ahead
        assert "acdc-jax-compile" in " ".join(backend_compiles)  # compiled, and by the workers
        before, runs = backend_compiles.count("MainThread"), []
        scorer.full(graph.ones())  # as acdc starts: a full pass measures the seconds per FLOP
        receivers = {3: "blocks.2.hook_resid_post", 2: "blocks.2.hook_q_input[0]", 1: "blocks.1.hook_q_input[0]"}
        for layer, width, cover in ((3, 7, covers[0]), (2, 5, covers[1]), (1, 3, covers[3])):  # 1: its own cover
            edges = [i for i, name in enumerate(graph.edge_names) if name.endswith("->" + receivers[layer])]
            cands = Candidates(graph.ones(), [[e] for e in edges[:width]])
            assert scorer.choose(cands, layer, width) == cover
            runs.append((cands, scorer.batch(cands, layer, width)))
        assert backend_compiles.count("MainThread") == before  # the passes ran the programs compiled ahead
    for cands, metrics in runs:
        with matmul_precision(precision):  # the reference: each candidate's own full pass
            reference = np.array([scorer.full(m) for m in cands.masks()])
        np.testing.assert_allclose(metrics, reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("precision", ["float32", "tensorfloat32"])
def test_acdc_with_covers_compiled_ahead_makes_the_loops_decisions(small, monkeypatch, precision):
    model, task = small
    tau = 3e-4
    seq = acdc(model, task, tau, mode="sequential", progress=False, precision=precision)
    tried = [d for d in seq.decisions if d.tried]
    assert any(not d.kept for d in tried) and any(d.kept for d in tried)
    force_accelerator_path(monkeypatch, covers_ahead=True)
    bat = acdc(model, task, tau, progress=False, max_width=6, precision=precision, rescore_ties=True)
    assert bat.settings["compiled_ahead"] >= 1
    assert [(d.edge, d.tried, d.kept) for d in bat.decisions] == [(d.edge, d.tried, d.kept) for d in seq.decisions]


def test_a_program_that_fails_to_compile_ahead_is_left_to_its_pass():
    from acdc_jax.programs import Programs

    programs, shape = Programs(), Shape("pass", 0, 4, None, None)

    def out_of_memory():
        raise MemoryError("RESOURCE_EXHAUSTED: emulated")

    assert programs.compile_ahead(shape, out_of_memory)
    ran = programs.run(shape, 0.0, lambda: "ran")  # waits for it, then runs (and so compiles) it itself
    assert ran == "ran" and shape in programs.compiled and programs.compiled_ahead == 0 and not programs.ahead


def test_exact_patching_with_covers_compiled_ahead_scores_each_edge_alone(small, monkeypatch):
    from acdc_jax import patched_forward
    from acdc_jax.algorithms import exact_patching

    model, task = small
    graph, bound, corruption = task.graph(model), task.bind(model), task.make_corruption(model)

    def metric_of(mask):  # the plain patched forward, one mask at a time
        logits = patched_forward(model, jax.numpy.asarray(task.clean), jax.numpy.asarray(mask), corruption, graph)
        return float(kl_divergence(logits[:, task.positions], bound))

    ones = np.ones(graph.n_edges, np.float32)
    reference = np.array([metric_of(np.where(np.arange(graph.n_edges) == e, 0.0, ones)) for e in range(graph.n_edges)])
    reference -= metric_of(ones)
    force_accelerator_path(monkeypatch, covers_ahead=True)
    circuit = exact_patching(model, task, progress=False, max_width=8)
    assert circuit.settings["compiled_ahead"] >= 1
    assert np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(circuit.scores, reference, rtol=1e-4, atol=1e-6)


def test_a_program_bought_while_renting_compiles_in_the_background(small, monkeypatch, backend_compiles):
    """The rental buys a pass's exact shape (with the layer's head cache):
    the passes rent the cover until it is compiled, off their thread, and
    then run in it, compiling nothing themselves; the metrics are each
    candidate's own full pass."""
    model, task = small
    force_accelerator_path(monkeypatch, covers_ahead=True)
    graph = task.graph_for(model)
    scorer = Scorer(model, graph, task.bind(model), Corruption.from_prompts(model, task.corrupted), kl_divergence,
                    static_task=task, widths=[4, 4, 4, 4])
    scorer.full(graph.ones())
    edges = [i for i, name in enumerate(graph.edge_names) if name.endswith("->blocks.1.hook_q_input[0]")]
    cands = Candidates(graph.ones(), [[e] for e in edges[:2]])
    need = scorer.need(cands, 1, 4)
    assert need.heads == 1  # a head cache of layer 1, one head recomputed per candidate
    cover = scorer.choose(cands, 1, 4)
    assert cover == Shape("pass", 0, 4, None, None)
    first = scorer.batch(cands, 1, 4, cover)  # compiles the cover (nothing to rent yet)
    # compiling looks free: buy now
    monkeypatch.setattr(scorer.programs, "estimate_compile", lambda kind, shape=None: 0.0)
    before = backend_compiles.count("MainThread")
    rented = scorer.choose(cands, 1, 4)
    assert rented == cover and need.cover() in scorer.programs.ahead  # bought layer 1's own cover, rented meanwhile
    scorer.programs.collect(wait_for=need.cover())
    assert scorer.choose(cands, 1, 4) == need.cover()  # ... and once it is compiled, rents that cover
    scorer.programs.regret.clear()
    assert scorer.choose(cands, 1, 4) == need.cover() and need in scorer.programs.ahead  # then buys the exact shape
    assert Shape("heads", 1, 1, graph.n_heads, None) in scorer.programs.ahead  # and its head cache
    for shape in list(scorer.programs.ahead):
        scorer.programs.collect(wait_for=shape)
    assert scorer.choose(cands, 1, 4) == need
    exact = scorer.batch(cands, 1, 4, need)
    assert backend_compiles.count("MainThread") == before and scorer.bought_ahead == 3
    reference = np.array([scorer.full(m) for m in cands.masks()])
    np.testing.assert_allclose(first[:2], reference, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(exact, reference, rtol=1e-4, atol=1e-7)


def test_acdc_buying_in_the_background_makes_the_loops_decisions(small, monkeypatch):
    model, task = small
    tau = 3e-4
    seq = acdc(model, task, tau, mode="sequential", progress=False)
    force_accelerator_path(monkeypatch, covers_ahead=True)
    from acdc_jax.programs import Programs

    monkeypatch.setattr(Programs, "estimate_compile", lambda self, kind, shape=None: 0.0)  # every rental buys at once
    bat = acdc(model, task, tau, progress=False, max_width=6, rescore_ties=True)
    assert bat.settings["bought_ahead"] >= 1
    assert [(d.edge, d.tried, d.kept) for d in bat.decisions] == [(d.edge, d.tried, d.kept) for d in seq.decisions]


def test_the_workers_enter_the_callers_jax_settings(backend_compiles):
    """A program compiled ahead under the caller's thread-local settings
    (here a default device and the rank-promotion rule, both part of a
    program's key) is the one the caller's own call then runs."""
    f = jax.jit(lambda x: (x * 2.0).sum())
    x = np.arange(6.0, dtype=np.float32)
    with jax.default_device(jax.devices("cpu")[0]), jax.numpy_rank_promotion("raise"):
        job = compile_ahead.in_this_context(lambda: f.lower(x).compile())
        worker = threading.Thread(target=job, name="acdc-jax-compile-test")
        worker.start()
        worker.join()
        before = backend_compiles.count("MainThread")
        assert float(f(x)) == 30.0
    assert backend_compiles.count("MainThread") == before and "acdc-jax-compile-test" in backend_compiles


# d_mlp None: attention only, whose deviations come with the heads' z; "zeros": no corrupted run to compile beside
@pytest.mark.parametrize("d_mlp,corruption", [(24, None), (None, None), (24, "zeros")])
def test_the_setup_compiles_beside_the_corrupted_run(monkeypatch, d_mlp, corruption):
    """On accelerators the reference logits' and the deviations' programs
    compile in the workers while the run compiles its corrupted run (or,
    under zero ablation, while it waits), and the run reuses them (model
    shapes no other test compiles for)."""
    config = TransformerConfig(n_layers=2, n_heads=3, d_model=12, d_head=4, d_mlp=d_mlp, d_vocab=37, n_ctx=8)
    n_prompts = 4 if corruption else 3  # shapes no other case has compiled
    model, task = peaked_random_model_and_task(config, seed=6, prompt_seed=2, n_prompts=n_prompts)
    where = {}

    def listen(event, duration, fun_name=None, **_):
        if event.endswith("backend_compile_duration") and fun_name in ("jit(_forward)", "jit(deviations)"):
            where.setdefault(fun_name, []).append(threading.current_thread().name)

    force_accelerator_path(monkeypatch, covers_ahead=True)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        bat = acdc(model, task, 1e-4, progress=False, max_width=4, corruption=corruption)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert set(where) == {"jit(_forward)", "jit(deviations)"}
    assert all(len(names) == 1 and names[0].startswith("acdc-jax-compile") for names in where.values()), where
    monkeypatch.setenv("ACDC_JAX_COVERS_AHEAD", "0")
    seq = acdc(model, task, 1e-4, mode="sequential", progress=False, corruption=corruption)
    assert any(not d.kept for d in seq.decisions if d.tried)
    assert [(d.edge, d.tried, d.kept) for d in bat.decisions] == [(d.edge, d.tried, d.kept) for d in seq.decisions]

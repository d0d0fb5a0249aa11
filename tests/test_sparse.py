"""Sparse passes (`acdc_jax/sparse.py`) score candidates like full patched
forward passes, follow the base circuit exactly, and recompute at least every
head whose output a cut changes."""

import jax
import numpy as np
import pytest

from acdc_jax import acdc
from acdc_jax.candidates import Candidates
from acdc_jax.graph import CircuitGraph
from acdc_jax.corruption import Corruption
from acdc_jax.patching import patched_logits_and_deviations
from acdc_jax.scoring import Scorer
from acdc_jax.sparse import reach
from acdc_jax.tasks.base import Task, kl_divergence
from converters.transformer_lens import from_transformer_lens

from .test_converters import _tl_state_dict

CASES = [("LN", "standard", "prompts", False, [6]), ("LNPre", "shortformer", "zeros", True, [5, 6]),
         (None, "standard", "mean", False, [3, 6]), ("RMS", "rotary", "prompts", False, [4, 6])]


def _rotary_rms_model(seed):
    """An attention-only model with RMSNorm and rotary positions (as Llama's
    attention), every weight random."""
    from acdc_jax.checkpoint import fill_model, parameter_shapes
    from acdc_jax.model import TransformerConfig

    c = TransformerConfig(n_layers=3, d_model=16, n_heads=4, d_head=4, d_vocab=23, n_ctx=8, normalization="RMS",
                          positional="rotary", rotary_base=20.0)
    rng = np.random.default_rng(seed)
    arrays = {n: (n.endswith(".w") + 0.3 * rng.standard_normal(s)).astype(np.float32)
              for n, s in parameter_shapes(c).items()}
    return fill_model(c, arrays)


def _setup(norm, pos_type, corruption, qkv_edges, positions, seed=0, d_mlp=None):
    cfg = dict(n_layers=3, d_model=16, n_heads=4, d_head=4, d_vocab=23, n_ctx=8, attn_only=d_mlp is None,
               d_mlp=d_mlp, normalization_type=norm, act_fn="gelu_new", positional_embedding_type=pos_type)
    if norm == "RMS":
        model = _rotary_rms_model(seed)
    else:
        model = from_transformer_lens(_tl_state_dict(cfg, np.random.default_rng(seed)), cfg)
    rng = np.random.default_rng(seed + 1)
    clean, corrupted = rng.integers(0, 23, (5, 7)), rng.integers(0, 23, (5, 7))
    task = Task("t", clean, corrupted, positions=np.array(positions), metrics={"kl": kl_divergence}).bind(model)
    graph = CircuitGraph(model.config, split_qkv=True, qkv_edges=qkv_edges)
    corr = {"prompts": Corruption.from_prompts(model, corrupted), "zeros": Corruption.zeros(),
            "mean": Corruption.mean(model, corrupted)}[corruption]
    return model, graph, corr, task, Scorer(model, graph, task, corr, kl_divergence, sparse=True)


def _receiver_layers(graph):
    return np.array([e.receiver.layer if e.receiver.kind != "logits" else graph.n_layers for e in graph.edges])


def _random_candidates(graph, rng, start, base=None):
    layers = _receiver_layers(graph)
    if base is None:
        base = (rng.uniform(size=graph.n_edges) > 0.3).astype(np.float32)
        base[layers < start] = 1.0
    kept = np.flatnonzero((base == 1) & (layers >= start) & (layers < graph.n_layers))
    cuts = [rng.choice(kept, size=int(rng.integers(1, 4)), replace=False) for _ in range(5)]
    return Candidates(base, cuts)


@pytest.mark.parametrize("case", CASES)
def test_sparse_passes_score_like_full_passes(case):
    """Random circuits (each next one neither a subset nor a superset of the
    last, so the base state moves both ways) with a few edges cut, from every
    start layer: the sparse program's metric equals a full patched forward's."""
    model, graph, corr, task, scorer = _setup(*case)
    rng = np.random.default_rng(7)
    for trial in range(6):
        start = trial % graph.n_layers
        cands = _random_candidates(graph, rng, start)
        shape = scorer.sparse.need(cands, start, 8)
        assert shape is not None and shape.kind == "sparse"
        got = scorer.batch(cands, start, 8, shape=shape)
        full = np.array([scorer.full(m) for m in cands.masks()])
        np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-6)
    assert scorer.sparse.rebases == 6


def test_the_base_state_follows_the_circuit():
    """After a chain of rebases (edges removed one layer at a time, as ACDC
    does, then one added back), the state holds every sender's deviation
    under the last circuit, as the full patched forward computes them."""
    model, graph, corr, task, scorer = _setup("LN", "standard", "prompts", False, [5, 6])
    rng = np.random.default_rng(3)
    mask = np.ones(graph.n_edges, np.float32)
    layers = _receiver_layers(graph)
    for layer in (3, 2, 1, 0):
        at = np.flatnonzero(layers == layer)
        mask[rng.choice(at, size=len(at) // 3, replace=False)] = 0.0
        scorer.sparse._move_to(mask)
    mask[np.flatnonzero(mask == 0)[0]] = 1.0
    scorer.sparse._move_to(mask)
    _, devs = patched_logits_and_deviations(model, graph, scorer.tokens, mask, corr)
    state, n_mid, out = scorer.sparse.state, graph.n_senders_before_attn(graph.n_layers - 1), np.array([5, 6])
    np.testing.assert_allclose(state.mid, devs[:, :n_mid], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.last, devs[:, n_mid:][:, :, out], rtol=1e-5, atol=1e-6)


def test_a_pass_at_the_same_head_leaves_the_state_where_it_was():
    """After removals into one head's inputs, a pass that cuts more of that
    head's inputs scores from the state as it is, without moving it (the
    head is recomputed for each candidate anyway), and its metrics equal
    full passes'; a pass at another head moves the state first."""
    model, graph, corr, task, scorer = _setup("LN", "standard", "prompts", False, [6])
    into = lambda layer, head: [e.index for e in graph.edges if e.kind == "residual" and e.receiver.layer == layer
                                and e.receiver.head == head and e.receiver.kind in ("q", "k", "v")]
    base = np.ones(graph.n_edges, np.float32)
    first, other = into(1, 2), into(1, 3)
    for step, cuts, moved in ((0, first[:4], True), (1, first[4:8], False), (2, other[:4], True)):
        base[first[:4 * step] if step < 2 else first[:8]] = 0.0
        cands = Candidates(base.copy(), [[e] for e in cuts])
        shape = scorer.sparse.need(cands, 1, 4)
        rebases = scorer.sparse.rebases
        got = scorer.batch(cands, 1, 4, shape=shape)
        assert (scorer.sparse.rebases > rebases) == moved and scorer.sparse.unmoved == int(step >= 1)
        full = np.array([scorer.full(m) for m in cands.masks()])
        np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-6)


def test_updates_keep_the_unembedded_numerator_exact():
    """Edges removed one at a time (as ACDC does) move the state by low-rank
    updates, with a dense one every `REFRESH` moves: after each move, the
    logits made from the state equal the full patched forward's."""
    from acdc_jax.corruption import example_inputs
    from acdc_jax.sparse import _final_residual, _logits

    model, graph, corr, task, scorer = _setup("LN", "standard", "prompts", False, [5, 6])
    mask = np.ones(graph.n_edges, np.float32)
    layers, out = _receiver_layers(graph), np.array([5, 6])
    dense = []
    for edge in np.flatnonzero((layers == 2) | (layers == 1))[::-1][:12]:
        mask[edge] = 0.0
        dense.append(scorer.sparse._rebase_plan(mask)[2])
        scorer.sparse._move_to(mask)
        state = scorer.sparse.state
        m_add = graph.dense_masks(scorer._rep(mask))[0]
        full = patched_logits_and_deviations(model, graph, scorer.tokens, mask, corr)[0][:, out]
        for i, tok in enumerate(scorer.tokens):
            corr_i = example_inputs(corr, model, tok, jax.tree_util.tree_map(lambda a: a[i], corr.acts))[0]
            x = _final_residual(model, graph, corr_i, state.mid[i], state.last[i], m_add, out)
            np.testing.assert_allclose(_logits(model, x, state.pre[i]), full[i], rtol=1e-4, atol=1e-5)
    assert dense.count(False) >= 6 and True in dense[1:]


def test_reach_holds_every_head_a_cut_changes():
    """The heads whose deviation differs between the base and a candidate (by
    full patched forwards) all lie in `reach`; heads outside it are unchanged."""
    model, graph, corr, task, scorer = _setup("LN", "standard", "prompts", False, [6])
    rng = np.random.default_rng(11)
    E, H = graph.n_embed, graph.n_heads
    for start in (0, 1, 2):
        cands = _random_candidates(graph, rng, start)
        heads, to_logits = reach(graph, cands.base, np.unique(cands.places(graph)[1]), start)
        reached = {(start + i) * H + h for i, hs in enumerate(heads) for h in hs}
        _, base_devs = patched_logits_and_deviations(model, graph, scorer.tokens, cands.base, corr)
        for m in cands.masks():
            _, devs = patched_logits_and_deviations(model, graph, scorer.tokens, m, corr)
            moved = np.abs(np.asarray(devs - base_devs)).max(axis=(0, 2, 3))[E:] > 1e-6
            assert set(np.flatnonzero(moved).tolist()) <= reached
        assert set(to_logits) <= reached


def test_models_with_mlps_use_dense_passes():
    *_, scorer = _setup("LN", "standard", "prompts", False, [6], d_mlp=32)
    cands = _random_candidates(scorer.graph, np.random.default_rng(0), 1)
    assert scorer.sparse.need(cands, 1, 4) is None
    assert scorer.choose(cands, 1, 4).kind == "pass"


def test_auto_mode_weighs_the_compiling_of_sparse_programs():
    """sparse="auto" decides at a run's first sparse pass: sparse if that
    pass's saving, once for each pass likely to come, plus what earlier runs'
    passes would have saved, covers the programs going sparse would
    compile; else the run stays dense. Once the process has a sparse program
    every sparse pass that costs fewer FLOPs runs sparse, as with "on"."""
    from acdc_jax.programs import Programs, Shape

    model, graph, corr, task, _ = _setup("LN", "standard", "prompts", False, [6])
    base = np.ones(graph.n_edges, np.float32)
    last_layer = np.flatnonzero(_receiver_layers(graph) == graph.n_layers - 1)
    cands = Candidates(base, [[e] for e in last_layer[:3]])
    programs = Programs()

    def run():  # a new run (Scorer) in the process, its state at the base: no move to pay for
        scorer = Scorer(model, graph, task, corr, kl_divergence, sparse="auto")
        scorer.sparse._move_to(base)
        scorer.programs = programs
        return scorer

    scorer = run()
    dense, sparse = scorer.need(cands, 2, 4), scorer.sparse.need(cands, 2, 4)
    assert scorer.sparse.cheaper(sparse, dense, base)
    saved_flops = scorer.flops_of_program(dense) - scorer.flops_of_program(sparse)
    assert scorer.choose(cands, 2, 4) == dense and scorer.sparse.entered is None  # no seconds per FLOP measured yet
    programs.compiled.add(dense)
    programs.compile_costs["pass"] = [0.975]
    cost = scorer.sparse.entry_cost(sparse, dense)
    # the sparse program, and per layer 0-2 a receiver cache and a move; less what the dense walk would compile
    # instead: a pass program for layers 0 and 1 (layer 2 has one) and a head cache for each of layers 0-2
    assert cost == pytest.approx((7 - 2 - 3) * 0.975)
    scorer.cover_first = True  # as on an accelerator: the dense pass's program is compiled, so nothing is saved
    assert scorer.sparse.entry_cost(sparse, dense) == pytest.approx(7 * 0.975)
    scorer.cover_first = False
    programs.seconds_per_flop = 1.0 / (32 * saved_flops)  # 1/32 s saved a pass
    left = scorer.sparse.passes_left(2)
    assert left == 3 * 3 * 4  # the q, k and v inputs of the 4 heads of layers 0-2
    assert left / 32 < cost  # this run stays dense, however long
    assert [scorer.choose(cands, 2, 4) for _ in range(80)] == [dense] * 80 and scorer.sparse.entered is False
    assert programs.forgone == pytest.approx(80 / 32)
    assert (80 + left) / 32 >= cost  # what it forwent carries the next run's first pass over the cost
    scorer = run()
    chosen = scorer.choose(cands, 2, 4)  # a cover of `sparse` (two heads), for its layer's later passes to rent
    assert chosen == scorer.sparse.cover(sparse) and chosen.covers(sparse) and chosen.reach == (2, 2)
    assert scorer.sparse.entered is True
    programs.forgone = 0.0
    programs.compiled.add(Shape("sparse", 0, 16, None, None, (4, 4, 4, 16)))  # a sparse program, compiled
    scorer = run()
    assert scorer.choose(Candidates(base, [[last_layer[5]]]), 2, 4).kind == "sparse"
    with pytest.raises(ValueError, match="sparse must be one of"):
        Scorer(model, graph, task, corr, kl_divergence, sparse="sometimes")


def test_auto_mode_counts_programs_on_disk_at_their_loading_cost(tmp_path, monkeypatch):
    """With the programs on disk, a layer's programs that an earlier process
    left there (its record) cost loading in the entry cost, not compiling:
    a later process goes the way the first went, and loads what it compiled
    instead of compiling the other family's programs."""
    from acdc_jax import program_record
    from acdc_jax.programs import Programs, Shape

    monkeypatch.setattr(program_record, "_directory", lambda: tmp_path)
    model, graph, corr, task, scorer = _setup("LN", "standard", "prompts", False, [6])
    base = np.ones(graph.n_edges, np.float32)
    last_layer = np.flatnonzero(_receiver_layers(graph) == graph.n_layers - 1)
    cands = Candidates(base, [[e] for e in last_layer[:3]])
    dense, sparse = scorer.need(cands, 2, 4), scorer.sparse.need(cands, 2, 4)
    family = {"sparse": [sparse], "rebase": [Shape("rebase", l, 1, None, None, (2, 0)) for l in range(3)],
              "receivers": [Shape("receivers", l, 1, None, None) for l in range(3)],
              "pass": [Shape("pass", l, 4, None, None) for l in range(3)],
              "heads": [Shape("heads", l, 1, 4, None) for l in range(3)]}

    def entry_cost(on_disk):  # a later process: compile seconds from the record, 0.1 s per program loaded
        (tmp_path / "acdc-jax-programs-kind.json").unlink(missing_ok=True)
        first = Programs(label="kind")
        for kind, shapes in family.items():
            for shape in shapes:
                first.record.note(shape, 0.975 if kind in ("pass", "heads") else 0.5, kind in on_disk)
        scorer.programs = later = Programs(label="kind")
        later.compiled.add(dense)
        later.load_costs = [0.1]
        return scorer.sparse.entry_cost(sparse, dense)

    # nothing on disk: the sparse program, per layer 0-2 a receiver cache and a move, at the sparse programs'
    # recorded 0.5 s; less a pass program for layers 0 and 1 and a head cache for layers 0-2 at 0.975 s
    assert entry_cost(()) == pytest.approx(7 * 0.5 - 5 * 0.975)
    # the first went sparse: its programs load, and the dense ones it never needed would be compiled
    assert entry_cost(("sparse", "rebase", "receivers")) == pytest.approx(7 * 0.1 - 5 * 0.975)
    # the first stayed dense: the sparse programs would be compiled, the dense ones load
    assert entry_cost(("pass", "heads")) == pytest.approx(7 * 0.5 - 5 * 0.1)


def test_a_compiled_sparse_program_is_rented_before_a_dense_one_is_compiled(monkeypatch):
    """Where a pass costs more sparse than dense (a move to pay, one
    candidate) but only a sparse program that runs it is compiled, the extra
    seconds are rented until they add up to a dense program's compile time;
    then the dense program is compiled, and used from then on."""
    from acdc_jax.programs import Programs

    model, graph, corr, task, scorer = _setup("LN", "standard", "prompts", False, [6])
    base = np.ones(graph.n_edges, np.float32)
    last_layer = np.flatnonzero(_receiver_layers(graph) == graph.n_layers - 1)
    cands = Candidates(base, [[last_layer[0]]])
    scorer.programs = programs = Programs()
    dense, sparse = scorer.need(cands, 2, 1), scorer.sparse.need(cands, 2, 1)
    programs.compiled.add(scorer.sparse.cover(sparse))
    programs.compile_costs["pass"], programs.seconds_per_flop = [1.0], 1e-9
    monkeypatch.setattr(type(scorer.sparse), "saving", lambda self, *args: -0.3e9)  # 0.3 s more a pass
    chosen = [scorer.choose(cands, 2, 1, max_width=4) for _ in range(4)]
    assert [c.kind for c in chosen] == ["sparse"] * 3 + ["pass"] and chosen[-1] == dense
    programs.compiled.add(dense)
    assert scorer.choose(cands, 2, 1, max_width=4) == dense


@pytest.mark.parametrize("kind", [("LN", "shortformer"), ("RMS", "rotary")])
def test_acdc_with_sparse_passes_decides_like_the_sequential_loop(monkeypatch, kind):
    """On a 3-layer attention-only model at three thresholds, a batched run
    that scores every pass it can in a sparse program (their estimated cost
    set to zero) decides every edge as the sequential loop does."""
    from acdc_jax import sparse_passes

    monkeypatch.setattr(sparse_passes.SparsePasses, "cheaper", lambda self, *args: True)
    model, graph, corr, task, _ = _setup(*kind, "prompts", False, [6], seed=4)
    task = Task("t", task.clean, task.corrupted, positions=task.positions, metrics={"kl": kl_divergence},
                graph_options=dict(split_qkv=True, qkv_edges=False))
    for tau in (3e-4, 3e-3, 3e-2):
        loop = acdc(model, task, tau, mode="sequential", progress=False)
        fast = acdc(model, task, tau, progress=False, sparse=True)
        assert fast.settings["sparse_passes"] > 0
        assert [(d.edge, d.kept) for d in fast.decisions] == [(d.edge, d.kept) for d in loop.decisions]


@pytest.mark.parametrize("start", [0, 1, 2])
def test_sparse_flops_agree_with_xla(start):
    """`sparse_flops` (which the choice between sparse and dense passes
    weighs) against XLA's cost analysis of the same vmapped sparse pass."""
    import jax

    from acdc_jax.model import Transformer, TransformerConfig
    from acdc_jax.sparse import head_maps, padded, sparse_flops, sparse_metric

    c = TransformerConfig(n_layers=3, d_model=64, n_heads=4, d_head=16, d_vocab=500, n_ctx=16, d_mlp=None)
    model = Transformer(c, key=jax.random.PRNGKey(0))
    graph = CircuitGraph(c)
    rng = np.random.default_rng(0)
    clean, corrupted = rng.integers(0, 500, (3, 12)), rng.integers(0, 500, (3, 12))
    task = Task("t", clean, corrupted, positions=np.array([11]), metrics={"kl": kl_divergence}).bind(model)
    scorer = Scorer(model, graph, task, Corruption.from_prompts(model, corrupted), kl_divergence, sparse=True)
    cands = _random_candidates(graph, rng, start)
    shape = scorer.sparse.need(cands, start, 8)
    scorer.sparse._move_to(cands.base)
    layers, pick, glob, valid = padded(*scorer.sparse._reach(cands, start), shape.reach, graph)
    lowered = sparse_metric.lower(model, graph, start, scorer.corruption, kl_divergence, scorer.task, scorer.arrays,
                                  cands.masks(8), scorer.tokens, scorer.sparse.state, head_maps(model),
                                  scorer.sparse._cache(start), layers, pick, glob, valid, scorer.positions, False)
    ours = 8 * 3 * sparse_flops(graph, start, shape.reach, 12, 1, "sparse")
    xla = lowered.lowered.cost_analysis()["flops"]
    assert 0.8 * xla <= ours <= xla, (ours, xla)


def test_passes_far_from_the_full_model_run_again_with_a_running_maximum(monkeypatch):
    """With the unembedding scaled by 300, cut candidates' logits lie far
    enough from the full model's that KL streamed without a running maximum
    overflows: sparse and dense passes say so and run again with one
    (`fused_kl.exact`), and score every candidate as a full pass does."""
    import equinox as eqx

    from acdc_jax import fused_kl, scoring, sparse_passes

    model, graph, corr, task, _ = _setup("LN", "standard", "prompts", False, [5, 6])
    model = eqx.tree_at(lambda m: m.unembed.W_U, model, model.unembed.W_U * 300.0)
    task = Task("t", task.clean, task.corrupted, positions=task.positions, metrics={"kl": kl_divergence}).bind(model)
    scorer = Scorer(model, graph, task, corr, kl_divergence, sparse=True)
    plain = []

    def spy(program):
        plain.append(bool(program(False)[1]))
        return fused_kl.exact(program)

    monkeypatch.setattr(scoring, "exact", spy)
    monkeypatch.setattr(sparse_passes, "exact", spy)
    rng = np.random.default_rng(5)
    for start, sparse in ((1, True), (1, False), (0, False)):
        cands = _random_candidates(graph, rng, start)
        shape = scorer.sparse.need(cands, start, 8) if sparse else scorer.need(cands, start, 8)
        got = scorer.batch(cands, start, 8, shape=shape)
        full = np.array([scorer.full(m) for m in cands.masks()])
        assert full.max() > 10.0
        np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
    assert plain == [False, False, False]

"""Program choice for batched passes: which shapes cover which, the ski-rental
rule, and that a pass run in a larger program scores every candidate as its
own shape and a full pass do."""

import math

import numpy as np
import pytest

from acdc_jax.candidates import Candidates
from acdc_jax.graph import CircuitGraph
from acdc_jax.corruption import Corruption
from acdc_jax.programs import Programs, Shape
from acdc_jax.scoring import Scorer
from acdc_jax.tasks.base import Task, kl_divergence

from .test_converters import _tl_state_dict


def test_covers():
    need = Shape("pass", 2, 4, 2, 4)
    assert Shape("pass", 2, 16, 4, 16).covers(need)
    assert Shape("pass", 2, 4, None, None).covers(need)  # all heads, no shared sum: any pass from layer 2
    assert Shape("pass", 1, 16, None, None).covers(need)  # a cover from an earlier layer recomputes layer 1 too
    assert not Shape("pass", 3, 16, None, None).covers(need)  # from a later one it cannot
    assert not Shape("pass", 1, 16, 4, 16).covers(need)  # nor a program that recomputes some heads only
    assert not Shape("pass", 1, 1, None, None).covers(need)  # too narrow
    assert not Shape("pass", 2, 1, None, None).covers(need)  # too narrow
    assert not Shape("pass", 2, 4, 1, 4).covers(need)  # too few heads
    assert not Shape("pass", 2, 4, 2, 4).covers(Shape("pass", 2, 4, None, 4))  # needs every head
    assert not Shape("pass", 2, 4, 2, 4).covers(Shape("pass", 2, 4, 2, None))  # needs every upstream row
    assert not Shape("heads", 2, 4, 2, 4).covers(need)


def _programs(compile_s: float, seconds_per_flop: float) -> Programs:
    p = Programs()
    p.compiled = {Shape("pass", 1, 16, None, None)}
    p.compile_costs = {"pass": [compile_s]}
    p.seconds_per_flop = seconds_per_flop
    return p


@pytest.mark.parametrize("compile_s, extra_s", [(1.0, 0.3), (1.0, 0.25), (2.0, 0.7), (0.5, 2.0)])
def test_ski_rental(compile_s, extra_s):
    """Rent the larger program while the extra seconds paid stay below the
    compile cost; then compile the exact shape and keep using it."""
    flops = lambda s: s.width * (2.0 if s.heads is None else 1.0)
    need = Shape("pass", 1, 4, 2, None)
    extra_flops = flops(Shape("pass", 1, 16, None, None)) - flops(need)
    p = _programs(compile_s, extra_s / extra_flops)
    picks = [p.choose(need, flops) for _ in range(10)]
    rentals = math.ceil(compile_s / extra_s - 1e-9) - 1
    assert picks[:rentals] == [Shape("pass", 1, 16, None, None)] * rentals
    assert picks[rentals] == need and p.reused == rentals
    p.compiled.add(need)
    assert p.choose(need, flops) == need
    assert p.choose(Shape("pass", 0, 4, None, None), flops) == Shape("pass", 0, 4, None, None)  # nothing covers it


def test_rent_pays_until_the_compile_cost_then_buys():
    programs = Programs()
    assert [programs.rent("k", 0.3, 1.0) for _ in range(4)] == [True, True, True, False]
    assert programs.rent("other", 0.3, 1.0)  # regret is kept per choice


def test_one_check_serves_a_family_of_programs():
    """Programs that differ only in width (two or more) or, when sparse, in
    head counts share one check of their rounding; one candidate wide, other
    start layers, other kinds or other dense head counts do not."""
    sparse = Shape("sparse", 2, 16, None, None, (2, 0, 2))
    assert sparse.family() == Shape("sparse", 2, 4, None, None, (4, 0, 8)).family()
    assert sparse.family() != Shape("sparse", 2, 1, None, None, (2, 0, 2)).family()
    assert sparse.family() != Shape("sparse", 1, 16, None, None, (2, 0, 0, 2)).family()
    dense = Shape("pass", 2, 16, 2, 4)
    assert dense.family() == Shape("pass", 2, 4, 2, 4).family() != Shape("pass", 2, 4, 4, 4).family()
    assert dense.family() != Shape("heads", 2, 16, 2, 4).family()


def test_no_program_wider_than_memory_allows_is_rented():
    p = _programs(10.0, 1e-9)  # renting is far cheaper than compiling
    need, wide = Shape("pass", 1, 4, 2, None), Shape("pass", 1, 16, None, None)
    flops = lambda s: float(s.width)
    assert p.choose(need, flops) == wide
    assert p.choose(need, flops, max_width=8) == need  # 16 candidates would not fit


def test_cover_is_compiled_first_then_rented():
    """With a cover, the first pass from a layer compiles the cover instead of
    its own shape; later passes from that layer rent it (ski rental as
    before), and passes from another layer get their own cover."""
    flops = lambda s: s.width * (4.0 if s.heads is None else s.heads) * (2.0 if s.rows is None else 1.0)
    p = Programs()
    p.compile_costs = {"pass": [1.0]}
    p.seconds_per_flop = 0.01  # renting the cover costs 0.01 s per extra FLOP
    cover = lambda need: Shape("pass", need.start_layer, need.width, None, None)
    first, second = Shape("pass", 2, 4, 1, 1), Shape("pass", 2, 4, 2, 4)
    assert p.choose(first, flops, cover(first)) == cover(first)
    p.compiled.add(cover(first))
    picks = [p.choose(second, flops, cover(second)) for _ in range(30)]
    rentals = math.ceil(1.0 / ((flops(cover(second)) - flops(second)) * 0.01) - 1e-9) - 1
    assert picks[:rentals] == [cover(second)] * rentals and picks[rentals] == second
    other = Shape("pass", 1, 4, 1, 1)
    assert p.choose(other, flops, cover(other)) == cover(other)
    assert p.choose(other, flops) == other  # no cover offered: the exact shape


def test_free_compilation_always_takes_the_exact_shape():
    p = _programs(0.0, 1e-9)
    need = Shape("pass", 1, 4, 1, 1)
    assert p.choose(need, lambda s: float(s.width)) == need


@pytest.fixture(scope="module")
def scorer():
    from converters.transformer_lens import from_transformer_lens

    cfg = dict(n_layers=3, d_model=16, n_heads=4, d_head=4, d_vocab=23, n_ctx=8, attn_only=False, d_mlp=32,
               normalization_type="LN", act_fn="gelu_new", positional_embedding_type="standard")
    model = from_transformer_lens(_tl_state_dict(cfg, np.random.default_rng(2)), cfg)
    rng = np.random.default_rng(3)
    clean, corrupted = rng.integers(0, 23, (6, 7)), rng.integers(0, 23, (6, 7))
    task = Task("t", clean, corrupted, positions=np.array([5, 6]), metrics={"kl": kl_divergence}).bind(model)
    return Scorer(model, CircuitGraph(model.config), task, Corruption.from_prompts(model, corrupted), kl_divergence)


def test_larger_programs_score_like_the_exact_one(scorer):
    """Candidates that cut edges into two heads of layer 1 and from one cached
    sender into layer 2, scored in their own program and in every larger
    one: wider, with more or all heads, more or all upstream rows."""
    graph = scorer.graph
    rng = np.random.default_rng(4)
    base = (rng.uniform(size=graph.n_edges) > 0.2).astype(np.float32)
    base[[e.index for e in graph.edges if e.receiver.layer < 1]] = 1.0
    kept = [e for e in graph.edges if base[e.index] == 1 and e.kind == "residual"]
    into = [next(e for e in kept if e.receiver.layer == 1 and e.receiver.head == h) for h in (0, 2)]
    later = [e for e in kept if e.receiver.layer == 2 and e.sender.name == "hook_embed"][:1]
    chain = later + into
    masks = np.repeat(base[None], len(chain), axis=0)
    for k, e in enumerate(chain):
        masks[k:, e.index] = 0.0
    cands = Candidates.from_masks(masks, base)
    need = scorer.need(cands, 1, 4)
    assert need == Shape("pass", 1, 4, 2, 1)
    exact = scorer.batch(cands, 1, 4, shape=need)
    np.testing.assert_allclose(exact, [scorer.full(m) for m in masks], rtol=1e-5, atol=1e-7)
    for larger in (Shape("pass", 1, 16, 2, 1), Shape("pass", 1, 4, 4, 4), Shape("pass", 1, 4, None, 1),
                   Shape("pass", 1, 4, 2, None), Shape("pass", 1, 16, None, None)):
        assert larger.covers(need)
        np.testing.assert_allclose(scorer.batch(cands, 1, 4, shape=larger), exact, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="cannot score"):
        scorer.batch(cands, 1, 4, shape=Shape("pass", 1, 4, 1, 1))
    with pytest.raises(ValueError, match="before layer 2"):
        scorer.batch(cands, 2, 4)


@pytest.mark.parametrize("chunk", [None, 3])
def test_candidate_loop_scores_like_vmap(scorer, chunk):
    """On a CPU a pass over full layers loops over its candidates (and groups
    them for the unembedding); it scores them as the vmapped pass does, with
    and without prompt chunks, from a cached base and from the embedding."""
    graph = scorer.graph
    rng = np.random.default_rng(6)
    base = (rng.uniform(size=graph.n_edges) > 0.2).astype(np.float32)
    base[[e.index for e in graph.edges if e.receiver.layer < 1]] = 1.0
    masks = np.repeat(base[None], 8, axis=0)
    into = [e.index for e in graph.edges if e.receiver.layer >= 1 and base[e.index] == 1]
    for k in range(8):
        masks[k, rng.choice(into, size=k + 1, replace=False)] = 0.0
    scorer.prompt_chunk = chunk
    try:
        cands = Candidates.from_masks(masks, base)
        for start, shape in ((1, scorer.need(cands, 1, 8)), (0, Shape("pass", 0, 8, None, None))):
            results = []
            for loop in (True, False):
                scorer.loop = loop
                results.append(scorer.batch(cands, start, 8, shape=shape))
            np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(results[0], [scorer.full(m) for m in masks], rtol=1e-5, atol=1e-7)
    finally:
        scorer.prompt_chunk, scorer.loop = None, True


_DISK_CACHE_RUN = """
import json, sys
import jax, numpy as np
import acdc_jax
from acdc_jax import program_record
where = acdc_jax.use_disk_cache(sys.argv[1])
hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(1) if event.endswith("/cache_hits") else None)
from acdc_jax.model import Transformer, TransformerConfig
from acdc_jax.tasks.base import Task, kl_divergence
config = TransformerConfig(n_layers=2, n_heads=2, d_model=16, d_head=8, d_vocab=40, n_ctx=8, d_mlp=None)
rng = np.random.default_rng(0)
task = Task("random-kl", rng.integers(0, 40, (4, 6)), rng.integers(0, 40, (4, 6)), positions=np.array([5]),
            metrics={"kl": kl_divergence})
model = Transformer(config, key=jax.random.PRNGKey(0))
circuit = acdc_jax.acdc(model, task, 1e-3, progress=False)
(p,) = acdc_jax.programs._shared.values()
nodes = acdc_jax.algorithms.acdc_nodes(model, task, 1e-3, progress=False)
print(json.dumps({"where": where, "hits": len(hits), "decisions": [[d.index, d.kept] for d in circuit.decisions],
                  "compiled": {k: len(v) for k, v in p.compile_costs.items()}, "loaded": len(p.load_costs),
                  "counts": [circuit.settings["programs_compiled"], circuit.settings["programs_loaded"]],
                  "nodes": [nodes.settings["programs_compiled"], nodes.settings["programs_loaded"]],
                  "shapes": sorted(program_record._row(s) for s in p.compiled), "label": p.record.name}))
"""


def test_a_later_process_loads_the_programs_from_disk(tmp_path):
    """With `use_disk_cache`, a second process finds the first one's compiled
    programs on disk and makes the same decisions with them."""
    import json
    import subprocess
    import sys

    def run():
        out = subprocess.run([sys.executable, "-c", _DISK_CACHE_RUN, str(tmp_path / "xla")], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["where"] == str(tmp_path / "xla") and any((tmp_path / "xla").iterdir())
    assert second["hits"] > first["hits"]  # (one process can hit its own entries: equal programs in two jits)
    assert second["decisions"] == first["decisions"]
    # the first compiled its programs and recorded them; the second, the same kind by name, loaded them all
    record = json.loads((tmp_path / "xla" / f"acdc-jax-programs-{first['label']}.json").read_text())
    assert second["label"] == first["label"] and sorted(record["on_disk"]) == first["shapes"] == second["shapes"]
    assert set(record["compile_seconds"]) == set(first["compiled"]) and first["loaded"] == 0
    assert second["compiled"] == {} and second["loaded"] == len(second["shapes"])
    # the circuit says so too, counting every executable of the run (the pass programs and the setup's)
    assert first["counts"][0] > len(first["shapes"])
    assert second["counts"] == [0, sum(first["counts"])]  # (the first loaded where two jits made one program)
    assert first["nodes"][0] > 0 and second["nodes"] == [0, sum(first["nodes"])]  # ACDC over nodes, after it


def test_a_later_process_buys_shapes_on_disk_and_rents_the_rest_at_the_recorded_compile_cost(tmp_path, monkeypatch):
    """The record beside the disk cache: a first process notes its real
    compile seconds and the shapes it wrote; a second (a fresh `Programs` of
    the same label), which has only loaded programs, buys a shape on disk as
    soon as renting costs more than loading it, and rents one that is not
    until it has paid the recorded compile seconds, not the loading ones."""
    from acdc_jax import program_record
    from acdc_jax.programs import Cost

    monkeypatch.setattr(program_record, "_directory", lambda: tmp_path)
    on_disk, elsewhere = Shape("pass", 2, 4, 1, None), Shape("pass", 2, 4, 2, None)
    first = Programs(label="kind")
    first._note(on_disk, Cost(0.8, misses=1))
    first._note(Shape("pass", 1, 16, None, None), Cost(1.2, misses=1))
    first._note(Shape("heads", 2, 4, 1, None), Cost(0.4, hits=1))  # loaded: not a compile cost
    record = (tmp_path / "acdc-jax-programs-kind.json").read_text()
    assert '"pass": [1.0, 2]' in record and "heads" in record.split('"on_disk"')[1]

    second = Programs(label="kind")
    assert second.estimate_compile("pass") == pytest.approx(1.0)
    assert second.estimate_compile("heads") == pytest.approx(1.0)  # no heads compiled: any kind's
    second._note(Shape("pass", 1, 16, None, None), Cost(0.1, hits=1))
    assert second.compile_costs == {} and second.load_costs == [0.1]
    assert second.estimate_compile("pass", on_disk) == pytest.approx(0.1)
    assert second.estimate_compile("pass", elsewhere) == pytest.approx(1.0)
    second.compiled, second.seconds_per_flop = {Shape("pass", 1, 16, None, None)}, 1.0
    flops = lambda s: {16: 1.0}.get(s.width, 0.96)  # renting costs 0.04 s a pass
    picks = {need: [second.choose(need, flops) for _ in range(30)] for need in (on_disk, elsewhere)}
    assert picks[on_disk][:2] == [Shape("pass", 1, 16, None, None)] * 2 and picks[on_disk][2] == on_disk
    assert picks[elsewhere][:24] == [Shape("pass", 1, 16, None, None)] * 24 and picks[elsewhere][24] == elsewhere


def test_a_record_label_names_the_settings_not_the_objects():
    """The record's name is the same for equal settings held in different
    objects (another process's), and differs where a setting does."""
    from acdc_jax.program_record import label

    def metric(x):
        return x

    other = eval("lambda x: x")  # a different object, at another address
    other.__name__, other.__qualname__ = metric.__name__, metric.__qualname__
    assert label("kl", (4, 6), metric) != label("kl", (4, 7), metric)
    assert label("kl", (4, 6), metric) != label("logit_diff", (4, 6), metric)
    assert repr(metric) != repr(other) and label("kl", (4, 6), metric) == label("kl", (4, 6), other)


def test_a_damaged_record_is_read_as_none(tmp_path, monkeypatch):
    """A record cut short (a crash mid-write elsewhere) or of the wrong shape is a lost hint, not an
    error: the estimate falls back to this process's own measurements, and the next note rewrites it whole."""
    from acdc_jax import program_record
    from acdc_jax.programs import Cost

    monkeypatch.setattr(program_record, "_directory", lambda: tmp_path)
    for damaged in ('{"compile_seconds": {"pass": [1.0', '{"compile_seconds": {"pass": "1.0"}}', '[1, 2]'):
        (tmp_path / "acdc-jax-programs-kind.json").write_text(damaged)
        assert Programs(label="kind").estimate_compile("pass", Shape("pass", 2, 4, 1, None)) == 0.0
    p = Programs(label="kind")
    p._note(Shape("pass", 2, 4, 1, None), Cost(0.3, misses=1))
    assert p.estimate_compile("pass") == pytest.approx(0.3)
    assert Programs(label="kind").record.on_disk(Shape("pass", 2, 4, 1, None))


def test_an_earlier_cover_is_rented_then_the_layers_own_cover_bought():
    """A pass from layer 2 rents a compiled cover from layer 0 (which
    recomputes layers 0 and 1 as well) until that has cost a compilation;
    then it buys layer 2's cover, not its exact shape, and rents that as
    before, its regret starting afresh."""
    flops = lambda s: s.width * (3 - s.start_layer) * (4.0 if s.heads is None else s.heads)
    p = Programs()
    p.compile_costs = {"pass": [1.0]}
    p.seconds_per_flop = 0.01
    early, need = Shape("pass", 0, 4, None, None), Shape("pass", 2, 4, 1, None)
    own = need.cover()
    p.compiled.add(early)
    picks = []
    for _ in range(30):
        picks.append(p.choose(need, flops, early))
        p.compiled.add(picks[-1])  # a chosen program is compiled when it runs
    rentals = math.ceil(1.0 / ((flops(early) - flops(need)) * 0.01) - 1e-9) - 1
    again = math.ceil(1.0 / ((flops(own) - flops(need)) * 0.01) - 1e-9) - 1
    assert rentals > 0 and picks[:rentals] == [early] * rentals and picks[rentals] == own
    assert picks[rentals + 1:rentals + 1 + again] == [own] * again and set(picks[rentals + 1 + again:]) == {need}


def test_binding_a_task_again_compiles_nothing():
    """A threshold sweep binds its task once per run: the reference logits'
    program is compiled once per model shape, not once per bind."""
    import dataclasses

    import jax

    from acdc_jax.model import TransformerConfig

    from .helpers import peaked_random_model_and_task

    config = TransformerConfig(n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=29, n_ctx=8)
    model, task = peaked_random_model_and_task(config, seed=3, prompt_seed=4, n_prompts=3)
    task.bind(model)
    compiled = []

    def listen(event, duration, fun_name=None, **_):
        if event.endswith("backend_compile_duration") and fun_name != "jit(stage)":  # jnp.asarray's lifting
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        other = dataclasses.replace(task, clean=np.roll(task.clean, 1, axis=0))  # same shapes, other prompts
        bound = other.bind(model)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled == []
    expected = np.stack([np.asarray(model(jax.numpy.asarray(t)))[task.positions] for t in other.clean])
    np.testing.assert_allclose(bound.reference, expected, rtol=1e-5, atol=1e-6)


def test_the_compile_threads_follow_the_setting(monkeypatch):
    from acdc_jax import programs

    monkeypatch.setattr(programs, "_workers", [])
    monkeypatch.setenv("ACDC_JAX_COMPILE_THREADS", "3")
    pool = programs._pool()
    try:
        assert pool._max_workers == 3 and programs._pool() is pool
    finally:
        pool.shutdown()
    monkeypatch.setattr(programs, "_workers", [])
    monkeypatch.setenv("ACDC_JAX_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="ACDC_JAX_COMPILE_THREADS"):
        programs._pool()

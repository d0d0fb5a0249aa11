"""A batched pass that runs out of device memory: ACDC narrows the passes from
that layer and earlier, plans again and makes the sequential loop's
decisions (as do ACDC over nodes, against its loop, and exact patching,
against the plain patched forward one edge at a time); a pass of one candidate that does not fit says how to fix it.
The device here is emulated: a pass wider than it allows first makes XLA
fail a real allocation (1 EiB, more than any address space holds), so the
error is XLA's own."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import patched_forward
from acdc_jax.acdc import acdc
from acdc_jax.algorithms import acdc_nodes, exact_patching
from acdc_jax.model import TransformerConfig
from acdc_jax.scoring import Scorer
from acdc_jax.tasks.base import kl_divergence

from .helpers import force_accelerator_path, peaked_random_model_and_task

CONFIG = TransformerConfig(n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=29, n_ctx=8)


@pytest.fixture(scope="module")
def small():
    return peaked_random_model_and_task(CONFIG, seed=3, prompt_seed=0, n_prompts=5)


def _decisions(circuit):
    return [(d.edge, d.tried, d.kept) for d in circuit.decisions]


def _device_holding(monkeypatch, fits):
    """Scorer.batch as on a device where a program from layer l holds at most `fits(l)` candidates."""
    batch, programs = Scorer.batch, []

    def limited(self, cands, start_layer, width, shape=None):
        shape = shape or self.choose(cands, start_layer, width)
        first = min(start_layer, shape.start_layer)  # a cover from an earlier layer computes from there
        programs.append((first, shape.width))
        if shape.width > fits(first):
            jnp.ones((1 << 58,), jnp.float32).block_until_ready()  # 1 EiB, past any address space: RESOURCE_EXHAUSTED
        return batch(self, cands, start_layer, width, shape=shape)

    monkeypatch.setattr(Scorer, "batch", limited)
    return programs


def test_passes_too_wide_for_the_device_are_narrowed(small, monkeypatch):
    model, task = small
    tau = 1e-4
    seq = acdc(model, task, tau, mode="sequential", progress=False)
    tried = [d for d in seq.decisions if d.tried]
    assert any(not d.kept for d in tried) and any(d.kept for d in tried)
    force_accelerator_path(monkeypatch)
    monkeypatch.setattr(importlib.import_module("acdc_jax.decide"), "adaptive_width", lambda: False)  # widest passes
    fits = {0: 2, 1: 8}
    programs = _device_holding(monkeypatch, lambda layer: fits.get(layer, 1 << 30))
    with pytest.warns(UserWarning, match="ran out of device memory"):
        bat = acdc(model, task, tau, progress=False, max_width=16)
    assert _decisions(bat) == _decisions(seq)
    assert {n["program_layer"] for n in bat.settings["narrowed"]} == {0, 1}  # the emulated device refused both
    assert all(n["width"] > fits[n["program_layer"]] for n in bat.settings["narrowed"])
    widths = bat.settings["widths"]
    assert widths == [fits[0], fits[1], 16]  # each layer narrowed as far as its own program needed, no further
    refused = sum(w > fits.get(first, 1 << 30) for first, w in programs)
    assert refused == len(bat.settings["narrowed"])  # each refusal narrowed once, and only refusals did
    assert bat.settings["passes"] - bat.settings["full_passes"] == len(programs) - refused  # refused: not counted


@pytest.mark.filterwarnings("ignore:A pass of")
def test_one_candidate_that_does_not_fit_says_how_to_fix_it(small, monkeypatch):
    model, task = small
    force_accelerator_path(monkeypatch)
    programs = _device_holding(monkeypatch, lambda layer: 0)
    with pytest.raises(MemoryError, match=r"one candidate from layer .*\(prompt_chunk=\).*bfloat16"):
        acdc(model, task, 1e-4, progress=False, max_width=4)
    assert programs[-1][1] == 1  # narrowed down to single candidates first


def test_other_runtime_errors_are_not_taken_for_memory(small, monkeypatch):
    model, task = small

    def broken(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else went wrong")

    monkeypatch.setattr(Scorer, "batch", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        acdc(model, task, 1e-4, progress=False)


@pytest.mark.filterwarnings("ignore:A pass of")
def test_exact_patching_and_acdc_over_nodes_narrow_too(small, monkeypatch):
    model, task = small
    graph, bound, corruption = task.graph(model), task.bind(model), task.make_corruption(model)

    def metric_of(mask):  # the plain patched forward, one mask at a time
        logits = patched_forward(model, jnp.asarray(task.clean), jnp.asarray(mask), corruption, graph)
        return float(kl_divergence(logits[:, task.positions], bound))

    ones = np.ones(graph.n_edges, np.float32)
    reference = np.array([metric_of(np.where(np.arange(graph.n_edges) == e, 0.0, ones)) for e in range(graph.n_edges)])
    reference -= metric_of(ones)
    nodes_seq = acdc_nodes(model, task, 3e-3, mode="sequential", progress=False)
    tried = [d for d in nodes_seq.decisions if d.tried]
    assert any(not d.kept for d in tried) and any(d.kept for d in tried)
    force_accelerator_path(monkeypatch)
    _device_holding(monkeypatch, lambda layer: {0: 2, 1: 4}.get(layer, 1 << 30))
    narrow = exact_patching(model, task, progress=False, max_width=16)
    assert {n["program_layer"] for n in narrow.settings["narrowed"]} == {0, 1}
    assert narrow.settings["widths"][:2] == [2, 4]
    assert np.abs(reference).max() > 1e-3
    # every edge scored once, alone; the passes and the plain forward round differently near 0
    np.testing.assert_allclose(narrow.scores, reference, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(importlib.import_module("acdc_jax.algorithms.nodes"), "_chain_width",
                        lambda p_remove, cap, cpu: cap)  # chains as long as allowed, as on an accelerator
    nodes_bat = acdc_nodes(model, task, 3e-3, progress=False, max_width=16)
    assert nodes_bat.settings["narrowed"]
    assert [(d.edge, d.kept) for d in nodes_bat.decisions] == [(d.edge, d.kept) for d in nodes_seq.decisions]


def test_over_several_processes_a_pass_is_not_narrowed_alone(monkeypatch):
    """Every process runs the same programs, so one cannot narrow its passes
    by itself: the error names the width to run with instead."""
    from acdc_jax.decide import score_pass
    from acdc_jax.programs import Shape

    class Refusing:  # a scorer whose device refuses every pass
        def choose(self, cands, start_layer, width):
            return Shape("pass", start_layer, width, None, None)

        def batch(self, *args, **kwargs):
            jnp.ones((1 << 58,), jnp.float32).block_until_ready()

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(MemoryError, match="over 2 processes.*max_width=8"):
        score_pass(Refusing(), None, 3, 16)

"""Batched ACDC makes exactly the decisions of the plain one-edge-at-a-time loop,
on every task, at three thresholds each."""

import numpy as np
import pytest

from acdc_jax.acdc import acdc

from .helpers import force_accelerator_path, random_hf_gpt2
from .test_converters import _tl_state_dict
from .test_tasks import _docstring_texts, _language_texts
from .tokenizers_for_tests import build_tokenizer

pytest.importorskip("tokenizers")


def _same(model, task, tau, **kw):
    seq = acdc(model, task, tau, mode="sequential", progress=False, **kw)
    bat = acdc(model, task, tau, mode="batched", progress=False, **kw)
    assert [(d.edge, d.tried, d.kept) for d in bat.decisions] == [(d.edge, d.tried, d.kept) for d in seq.decisions]
    assert np.array_equal(bat.mask, seq.mask)
    assert bat.settings["passes"] < seq.settings["passes"]
    return seq


@pytest.fixture(scope="module")
def tracr_tasks():
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr import proportion_task, reverse_task

    return {"tracr-reverse": reverse_task(), "tracr-proportion": proportion_task()}


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-proportion"])
@pytest.mark.parametrize("tau", [1e-4, 1e-2, 1e-1])
@pytest.mark.parametrize("corruption", ["prompts", "zeros"])
def test_tracr(tracr_tasks, name, tau, corruption):
    model, task = tracr_tasks[name]
    _same(model, task, tau, corruption=corruption)


@pytest.mark.parametrize("tau", [3e-3, 1e-2, 3e-2])
def test_induction(tau):
    from acdc_jax.tasks import get

    model, task = get("induction", n_examples=20)
    c = _same(model, task, tau)
    assert 0 < c.n_edges < c.graph.n_edges


def test_induction_in_wide_passes_as_on_an_accelerator(monkeypatch):
    """Every pass as wide as allowed (64 candidates of 50 prompts x 28
    positions, vmapped): the metric's reductions then exceed 2^15 rows, which
    XLA's CPU backend got wrong before `acdc_jax.xla_cpu` (candidates 23-63
    of a pass were scored as others, and decision 4 differed)."""
    import importlib

    from acdc_jax.tasks import get

    monkeypatch.setattr(importlib.import_module("acdc_jax.decide"), "adaptive_width", lambda: False)
    force_accelerator_path(monkeypatch)
    model, task = get("induction")
    seq = _same(model, task, 3e-3, max_width=64)
    assert seq.settings["n_prompts"] * len(task.positions) * 64 > 2 ** 15


@pytest.fixture(scope="module")
def gpt2_tasks(tmp_path_factory):
    from acdc_jax.tasks.greaterthan import greaterthan
    from acdc_jax.tasks.ioi import ioi

    tmp = tmp_path_factory.mktemp("eq")
    tok = build_tokenizer(_language_texts())
    _, model = random_hf_gpt2(tmp, n_layer=12, n_head=12, n_embd=24, vocab=tok.get_vocab_size(), n_positions=32, scale=0.5)
    return model, {"ioi": ioi(model, tok, n_examples=8), "greater-than": greaterthan(model, tok, n_examples=8)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ioi", "greater-than"])
@pytest.mark.parametrize("tau", [3e-3, 1e-2, 3e-2])
def test_gpt2_shaped(gpt2_tasks, name, tau):
    model, tasks = gpt2_tasks
    _same(model, tasks[name], tau)


@pytest.fixture(scope="module")
def docstring_task(tmp_path_factory):
    from acdc_jax.tasks.docstring import docstring
    from converters.transformer_lens import from_transformer_lens

    tok = build_tokenizer(_docstring_texts(), special="<|BOS|>")
    cfg = dict(n_layers=4, d_model=32, n_heads=8, d_head=4, d_vocab=tok.get_vocab_size(), n_ctx=64, attn_only=True,
               normalization_type="LN", act_fn="gelu_new", positional_embedding_type="shortformer")
    model = from_transformer_lens(_tl_state_dict(cfg, np.random.default_rng(1)), cfg)
    return model, docstring(model, tok, n_examples=6)


@pytest.mark.parametrize("tau", [pytest.param(1e-3, marks=pytest.mark.slow), 1e-2, 5e-2])  # 0.1 removed every edge: cutting them all moves KL by 0.08
def test_docstring(docstring_task, tau):
    model, task = docstring_task
    _same(model, task, tau)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(split_qkv=False), dict(qkv_edges=False), dict(split_embed=True)])
@pytest.mark.parametrize("corruption", ["prompts", "mean", "zeros"])
def test_induction_on_every_graph_and_corruption(options, corruption):
    """The options the other tests leave at their defaults, with sparse
    passes wherever they cost fewer FLOPs, and the task metric as well as KL."""
    from acdc_jax import CircuitGraph
    from acdc_jax.tasks import get

    model, task = get("induction", n_examples=20)
    graph = CircuitGraph(model.config, **options)
    for metric in ("kl", "nll"):
        _same(model, task, 0.005, graph=graph, corruption=corruption, metric=metric, sparse="on")

"""Attribution and optimisation methods against independent references:
exact single-edge patching done one mask at a time, linearity, integrated
gradients' completeness, the requested sparsity, and the tracr ground truth."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import MetricAtMinimumWarning, evaluate
from acdc_jax.algorithms import (METHODS, eap, eap_ig, edge_pruning, exact_patching, subnetwork_probing,
                                 top_k_mask, top_k_threshold)
from acdc_jax.model import cast
from acdc_jax.patching import patched_forward
from acdc_jax.tasks.base import Task, kl_divergence

from .test_converters import _tl_state_dict


def _mean_logit(logits, task):
    """Linear in the logits: the mean logit of token 3."""
    return logits[..., 3].mean()


def _model(cfg, seed=0, zero_qk=False):
    from converters.transformer_lens import from_transformer_lens

    sd = _tl_state_dict(cfg, np.random.default_rng(seed))
    if zero_qk:  # uniform causal attention: q/k inputs no longer matter
        for l in range(cfg["n_layers"]):
            for n in "QK":
                sd[f"blocks.{l}.attn.W_{n}"][:] = 0
                sd[f"blocks.{l}.attn.b_{n}"][:] = 0
    return from_transformer_lens(sd, cfg)


def _task(cfg, metric, n=6, pos=5, seed=0):
    rng = np.random.default_rng(seed)
    clean, corrupted = rng.integers(0, cfg["d_vocab"], (n, pos)), rng.integers(0, cfg["d_vocab"], (n, pos))
    return Task("random", clean, corrupted, positions=np.array([pos - 2, pos - 1]), metrics={"m": metric},
                default_metric="m")


CFG = dict(n_layers=2, d_model=16, n_heads=2, d_head=4, d_vocab=11, n_ctx=8, attn_only=True, normalization_type=None,
           act_fn="gelu_new", positional_embedding_type="standard")


@pytest.fixture(scope="module")
def multilinear():
    """No LayerNorm, uniform attention, a linear metric: the metric is linear
    in each single mask (it is a polynomial of degree one in every mask)."""
    cfg = dict(CFG, n_layers=1)
    return _model(cfg, zero_qk=True), _task(cfg, _mean_logit)


def _by_hand(model, task, index):
    """Cut one edge with the plain patched forward and apply the metric."""
    graph = task.graph(model)
    corr = task.make_corruption(model)
    bound = task.bind(model)

    def metric(mask):
        logits = np.asarray(patched_forward(model, task.clean, mask, corr, graph))[:, task.positions]
        return float(task.metrics["m"](logits, bound))

    ones = np.ones(graph.n_edges, np.float32)
    cut = ones.copy()
    cut[index] = 0
    return metric(cut) - metric(ones), metric


def test_exact_patching_matches_single_cuts_by_hand():
    cfg = dict(CFG, normalization_type="LN")
    model, task = _model(cfg, seed=2), _task(cfg, kl_divergence)
    task = Task(task.name, task.clean, task.corrupted, task.positions, {"m": kl_divergence}, default_metric="m")
    scores = exact_patching(model, task, max_width=4).scores
    for index in range(0, len(scores), 7):
        assert scores[index] == pytest.approx(_by_hand(model, task, index)[0], abs=2e-5)


def test_eap_equals_exact_effects_when_the_metric_is_linear_in_each_mask(multilinear):
    model, task = multilinear
    exact = exact_patching(model, task).scores
    attributed = eap(model, task).scores
    assert np.abs(exact).max() > 1e-2
    np.testing.assert_allclose(attributed, exact, atol=1e-4, rtol=1e-4)


def test_eap_scores_sum_to_the_total_effect_where_the_metric_is_linear(multilinear):
    model, task = multilinear
    graph = task.graph(model)
    scores = eap(model, task).scores
    into_logits = [e.index for e in graph.edges if e.receiver.kind == "logits"]
    _, metric = _by_hand(model, task, 0)
    ones = np.ones(graph.n_edges, np.float32)
    cut = ones.copy()
    cut[into_logits] = 0  # the metric is jointly linear in the masks into the logits
    assert scores[into_logits].sum() == pytest.approx(metric(cut) - metric(ones), rel=1e-4, abs=1e-5)


def test_eap_ig_converges_to_the_effect_of_cutting_everything():
    cfg = dict(CFG, normalization_type="LN")
    model = _model(cfg, seed=3)
    task = _task(cfg, kl_divergence)
    task = Task(task.name, task.clean, task.corrupted, task.positions, {"m": kl_divergence}, default_metric="m")
    _, metric = _by_hand(model, task, 0)
    n = task.graph(model).n_edges
    total = metric(np.zeros(n, np.float32)) - metric(np.ones(n, np.float32))
    errors = [abs(eap_ig(model, task, steps).scores.sum() - total) for steps in (1, 4, 32)]
    assert total > 1e-2
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3 * abs(total)  # midpoint rule: O(1/steps^2)


def test_top_k_threshold():
    x = np.array([0.5, 3.0, 1.0, 2.0, 1.0])
    assert top_k_threshold(x, 2) == 2.0 and top_k_threshold(x, 1) == 3.0
    with pytest.raises(ValueError, match="2 edges tie at the score of the 3-th edge"):
        top_k_threshold(x, 3)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_mask_breaks_ties_as_asked(seed):
    """Against a plain count: "more" keeps every edge at or above the k-th
    score, "fewer" those strictly above, "index" exactly k, taking tied edges
    by index (as a stable sort on -score does); "refuse" names all three and
    how many each keeps."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, 30).astype(float)  # many ties
    x[rng.integers(0, 30, 10)] = 0.0
    for k in range(1, 31):
        kth = sorted(x, reverse=True)[k - 1]
        stable = np.zeros(30, bool)
        stable[np.argsort(-x, kind="stable")[:k]] = True
        assert np.array_equal(top_k_mask(x, k, "index")[0], stable)
        assert top_k_mask(x, k, "index")[1] == kth
        if sum(v >= kth for v in x) == k:  # no tie in the way: every choice keeps those k
            assert all(np.array_equal(top_k_mask(x, k, ties)[0], x >= kth) for ties in ("refuse", "more", "fewer"))
        else:
            assert top_k_mask(x, k, "more")[0].sum() == sum(v >= kth for v in x)
            assert top_k_mask(x, k, "fewer")[0].sum() == sum(v > kth for v in x)
            with pytest.raises(ValueError, match=f"ties='more' keeps {sum(v >= kth for v in x)} edges, "
                                                 f"ties='fewer' keeps {sum(v > kth for v in x)}, ties='index' keeps {k}"):
                top_k_mask(x, k)
    with pytest.raises(ValueError, match="ties='sometimes' is not one of"):
        top_k_mask(x, 3, "sometimes")


def test_signed_ranking_puts_the_edges_that_help_first():
    """|score| ranks an edge that works against the task (cutting it lowers the
    minimised metric) with those that help; "signed" ranks it last, NaN last of all."""
    from acdc_jax import CircuitGraph, TransformerConfig
    from acdc_jax.algorithms import circuit_from_scores

    graph = CircuitGraph(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6))
    scores = np.zeros(graph.n_edges)
    scores[:5] = [-5.0, 3.0, 0.5, -1.0, 2.0]
    scores[5] = np.nan

    def kept(**kw):
        return np.nonzero(circuit_from_scores(graph, scores, {}, **kw).mask)[0].tolist()

    assert kept(n_edges=2) == [0, 1] and kept(n_edges=2, rank="signed") == [1, 4]
    assert kept(threshold=1.0) == [0, 1, 3, 4] and kept(threshold=1.0, rank="signed") == [1, 4]
    assert kept(rank="signed") == [1, 2, 4] and circuit_from_scores(graph, scores, {}, rank="signed").settings["rank"] == "signed"
    masks = evaluate.top_fraction_masks(scores, [3 / graph.n_edges, 1.0], rank="signed")
    assert np.nonzero(masks[0])[0].tolist() == [1, 2, 4] and masks[1].sum() == graph.n_edges
    with pytest.raises(ValueError, match="rank='positive' is not one of"):
        circuit_from_scores(graph, scores, {}, rank="positive")
    # the ROC follows the circuit's ranking: edges 1, 2 and 4 are the canonical ones
    canonical = [graph.edge_names[i] for i in (1, 2, 4)]
    signed = evaluate.roc_from_scores(circuit_from_scores(graph, scores, {}, rank="signed"), canonical)
    absolute = evaluate.roc_from_scores(circuit_from_scores(graph, scores, {}), canonical)
    assert signed.edge_auc == 1.0 and absolute.edge_auc < 1.0
    assert evaluate.roc_from_scores(circuit_from_scores(graph, scores, {}), canonical, rank="signed").edge_auc == 1.0


@pytest.fixture(scope="module")
def tracr_reverse():
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr import reverse_task

    return reverse_task()


def test_edge_pruning_reaches_the_requested_sparsity(tracr_reverse):
    model, task = tracr_reverse
    circuit = edge_pruning(model, task, sparsity=0.8, corruption="zeros")
    n = circuit.graph.n_edges
    assert circuit.n_edges == round(0.2 * n)
    assert abs(circuit.settings["expected_density"] - 0.2) < 0.08  # the Lagrangian pulled training to the target


@pytest.mark.parametrize("method, sparsity", [(edge_pruning, 0.8), (subnetwork_probing, 0.5)])
def test_pruning_a_bf16_model_keeps_exactly_the_requested_size(method, sparsity):
    """The gates train in float32 whatever the model's dtype: bf16 gates tie
    in the dozens near their starting log-alpha, so no threshold kept exactly
    k edges (edge pruning raised on the induction model)."""
    from acdc_jax.tasks import get

    model, task = get("induction", n_examples=8)
    circuit = method(cast(model, jnp.bfloat16), task, steps=6, sparsity=sparsity, metric="nll", progress=False)
    scores = circuit.scores if method is edge_pruning else np.array(list(circuit.settings["node_scores"].values()))
    assert len(np.unique(scores)) == len(scores)  # no ties among the gates
    if method is edge_pruning:
        assert circuit.n_edges == round((1 - sparsity) * circuit.graph.n_edges)
    else:
        assert len(circuit.settings["kept_nodes"]) == round((1 - sparsity) * len(scores))


def test_a_sparsity_that_keeps_nothing_is_warned_of_before_training():
    """round((1 - sparsity) * n) = 0 gives an empty circuit whatever the gates
    learn: edge pruning says so before it trains (and SP for its nodes)."""
    model, task = _model(CFG), _task(CFG, _mean_logit)
    n = task.graph(model).n_edges
    with pytest.warns(UserWarning, match=rf"keeps round\(.*\) = 0 of the {n} edges, so the circuit will be empty"):
        assert edge_pruning(model, task, sparsity=1 - 0.4 / n, steps=1, progress=False).n_edges == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sparsity=")
        assert edge_pruning(model, task, sparsity=1 - 0.6 / n, steps=1, progress=False).n_edges == 1
    with pytest.warns(UserWarning, match="of the .* heads and MLPs"):
        subnetwork_probing(model, task, sparsity=0.99, steps=1, progress=False)


def test_gradients_vanish_for_a_metric_minimised_by_the_full_model(tracr_reverse):
    """L2 to the full model's outputs is 0 there, and so is its gradient: EAP
    and HISP score every edge 0 and say why, naming a metric that works."""
    model, task = tracr_reverse
    with pytest.warns(MetricAtMinimumWarning, match=r"EAP .* 'l2' .* at its minimum.*metric='logit'"):
        assert not np.any(eap(model, task, corruption="zeros").scores)
    with pytest.warns(MetricAtMinimumWarning, match="HISP"):
        assert not any(METHODS["hisp"](model, task, corruption="zeros").settings["node_scores"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricAtMinimumWarning)
        assert np.any(eap(model, task, corruption="zeros", metric="logit").scores)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_recovers_tracr_reverse(tracr_reverse, name):
    """Exact patching and edge pruning rank the compiled circuit's edges
    perfectly, SP and HISP its nodes. Gradients see the right nodes but,
    through tracr's saturated attention, miss the exact edge ranking by a little.

    The gradient methods run in float64: head 0.0's gradient passes through
    that saturated attention and is about 1e-20 of the largest, which float32
    rounds to exactly 0 on some CPUs (a tie with the nodes outside the circuit)."""
    model, task = tracr_reverse
    kwargs = {"corruption": "zeros"}
    gradient = name in ("eap", "eap_ig", "hisp")
    if gradient:
        kwargs["metric"] = "logit"
    if name in ("edge_pruning", "subnetwork_probing"):
        kwargs["sparsity"] = {"edge_pruning": 0.85, "subnetwork_probing": 0.375}[name]
    with jax.enable_x64(gradient):
        circuit = METHODS[name](cast(model, jnp.float64) if gradient else model, task, **kwargs)
    result = evaluate.roc_from_scores(circuit, task.canonical)
    assert result.node_auc == pytest.approx(1.0)
    if name in ("exact_patching", "edge_pruning"):
        assert result.edge_auc == pytest.approx(1.0)
    elif name in ("eap", "eap_ig"):
        assert result.edge_auc > 0.98


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_at_its_precision(name):
    """Each method runs in full float32 unless told otherwise (as ACDC does):
    the precision holds while its metric is traced, is recorded, and is not
    left behind; a bad value raises."""
    cfg = dict(CFG, n_layers=1)
    model, seen = _model(cfg), []

    def metric(logits, task):
        seen.append(jax.config.jax_default_matmul_precision)
        return _mean_logit(logits, task)

    def metric_again(logits, task):  # another function: traced afresh, not taken from the jit cache
        return metric(logits, task)

    fast = {"edge_pruning": {"steps": 2}, "subnetwork_probing": {"steps": 2}, "eap_ig": {"steps": 2}}.get(name, {})
    circuit = METHODS[name](model, _task(cfg, metric), **fast)
    assert circuit.settings["precision"] == "float32" and seen and set(seen) == {"float32"}
    seen.clear()
    circuit = METHODS[name](model, _task(cfg, metric_again), precision="tensorfloat32", **fast)
    assert circuit.settings["precision"] == "tensorfloat32" and seen and set(seen) == {"tensorfloat32"}
    assert jax.config.jax_default_matmul_precision is None
    with pytest.raises(ValueError, match="precision must be one of"):
        METHODS[name](model, _task(cfg, metric), precision="highest", **fast)
    assert inspect.signature(METHODS[name]).parameters["precision"].default == "float32"


def test_long_runs_show_a_progress_bar_that_can_be_turned_off(capsys):
    """ACDC, exact patching and the trained masks count their edges or steps on
    stderr; progress=False prints nothing."""
    from acdc_jax.acdc import acdc
    from acdc_jax.algorithms import subnetwork_probing

    model, task = _model(CFG), _task(CFG, kl_divergence)
    task = Task("random", task.clean, task.corrupted, positions=task.positions, metrics={"kl": kl_divergence})
    n = task.graph(model).n_edges
    runs = [
        (lambda p: acdc(model, task, 0.01, progress=p), "ACDC edges", f"{n}/{n}"),
        (lambda p: exact_patching(model, task, progress=p), "exact patching", f"{n}/{n}"),
        (lambda p: edge_pruning(model, task, steps=7, progress=p), "edge pruning", "7/7"),
        (lambda p: subnetwork_probing(model, task, steps=5, progress=p), "subnetwork probing", "5/5"),
    ]
    for run, desc, count in runs:
        capsys.readouterr()
        run(False)
        assert capsys.readouterr().err == ""
        run(True)
        err = capsys.readouterr().err
        assert desc in err and count in err, (desc, err[-300:])


def _nan_after_cut(logits, t):
    return jnp.where(jnp.abs(logits - t.reference).max() > 1e-4, jnp.nan, 0.0)


def _nan_everywhere(logits, t):
    return jnp.nan * logits.sum()


def _nan_gradient(logits, t):  # finite, but jnp.where's untaken branch makes the gradient NaN
    return jnp.where(True, jnp.abs(logits - t.reference).sum(), jnp.sqrt(-jnp.abs(logits).sum() - 1.0))


@pytest.mark.parametrize("run, metric, pattern", [
    (lambda m, t, f: exact_patching(m, t, metric=f, n_edges=3, progress=False), _nan_after_cut,
     r"metric after cutting \S+ is nan"),
    (lambda m, t, f: exact_patching(m, t, metric=f, n_edges=3, progress=False), _nan_everywhere,
     "metric of the full model is nan"),
    (lambda m, t, f: eap(m, t, metric=f, n_edges=3), _nan_everywhere, "metric at the full model is nan"),
    (lambda m, t, f: eap(m, t, metric=f, n_edges=3), _nan_gradient,
     "gradient with respect to the masks at the full model is nan"),
    (lambda m, t, f: METHODS["hisp"](m, t, metric=f, n_edges=3), _nan_gradient, "gradient .* is nan"),
    (lambda m, t, f: eap_ig(m, t, 2, metric=f, n_edges=3, progress=False), _nan_after_cut,
     "metric at alpha=0.25 is nan"),
    (lambda m, t, f: edge_pruning(m, t, metric=f, steps=3, progress=False), _nan_after_cut,
     "metric at training step 0 .* is nan"),
    (lambda m, t, f: subnetwork_probing(m, t, metric=f, steps=3, progress=False), _nan_everywhere,
     "metric at training step 0 .* is nan"),
    (lambda m, t, f: evaluate.faithfulness(m, t, evaluate.Circuit(t.graph(m), np.ones(t.graph(m).n_edges)),
                                           metric=f), _nan_after_cut, "metric of the empty circuit is nan"),
])
def test_a_metric_that_is_not_finite_is_refused_by_name(small_gpt2, run, metric, pattern):
    """NaN scores would rank last and NaN gates train to an arbitrary circuit,
    silently: every method refuses a metric (or gradient) that is not finite,
    and says where it was."""
    from acdc_jax import MetricError

    model, task = small_gpt2
    with pytest.raises(MetricError, match=pattern):
        run(model, task, metric)


def _per_prompt(logits, t):
    return jnp.abs(logits - t.reference).sum(axis=-1)


def _text(logits, t):
    return "low"


@pytest.mark.parametrize("metric, pattern", [(_per_prompt, r"returned an array of shape \(\d+, \d+\)"),
                                             (_text, "returned str")])
@pytest.mark.parametrize("method", ["acdc", "exact_patching", "eap", "edge_pruning"])
def test_a_metric_that_is_not_one_number_is_refused(small_gpt2, method, metric, pattern):
    """A metric must give one float for the batch; one per prompt (or a
    string) is refused by name, whether the first to evaluate it is a full
    pass, a gradient or a training step (before: a TypeError from deep in JAX
    or numpy)."""
    from acdc_jax import MetricError, acdc

    model, task = small_gpt2
    run = {"acdc": lambda: acdc(model, task, 0.01, metric=metric, progress=False),
           "exact_patching": lambda: exact_patching(model, task, metric=metric, n_edges=3, progress=False),
           "eap": lambda: eap(model, task, metric=metric, n_edges=3),
           "edge_pruning": lambda: edge_pruning(model, task, metric=metric, steps=2, progress=False)}[method]
    with pytest.raises(MetricError, match=f"The metric {metric.__name__} {pattern}"):
        run()

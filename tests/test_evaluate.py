"""Evaluation against ground truth: the tracr circuits (derived from the
compiled programs, checked against the lists the ACDC authors published) and
the shipped induction model (heads named by measured attention scores)."""

import json

import numpy as np
import pytest

from acdc_jax import evaluate
from acdc_jax.acdc import acdc

# The canonical tracr circuits published with the original ACDC code
# (acdc/tracr_task/utils.py), as (receiver, sender) hook names. Edges inside a
# head (result <- q/k/v) and inside an MLP (mlp_out <- mlp_in) are not edges of
# our graph and are left out.
ACDC_PUBLISHED = {
    "tracr-reverse": [
        ("blocks.3.hook_resid_post", "blocks.3.attn.hook_result"),
        ("blocks.3.attn.hook_q", "blocks.3.hook_q_input"),
        ("blocks.3.attn.hook_k", "blocks.3.hook_k_input"),
        ("blocks.3.attn.hook_v", "blocks.3.hook_v_input"),
        ("blocks.3.hook_q_input", "blocks.2.hook_mlp_out"),
        ("blocks.3.hook_k_input", "hook_pos_embed"),
        ("blocks.3.hook_v_input", "hook_embed"),
        ("blocks.2.hook_mlp_in", "blocks.1.hook_mlp_out"),
        ("blocks.1.hook_mlp_in", "blocks.0.hook_mlp_out"),
        ("blocks.1.hook_mlp_in", "hook_embed"),
        ("blocks.1.hook_mlp_in", "hook_pos_embed"),
        ("blocks.0.hook_mlp_in", "blocks.0.attn.hook_result"),
        ("blocks.0.hook_mlp_in", "hook_embed"),
        ("blocks.0.attn.hook_v", "blocks.0.hook_v_input"),
        ("blocks.0.hook_v_input", "hook_embed"),
    ],
    "tracr-proportion": [
        ("blocks.1.hook_resid_post", "blocks.1.attn.hook_result"),
        ("blocks.1.attn.hook_q", "blocks.1.hook_q_input"),
        ("blocks.1.attn.hook_k", "blocks.1.hook_k_input"),
        ("blocks.1.attn.hook_v", "blocks.1.hook_v_input"),
        ("blocks.1.hook_q_input", "hook_embed"),
        ("blocks.1.hook_q_input", "hook_pos_embed"),
        ("blocks.1.hook_k_input", "hook_embed"),
        ("blocks.1.hook_k_input", "hook_pos_embed"),
        ("blocks.1.hook_v_input", "blocks.0.hook_mlp_out"),
        ("blocks.0.hook_mlp_in", "hook_embed"),
    ],
}


def _our_name(receiver: str, sender: str) -> str:
    """ACDC's (receiver, sender) hook pair -> our edge name (tracr models have one head per layer)."""
    head = lambda hook: f"{hook}[0]" if "attn.hook" in hook or "_input" in hook else hook
    return f"{head(sender)}->{head(receiver)}"


@pytest.fixture(scope="module")
def tracr_tasks():
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr import proportion_task, reverse_task

    return {"tracr-reverse": reverse_task(), "tracr-proportion": proportion_task()}


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-proportion"])
def test_derived_ground_truth_equals_the_published_tracr_circuits(tracr_tasks, name):
    _, task = tracr_tasks[name]
    published = {_our_name(r, s) for r, s in ACDC_PUBLISHED[name]}
    assert set(task.canonical) == published


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-proportion"])
def test_acdc_recovers_tracr_circuits_with_edge_auc_one(tracr_tasks, name):
    model, task = tracr_tasks[name]
    result = evaluate.roc(model, task, [1e-5, 1e-3, 1e-1, 10.0], corruption="zeros", progress=False)
    assert result.edge_auc == 1.0 and result.node_auc == 1.0
    exact = [set(c.edges) == set(task.canonical) for c in result.circuits]
    assert any(exact)
    assert result.circuits[-1].n_edges < len(task.canonical)  # a huge tau cuts real edges: the sweep is not trivial


def _measured_head_scores(model, tokens, source):
    """Previous-token and induction scores from the model's attention patterns."""
    pats = np.asarray(model.attention_patterns(tokens))  # [batch, layer, head, q, k]
    q = np.arange(1, tokens.shape[1])
    prev = pats[:, :, :, q, q - 1].mean(axis=(0, 3))
    b, p = np.nonzero(source >= 0)
    ind = pats[b, :, :, p, source[b, p]].mean(axis=0)
    return prev, ind


def test_shipped_induction_scores_are_reproduced():
    from acdc_jax.tasks.induction import DATA, load_induction_model, repeated_sequences

    meta = json.loads((DATA / "scores.json").read_text())
    model = load_induction_model()
    tokens, source = repeated_sequences(np.random.default_rng(12345), 256)
    prev, ind = _measured_head_scores(model, tokens, source)
    np.testing.assert_allclose(prev, meta["scores"]["previous_token"], atol=2e-4)
    np.testing.assert_allclose(ind, meta["scores"]["induction"], atol=2e-4)
    th = meta["thresholds"]
    assert [[0, h] for h in range(4) if prev[0, h] >= th["previous_token"]] == meta["previous_token_heads"]
    assert [[1, h] for h in range(4) if ind[1, h] >= th["induction"]] == meta["induction_heads"]
    assert meta["previous_token_heads"] and meta["induction_heads"]
    # the model really does induction: it predicts the second copy of a segment
    pred = np.asarray(model(tokens).argmax(-1))[:, :-1]
    assert (pred == tokens[:, 1:])[source[:, :-1] >= 0].mean() > 0.9


@pytest.fixture(scope="module")
def induction():
    from acdc_jax.tasks import get

    return get("induction", n_examples=40)


def test_acdc_recovers_the_induction_circuit(induction):
    model, task = induction
    circuit = acdc(model, task, 0.01, progress=False)
    assert set(task.canonical) <= set(circuit.edges)
    assert circuit.n_edges < 0.7 * circuit.graph.n_edges
    fpr, tpr = evaluate.rates(set(circuit.edges), set(task.canonical), set(circuit.graph.edge_names))
    assert tpr == 1.0 and fpr < 0.5

    faith = evaluate.faithfulness(model, task, circuit)
    assert faith["full"] == pytest.approx(0.0, abs=1e-5)  # KL of the full model to itself
    assert faith["circuit"] == pytest.approx(circuit.metric, rel=1e-4, abs=1e-6)
    assert faith["empty"] > 10 * faith["circuit"]
    assert 0.9 < faith["normalized"] <= 1.0


@pytest.mark.slow
def test_induction_roc(induction):
    model, task = induction
    result = evaluate.roc(model, task, [0.001, 0.01, 0.1, 1.0], progress=False)
    assert result.edge_auc > 0.8 and result.node_auc > 0.8
    sizes = [c.n_edges for c in result.circuits]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_compare_gives_auc_and_the_faithfulness_curve(tracr_tasks):
    """evaluate.compare on tracr-reverse (zero ablation): both ACDC and exact
    patching rank the derived circuit perfectly; each curve point is the
    circuit's own faithfulness, and CPR and CMD are the areas numpy's
    trapezoid rule gives for that curve."""
    from acdc_jax.algorithms import exact_patching

    model, task = tracr_tasks["tracr-reverse"]
    rows = evaluate.compare({"acdc": None, "exact_patching": exact_patching}, {"tracr-reverse": (model, task)},
                            taus=[1e-5, 1e-3, 0.1, 10.0], corruption="zeros", fractions=(0.0, 0.05, 0.2, 1.0))
    assert [r["method"] for r in rows] == ["acdc", "exact_patching"]
    for row in rows:
        assert row["edge_auc"] == 1.0 and row["metric"] == "l2"
        xs, ys = np.array(row["curve"]).T
        assert np.all(np.diff(xs) >= 0) and xs[0] == 0.0 and xs[-1] == 1.0
        np.testing.assert_allclose(ys[[0, -1]], [0.0, 1.0], atol=1e-6)
        np.testing.assert_allclose(row["cpr"], np.trapezoid(ys, xs), rtol=1e-12)
        np.testing.assert_allclose(row["cmd"], np.trapezoid(np.abs(1 - ys), xs), rtol=1e-12)
    circuit = acdc(model, task, 1e-3, corruption="zeros", progress=False)
    [(fraction, value)] = evaluate.faithfulness_curve(model, task, [circuit.mask], corruption="zeros")
    assert fraction == circuit.n_edges / circuit.graph.n_edges
    assert value == pytest.approx(evaluate.faithfulness(model, task, circuit)["normalized"], abs=1e-6)
    assert (fraction, pytest.approx(value, abs=1e-6)) in [tuple(p) for p in rows[0]["curve"]]


def test_a_scored_circuit_keeps_max_points_thresholds_and_its_exact_auc():
    """With more distinct scores than max_points, the plotted thresholds are
    spread from the highest score to the lowest; the AUC stays the exact
    ranking AUC (the Mann-Whitney count, computed here pair by pair)."""
    from acdc_jax import Circuit, CircuitGraph, TransformerConfig

    graph = CircuitGraph(TransformerConfig(n_layers=2, d_model=8, n_heads=4, d_head=2, d_vocab=10, n_ctx=8, d_mlp=16))
    rng = np.random.default_rng(0)
    scores = rng.normal(size=graph.n_edges)
    truth = rng.random(graph.n_edges) < 0.3
    circuit = Circuit(graph, np.ones(graph.n_edges, np.float32), scores=scores, settings={"rank": "signed"})
    result = evaluate.roc_from_scores(circuit, [n for n, t in zip(graph.edge_names, truth) if t], max_points=20)
    assert len(result.taus) == 20 and graph.n_edges > 20
    assert result.taus[0] == scores.max() and result.taus[-1] == scores.min()
    assert result.edge_points[-1] == (1.0, 1.0)
    pos, neg = scores[truth], scores[~truth]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert result.edge_auc == pytest.approx(pairs, abs=1e-12)


def test_a_circuit_answers_membership_by_name_or_index():
    from acdc_jax import Circuit, CircuitGraph, TransformerConfig

    graph = CircuitGraph(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=10, n_ctx=8))
    mask = np.ones(graph.n_edges, np.float32)
    mask[3] = 0
    circuit = Circuit(graph, mask, metric=0.25)
    assert graph.edge_names[3] not in circuit and 3 not in circuit
    assert graph.edge_names[4] in circuit and 4 in circuit
    assert repr(circuit) == f"Circuit({graph.n_edges - 1} of {graph.n_edges} edges, metric=0.25)"


def test_a_sweep_saved_as_it_goes_resumes_from_its_files(induction, tmp_path):
    """`sweep(out=...)` saves each threshold's circuit and log; `resume` reads
    the saved ones back instead of finding them again, and refuses a sweep
    made by another method."""
    from acdc_jax.algorithms import acdc_nodes

    model, task = induction
    taus = [0.01, 0.5]
    first = evaluate.sweep(model, task, taus, method=acdc_nodes, out=tmp_path, progress=False)
    saved = {tau: (tmp_path / f"tau-{tau:g}" / "circuit.json").read_bytes() for tau in taus}
    again = evaluate.sweep(model, task, taus, method=acdc_nodes, out=tmp_path, resume=True, progress=False)
    assert {tau: (tmp_path / f"tau-{tau:g}" / "circuit.json").read_bytes() for tau in taus} == saved
    assert [c.edges for c in again] == [c.edges for c in first] and first[0].n_edges > first[1].n_edges
    with pytest.raises(ValueError, match=r"Cannot resume the sweep .*'method': \('acdc_nodes', 'acdc'\)"):
        evaluate.sweep(model, task, taus, out=tmp_path, resume=True, progress=False)

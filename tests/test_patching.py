"""The edge-decomposed forward against independent references: the plain
forward, the corrupted run, hand-written PyTorch hooks, separate calls, and
finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import CircuitGraph, Corruption, patched_forward
from acdc_jax.candidates import Candidates
from acdc_jax.model import cast
from converters.transformer_lens import from_transformer_lens

from .helpers import assert_all_ones_and_zeros, assert_cut_matches, random_hf_gpt2, record_senders
from .test_converters import _tl_state_dict

VOCAB = 61


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return random_hf_gpt2(tmp_path_factory.mktemp("gpt2"), tied=False, n_layer=3, n_embd=24, n_head=3, seed=1)


def _tokens(seed, shape=(3, 9), vocab=VOCAB):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape))


def _shortformer_model():
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=VOCAB, n_ctx=16, attn_only=True,
               normalization_type="LN", act_fn="gelu_new", positional_embedding_type="shortformer")
    return from_transformer_lens(_tl_state_dict(cfg, np.random.default_rng(0)), cfg)


GRAPH_OPTIONS = [dict(), dict(split_qkv=False), dict(split_embed=True), dict(qkv_edges=False)]


@pytest.mark.parametrize("options", GRAPH_OPTIONS, ids=str)
def test_all_ones_is_the_plain_forward_and_all_zeros_the_corrupted_run(gpt2, options):
    _, model = gpt2
    graph = CircuitGraph(model.config, **options)
    assert_all_ones_and_zeros(model, graph, _tokens(0), _tokens(1))


def test_all_ones_matches_for_shortformer_and_tracr():
    model = _shortformer_model()
    clean = _tokens(2)
    for corruption in (Corruption.zeros(), Corruption.mean(model, _tokens(3, (5, 9))), Corruption.from_prompts(model, _tokens(4))):
        out = patched_forward(model, clean, CircuitGraph(model.config).ones(), corruption)
        assert np.abs(np.asarray(out - model(clean))).max() <= 1e-5
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr_programs import compile_tracr_model

    tracr = compile_tracr_model("reverse")
    toks = jnp.asarray([[3, 0, 1, 2], [3, 2, 1, 0]])
    g = CircuitGraph(tracr.config, split_embed=True)
    out = patched_forward(tracr, toks, g.ones(), Corruption.zeros(), g)
    assert np.abs(np.asarray(out - tracr(toks))).max() <= 1e-5


def test_zero_and_mean_ablation_of_everything(gpt2):
    """With every edge cut, each receiver reads only the replaced sender outputs
    plus the attention biases b_O (which belong to no edge)."""
    _, model = gpt2
    graph = CircuitGraph(model.config)
    clean, data = _tokens(5), _tokens(6, (7, 9))
    b_O = np.asarray(model.blocks.attn.b_O).sum(0)
    ln_f = lambda x: model.unembed(model.ln_final(jnp.asarray(x)))
    out = patched_forward(model, clean, jnp.zeros(graph.n_edges), Corruption.zeros(), graph)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(ln_f(b_O[None])), out.shape), atol=1e-5)
    _, acts = model.run_with_senders(data)
    mean_senders = np.asarray(acts.tok + acts.pos + acts.heads.sum((1, 2)) + acts.mlps.sum(1)).mean(0)
    out = patched_forward(model, clean, jnp.zeros(graph.n_edges), Corruption.mean(model, data), graph)
    expected = ln_f(mean_senders + b_O)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(expected), out.shape), atol=1e-5)


# --- one edge patched, against hooks on the PyTorch model ----------------------

def _torch_patched_logits(pt, clean, corrupt, edge):
    """Cut one edge by hand with forward hooks on HF GPT-2: the receiver's input
    becomes the clean input minus (clean - corrupted) output of the sender."""
    import torch

    n_head = pt.config.n_head
    d = pt.config.n_embd
    dh = d // n_head
    blocks = pt.transformer.h

    def record(tokens):
        """Each sender's output and each block's input residual, by hooks."""
        wte, wpe = pt.transformer.wte.weight, pt.transformer.wpe.weight
        return record_senders(pt, tokens, blocks, n_head, dh, lambda blk: blk.attn.c_proj,
                              lambda W, rows: W[rows],  # Conv1D [in, out]
                              lambda t: wte[t] + wpe[: t.shape[1]][None])

    clean_t, corrupt_t = torch.tensor(np.asarray(clean)), torch.tensor(np.asarray(corrupt))
    a_clean, a_corr = record(clean_t), record(corrupt_t)
    kind, sender, receiver = edge
    delta = None if kind == "qkv" else a_clean[sender] - a_corr[sender]

    hooks = []
    if receiver[0] in ("q", "k", "v"):
        letter, l, h = receiver
        blk = blocks[l]
        def qkv_hook(mod, args, out):
            # This head's q/k/v slice recomputed from the patched residual (or,
            # for a cut q/k/v step, from the corrupted run's residual).
            resid = a_corr[("resid", l)] if kind == "qkv" else a_clean[("resid", l)] - delta
            new = blk.ln_1(resid) @ mod.weight + mod.bias  # Conv1D, computed by hand
            col = "qkv".index(letter) * d + h * dh
            out = out.clone()
            out[..., col:col + dh] = new[..., col:col + dh]
            return out
        hooks.append(blk.attn.c_attn.register_forward_hook(qkv_hook))
    elif receiver[0] == "mlp_in":
        hooks.append(blocks[receiver[1]].ln_2.register_forward_pre_hook(lambda mod, args: (args[0] - delta,)))
    else:
        hooks.append(pt.transformer.ln_f.register_forward_pre_hook(lambda mod, args: (args[0] - delta,)))
    with torch.no_grad():
        out = pt(clean_t).logits.numpy()
    for hk in hooks:
        hk.remove()
    return out


EDGES = {
    # edge name: (kind, sender, receiver) for the hook reference
    "blocks.0.hook_resid_pre->blocks.1.hook_q_input[0]": ("residual", ("embed",), ("q", 1, 0)),
    "blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[2]": ("residual", ("head", 0, 1), ("k", 2, 2)),
    "blocks.1.attn.hook_result[0]->blocks.2.hook_v_input[1]": ("residual", ("head", 1, 0), ("v", 2, 1)),
    "blocks.0.hook_mlp_out->blocks.1.hook_mlp_in": ("residual", ("mlp", 0), ("mlp_in", 1)),
    "blocks.1.attn.hook_result[2]->blocks.1.hook_mlp_in": ("residual", ("head", 1, 2), ("mlp_in", 1)),
    "blocks.2.attn.hook_result[1]->blocks.2.hook_resid_post": ("residual", ("head", 2, 1), ("logits",)),
    "blocks.2.hook_mlp_out->blocks.2.hook_resid_post": ("residual", ("mlp", 2), ("logits",)),
    "blocks.1.hook_v_input[2]->blocks.1.attn.hook_v[2]": ("qkv", None, ("v", 1, 2)),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_one_patched_edge_matches_pytorch_hooks(gpt2, name):
    pt, model = gpt2
    graph = CircuitGraph(model.config)
    clean, corrupt = _tokens(7), _tokens(8)
    ref = _torch_patched_logits(pt, clean, corrupt, EDGES[name])
    assert_cut_matches(pt, model, graph, [name], clean, corrupt, ref)


def test_vmapped_masks_equal_separate_calls(gpt2):
    _, model = gpt2
    graph = CircuitGraph(model.config)
    clean, corruption = _tokens(9), Corruption.from_prompts(model, _tokens(10))
    masks = jnp.asarray(np.random.default_rng(0).uniform(size=(8, graph.n_edges)), jnp.float32)
    batched = jax.vmap(lambda m: patched_forward(model, clean, m, corruption, graph))(masks)
    for i in range(8):
        single = patched_forward(model, clean, masks[i], corruption, graph)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), atol=1e-5)


def test_grad_wrt_masks_matches_finite_differences(gpt2):
    _, model = gpt2
    graph = CircuitGraph(model.config)
    with jax.enable_x64(True):
        m64 = cast(model, jnp.float64)
        clean, corruption = _tokens(11), Corruption.from_prompts(m64, _tokens(12))
        masks = jnp.asarray(np.random.default_rng(1).uniform(size=graph.n_edges), jnp.float64)

        def f(m):
            logp = jax.nn.log_softmax(patched_forward(m64, clean, m, corruption, graph)[:, -1])
            return logp[:, 3].mean()

        grad, value = eqx.filter_jit(jax.grad(f))(masks), eqx.filter_jit(f)
        rng = np.random.default_rng(2)
        for i in rng.choice(graph.n_edges, 12, replace=False):
            eps = 1e-5
            e = jnp.zeros_like(masks).at[i].set(eps)
            fd = (value(masks + e) - value(masks - e)) / (2 * eps)
            np.testing.assert_allclose(float(grad[i]), float(fd), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("which", ["gpt2", "shortformer"])
def test_narrow_pass_from_every_layer_matches_the_full_forward(gpt2, which):
    """A pass started at any layer from cached deviations, with the last layer
    run at the metric positions only (and the start layer's heads partly taken
    from a cache), gives the full forward's logits at those positions."""
    import equinox as eqx

    from acdc_jax import patching
    from acdc_jax.corruption import example_corruption
    from acdc_jax.patching import patched_logits_and_deviations, senders_before

    # jitted, as the Scorer runs them (and a program per start layer, rather than thousands of eager ops)
    run_from, start_layer_heads, upstream_mix = (eqx.filter_jit(f) for f in (
        patching.run_from, patching.start_layer_heads, patching.upstream_mix))
    model = gpt2[1] if which == "gpt2" else _shortformer_model()
    graph = CircuitGraph(model.config)
    clean, corruption = _tokens(13), Corruption.from_prompts(model, _tokens(14))
    mask = jnp.asarray(np.random.default_rng(3).uniform(size=graph.n_edges), jnp.float32)
    at = (3, 8)  # static, as the Scorer's positions
    full = patched_forward(model, clean, mask, corruption, graph)[:, np.array(at)]
    deviations = patched_logits_and_deviations(model, graph, clean, mask, corruption)[1]
    m_add, m_dir = graph.dense_masks(mask)
    other_add = graph.dense_masks(jnp.asarray(np.random.default_rng(4).uniform(size=graph.n_edges), jnp.float32))[0]
    for start in range(graph.n_layers + 1):
        for b in (0, 2):
            corr = example_corruption(corruption, model, clean.shape[1], jax.tree_util.tree_map(lambda a: a[b], corruption.acts))
            pos_qk = model.embeddings(clean[b])[2]
            up = deviations[b, :senders_before(graph, start)]
            first = None
            if start < graph.n_layers:
                first = (start_layer_heads(model, graph, start, up, m_add, m_dir, corr, pos_qk), jnp.array([1]))
            logits, down = run_from(model, graph, start, up, m_add, m_dir, corr, pos_qk, at, first, narrow=True)
            assert down is None
            np.testing.assert_allclose(np.asarray(logits), np.asarray(full[b]), atol=2e-5)
            if start < graph.n_layers:  # the upstream senders summed under another mask, corrected at every row
                shared = upstream_mix(graph, start, up, other_add, jnp.arange(up.shape[0]))
                logits = run_from(model, graph, start, up, m_add, m_dir, corr, pos_qk, at, first, narrow=True,
                                  upstream=shared)[0]
                np.testing.assert_allclose(np.asarray(logits), np.asarray(full[b]), atol=2e-5)


@pytest.mark.parametrize("start", [1, 2])
def test_shared_upstream_sum_in_a_chain_across_layers(gpt2, start):
    """A chain that crosses from the receivers after the start layer into it,
    as ACDC's do: the Scorer sums the cached senders once under the base mask
    and corrects only the changed rows; every candidate's metric equals a
    full pass's."""
    from acdc_jax.scoring import Scorer
    from acdc_jax.tasks.base import Task, kl_divergence

    model = gpt2[1]
    graph = CircuitGraph(model.config)
    clean, corrupted = _tokens(21), _tokens(22)
    task = Task("t", clean, corrupted, positions=np.array([6, 8]), metrics={"kl": kl_divergence}).bind(model)
    scorer = Scorer(model, graph, task, Corruption.from_prompts(model, corrupted), kl_divergence)
    rng = np.random.default_rng(5)
    base = (rng.uniform(size=graph.n_edges) > 0.1).astype(np.float32)
    base[[e.index for e in graph.edges if e.receiver.layer < start]] = 1.0  # ACDC has not reached them yet
    slot = {n.name: i for i, n in enumerate(graph.senders)}
    n_up = graph.n_senders_before_attn(start)
    kept = [e for e in graph.edges if base[e.index] == 1]
    later_from_up = [e for e in kept if e.receiver.layer > start and e.kind == "residual" and slot[e.sender.name] < n_up]
    into_start = [e for e in kept if e.receiver.layer == start]
    # one changed upstream row after layer 1 (5 cached senders), two (padded to 4) after layer 2 (9)
    second = [e for e in later_from_up if (e.sender == later_from_up[0].sender) == (start == 1)][-1]
    chain = [later_from_up[0], second] + into_start[:3]
    masks = np.repeat(base[None], len(chain), axis=0)
    for k, e in enumerate(chain):
        masks[k:, e.index] = 0.0
    cands = Candidates.from_masks(masks, base)
    rows = scorer.upstream_rows(cands, start)
    changed = {slot[later_from_up[0].sender.name], slot[second.sender.name]}
    assert len(changed) == start
    assert rows is not None and changed <= set(rows.tolist()) and len(rows) < n_up
    batched = scorer.batch(cands, start, 8)
    np.testing.assert_allclose(batched, [scorer.full(m) for m in masks], rtol=1e-5, atol=1e-7)

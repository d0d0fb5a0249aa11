"""GPT-NeoX checkpoints (Pythia's layout: parallel attention and MLP, partial
rotary, LayerNorm) against transformers: logits parity per config option,
the graph of a parallel layer, patched edges against hand-written PyTorch
hooks, and ACDC's batched decisions against the sequential loop."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import CircuitGraph
from acdc_jax.errors import ConfigError
from acdc_jax.tasks import prompt_task

from .helpers import assert_all_ones_and_zeros, assert_cut_matches, logits_gap, random_hf_gpt_neox, record_senders
from .test_batched_equals_sequential import _same

VOCAB = 61


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


@pytest.mark.parametrize("options", [
    dict(), dict(use_parallel_residual=False), dict(tie_word_embeddings=True), dict(attention_bias=False),
    dict(hidden_act="gelu_new"),
    dict(rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 1.0, "rope_type": "default"}),
    dict(rope_parameters={"rope_theta": 100.0, "partial_rotary_factor": 0.5, "rope_type": "linear", "factor": 4.0}),
], ids=str)
def test_logits_match_transformers(tmp_path, options):
    pt, model = random_hf_gpt_neox(tmp_path, **options)
    # about 1e-6 measured; the MLP reading the wrong residual, or rotating the wrong share of each head,
    # is off by 1e-2 or more
    assert logits_gap(model, pt, 20, VOCAB) <= 1e-5


def test_older_config_fields_and_refusals(tmp_path):
    """Pythia's own config.json says rotary_pct and rotary_emb_base; rope
    scaling and unknown fields are refused by name."""
    random_hf_gpt_neox(tmp_path, name="base")
    path = tmp_path / "base" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["rope_parameters"]
    path.write_text(json.dumps({**cfg, "rotary_pct": 0.5, "rotary_emb_base": 300}))
    config = converters.convert(tmp_path / "base").config
    assert (config.rotary_dim, config.rotary_base) == (4, 300.0)
    for change, words in [({"rope_scaling": {"type": "proportional", "factor": 2.0}}, "rope type 'proportional'"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"use_qk_norm": True}, r"Unsupported config field\(s\) \['use_qk_norm'\]")]:
        path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConfigError, match=words):
            converters.convert(tmp_path / "base")


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    return random_hf_gpt_neox(tmp_path_factory.mktemp("neox"), n_layers=3, seed=1, scale=0.2,
                              rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"})


def test_a_parallel_layer_sends_nothing_from_its_heads_to_its_mlp(neox):
    _, model = neox
    import dataclasses

    parallel = CircuitGraph(model.config)
    sequential = CircuitGraph(dataclasses.replace(model.config, parallel_attn_mlp=False))
    assert parallel.n_edges == sequential.n_edges - model.config.n_layers * model.config.n_heads
    same_layer = [e for e in parallel.edges
                  if e.receiver.kind == "mlp_in" and e.sender.kind == "head" and e.sender.layer == e.receiver.layer]
    assert not same_layer and "blocks.0.attn.hook_result[0]->blocks.1.hook_mlp_in" in parallel.edge_names


def test_all_ones_is_the_plain_forward_and_all_zeros_the_corrupted_run(neox):
    _, model = neox
    graph = CircuitGraph(model.config)
    assert_all_ones_and_zeros(model, graph, _tokens(0), _tokens(1))


def _torch_patched_logits(pt, clean, corrupt, edge):
    """One edge cut by hand with forward hooks on HF GPT-NeoX."""
    import torch

    H = pt.config.num_attention_heads
    dh = pt.config.hidden_size // H
    layers = pt.gpt_neox.layers

    def record(tokens):
        return record_senders(pt, tokens, layers, H, dh, lambda blk: blk.attention.dense,
                              lambda W, rows: W[:, rows].T, lambda t: pt.gpt_neox.embed_in.weight[t])

    clean_t = torch.tensor(np.asarray(clean))
    a_clean, a_corr = record(clean_t), record(torch.tensor(np.asarray(corrupt)))
    sender, receiver = edge
    delta = a_clean[sender] - a_corr[sender]
    if receiver[0] in ("q", "k", "v"):
        letter, l, h = receiver
        blk = layers[l]
        def qkv_hook(mod, args, out):
            new = torch.nn.functional.linear(blk.input_layernorm(a_clean[("resid", l)] - delta), mod.weight, mod.bias)
            col = h * 3 * dh + "qkv".index(letter) * dh  # rows are [head, (q, k, v), d_head]
            out = out.clone()
            out[..., col:col + dh] = new[..., col:col + dh]
            return out
        hook = blk.attention.query_key_value.register_forward_hook(qkv_hook)
    elif receiver[0] == "mlp_in":
        hook = layers[receiver[1]].post_attention_layernorm.register_forward_pre_hook(lambda m, a: (a[0] - delta,))
    else:
        hook = pt.gpt_neox.final_layer_norm.register_forward_pre_hook(lambda m, a: (a[0] - delta,))
    with torch.no_grad():
        out = pt(clean_t).logits.numpy()
    hook.remove()
    return out


EDGES = {
    "blocks.0.hook_resid_pre->blocks.1.hook_q_input[3]": (("embed",), ("q", 1, 3)),
    "blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[2]": (("head", 0, 1), ("k", 2, 2)),
    "blocks.1.attn.hook_result[2]->blocks.2.hook_mlp_in": (("head", 1, 2), ("mlp_in", 2)),
    "blocks.0.hook_mlp_out->blocks.1.hook_mlp_in": (("mlp", 0), ("mlp_in", 1)),
    "blocks.2.hook_mlp_out->blocks.2.hook_resid_post": (("mlp", 2), ("logits",)),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_one_patched_edge_matches_pytorch_hooks(neox, name):
    pt, model = neox
    graph = CircuitGraph(model.config)
    clean, corrupt = _tokens(7), _tokens(8)
    ref = _torch_patched_logits(pt, clean, corrupt, EDGES[name])
    assert_cut_matches(pt, model, graph, [name], clean, corrupt, ref)


@pytest.mark.parametrize("tau", [pytest.param(1e-3, marks=pytest.mark.slow), 1e-2,
                                 pytest.param(3e-2, marks=pytest.mark.slow)])
def test_batched_acdc_decides_like_the_sequential_loop(neox, tau):
    _, model = neox
    rng = np.random.default_rng(3)
    task = prompt_task(rng.integers(0, VOCAB, (6, 8)).tolist(), rng.integers(0, VOCAB, (6, 8)).tolist(),
                       position=[5, 7], name="random-neox")
    circuit = _same(model, task, tau)
    assert 0 < len(circuit.edges) < CircuitGraph(model.config).n_edges

"""Phi, GPT-J and Gemma checkpoints against transformers: logits parity per
config option, patched edges against hand-written PyTorch hooks (Phi and
GPT-J run attention and the MLP on one shared LayerNorm; GPT-J's
interleaved rotary pairs are reordered; Gemma's norms and embedding carry
folded factors), and ACDC's batched decisions against the sequential loop."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import CircuitGraph
from acdc_jax.errors import CheckpointError, ConfigError
from acdc_jax.tasks import prompt_task

from .helpers import (assert_all_ones_and_zeros, assert_cut_matches, edit_config, logits_gap, random_hf_llama,
                      random_hf_parallel, record_senders)
from .test_batched_equals_sequential import _same
from .test_llama import torch_patched_logits

VOCAB = 61
CASES = {
    "phi": dict(model_type="phi"),
    "phi-gqa-tied-gelu": dict(model_type="phi", num_key_value_heads=2, tie_word_embeddings=True, hidden_act="gelu"),
    "phi-full-rotary-scaled": dict(model_type="phi", rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 300.0, "partial_rotary_factor": 1.0}),
    "gptj": dict(model_type="gptj"),
    "gptj-full-rotary-tied": dict(model_type="gptj", rotary_dim=8, tie_word_embeddings=True),
    "gemma-mqa": dict(model_type="gemma", n_kv=1, head_dim=12),
    "gemma-bias-legacy-gelu": dict(model_type="gemma", n_kv=4, attention_bias=True, hidden_act="gelu"),
}


def _random(tmp_path, case, **kw):
    options = {**CASES[case], **kw}
    make = random_hf_llama if options["model_type"] == "gemma" else random_hf_parallel
    return make(tmp_path, name=case, **options)


def _tokens(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pt, model = _random(tmp_path, case)
    # about 1e-6 measured; GPT-J's pairs left interleaved, or Gemma's norms without their 1 + w,
    # are off by 0.3 and 4
    assert logits_gap(model, pt, 20, VOCAB) <= 1e-5
    assert model.config.parallel_attn_mlp == (not case.startswith("gemma"))


@pytest.mark.parametrize("case,change,error,words", [
    ("phi", dict(qk_layernorm=True), ConfigError, "qk_layernorm"),
    ("phi", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}), ConfigError,
     "attention_factor with partial rotary"),
    ("phi", dict(hidden_act="tanh"), ConfigError, "activation 'tanh'"),
    ("gptj", dict(rotary_dim=None), ConfigError, "GPT-J needs a rotary_dim"),
    ("gptj", dict(use_qk_norm=True), ConfigError, r"Unsupported config field\(s\) \['use_qk_norm'\]"),
    ("gemma-mqa", dict(use_bidirectional_attention=True), ConfigError, "use_bidirectional_attention"),
    ("gemma-mqa", dict(hidden_act="silu"), ConfigError, "hidden_act 'silu'"),
    ("gptj", dict(n_layer=3), CheckpointError, r"Missing tensor 'transformer.h.2.attn.q_proj.weight'"),
])
def test_bad_configs_are_refused_by_name(tmp_path, case, change, error, words):
    _random(tmp_path, case)
    edit_config(tmp_path / case, change)
    with pytest.raises(error, match=words):
        converters.convert(tmp_path / case)


def test_each_converter_refuses_the_other_family(tmp_path):
    from safetensors.numpy import load_file

    _random(tmp_path, "phi")
    config = json.loads((tmp_path / "phi" / "config.json").read_text())
    with pytest.raises(ConfigError, match="model_type 'phi' is not 'gptj'"):
        converters.from_hf_gptj(load_file(tmp_path / "phi" / "model.safetensors"), config)


# --- the edge-decomposed forward ----------------------------------------------

FAMILIES = ("phi", "gptj", "gemma-mqa")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    pt, model = _random(tmp_path_factory.mktemp(request.param), request.param, n_layers=3, seed=1, scale=0.2)
    return request.param, pt, model


def _modules(case, pt):
    """(layers, attention output projection, q/k/v projection, the norm the
    MLP reads through, final norm, embedding) of an HF Phi or GPT-J."""
    if case == "gptj":
        return (pt.transformer.h, lambda b: b.attn.out_proj, lambda b, x: getattr(b.attn, f"{x}_proj"),
                lambda b: b.ln_1, pt.transformer.ln_f, pt.transformer.wte)
    return (pt.model.layers, lambda b: b.self_attn.dense, lambda b, x: getattr(b.self_attn, f"{x}_proj"),
            lambda b: b.input_layernorm, pt.model.final_layernorm, pt.model.embed_tokens)


def _torch_patched_logits(case, pt, clean, corrupt, edge):
    """One edge cut by hand with forward hooks on HF Phi or GPT-J, whose MLP
    reads the shared norm of the layer's input (Gemma's, a Llama-family
    model, is cut by the Llama tests' reference)."""
    import torch

    layers, out_proj, proj, mlp_norm, final_norm, embed = _modules(case, pt)
    model_cfg = pt.config
    H = getattr(model_cfg, "num_attention_heads", None) or model_cfg.n_head
    dh = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // H

    def record(tokens):
        return record_senders(pt, tokens, layers, H, dh, out_proj, lambda W, rows: W[:, rows].T, embed)

    clean_t = torch.tensor(np.asarray(clean))
    a_clean, a_corr = record(clean_t), record(torch.tensor(np.asarray(corrupt)))
    sender, receiver = edge
    delta = a_clean[sender] - a_corr[sender]
    if receiver[0] in ("q", "k", "v"):
        letter, l, h = receiver
        blk = layers[l]
        attn_norm = blk.ln_1 if case == "gptj" else blk.input_layernorm
        def qkv_hook(mod, args, out):
            new = torch.nn.functional.linear(attn_norm(a_clean[("resid", l)] - delta), mod.weight, mod.bias)
            out = out.clone()
            out[..., h * dh:(h + 1) * dh] = new[..., h * dh:(h + 1) * dh]
            return out
        hook = proj(blk, letter).register_forward_hook(qkv_hook)
    elif receiver[0] == "mlp_in":
        l = receiver[1]
        hook = layers[l].mlp.register_forward_pre_hook(lambda m, a: (mlp_norm(layers[l])(a_clean[("resid", l)] - delta),))
    else:
        hook = final_norm.register_forward_pre_hook(lambda m, a: (a[0] - delta,))
    with torch.no_grad():
        out = pt(clean_t).logits.numpy()
    hook.remove()
    return out


EDGES = {  # names cut together: (sender, receiver) for the hook reference
    ("blocks.0.hook_resid_pre->blocks.1.hook_q_input[3]",): (("embed",), ("q", 1, 3)),
    ("blocks.0.attn.hook_result[1]->blocks.2.hook_k_input[2]",): (("head", 0, 1), ("k", 2, 2)),
    ("blocks.0.hook_mlp_out->blocks.1.hook_v_input[0]",): (("mlp", 0), ("v", 1, 0)),
    ("blocks.1.attn.hook_result[2]->blocks.2.hook_mlp_in",): (("head", 1, 2), ("mlp_in", 2)),
    ("blocks.2.hook_mlp_out->blocks.2.hook_resid_post",): (("mlp", 2), ("logits",)),
}


def _names(case, names):
    """Gemma's fixture has one key/value head: a k or v cut reaches every query head."""
    if case != "gemma-mqa" or "_k_input" not in names[0] and "_v_input" not in names[0]:
        return names
    return tuple(names[0][:-2] + f"{h}]" for h in range(4))


@pytest.mark.parametrize("names", sorted(EDGES), ids=lambda n: n[0])
def test_patched_edges_match_pytorch_hooks(family, names):
    case, pt, model = family
    graph = CircuitGraph(model.config)
    clean, corrupt = _tokens(7), _tokens(8)
    sender, (kind, *where) = EDGES[names]
    if case == "gemma-mqa":  # one key/value head: a k or v cut is a cut of head 0 of the group
        receiver = (kind, where[0], 0) if kind in "kv" else (kind, *where)
        ref = torch_patched_logits(pt, clean, corrupt, ("residual", sender, receiver))
    else:
        ref = _torch_patched_logits(case, pt, clean, corrupt, (sender, (kind, *where)))
    assert_cut_matches(pt, model, graph, _names(case, names), clean, corrupt, ref)


def test_all_ones_is_the_plain_forward_and_all_zeros_the_corrupted_run(family):
    _, _, model = family
    graph = CircuitGraph(model.config)
    assert_all_ones_and_zeros(model, graph, _tokens(0), _tokens(1))


@pytest.mark.slow  # 7-10 s each; the quick suite checks these model features on GPT-NeoX and Llama
def test_batched_acdc_decides_like_the_sequential_loop(family):
    _, _, model = family
    rng = np.random.default_rng(3)
    task = prompt_task(rng.integers(0, VOCAB, (6, 8)).tolist(), rng.integers(0, VOCAB, (6, 8)).tolist(),
                       position=[5, 7], name="random-parallel")
    circuit = _same(model, task, 1e-2)
    assert 0 < len(circuit.edges) < CircuitGraph(model.config).n_edges

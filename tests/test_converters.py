"""Logits parity between each converter's output and the model it came from."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from acdc_jax import load, save
from acdc_jax.errors import ConfigError
from converters.transformer_lens import from_transformer_lens, to_transformer_lens

from .helpers import random_hf_gpt2, torch_logits

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("tied", [True, False])
def test_hf_gpt2_safetensors_parity(tmp_path, tied):
    pt, model = random_hf_gpt2(tmp_path, tied=tied)
    tokens = np.random.default_rng(0).integers(0, 61, (3, 20))
    err = np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max()
    assert err <= 1e-4


@pytest.mark.parametrize("extra", [dict(activation_function="gelu"), dict(activation_function="relu"),
                                   dict(activation_function="gelu_pytorch_tanh"), dict(scale_attn_weights=False),
                                   dict(n_inner=24, layer_norm_epsilon=1e-3)])
def test_hf_gpt2_config_variants_parity(tmp_path, extra):
    """Each GPT-2 config option the converter accepts is computed as transformers computes it."""
    pt, model = random_hf_gpt2(tmp_path, tied=False, seed=5, scale=0.5, **extra)
    tokens = np.random.default_rng(2).integers(0, 61, (2, 16))
    # 5e-6 to 1e-5 measured; computing any of these options the default way is off by 1e-3 or more
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 5e-5


def test_hf_gpt2_pytorch_bin_parity(tmp_path):
    import torch

    pt, _ = random_hf_gpt2(tmp_path, tied=False, seed=3)
    d = tmp_path / "bin"
    d.mkdir()
    pt.config.to_json_file(d / "config.json")
    torch.save(pt.state_dict(), d / "pytorch_model.bin")
    model = converters.convert(d)
    tokens = np.random.default_rng(1).integers(0, 61, (2, 24))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 1e-4


def test_a_live_pytorch_model_converts_as_it_is(tmp_path):
    """The numpy-in converters also take what a researcher has in hand: a
    torch state dict, bf16 included (numpy has no bfloat16: it raised a
    TypeError), and ``model.config`` itself (a config object was iterated
    for private attributes and refused)."""
    import torch

    from .helpers import random_hf_llama

    pt, from_files = random_hf_gpt2(tmp_path, tied=False, seed=3)
    tokens = np.random.default_rng(1).integers(0, 61, (2, 24))
    live = converters.from_hf_gpt2(pt.state_dict(), pt.config)
    assert np.abs(np.asarray(live(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 1e-4
    llama, _ = random_hf_llama(tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in llama.state_dict().items()}
    widened = {k: v.float().numpy() for k, v in state.items()}  # widened by PyTorch: the reference values
    for a, b in zip(jax.tree_util.tree_leaves(converters.from_hf_llama(state, llama.config)),
                    jax.tree_util.tree_leaves(converters.from_hf_llama(widened, llama.config.to_dict()))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="A config must be a dict .* got list"):
        converters.from_hf_gpt2(pt.state_dict(), [1])


def test_flax_msgpack_parity():
    # Both files were written by Hugging Face from the same model (see make_gpt2_flax_fixture.py).
    from transformers import GPT2LMHeadModel

    src = DATA / "gpt2_flax_tiny"
    assert converters.detect_format(src / "flax_model.msgpack") == "flax-gpt2"
    model = converters.convert(src / "flax_model.msgpack")
    pt = GPT2LMHeadModel.from_pretrained(src).eval()
    tokens = np.random.default_rng(2).integers(0, 64, (2, 32))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max() <= 1e-4


def test_a_directory_of_flax_weights_alone_is_read_as_flax(tmp_path):
    """A GPT-2 directory with flax_model.msgpack and no PyTorch weights is
    detected as Flax, and reads as the msgpack file named directly."""
    import shutil

    for name in ("config.json", "flax_model.msgpack"):
        shutil.copy(DATA / "gpt2_flax_tiny" / name, tmp_path / name)
    assert converters.detect_format(tmp_path) == "flax-gpt2"
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 8)))
    np.testing.assert_array_equal(np.asarray(converters.convert(tmp_path)(tokens)),
                                  np.asarray(converters.convert(DATA / "gpt2_flax_tiny" / "flax_model.msgpack")(tokens)))


def test_a_cache_entry_with_one_snapshot_and_no_ref_is_that_snapshot(tmp_path):
    entry = tmp_path / "models--org--tiny"
    (entry / "snapshots" / "abc123").mkdir(parents=True)
    assert converters.resolve(entry) == entry / "snapshots" / "abc123"
    assert converters.resolve(tmp_path) == tmp_path  # not a cache entry


def test_the_converter_command_names_a_bad_checkpoint(tmp_path, capsys):
    from converters.__main__ import main

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "error: Unsupported architecture model_type='bert'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- TransformerLens layout, against a reference forward written here ---------

def _tl_state_dict(cfg, rng):
    L, D, H, K, V = cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_vocab"]
    r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    sd = {"embed.W_E": r(V, D), "pos_embed.W_pos": r(cfg["n_ctx"], D), "unembed.W_U": r(D, V), "unembed.b_U": r(V)}
    for l in range(L):
        p = f"blocks.{l}."
        for n in "QKV":
            sd[p + f"attn.W_{n}"], sd[p + f"attn.b_{n}"] = r(H, D, K), r(H, K)
        sd[p + "attn.W_O"], sd[p + "attn.b_O"] = r(H, K, D), r(D)
        sd[p + "attn.mask"] = np.tril(np.ones((cfg["n_ctx"], cfg["n_ctx"]), bool))
        sd[p + "attn.IGNORE"] = np.array(-np.inf, np.float32)
        lns = ["ln1"] + ([] if cfg["attn_only"] else ["ln2"])
        if cfg["normalization_type"] == "LN":
            for ln in lns:
                sd[p + f"{ln}.w"], sd[p + f"{ln}.b"] = 1 + r(D), r(D)
        if not cfg["attn_only"]:
            M = cfg["d_mlp"]
            sd[p + "mlp.W_in"], sd[p + "mlp.b_in"], sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = r(D, M), r(M), r(M, D), r(D)
    if cfg["normalization_type"] == "LN":
        sd["ln_final.w"], sd["ln_final.b"] = 1 + r(D), r(D)
    return sd


def _reference_tl_forward(sd, cfg, tokens):
    """A from-scratch numpy forward in float64 following TransformerLens' definitions."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    n = tokens.shape[-1]

    def ln(x, key):
        if cfg["normalization_type"] is None:
            return x
        x = x - x.mean(-1, keepdims=True)
        x = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.get("eps", 1e-5))
        return x * sd[key + ".w"] + sd[key + ".b"] if cfg["normalization_type"] == "LN" else x

    def act(x):
        if cfg["act_fn"] == "relu":
            return np.maximum(x, 0)
        assert cfg["act_fn"] == "gelu_new"
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    shortformer = cfg.get("positional_embedding_type") == "shortformer"
    pos = sd["pos_embed.W_pos"][:n]
    resid = sd["embed.W_E"][tokens] + (0 if shortformer else pos)
    for l in range(cfg["n_layers"]):
        p = f"blocks.{l}."
        x = ln(resid, p + "ln1")
        xqk = x + pos if shortformer else x
        q = np.einsum("bpd,hdk->bphk", xqk, sd[p + "attn.W_Q"]) + sd[p + "attn.b_Q"]
        k = np.einsum("bpd,hdk->bphk", xqk, sd[p + "attn.W_K"]) + sd[p + "attn.b_K"]
        v = np.einsum("bpd,hdk->bphk", x, sd[p + "attn.W_V"]) + sd[p + "attn.b_V"]
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(cfg["d_head"])
        if cfg.get("attention_dir", "causal") == "causal":
            scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        pattern = scores / scores.sum(-1, keepdims=True)
        z = np.einsum("bhqs,bshk->bqhk", pattern, v)
        resid = resid + np.einsum("bqhk,hkd->bqd", z, sd[p + "attn.W_O"]) + sd[p + "attn.b_O"]
        if not cfg["attn_only"]:
            h = act(ln(resid, p + "ln2") @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"])
            resid = resid + h @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
    return ln(resid, "ln_final") @ sd["unembed.W_U"] + sd["unembed.b_U"]


TL_CONFIGS = {
    "attn-only-LN": dict(attn_only=True, normalization_type="LN", act_fn="gelu_new"),
    "gelu-LNPre": dict(attn_only=False, d_mlp=48, normalization_type="LNPre", act_fn="gelu_new"),
    "shortformer": dict(attn_only=True, normalization_type="LN", act_fn="gelu_new", positional_embedding_type="shortformer"),
    "relu-noLN-bidirectional": dict(attn_only=False, d_mlp=20, normalization_type=None, act_fn="relu", attention_dir="bidirectional"),
}


@pytest.mark.parametrize("name", sorted(TL_CONFIGS))
def test_transformer_lens_parity(name):
    cfg = dict(n_layers=3, d_model=24, n_heads=3, d_head=8, d_vocab=37, n_ctx=16, **TL_CONFIGS[name])
    rng = np.random.default_rng(4)
    sd = _tl_state_dict(cfg, rng)
    model = from_transformer_lens(sd, cfg)
    tokens = rng.integers(0, 37, (2, 16))
    ref = _reference_tl_forward(sd, cfg, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max() <= 1e-4
    # And back: our TransformerLens export converts to the same model.
    sd2, cfg2 = to_transformer_lens(model)
    again = from_transformer_lens(sd2, cfg2)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))))


@pytest.mark.parametrize("fields,words", [
    (dict(positional="none"), "without positional embeddings"),
    (dict(positional="rotary", normalization="RMS", gated_mlp=True, d_mlp=8), "rotary, RMSNorm, gated_mlp"),
    (dict(parallel_attn_mlp=True, d_mlp=8), "parallel_attn_mlp"),
    (dict(logit_softcap=30.0), "capped"),
])
def test_transformer_lens_export_refuses_what_it_cannot_write(fields, words):
    from acdc_jax import Transformer, TransformerConfig

    config = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6, **fields)
    with pytest.raises(ConfigError, match=words):
        to_transformer_lens(Transformer(config, key=jax.random.PRNGKey(0)))


def test_transformer_lens_file_and_neel_config(tmp_path):
    """A safetensors file with Neel Nanda's config.json keys converts through `convert`."""
    import json

    from safetensors.numpy import save_file

    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=29, n_ctx=12, attn_only=True,
               normalization_type="LN", act_fn="gelu_new", positional_embedding_type="shortformer")
    sd = _tl_state_dict(cfg, np.random.default_rng(7))
    neel = {k: v for k, v in cfg.items() if k not in ("normalization_type", "positional_embedding_type")}
    neel.update(normalization="LN", shortformer_pos=True, d_mlp=-1, tokenizer_name="NeelNanda/gpt-neox-tokenizer-digits")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items() if v.dtype != bool}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(neel))
    model = converters.convert(tmp_path)
    tokens = np.random.default_rng(8).integers(0, 29, (2, 12))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - _reference_tl_forward(sd, cfg, tokens)).max() <= 1e-4


def test_save_load_roundtrip_and_cli(tmp_path):
    from converters.__main__ import main

    pt, model = random_hf_gpt2(tmp_path, tied=True, seed=11)
    src = tmp_path / "gpt2_tied_11"
    assert main([str(src), "--out", str(tmp_path / "converted")]) == 0
    loaded = load(tmp_path / "converted")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 10)))
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))
    save(loaded, tmp_path / "again")
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "again")(tokens)), np.asarray(model(tokens)))
    # A converted model is a checkpoint like any other (--checkpoint DIR): found by its config.
    assert converters.detect_format(tmp_path / "converted") == "acdc-jax"
    np.testing.assert_array_equal(np.asarray(converters.convert(tmp_path / "converted")(tokens)),
                                  np.asarray(model(tokens)))


def test_bfloat16_and_float8_safetensors_are_read_exactly(tmp_path):
    """numpy has no bf16 or fp8: those tensors are widened to float32 exactly,
    the rest keep their dtype."""
    import torch
    from safetensors.torch import save_file

    from acdc_jax.checkpoint import read_safetensors

    tensors = {"bf16": torch.randn(3, 5, dtype=torch.bfloat16), "fp16": torch.randn(4, dtype=torch.float16),
               "fp8": torch.randn(2, 2).to(torch.float8_e4m3fn), "ids": torch.arange(6).reshape(2, 3)}
    save_file(tensors, tmp_path / "mixed.safetensors")
    read = read_safetensors(tmp_path / "mixed.safetensors")
    for name, t in tensors.items():
        want = t.float().numpy() if t.is_floating_point() and name != "fp16" else t.numpy()
        assert read[name].dtype == want.dtype and np.array_equal(read[name], want)


def test_a_bfloat16_hf_checkpoint_converts_to_its_own_logits(tmp_path):
    """Most recent checkpoints ship in bf16: the converted model computes in
    float32 on the same values as the bf16 weights widened in PyTorch."""
    import torch

    from .helpers import random_hf_llama

    pt, _ = random_hf_llama(tmp_path, name="f32")
    pt = pt.to(torch.bfloat16)
    pt.save_pretrained(tmp_path / "bf16")
    header = (tmp_path / "bf16" / "model.safetensors").read_bytes()[:4096]
    assert b'"BF16"' in header
    model = converters.convert(tmp_path / "bf16")
    # loaded in float32 by transformers (pt.float() would keep its bf16-rounded rotary frequencies)
    reference = type(pt).from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 61, (2, 12))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(reference, tokens)).max() <= 1e-5
    with torch.no_grad():
        assert all(torch.equal(p.float(), q) for p, q in zip(pt.parameters(), reference.parameters()))

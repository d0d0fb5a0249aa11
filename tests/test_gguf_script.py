"""`scripts/smollm2_from_gguf.py` on a GGUF file written here the way
llama.cpp writes one (query and key rows in its interleaved rotary order):
the directory it writes converts to a model with transformers' logits, and
its tokenizer encodes as the vocabulary and merges say."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import converters

from .helpers import random_hf_llama, torch_logits

gguf = pytest.importorskip("gguf")

SCRIPT = Path(__file__).parents[1] / "scripts" / "smollm2_from_gguf.py"


def _script():
    spec = importlib.util.spec_from_file_location("smollm2_from_gguf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf reorders each head's rows from
    transformers' rotate-half halves to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(pt, path, tokens, merges):
    cfg, sd = pt.config, {k: v.detach().numpy() for k, v in pt.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for l in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            t = sd[f"model.layers.{l}.{hf}.weight"]
            if ours == "attn_q":
                t = _llama_cpp_permute(t, cfg.num_attention_heads)
            elif ours == "attn_k":
                t = _llama_cpp_permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{l}.{ours}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_to_hf_directory_round_trip(tmp_path):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["Ġa", "Ġab", "<|endoftext|>"]
    merges = ["Ġ a", "Ġa b"]
    pt, _ = random_hf_llama(tmp_path, vocab=len(tokens), n_heads=4, n_kv=2, d_model=32, scale=0.2)
    _write_gguf(pt, tmp_path / "tiny.gguf", tokens, merges)
    _script().convert(tmp_path / "tiny.gguf", tmp_path / "hf")
    model = converters.convert(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, len(tokens), (2, 12))
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(pt, ids)).max() <= 1e-5

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    index = {t: i for i, t in enumerate(tokens)}
    assert tok.encode(" ab b").ids == [index["Ġab"], index["Ġ"], index["b"]]
    assert tok.encode("12").ids == [index["1"], index["2"]]
    assert tok.token_to_id("<|endoftext|>") == len(tokens) - 1
    assert tok.decode(tok.encode(" ab b").ids) == " ab b"

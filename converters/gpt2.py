"""Hugging Face GPT-2 (PyTorch state dict or Flax msgpack) -> acdc_jax.Transformer."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from acdc_jax.checkpoint import fill_model
from acdc_jax.errors import CheckpointError, ConfigError
from acdc_jax.model import Transformer, TransformerConfig

from ._source import HF_INERT, Source, check_fields, plain_config, require, stack

_ACT = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

_HANDLED = {
    "model_type", "n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner",
    "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "add_cross_attention", "reorder_and_upcast_attn", "n_ctx",
}
# Fields that do not change the eval-mode forward pass.
_IGNORED = HF_INERT | {
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj",
}  # dropout and the classification head


def gpt2_config(hf: Mapping[str, Any], origin: str = "config.json") -> tuple[TransformerConfig, bool]:
    """TransformerConfig and whether the unembedding is tied, from a GPT-2 config.json."""
    check_fields(hf, handled=_HANDLED, ignored=_IGNORED, origin=origin)
    model_type = require(hf, "model_type", origin)
    if model_type != "gpt2":
        raise ConfigError(
            f"{origin}: model_type {model_type!r} is not supported by the GPT-2 converter "
            "(supported: 'gpt2'; TransformerLens state dicts have their own converter)."
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag, False):
            raise ConfigError(f"{origin}: {flag}=true is not supported; the model would be computed wrongly.")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACT:
        raise ConfigError(f"{origin}: activation_function {act!r} is not supported; use one of {sorted(_ACT)}.")
    d_model = require(hf, "n_embd", origin)
    n_heads = require(hf, "n_head", origin)
    if d_model % n_heads:
        raise ConfigError(f"{origin}: n_embd={d_model} is not divisible by n_head={n_heads}.")
    n_ctx = hf.get("n_positions", hf.get("n_ctx"))
    if n_ctx is None:
        raise ConfigError(f"Config {origin} is missing the field 'n_positions'.")
    d_head = d_model // n_heads
    config = TransformerConfig(
        n_layers=require(hf, "n_layer", origin),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_vocab=require(hf, "vocab_size", origin),
        n_ctx=n_ctx,
        d_mlp=hf.get("n_inner") or 4 * d_model,
        act_fn=_ACT[act],
        normalization="LN",
        positional="learned",
        causal=True,
        ln_eps=hf.get("layer_norm_epsilon", 1e-5),
        attn_scale=float(np.sqrt(d_head)) if hf.get("scale_attn_weights", True) else 1.0,
    )
    return config, bool(hf.get("tie_word_embeddings", True))


def from_hf_gpt2(state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any], origin: str = "GPT-2 state dict") -> Transformer:
    """Convert a Hugging Face GPT-2 state dict (numpy arrays, PyTorch names and
    Conv1D layout ``[in, out]``) and its config.json into a Transformer."""
    config, tied = gpt2_config(plain_config(hf_config))
    prefixed = any(k.startswith("transformer.") for k in state_dict)
    src = Source(
        {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in state_dict.items()},
        origin,
    )
    L, D, H, K, M, V = (config.n_layers, config.d_model, config.n_heads, config.d_head, config.d_mlp, config.d_vocab)

    def heads_in(w: np.ndarray) -> np.ndarray:  # [D, H*K] -> [H, D, K]
        return w.reshape(D, H, K).transpose(1, 0, 2)

    per_layer: dict[str, list[np.ndarray]] = {}

    def put(name: str, value: np.ndarray) -> None:
        per_layer.setdefault(name, []).append(value)

    for l in range(L):
        p = f"h.{l}."
        # Causal-mask buffers saved by older versions of transformers.
        src.ignore([p + "attn.bias", p + "attn.masked_bias"])
        qkv_w = src.take(p + "attn.c_attn.weight", (D, 3 * D))
        qkv_b = src.take(p + "attn.c_attn.bias", (3 * D,))
        for i, letter in enumerate("QKV"):
            put(f"blocks.attn.W_{letter}", heads_in(qkv_w[:, i * D:(i + 1) * D]))
            put(f"blocks.attn.b_{letter}", qkv_b[i * D:(i + 1) * D].reshape(H, K))
        put("blocks.attn.W_O", src.take(p + "attn.c_proj.weight", (D, D)).reshape(H, K, D))
        put("blocks.attn.b_O", src.take(p + "attn.c_proj.bias", (D,)))
        put("blocks.ln1.w", src.take(p + "ln_1.weight", (D,)))
        put("blocks.ln1.b", src.take(p + "ln_1.bias", (D,)))
        put("blocks.ln2.w", src.take(p + "ln_2.weight", (D,)))
        put("blocks.ln2.b", src.take(p + "ln_2.bias", (D,)))
        put("blocks.mlp.W_in", src.take(p + "mlp.c_fc.weight", (D, M)))
        put("blocks.mlp.b_in", src.take(p + "mlp.c_fc.bias", (M,)))
        put("blocks.mlp.W_out", src.take(p + "mlp.c_proj.weight", (M, D)))
        put("blocks.mlp.b_out", src.take(p + "mlp.c_proj.bias", (D,)))

    arrays = {name: stack(values) for name, values in per_layer.items()}
    arrays["embed.W_E"] = src.take("wte.weight", (V, D))
    arrays["embed.W_pos"] = src.take("wpe.weight", (config.n_ctx, D))
    arrays["ln_final.w"] = src.take("ln_f.weight", (D,))
    arrays["ln_final.b"] = src.take("ln_f.bias", (D,))
    # lm_head sits outside "transformer." in GPT2LMHeadModel.
    head_key = "lm_head.weight"
    if tied:
        # As in transformers: a tied head is the token embedding, whatever lm_head holds.
        src.ignore([head_key])
        arrays["unembed.W_U"] = arrays["embed.W_E"].T.copy()
    else:
        if not src.has(head_key):
            hint = " (a GPT2Model without its LM head?)" if not prefixed else ""
            raise CheckpointError(
                f"Missing tensor {head_key!r} in {origin}: the config sets tie_word_embeddings=false{hint}."
            )
        arrays["unembed.W_U"] = src.take(head_key, (V, D)).T.copy()
    arrays["unembed.b_U"] = np.zeros((V,), np.float32)
    src.finish()
    return fill_model(config, arrays, source=origin)


def flax_gpt2_state_dict(params: Mapping[str, Any], origin: str = "flax_model.msgpack") -> dict[str, np.ndarray]:
    """Rename a Flax GPT-2 parameter tree (as written by transformers'
    FlaxGPT2LMHeadModel) to the PyTorch state-dict names and layout."""
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk(params, "")
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        name = key
        if name.startswith("params."):
            name = name[len("params."):]
        leaf = name.rsplit(".", 1)[-1]
        base = name.rsplit(".", 1)[0]
        if leaf == "embedding":
            out[base + ".weight"] = value
        elif leaf == "scale":
            out[base + ".weight"] = value
        elif leaf == "bias":
            out[base + ".bias"] = value
        elif leaf == "kernel":
            # FlaxConv1D stores [out, in]; torch Conv1D uses [in, out]. lm_head is
            # a Dense [in, out]; torch Linear uses [out, in]. Both are transposes.
            out[base + ".weight"] = value.T
        else:
            raise CheckpointError(f"Unexpected parameter {key!r} in {origin}.")
    return out


def read_flax_msgpack(path) -> dict[str, np.ndarray]:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(open(path, "rb").read())
    except Exception as e:
        raise CheckpointError(f"Cannot read {path} as a Flax msgpack checkpoint: {e}") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} does not hold a parameter tree.")
    return flax_gpt2_state_dict(tree, origin=str(path))

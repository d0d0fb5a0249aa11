"""tracr-compiled models -> acdc_jax.Transformer.

`from_tracr` takes the haiku parameter dict as numpy arrays plus the few facts
that are not in it (heads, key size, causality, the unembedding).
`tracr_model_arrays` pulls those out of a tracr ``AssembledTransformerModel``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from acdc_jax.checkpoint import fill_model
from acdc_jax.errors import ConfigError
from acdc_jax.model import Transformer, TransformerConfig

from ._source import Source, check_fields, require, stack

_META_FIELDS = {"n_heads", "d_head", "d_mlp", "causal", "layer_norm", "activation", "unembed"}


def from_tracr(params: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping[str, Any]) -> Transformer:
    """Convert tracr parameters. ``meta`` holds ``n_heads``, ``d_head`` (tracr's
    key_size), ``d_mlp``, ``causal``, ``layer_norm`` (must be False),
    ``activation`` (must be "relu") and ``unembed`` [d_model, d_out]: the
    projection of the residual stream onto the program's output space."""
    origin = "tracr meta"
    check_fields(meta, handled=_META_FIELDS, ignored=set(), origin=origin)
    if require(meta, "layer_norm", origin):
        raise ConfigError("tracr models compiled with layer_norm=True are not supported.")
    if require(meta, "activation", origin) != "relu":
        raise ConfigError(f"tracr activation {meta['activation']!r} is not supported (only relu).")
    flat = {f"{module}/{name}": np.asarray(v) for module, d in params.items() for name, v in d.items()}
    src = Source(flat, "tracr params")
    d_vocab, d_model = np.asarray(params["token_embed"]["embeddings"]).shape
    n_ctx = np.asarray(params["pos_embed"]["embeddings"]).shape[0]
    unembed = np.asarray(require(meta, "unembed", origin), np.float32)
    if unembed.ndim != 2 or unembed.shape[0] != d_model:
        raise ConfigError(f"tracr unembed must have shape [d_model={d_model}, d_out], got {unembed.shape}.")
    layers = sorted({int(k.split("/")[1].split("_")[1]) for k in flat if k.startswith("transformer/layer_")})
    if layers != list(range(len(layers))) or not layers:
        raise ConfigError(f"tracr params have layers {layers}; expected 0..n-1.")
    H, K, M = require(meta, "n_heads", origin), require(meta, "d_head", origin), require(meta, "d_mlp", origin)
    config = TransformerConfig(
        n_layers=len(layers), d_model=d_model, n_heads=H, d_head=K, d_vocab=d_vocab, n_ctx=n_ctx,
        d_mlp=M, d_vocab_out=unembed.shape[1], act_fn="relu", normalization="none",
        positional="learned", causal=bool(require(meta, "causal", origin)),
    )
    per_layer: dict[str, list[np.ndarray]] = {}
    for l in layers:
        a, m = f"transformer/layer_{l}/attn/", f"transformer/layer_{l}/mlp/"
        for letter, name in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = src.take(a + name + "/w", (d_model, H * K)).reshape(d_model, H, K).transpose(1, 0, 2)
            per_layer.setdefault(f"blocks.attn.W_{letter}", []).append(w)
            per_layer.setdefault(f"blocks.attn.b_{letter}", []).append(src.take(a + name + "/b", (H * K,)).reshape(H, K))
        per_layer.setdefault("blocks.attn.W_O", []).append(src.take(a + "linear/w", (H * K, d_model)).reshape(H, K, d_model))
        per_layer.setdefault("blocks.attn.b_O", []).append(src.take(a + "linear/b", (d_model,)))
        per_layer.setdefault("blocks.mlp.W_in", []).append(src.take(m + "linear_1/w", (d_model, M)))
        per_layer.setdefault("blocks.mlp.b_in", []).append(src.take(m + "linear_1/b", (M,)))
        per_layer.setdefault("blocks.mlp.W_out", []).append(src.take(m + "linear_2/w", (M, d_model)))
        per_layer.setdefault("blocks.mlp.b_out", []).append(src.take(m + "linear_2/b", (d_model,)))
    arrays = {name: stack(v) for name, v in per_layer.items()}
    arrays["embed.W_E"] = src.take("token_embed/embeddings", (d_vocab, d_model))
    arrays["embed.W_pos"] = src.take("pos_embed/embeddings", (n_ctx, d_model))
    arrays["unembed.W_U"] = unembed
    arrays["unembed.b_U"] = np.zeros((unembed.shape[1],), np.float32)
    src.finish()
    return fill_model(config, arrays, source="tracr params")


def tracr_model_arrays(assembled, output_label: str) -> tuple[dict, dict]:
    """(params, meta) for `from_tracr` from a tracr AssembledTransformerModel.

    ``output_label`` is the label of the program's output SOp (``program.label``);
    the unembedding projects onto its residual directions in the output
    encoder's order (a single direction for numerical outputs)."""
    import jax

    cfg = assembled.model_config
    if cfg.activation_function is not jax.nn.relu:
        raise ConfigError("Only tracr models with ReLU MLPs are supported.")
    labels = list(assembled.residual_labels)
    if assembled.output_encoder is not None and hasattr(assembled.output_encoder, "encoding_map"):
        ordered = sorted(assembled.output_encoder.encoding_map.items(), key=lambda kv: kv[1])
        out_labels = [f"{output_label}:{value}" for value, _ in ordered]
    else:
        out_labels = [output_label]
    missing = [lab for lab in out_labels if lab not in labels]
    if missing:
        raise ConfigError(f"Output directions {missing} are not in the tracr residual stream; check output_label.")
    unembed = np.zeros((len(labels), len(out_labels)), np.float32)
    for j, lab in enumerate(out_labels):
        unembed[labels.index(lab), j] = 1.0
    params = {m: {k: np.asarray(v) for k, v in d.items()} for m, d in assembled.params.items()}
    meta = {
        "n_heads": cfg.num_heads, "d_head": cfg.key_size, "d_mlp": cfg.mlp_hidden_size,
        "causal": bool(cfg.causal), "layer_norm": bool(cfg.layer_norm), "activation": "relu",
        "unembed": unembed,
    }
    return params, meta

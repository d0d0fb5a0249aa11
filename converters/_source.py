"""Bookkeeping shared by the converters: take each source tensor once, check
its shape, and refuse to finish while any tensor is left unused."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from acdc_jax.errors import CheckpointError, ConfigError

# Fields of every Hugging Face config.json that do not change the eval-mode
# forward pass (generation defaults, labels, bookkeeping, where remote code lives).
HF_INERT = frozenset({
    "_attn_implementation", "_attn_implementation_autoset", "_name_or_path", "architectures", "auto_map", "bad_words_ids", "bos_token_id",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "do_sample", "dtype",
    "early_stopping", "eos_token_id", "finetuning_task", "id2label", "initializer_range", "is_decoder",
    "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
    "num_beams", "num_return_sequences", "output_attentions", "output_hidden_states", "pad_token_id", "prefix",
    "problem_type", "pruned_heads", "repetition_penalty", "return_dict", "sep_token_id", "task_specific_params",
    "temperature", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript",
    "transformers_version", "use_bfloat16", "use_cache", "use_return_dict",
})

# transformers' activation names (ACT2FN) and ours; gelu_fast and gelu_pytorch_tanh compute the tanh GELU.
HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
          "relu": "relu", "silu": "silu"}



def _array(value) -> np.ndarray:
    """A tensor as a numpy array: numpy, JAX, or PyTorch (a state dict passed
    as it is; its bfloat16 and float16 are widened to float32, exactly)."""
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def plain_config(config) -> Mapping:
    """A config as the dict of its config.json: a mapping as it is, or a
    transformers or TransformerLens config object (``model.config``) through
    its ``to_dict()``."""
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ConfigError(f"A config must be a dict (a parsed config.json) or a config object with to_dict(), got "
                      f"{type(config).__name__}.")


class Source:
    """A checkpoint's named tensors, consumed one by one."""

    def __init__(self, tensors: Mapping[str, np.ndarray], origin: str):
        self.tensors = dict(tensors)
        self.origin = origin
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.tensors:
            raise CheckpointError(f"Missing tensor {key!r} in {self.origin} (expected shape {shape}).")
        value = _array(self.tensors[key])
        if value.shape != tuple(shape):
            raise CheckpointError(
                f"Tensor {key!r} in {self.origin} has shape {value.shape}, expected {tuple(shape)}. "
                "The config does not match the weights."
            )
        self.used.add(key)
        return value.astype(np.float32)

    def ignore(self, keys: Iterable[str]) -> None:
        """Mark non-parameter buffers (causal masks and the like) as handled."""
        self.used.update(k for k in keys if k in self.tensors)

    def finish(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            shown = unused[:8] + (["..."] if len(unused) > 8 else [])
            raise CheckpointError(
                f"{len(unused)} tensor(s) in {self.origin} were not used: {shown}. "
                "The checkpoint has parts this converter does not handle."
            )


def check_fields(config: Mapping, *, handled: set[str], ignored: set[str], origin: str) -> None:
    """Reject config fields that are neither converted nor known to be irrelevant."""
    unknown = sorted(set(config) - handled - ignored)
    if unknown:
        raise ConfigError(
            f"Unsupported config field(s) {unknown} in {origin}. This converter does not know "
            "how they change the forward pass."
        )


def require(config: Mapping, key: str, origin: str):
    if key not in config:
        raise ConfigError(f"Config {origin} is missing the field {key!r}.")
    return config[key]


def stack(per_layer: list[np.ndarray]) -> np.ndarray:
    return np.stack(per_layer, axis=0)

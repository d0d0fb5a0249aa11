"""Checkpoint converters: one function per source format, numpy arrays in,
``acdc_jax.Transformer`` out, plus `convert(src)` which detects the format of a
local checkpoint directory or file.

=================  ==========================================================
format             source
=================  ==========================================================
``hf-gpt2``        HF GPT-2 dir: config.json + model.safetensors or pytorch_model.bin
``flax-gpt2``      HF GPT-2 dir: config.json + flax_model.msgpack
``hf-llama``       HF Llama (also Llama 3.x rope scaling), Mistral, Qwen2, Qwen3, Gemma 1-3 (text), OLMo 1-3, SmolLM3, Granite or Phi-3 dir: config.json + model.safetensors
                   (or sharded, with model.safetensors.index.json) or pytorch_model.bin
``hf-gpt-neox``    HF GPT-NeoX (Pythia) dir, with the same weight files
``hf-phi``         HF Phi (phi-1, phi-1.5, phi-2) dir, with the same weight files
``hf-gptj``        HF GPT-J dir, with the same weight files
``transformer-lens``  TransformerLens state dict (.safetensors/.pt/.pth/.bin) + config.json
``acdc-jax``       a directory written by ``acdc_jax.save`` or this package's CLI
``tracr``          ``tracr:reverse`` or ``tracr:proportion``, compiled locally
=================  ==========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from acdc_jax.checkpoint import load, read_json, read_weights
from acdc_jax.errors import CheckpointError, ConfigError
from acdc_jax.model import Transformer

from .gpt2 import flax_gpt2_state_dict, from_hf_gpt2, gpt2_config, read_flax_msgpack
from .gpt_neox import from_hf_gpt_neox, gpt_neox_config
from .llama import MODEL_TYPES as LLAMA_TYPES
from .llama import from_hf_llama, llama_config
from .phi_gptj import from_hf_gptj, from_hf_phi, phi_gptj_config
from .tracr import from_tracr, tracr_model_arrays
from .transformer_lens import from_transformer_lens, tl_config, to_transformer_lens

__all__ = [
    "FORMATS", "convert", "detect_format", "resolve", "from_hf_gpt2", "flax_gpt2_state_dict", "from_hf_llama", "llama_config",
    "from_hf_gpt_neox", "gpt_neox_config", "from_hf_phi", "from_hf_gptj", "phi_gptj_config",
    "from_transformer_lens",
    "from_tracr", "tracr_model_arrays", "gpt2_config", "tl_config", "to_transformer_lens",
]

_TL_WEIGHTS = ("model.safetensors", "model.pth", "model.pt", "pytorch_model.bin", "model_final.pth")


def _config_dir(src: Path) -> tuple[Path, Path | None]:
    """(directory holding config.json, explicit weights file or None)."""
    if src.is_file():
        return src.parent, src
    if src.is_dir():
        return src, None
    raise CheckpointError(f"{src} does not exist.")


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _hf_weights(src: Path) -> tuple[dict, dict, str]:
    """(config.json, state dict, where the weights came from) of an HF directory."""
    directory, weights = _config_dir(src)
    cfg = read_json(directory / "config.json")
    if weights is None:
        found = [directory / n for n in _HF_WEIGHTS if (directory / n).is_file()]
        if not found:
            raise CheckpointError(f"No {', '.join(_HF_WEIGHTS)} in {directory}.")
        weights = found[0]
    if weights.name.endswith(".index.json"):
        return cfg, _read_shards(weights), str(weights)
    return cfg, read_weights(weights), str(weights)


def _read_shards(index: Path) -> dict:
    """The tensors of a sharded safetensors checkpoint, checked against its index."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; it is not a sharded checkpoint index.")
    tensors: dict = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_weights(index.parent / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index} lists tensor(s) its shards do not hold: {missing[:8]}. A shard is stale or truncated.")
    return tensors


def _hf(convert_fn: Callable) -> Callable[[Path], Transformer]:
    def run(src: Path) -> Transformer:
        cfg, tensors, origin = _hf_weights(src)
        return convert_fn(tensors, cfg, origin=origin)
    return run


def _flax_gpt2(src: Path) -> Transformer:
    directory, weights = _config_dir(src)
    weights = weights or directory / "flax_model.msgpack"
    if not weights.is_file():
        raise CheckpointError(f"No flax_model.msgpack in {directory}.")
    return from_hf_gpt2(read_flax_msgpack(weights), read_json(directory / "config.json"), origin=str(weights))


def _transformer_lens(src: Path) -> Transformer:
    directory, weights = _config_dir(src)
    if weights is None:
        found = [directory / n for n in _TL_WEIGHTS if (directory / n).is_file()]
        if not found:
            raise CheckpointError(f"No TransformerLens weights ({', '.join(_TL_WEIGHTS)}) in {directory}.")
        weights = found[0]
    return from_transformer_lens(read_weights(weights), read_json(directory / "config.json"), origin=str(weights))


def _acdc_jax(src: Path) -> Transformer:
    return load(_config_dir(src)[0])


def _tracr(src: Path) -> Transformer:
    from acdc_jax.tasks.tracr_programs import compile_tracr_model

    name = str(src).split(":", 1)[1]
    return compile_tracr_model(name)


FORMATS: dict[str, Callable[[Path], Transformer]] = {
    "hf-gpt2": _hf(from_hf_gpt2),
    "flax-gpt2": _flax_gpt2,
    "hf-llama": _hf(from_hf_llama),
    "hf-gpt-neox": _hf(from_hf_gpt_neox),
    "hf-phi": _hf(from_hf_phi),
    "hf-gptj": _hf(from_hf_gptj),
    "transformer-lens": _transformer_lens,
    "acdc-jax": _acdc_jax,
    "tracr": _tracr,
}


def detect_format(src: str | Path) -> str:
    if str(src).startswith("tracr:"):
        return "tracr"
    src = Path(src)
    directory, weights = _config_dir(src)
    cfg = read_json(directory / "config.json")
    if cfg.get("format") == "acdc-jax":
        return "acdc-jax"
    if "model_type" in cfg:
        if cfg["model_type"] in LLAMA_TYPES:
            return "hf-llama"
        named = {"gpt_neox": "hf-gpt-neox", "phi": "hf-phi", "gptj": "hf-gptj"}
        if cfg["model_type"] in named:
            return named[cfg["model_type"]]
        if cfg["model_type"] != "gpt2":
            raise ConfigError(
                f"Unsupported architecture model_type={cfg['model_type']!r} in {directory / 'config.json'}; "
                f"supported: gpt2, {', '.join(LLAMA_TYPES)}, {', '.join(named)} (HF), TransformerLens state dicts, "
                "tracr."
            )
        if weights is not None:
            return "flax-gpt2" if weights.suffix == ".msgpack" else "hf-gpt2"
        if any((directory / n).is_file() for n in _HF_WEIGHTS):
            return "hf-gpt2"
        if (directory / "flax_model.msgpack").is_file():
            return "flax-gpt2"
        raise CheckpointError(f"No GPT-2 weights ({', '.join(_HF_WEIGHTS)}, flax_model.msgpack) in {directory}.")
    if "n_layers" in cfg and "d_model" in cfg:
        return "transformer-lens"
    raise ConfigError(
        f"Cannot tell the checkpoint format of {src} from {directory / 'config.json'}: "
        "expected an HF config (model_type) or a TransformerLens config (n_layers, d_model). "
        "Pass --format explicitly."
    )


def resolve(src: str | Path) -> Path:
    """A Hugging Face hub cache entry (``.../hub/models--org--name``, as left
    by an earlier download) is the snapshot its ``refs/main`` names, or its
    only snapshot; any other path is itself. Nothing is downloaded."""
    src = Path(src)
    if not (src.is_dir() and src.name.startswith("models--") and (src / "snapshots").is_dir()):
        return src
    snapshots = sorted(p.name for p in (src / "snapshots").iterdir() if p.is_dir())
    ref = src / "refs" / "main"
    if ref.is_file() and ref.read_text().strip() in snapshots:
        return src / "snapshots" / ref.read_text().strip()
    if len(snapshots) == 1:
        return src / "snapshots" / snapshots[0]
    raise CheckpointError(
        f"{src} is a Hugging Face cache entry with {len(snapshots)} snapshots {snapshots[:4]} and no refs/main "
        "naming one of them; pass the snapshot directory itself."
    )


def convert(src: str | Path, format: str | None = None) -> Transformer:
    """Load and convert a local checkpoint (or a Hugging Face cache entry,
    see `resolve`) into an ``acdc_jax.Transformer``."""
    if not str(src).startswith("tracr:"):
        src = resolve(src)
    format = format or detect_format(src)
    if format not in FORMATS:
        raise ConfigError(f"Unknown format {format!r}; choose from {sorted(FORMATS)}.")
    return FORMATS[format](src if format == "tracr" else Path(src))

"""Checkpoint converters: one function per source format, numpy arrays in,
``acdc_jax.Transformer`` out, plus `convert(src)` which detects the format of a
local checkpoint directory or file.

=================  ==========================================================
format             source
=================  ==========================================================
``hf-gpt2``        HF GPT-2 dir: config.json + model.safetensors or pytorch_model.bin
``flax-gpt2``      HF GPT-2 dir: config.json + flax_model.msgpack
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
from .tracr import from_tracr, tracr_model_arrays
from .transformer_lens import from_transformer_lens, tl_config, to_transformer_lens

__all__ = [
    "FORMATS", "convert", "detect_format", "from_hf_gpt2", "flax_gpt2_state_dict", "from_transformer_lens",
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


def _hf_gpt2(src: Path) -> Transformer:
    directory, weights = _config_dir(src)
    cfg = read_json(directory / "config.json")
    if weights is None:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (directory / name).is_file():
                weights = directory / name
                break
        else:
            raise CheckpointError(f"No model.safetensors or pytorch_model.bin in {directory}.")
    return from_hf_gpt2(read_weights(weights), cfg, origin=str(weights))


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
    "hf-gpt2": _hf_gpt2,
    "flax-gpt2": _flax_gpt2,
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
        if cfg["model_type"] != "gpt2":
            raise ConfigError(
                f"Unsupported architecture model_type={cfg['model_type']!r} in {directory / 'config.json'}; "
                f"supported: gpt2 (HF), TransformerLens state dicts, tracr."
            )
        if weights is not None:
            return "flax-gpt2" if weights.suffix == ".msgpack" else "hf-gpt2"
        if any((directory / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            return "hf-gpt2"
        if (directory / "flax_model.msgpack").is_file():
            return "flax-gpt2"
        raise CheckpointError(f"No GPT-2 weights (model.safetensors, pytorch_model.bin, flax_model.msgpack) in {directory}.")
    if "n_layers" in cfg and "d_model" in cfg:
        return "transformer-lens"
    raise ConfigError(
        f"Cannot tell the checkpoint format of {src} from {directory / 'config.json'}: "
        "expected an HF config (model_type) or a TransformerLens config (n_layers, d_model). "
        "Pass --format explicitly."
    )


def convert(src: str | Path, format: str | None = None) -> Transformer:
    """Load and convert a local checkpoint into an ``acdc_jax.Transformer``."""
    format = format or detect_format(src)
    if format not in FORMATS:
        raise ConfigError(f"Unknown format {format!r}; choose from {sorted(FORMATS)}.")
    return FORMATS[format](src if format == "tracr" else Path(src))

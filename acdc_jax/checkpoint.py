"""Reading and writing model files, and filling a model from named arrays.

A saved model is a directory with ``config.json`` and ``model.safetensors``.
The tensor names are the model's own field paths (``blocks.attn.W_Q`` holds
all layers stacked). Nothing here unpickles data: torch files are read with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .errors import CheckpointError, ConfigError
from .model import Transformer, TransformerConfig

FORMAT = "acdc-jax"
FORMAT_VERSION = 1


def _path_name(path) -> str:
    return ".".join(getattr(k, "name", str(k)) for k in path)


def parameter_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array in a model with this config."""
    template = eqx.filter_eval_shape(Transformer, config, key=jr.PRNGKey(0))
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    return {_path_name(p): tuple(leaf.shape) for p, leaf in leaves}


def fill_model(config: TransformerConfig, arrays: Mapping[str, np.ndarray], source: str = "") -> Transformer:
    """Build a model whose every array comes from `arrays` (names as in
    `parameter_shapes`). Every array must be used and every shape must match."""
    template = eqx.filter_eval_shape(Transformer, config, key=jr.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    where = f" in {source}" if source else ""
    filled, used = [], set()
    for path, leaf in leaves:
        name = _path_name(path)
        if name not in arrays:
            raise CheckpointError(f"Missing tensor {name!r}{where} (expected shape {tuple(leaf.shape)}).")
        value = np.asarray(arrays[name])
        if value.shape != tuple(leaf.shape):
            raise CheckpointError(
                f"Tensor {name!r}{where} has shape {value.shape}, expected {tuple(leaf.shape)} "
                f"for config {config}."
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"Tensor {name!r}{where} has dtype {value.dtype}; expected floating point.")
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"Tensor {name!r}{where} contains NaN or infinite values.")
        filled.append(jnp.asarray(value, dtype=jnp.float32))
        used.add(name)
    extra = sorted(set(arrays) - used)
    if extra:
        raise CheckpointError(f"Unused tensor(s){where}: {extra}. The config may not match the weights.")
    return jax.tree_util.tree_unflatten(treedef, filled)


def model_arrays(model: Transformer) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    return {_path_name(p): np.asarray(leaf) for p, leaf in leaves}


def save(model: Transformer, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_arrays(model), str(directory / "model.safetensors"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load(directory: str | os.PathLike) -> Transformer:
    """Load a model written by `save` (or by ``python -m converters``)."""
    directory = Path(directory)
    meta = read_json(directory / "config.json")
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"{directory / 'config.json'} is not an acdc-jax model config (no \"format\": \"{FORMAT}\"). "
            "Convert the checkpoint first: python -m converters SRC --out DIR."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"Unsupported acdc-jax format_version {meta.get('format_version')!r}.")
    config = TransformerConfig.from_dict(meta["config"])
    arrays = read_safetensors(directory / "model.safetensors")
    return fill_model(config, arrays, source=str(directory / "model.safetensors"))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"No config file at {path}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


# Float types numpy has no name for (bf16 is how most recent checkpoints ship), read through
# ml_dtypes, which JAX depends on, and widened to float32 exactly.
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No weights file at {path}.")
    try:
        out, widened = {}, []
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() in _ML_DTYPES:
                    widened.append(name)
                else:
                    out[name] = f.get_tensor(name)
        out.update(_read_ml_dtypes(path, widened))
        return out
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"Cannot read {path}: {e}. The file is malformed or truncated; re-download or re-export it."
        ) from e


def _read_ml_dtypes(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors (bf16 or fp8, in a file safetensors has already
    checked) as float32, from the offsets in the file's header."""
    if not names:
        return {}
    import ml_dtypes

    with open(path, "rb") as f:
        size = int(np.frombuffer(f.read(8), "<u8")[0])
        header = json.loads(f.read(size))
    out = {}
    for name in names:
        info = header[name]
        start, end = info["data_offsets"]
        raw = np.fromfile(path, dtype=np.uint8, count=end - start, offset=8 + size + start)
        dtype = np.dtype(getattr(ml_dtypes, _ML_DTYPES[info["dtype"]]))
        out[name] = raw.view(dtype).reshape(info["shape"]).astype(np.float32)
    return out


def read_torch(path: Path) -> dict[str, np.ndarray]:
    """A torch state dict, loaded with weights_only=True (no arbitrary unpickling)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            f"Reading {path} needs PyTorch: pip install 'acdc-jax[torch]', or convert it to safetensors."
        ) from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Cannot read {path} as a torch state dict (weights_only=True): {e}") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"Entry {key!r} of {path} is a {type(value).__name__}, not a tensor.")
        out[key] = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return out


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Dispatch on the file suffix: .safetensors, or .bin/.pt/.pth (torch)."""
    suffix = Path(path).suffix
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".bin", ".pt", ".pth"):
        return read_torch(path)
    raise CheckpointError(f"Unknown weights file type {suffix!r} for {path}; use .safetensors, .bin, .pt or .pth.")

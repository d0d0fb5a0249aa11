"""Spreading candidate masks and prompts over devices.

A `Mesh` with two axes, ``candidates`` and ``prompts``, over every device the
process sees (all hosts' devices after ``jax.distributed.initialize()``). The
scorer places the prompt batch (tokens, cached deviations, corrupted
activations) along ``prompts`` and each batch of candidate masks along
``candidates``; XLA partitions the vmapped passes and inserts the one
reduction the metric needs (its mean over prompts). Every process runs the
same ACDC loop on the same replicated metrics, so all make the same decisions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import check_whole

AXES = ("candidates", "prompts")


def make_mesh(candidates: Optional[int] = None, prompts: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ``candidates x prompts`` mesh. By default every device goes to the
    candidate axis (no cross-device reduction, so results match one device
    bit for bit); ``prompts > 1`` also splits the prompt batch, which lowers
    the memory per device."""
    devices = list(jax.devices() if devices is None else devices)
    prompts = check_whole(prompts, "prompts (the prompt shards)", 1)
    if candidates is None:
        if len(devices) % prompts:
            raise ValueError(f"{len(devices)} devices cannot be split into {prompts} prompt shards.")
        candidates = len(devices) // prompts
    if candidates * prompts > len(devices):
        raise ValueError(f"A {candidates}x{prompts} mesh needs {candidates * prompts} devices; "
                         f"{len(devices)} are available ({jax.default_backend()}).")
    grid = np.asarray(devices[: candidates * prompts], dtype=object).reshape(candidates, prompts)
    return Mesh(grid, AXES)


def parse_mesh(spec, n_prompts: Optional[int] = None) -> Optional[Mesh]:
    """``None``/``"none"``: one device; ``"auto"``: all devices on candidates,
    or, given `n_prompts` (for methods with one mask at a time, which have no
    candidates to spread), as many prompt shards as divide both the device
    count and `n_prompts`, the rest of the devices holding copies (every
    device, so that every host takes part); ``"CxP"``: C candidate shards
    times P prompt shards; a mesh (anything but a string) as it is."""
    if not isinstance(spec, str):
        return spec
    if spec == "none":
        return None
    if spec == "auto" and n_prompts is not None:
        n = len(jax.devices())
        p = max(k for k in range(1, n + 1) if n % k == 0 and n_prompts % k == 0)
        return make_mesh(n // p, p)
    if spec == "auto":
        return make_mesh()
    try:
        c, p = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh must be 'auto', 'none' or 'CxP' such as '4x1', got {spec!r}.") from None
    return make_mesh(c, p)


def candidate_shards(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.shape["candidates"]


def prompt_shards(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.shape["prompts"]


def check_prompts(mesh: Optional[Mesh], n_prompts: int) -> None:
    if n_prompts % prompt_shards(mesh):
        raise ValueError(f"{n_prompts} prompts cannot be split evenly over {prompt_shards(mesh)} prompt shards; "
                         "use a prompt count that the shard count divides, or fewer prompt shards.")


def round_width(width: int, mesh: Optional[Mesh]) -> int:
    """`width` rounded up to a multiple of the candidate shards."""
    k = candidate_shards(mesh)
    return k * math.ceil(width / k)


def _put(x, mesh: Mesh, spec: P):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same values; each places its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_prompts(tree, mesh: Optional[Mesh]):
    """Arrays whose leading axis is the prompt batch, split along ``prompts``."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: _put(a, mesh, P("prompts")), tree)


def put_candidates(x, mesh: Optional[Mesh]):
    if mesh is None:
        return x
    return _put(x, mesh, P("candidates"))


def put_replicated(tree, mesh: Optional[Mesh]):
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: _put(a, mesh, P()), tree)


def fetch(x) -> np.ndarray:
    """A (possibly multi-host) array as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

"""Candidate circuits as cuts from one circuit.

ACDC's candidates (and exact patching's) are the current circuit with a few
edges cut. Kept as the base mask plus each candidate's cut edges, the host
work per pass (which heads and cached senders a pass changes, the padding to a
compiled shape) scales with the edges cut, not with candidates x edges, and
the dense masks are made where the pass runs (`on_device`).
"""

from __future__ import annotations

import functools
from functools import cached_property
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Candidates:
    """Candidate i is the circuit `base` [n_edges] with the edges `cuts[i]` set to 0."""

    def __init__(self, base: np.ndarray, cuts: Sequence[Sequence[int]]):
        self.base = np.array(base, np.float32)  # a copy: callers go on changing theirs
        if self.base.ndim != 1:
            raise ValueError(f"The base circuit must be one mask [n_edges], got shape {self.base.shape}.")
        if not len(cuts):
            raise ValueError("No candidates: give at least one set of cut edges.")
        self.counts = np.array([len(c) for c in cuts], np.int64)
        self.flat = np.fromiter((e for c in cuts for e in c), np.int64, int(self.counts.sum()))
        self._places = None
        n = self.base.shape[0]
        if self.flat.size and (self.flat.min() < 0 or self.flat.max() >= n):
            raise ValueError(f"Cut edge indices must lie in [0, {n}), got {self.flat.min()}..{self.flat.max()}.")

    @classmethod
    def from_masks(cls, masks: np.ndarray, base: Optional[np.ndarray] = None) -> "Candidates":
        """Candidates from dense masks [n, n_edges], each `base` (default: the
        largest value of each edge over the masks) with some edges set to 0."""
        masks = np.asarray(masks, np.float32)
        if masks.ndim != 2:
            raise ValueError(f"masks must have shape [n, n_edges], got {masks.shape}.")
        base = masks.max(axis=0) if base is None else np.asarray(base, np.float32)
        other = (masks != base[None]) & (masks != 0)
        if other.any():
            i, e = map(int, np.argwhere(other)[0])
            raise ValueError(f"Candidate {i} is not the base circuit with some edges cut: edge {e} is "
                             f"{masks[i, e]} there and {base[e]} in the base.")
        return cls(base, [np.flatnonzero((m != base) & (m == 0)) for m in masks])

    def __len__(self) -> int:
        return len(self.counts)

    @cached_property
    def changed(self) -> np.ndarray:
        """The edges that any candidate cuts and the base keeps, sorted."""
        cut = np.unique(self.flat)
        return cut[self.base[cut] != 0]

    def places(self, graph) -> tuple[np.ndarray, np.ndarray]:
        """(sender rows, columns) of the dense-mask places of the changed edges (`CircuitGraph.places`)."""
        if self._places is None or self._places[0] is not graph:
            self._places = (graph, graph.places(self.changed))
        return self._places[1]

    def _rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.counts)), self.counts)

    def masks(self, width: Optional[int] = None) -> np.ndarray:
        """Dense masks [width, n_edges] (default width: one per candidate; the
        last candidate repeats to fill a wider batch)."""
        n = len(self)
        width = n if width is None else width
        if width < n:
            raise ValueError(f"{n} candidates do not fit in a batch of {width}.")
        out = np.repeat(self.base[None], width, axis=0)
        out[self._rows(), self.flat] = 0.0
        out[n:] = out[n - 1]
        return out

    def on_device(self, width: int, dtype) -> jax.Array:
        """`masks(width)` in `dtype`, made on the default device from the base
        and the cut indices (padded to a power of two, so that few shapes are
        compiled): only those cross from the host."""
        n = len(self)
        if width < n:
            raise ValueError(f"{n} candidates do not fit in a batch of {width}.")
        size = max(8, 1 << int(self.flat.size - 1).bit_length()) if self.flat.size else 8
        rows = np.full(size, width, np.int32)  # past the last row: dropped
        cols = np.zeros(size, np.int32)
        rows[:self.flat.size], cols[:self.flat.size] = self._rows(), self.flat
        return _densify(self.base.astype(dtype), rows, cols, np.int32(n), width)


@functools.partial(jax.jit, static_argnames="width")
def _densify(base, rows, cols, n, width: int):
    masks = jnp.broadcast_to(base, (width,) + base.shape).at[rows, cols].set(0, mode="drop")
    return jnp.where((jnp.arange(width) < n)[:, None], masks, masks[n - 1])

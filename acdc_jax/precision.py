"""Matmul precision of a run: how float32 matrix products are multiplied.

JAX multiplies float32 matrices on NVIDIA tensor cores in TF32 by default;
PyTorch (and so the original ACDC) in full float32. Every method here runs
in full float32 unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import jax

PRECISIONS = ("float32", "tensorfloat32", "default")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}: 'float32' multiplies in full "
                         "float32; 'tensorfloat32' and 'default' let NVIDIA GPUs use TF32 tensor cores (faster, "
                         "10-bit mantissas).")
    return precision


def matmul_precision(precision: Optional[str]):
    """`jax.default_matmul_precision(precision)`; None leaves it as it is."""
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def takes_precision(method):
    """Give `method` a keyword ``precision="float32"`` (see `PRECISIONS`) under
    which the whole method runs, as `acdc` does."""

    @functools.wraps(method)
    def run(*args, precision: str = "float32", **kwargs):
        with matmul_precision(check_precision(precision)):
            return method(*args, **kwargs)

    signature = inspect.signature(method)
    extra = inspect.Parameter("precision", inspect.Parameter.KEYWORD_ONLY, default="float32", annotation=str)
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return run

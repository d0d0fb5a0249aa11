"""The two tracr programs of the ACDC paper, compiled locally with tracr-pypi."""

from __future__ import annotations

import functools

from ..errors import TaskError
from ..model import Transformer

# name -> (program builder, vocabulary); both compile with max_seq_len 5 and a BOS token.
PROGRAMS = ("reverse", "proportion")


def _program(name: str):
    from tracr.compiler import lib
    from tracr.rasp import rasp

    if name == "reverse":
        return lib.make_reverse(rasp.tokens), {1, 2, 3}
    if name == "proportion":
        return lib.make_frac_prevs(rasp.tokens == "x"), {"w", "x", "y", "z"}
    raise TaskError(f"Unknown tracr program {name!r}; choose from {PROGRAMS}.")


@functools.lru_cache(maxsize=None)
def compile_tracr(name: str):
    """(tracr AssembledTransformerModel, RASP program) for a named program."""
    try:
        from tracr.compiler import compiling
    except ImportError as e:
        raise TaskError("The tracr tasks need tracr: pip install '.[tracr]' in the acdc-jax checkout "
                        "(the extra installs tracr-pypi).") from e
    program, vocab = _program(name)
    assembled = compiling.compile_rasp_to_model(program, vocab=vocab, max_seq_len=5, compiler_bos="BOS")
    return assembled, program


@functools.lru_cache(maxsize=None)
def compile_tracr_model(name: str) -> Transformer:
    """The compiled program converted to an acdc_jax Transformer."""
    from converters.tracr import from_tracr, tracr_model_arrays

    assembled, program = compile_tracr(name)
    return from_tracr(*tracr_model_arrays(assembled, program.label))

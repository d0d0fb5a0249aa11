"""Small byte-level BPE tokenizers built here, for testing the language tasks
without GPT-2's files: every whitespace-split piece of the given texts is one
token, and numbers split as GPT-2 splits years (" 1732" -> " 17", "32")."""

from __future__ import annotations

from pathlib import Path


def build_tokenizer(texts, special="<|endoftext|>", path: Path | None = None):
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    pre = ByteLevel(add_prefix_space=False)
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        cur = token[0]
        for ch in token[1:]:
            if cur + ch not in vocab:
                vocab[cur + ch] = len(vocab)
                merges.append((cur, ch))
            cur += ch

    # Century prefixes and two-digit numbers first, so " 1732" merges to " 17" + "32".
    space = pre.pre_tokenize_str(" 1")[0][0][0]
    for c in range(10, 20):
        add(f"{space}{c}")
    for i in range(100):
        add(f"{i:02d}")
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if not piece.lstrip(space).isdigit():
                add(piece)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([special])
    if path is not None:
        tok.save(str(path))
    return tok

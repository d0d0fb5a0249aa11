"""Your own task: clean and corrupted prompts, the answers, a metric.

``prompt_task(clean, corrupted, tokenizer=..., answers=..., wrong_answers=...)``
builds a `Task` from texts (with a local tokenizer) or from token ids, and
``load_task(path)`` from a JSON file of the same fields, which is how the
CLI takes a task (``acdc-jax discover --task my_task.json``).

Metrics (minimised; by default at the last token; with several positions,
averaged over them, and the answers are given per position):

- ``kl``: KL divergence from the full model's next-token distribution (the default);
- ``logit_diff``: -(mean logit of the answers - mean logit of the wrong answers);
- ``prob_diff``: -(probability of the answers - probability of the wrong answers);
- ``nll``: -log(probability of the answers).

Each prompt's answers (and wrong answers) are one token or a list of
tokens (any of which counts); with several positions, a list with one such
entry per position. Texts must each be one token for the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import TaskError
from .base import Task, kl_divergence
from .text import as_tokenizer, bos_id, encode

Prompts = Union[Sequence[str], Sequence[Sequence[int]], np.ndarray]
FIELDS = ("name", "clean", "corrupted", "answers", "wrong_answers", "position", "bos", "metric", "corruption",
          "canonical", "description")


def _at_answers(values: jax.Array, task, key: str) -> tuple[jax.Array, jax.Array]:
    """values [batch, positions, vocab] -> [batch, positions, n] at the
    prompt's tokens of `key` for each position, and their mask. Labels of one
    position are [batch, n]."""
    ids, mask = task.labels[key], task.labels[key + "_mask"]
    if ids.ndim == 2:
        ids, mask = ids[:, None], mask[:, None]
    return jnp.take_along_axis(values, ids, axis=-1), mask


def logit_diff(logits, task):
    """-(mean logit of the answers - mean logit of the wrong answers), averaged over positions and prompts."""
    right, rm = _at_answers(logits, task, "answers")
    wrong, wm = _at_answers(logits, task, "wrong_answers")
    return -((right * rm).sum(-1) / rm.sum(-1) - (wrong * wm).sum(-1) / wm.sum(-1)).mean()


def prob_diff(logits, task):
    """-(P(answers) - P(wrong answers)), averaged over positions and prompts."""
    probs = jax.nn.softmax(logits, axis=-1)
    right, rm = _at_answers(probs, task, "answers")
    wrong, wm = _at_answers(probs, task, "wrong_answers")
    return -((right * rm).sum(-1) - (wrong * wm).sum(-1)).mean()


def nll(logits, task):
    """-log P(answers), averaged over positions and prompts."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    right, rm = _at_answers(logp, task, "answers")
    return -jax.nn.logsumexp(jnp.where(rm > 0, right, -jnp.inf), axis=-1).mean()


def _tokens(prompts: Prompts, tokenizer, bos: Optional[Union[str, int]], what: str) -> list[list[int]]:
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
            raise TaskError(f"{what}: token ids must be an int array [prompts, tokens], got {prompts.dtype} "
                            f"{prompts.shape}.")
        prompts = prompts.tolist()
    if isinstance(prompts, str) or not len(prompts):
        raise TaskError(f"{what}: give a list of prompts (texts or lists of token ids), got {prompts!r}.")
    texts = [isinstance(p, str) for p in prompts]
    if all(texts):
        if tokenizer is None:
            raise TaskError(f"{what} are texts: pass tokenizer= (a local tokenizer file or directory) to turn "
                            "them into tokens, or give token ids instead.")
        rows = [encode(tokenizer, p) for p in prompts]
    elif any(texts) or not all(_is_ids(p) for p in prompts):
        raise TaskError(f"{what}: every prompt must be a text, or every prompt a list of int token ids.")
    else:
        rows = [[int(t) for t in p] for p in prompts]
    start = [] if bos is None else [_bos(tokenizer, bos)]
    return [start + r for r in rows]


def _is_ids(p) -> bool:
    return isinstance(p, (list, tuple, np.ndarray)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in p)


def _bos(tokenizer, bos: Union[str, int]) -> int:
    if isinstance(bos, (int, np.integer)) and not isinstance(bos, bool):
        return int(bos)
    if not isinstance(bos, str):
        raise TaskError(f"bos {bos!r} is neither a text nor a token id.")
    if tokenizer is None:
        raise TaskError(f"bos {bos!r} is a text; pass tokenizer= or give its token id.")
    return bos_id(tokenizer, bos)


def _answer_ids(answers, n: int, tokenizer, what: str, order: Optional[list[int]] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt one token or a list of them -> padded ids [n, most] and
    their mask. With `order` (several positions), per prompt one such entry
    per position, in the order given -> [n, positions, most], the positions
    put in `order`."""
    if isinstance(answers, str) or not isinstance(answers, (list, tuple, np.ndarray)) or len(answers) != n:
        raise TaskError(f"{what}: give one entry per prompt ({n}), each a token or a list of tokens; got "
                        f"{answers!r:.200}.")
    if order is not None:
        for i, a in enumerate(answers):
            if isinstance(a, str) or not isinstance(a, (list, tuple, np.ndarray)) or len(a) != len(order):
                raise TaskError(f"{what}[{i}]: with {len(order)} positions, give one entry per position (each a "
                                f"token or a list of tokens), in the order of `position`; got {a!r:.200}.")
        per_position = [_answer_ids([a[j] for a in answers], n, tokenizer, f"{what}[:][{j}]") for j in order]
        most = max(ids.shape[1] for ids, _ in per_position)
        pad = lambda x, fill: np.concatenate([x, np.repeat(fill, most - x.shape[1], axis=1)], axis=1)
        return (np.stack([pad(ids, ids[:, :1]) for ids, _ in per_position], axis=1),
                np.stack([pad(mask, np.zeros_like(mask[:, :1])) for _, mask in per_position], axis=1))
    rows = []
    for i, a in enumerate(answers):
        items = list(a) if isinstance(a, (list, tuple, np.ndarray)) else [a]
        if not items:
            raise TaskError(f"{what}[{i}] is empty; give at least one token.")
        rows.append([_one_token(t, tokenizer, f"{what}[{i}]") for t in items])
    most = max(len(r) for r in rows)
    ids = np.array([r + [r[0]] * (most - len(r)) for r in rows], np.int32)
    mask = np.array([[1.0] * len(r) + [0.0] * (most - len(r)) for r in rows], np.float32)
    return ids, mask


def _one_token(t, tokenizer, what: str) -> int:
    if isinstance(t, bool) or not isinstance(t, (str, int, np.integer)):
        raise TaskError(f"{what}: {t!r} is neither a text nor a token id.")
    if not isinstance(t, str):
        return int(t)
    if tokenizer is None:
        raise TaskError(f"{what}: {t!r} is a text; pass tokenizer= or give its token id.")
    ids = encode(tokenizer, t)
    if len(ids) != 1:
        hint = f" (did you mean {' ' + t!r}, with a leading space?)" if not t.startswith(" ") else ""
        raise TaskError(f"{what}: {t!r} is {len(ids)} tokens for this tokenizer, not one{hint}.")
    return ids[0]


def prompt_task(clean: Prompts, corrupted: Optional[Prompts] = None, *, tokenizer=None, answers=None,
                wrong_answers=None, position: Union[int, Sequence[int]] = -1, bos: Optional[Union[str, int]] = None,
                metric: Optional[str] = None, corruption: Optional[str] = None,
                canonical: Optional[Sequence[str]] = None, name: str = "prompts", description: str = "") -> Task:
    """A Task from your prompts.

    clean, corrupted: texts (with `tokenizer`) or token ids, one corrupted
      prompt per clean one, of the same token length; without `corrupted`,
      give ``corruption="zeros"`` or ``"mean"``.
    tokenizer: a path (see `text.load_tokenizer`), a tokenizers.Tokenizer or a fast Hugging Face tokenizer.
    answers, wrong_answers: per prompt, the token (or list of tokens) the model
      should and should not predict at `position`; they add the metrics
      ``nll`` (answers) and ``logit_diff``, ``prob_diff`` (both).
    position: the token position the metrics read (negative counts from the
      end), or a list of positions for ``kl`` (averaged over them).
    bos: a token (text or id) put before every prompt, e.g. "<|endoftext|>" for GPT-2.
    metric: the default metric (``kl`` unless given).
    canonical: edge names of a known circuit, for ROC curves.
    """
    tok = as_tokenizer(tokenizer)
    for what, text in (("name", name), ("description", description)):
        if not isinstance(text, str):
            raise TaskError(f"The task's {what} must be a text, got {text!r}.")
    if canonical is not None and (isinstance(canonical, str) or not all(isinstance(e, str) for e in canonical)):
        raise TaskError(f"canonical must be a list of edge names, got {canonical!r:.120}.")
    if corrupted is None and corruption in (None, "prompts"):
        raise TaskError("There are no corrupted prompts: give corrupted= (one per clean prompt), or "
                        "corruption='zeros' or 'mean' to replace activations by zeros or their mean over the prompts.")
    clean_ids = _tokens(clean, tok, bos, "clean prompts")
    corrupt_ids = None if corrupted is None else _tokens(corrupted, tok, bos, "corrupted prompts")
    if corrupt_ids is not None and len(corrupt_ids) != len(clean_ids):
        raise TaskError(f"There are {len(clean_ids)} clean prompts but {len(corrupt_ids)} corrupted ones; give one "
                        "corrupted prompt per clean prompt.")
    length = len(clean_ids[0])
    for i in range(len(clean_ids)):
        for what, ids, source in (("clean", clean_ids, clean), ("corrupted", corrupt_ids, corrupted)):
            if ids is not None and len(ids[i]) != length:
                raise TaskError(
                    f"{what} prompt {i} ({source[i]!r:.120}) is {len(ids[i])} tokens but clean prompt 0 is {length}. "
                    "Every prompt, clean and corrupted, must have the same number of tokens; rephrase them or "
                    "use words that are single tokens."
                )
    positions = _positions(position, length)
    several = not isinstance(position, (int, np.integer)) and len(position) > 1
    order = _answer_order(position, length) if several and answers is not None else None
    metrics: dict[str, Any] = {"kl": kl_divergence}
    labels = {}
    if answers is not None:
        labels["answers"], labels["answers_mask"] = _answer_ids(answers, len(clean_ids), tok, "answers", order)
        metrics["nll"] = nll
    if wrong_answers is not None:
        if answers is None:
            raise TaskError("wrong_answers need answers too (the metrics compare the two).")
        labels["wrong_answers"], labels["wrong_answers_mask"] = _answer_ids(wrong_answers, len(clean_ids), tok,
                                                                            "wrong_answers", order)
        metrics.update(logit_diff=logit_diff, prob_diff=prob_diff)
    if metric is not None and metric not in metrics:
        need = " (it needs answers and wrong_answers)" if metric in ("logit_diff", "prob_diff") else (
            " (it needs answers)" if metric == "nll" else "")
        raise TaskError(f"metric {metric!r} is not available{need}; this task has {sorted(metrics)}.")
    return Task(
        name=name,
        clean=np.asarray(clean_ids, np.int32),
        corrupted=None if corrupt_ids is None else np.asarray(corrupt_ids, np.int32),
        positions=np.array(positions),
        metrics=metrics,
        default_metric=metric or "kl",
        labels=labels,
        vocab_labels=tuple(k for k in labels if not k.endswith("_mask")),
        canonical=None if canonical is None else frozenset(canonical),
        corruption=corruption or "prompts",
        description=description or f"{len(clean_ids)} prompts of {length} tokens; metrics at position(s) {positions}.",
    )


def _positions(position, length: int) -> list[int]:
    items = [position] if isinstance(position, (int, np.integer)) else position
    ok = isinstance(items, (list, tuple, np.ndarray)) and len(items) > 0 and all(
        isinstance(p, (int, np.integer)) and not isinstance(p, bool) and -length <= p < length for p in items)
    if not ok:
        raise TaskError(f"position {position!r} is outside prompts of {length} tokens (use 0..{length - 1}, a "
                        "negative position from the end, or a list of them).")
    return sorted({int(p) % length for p in items})


def _answer_order(position, length: int) -> list[int]:
    """For each sorted position, the index in `position` of its answers."""
    given = [int(p) % length for p in position]
    if len(set(given)) != len(given):
        raise TaskError(f"position {position!r} names a position twice; with answers, name each once.")
    return sorted(range(len(given)), key=lambda i: given[i])


def load_task(path: Union[str, Path], tokenizer=None) -> Task:
    """A Task from a JSON file with the fields of `prompt_task` (clean,
    corrupted, answers, wrong_answers, position, bos, metric, corruption,
    canonical, name, description); the name defaults to the file's stem."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise TaskError(f"No task file at {p}.") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"Cannot read the task file {p} as JSON: {e}") from e
    if not isinstance(spec, Mapping) or "clean" not in spec:
        raise TaskError(f"The task file {p} must hold a JSON object with at least \"clean\" (a list of prompts); "
                        f"the fields are {list(FIELDS)}.")
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise TaskError(f"The task file {p} has unknown field(s) {unknown}; the fields are {list(FIELDS)}.")
    kw = dict(spec)
    kw.setdefault("name", p.stem)
    try:
        return prompt_task(kw.pop("clean"), kw.pop("corrupted", None), tokenizer=tokenizer, **kw)
    except TaskError as e:
        raise TaskError(f"{p}: {e}") from e

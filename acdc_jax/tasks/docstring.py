"""Docstring (Heimersheim & Janiak 2023) on attn-only-4l, as in the ACDC paper.

A Python method with six parameters and a reST docstring that documents the
third and fourth; the model should name the fifth after the final ":param".
The corrupted prompt ("random_random") swaps the middle three parameters and
the documented ones for unrelated names. Metrics: "kl" (default) and
"logit_diff" = -(logit of the right name - the largest logit of the other
parameters). The canonical circuit is the paper's 37 edges over heads 0.5,
1.2, 1.4, 2.0, 3.0 and 3.6. Real results need the attn-only-4l weights (a
TransformerLens state dict) and their tokenizer, given as local paths.
"""

from __future__ import annotations

import numpy as np

from .base import Task, check_examples, kl_divergence, with_paper_circuit
from .text import as_tokenizer, bos_id, need, single_token, single_tokens, tokenize_batch

VARIABLES = (
    "data name file value test result line user key default request path output node item url model response "
    "text version function log string field start number values index error context image message check state "
    "row parser target array code table source config options status group content client filename results "
    "command base format color settings order count match title parent session token server host date mode "
    "project info page header option task shape port root label size event query"
).split()
NOUNS = (
    "price control action cost issue process position course type research subject age force order value act "
    "matter health street class mind condition paper bank section activity table building sense team student "
    "language town plan product practice evidence ground letter game food union role event land art support "
    "range stage trade voice club field history account material care manager record window light story"
).split()

# The paper's circuit, as (receiver, sender) TransformerLens names.
_H = "blocks.{}.attn.hook_result[{}]"
_EMBED = "blocks.0.hook_resid_pre"


def _canonical_pairs() -> list[tuple[str, str]]:
    pairs = [
        ("blocks.1.hook_v_input[4]", _H.format(0, 5)),
        ("blocks.0.attn.hook_v[5]", "blocks.0.hook_v_input[5]"),
        ("blocks.0.hook_v_input[5]", _EMBED),
        ("blocks.2.attn.hook_q[0]", "blocks.2.hook_q_input[0]"),
        ("blocks.2.hook_q_input[0]", _EMBED),
        ("blocks.2.hook_q_input[0]", _H.format(0, 5)),
        ("blocks.2.attn.hook_k[0]", "blocks.2.hook_k_input[0]"),
        ("blocks.2.hook_k_input[0]", _EMBED),
        ("blocks.2.hook_k_input[0]", _H.format(0, 5)),
        ("blocks.2.attn.hook_v[0]", "blocks.2.hook_v_input[0]"),
        ("blocks.2.hook_v_input[0]", _H.format(1, 4)),
        ("blocks.1.attn.hook_v[4]", "blocks.1.hook_v_input[4]"),
        ("blocks.1.hook_v_input[4]", _EMBED),
        ("blocks.1.attn.hook_q[2]", "blocks.1.hook_q_input[2]"),
        ("blocks.1.attn.hook_k[2]", "blocks.1.hook_k_input[2]"),
        ("blocks.1.hook_q_input[2]", _EMBED),
        ("blocks.1.hook_k_input[2]", _EMBED),
        ("blocks.1.hook_q_input[2]", _H.format(0, 5)),
        ("blocks.1.hook_k_input[2]", _H.format(0, 5)),
    ]
    for h in (0, 6):
        pairs += [
            ("blocks.3.hook_resid_post", _H.format(3, h)),
            (f"blocks.3.attn.hook_q[{h}]", f"blocks.3.hook_q_input[{h}]"),
            (f"blocks.3.hook_q_input[{h}]", _H.format(1, 4)),
            (f"blocks.3.attn.hook_v[{h}]", f"blocks.3.hook_v_input[{h}]"),
            (f"blocks.3.hook_v_input[{h}]", _EMBED),
            (f"blocks.3.hook_v_input[{h}]", _H.format(0, 5)),
            (f"blocks.3.attn.hook_k[{h}]", f"blocks.3.hook_k_input[{h}]"),
            (f"blocks.3.hook_k_input[{h}]", _H.format(2, 0)),
            (f"blocks.3.hook_k_input[{h}]", _H.format(1, 2)),
        ]
    return pairs


DOCSTRING_CANONICAL = frozenset(f"{sender}->{receiver}" for receiver, sender in _canonical_pairs())


def logit_diff(logits, task):
    """-(logit of the right parameter - the largest logit of the wrong ones), last position."""
    last = logits[:, -1]
    rows = np.arange(last.shape[0])
    right = last[rows, task.labels["answer"]]
    wrong = last[rows[:, None], task.labels["wrong"]].max(-1)
    return -(right - wrong).mean()


def _prompt(method: str, desc: list[str], def_args: list[str], doc_args: list[str], doc_desc: list[list[str]]) -> str:
    lines = [f"    :param {a}: {' '.join(d)}" for a, d in zip(doc_args, doc_desc)]
    body = "\n".join(lines)
    return f'\ndef {method}(self, {", ".join(def_args)}):\n    """{" ".join(desc)}\n\n{body}\n    :param'


def docstring_task(tokenizer, n_examples: int = 50, seed: int = 0, bos: str | None = "<|BOS|>") -> Task:
    check_examples("docstring", n_examples)
    tok = as_tokenizer(tokenizer)
    variables = need(single_tokens(tok, VARIABLES), 14, "variable names")
    nouns = need(single_tokens(tok, NOUNS, prefix=" "), 8, "nouns")
    rng = np.random.default_rng(seed)
    clean, corrupt, answer, wrong = [], [], [], []
    for _ in range(n_examples):
        method, *names = rng.choice(variables, 14, replace=False).tolist()
        prefix, matching, suffix = names[0:2], names[2:5], names[5:6]
        other_def, other_doc = names[6:9], names[9:11]
        desc = rng.choice(nouns, 3, replace=False).tolist()
        doc_desc = [rng.choice(nouns, 2, replace=False).tolist() for _ in range(2)]
        clean_def = prefix + matching + suffix
        clean.append(_prompt(method, desc, clean_def, matching[:2], doc_desc))
        corrupt.append(_prompt(method, desc, prefix + other_def + suffix, other_doc, doc_desc))
        answer.append(matching[2])
        wrong.append([a for a in clean_def if a != matching[2]])
    def ids(words):
        return [single_token(tok, " " + w) for w in words]

    b_id = bos_id(tok, bos)
    clean_ids = tokenize_batch(tok, clean, b_id, "docstring")
    return Task(
        name="docstring",
        clean=clean_ids,
        corrupted=tokenize_batch(tok, corrupt, b_id, "docstring corrupted"),
        positions=np.array([clean_ids.shape[1] - 1]),
        metrics={"kl": kl_divergence, "logit_diff": logit_diff},
        labels={"answer": np.asarray(ids(answer), np.int32), "wrong": np.asarray([ids(w) for w in wrong], np.int32)},
        vocab_labels=("answer", "wrong"),
        description="docstring parameter completion; KL or logit difference at the final position.",
    )


def docstring(model, tokenizer, n_examples: int = 50, seed: int = 0, bos: str | None = "<|BOS|>") -> Task:
    return with_paper_circuit(docstring_task(tokenizer, n_examples, seed, bos), model, "attn-only-4l", (4, 8, True),
                              lambda: DOCSTRING_CANONICAL)

"""Indirect object identification (Wang et al. 2022) on GPT-2 small, as in the
ACDC paper: one ABBA template, prompts cut before the indirect object, and a
corrupted ("ABC") prompt whose three name slots hold three other names.

Metrics: "kl" (default) and "logit_diff" = -(logit[IO] - logit[S]) at the last
position. The canonical circuit is the ACDC paper's: 26 heads in 7 classes;
non-circuit heads are removed entirely; MLPs keep their edges; circuit heads are
joined only along the class connections below. Real results need GPT-2 small
weights converted from a local checkpoint; tests use a random model of the
same shape.
"""

from __future__ import annotations

import numpy as np

from ..graph import CircuitGraph
from .base import Task, check_examples, kl_divergence, with_paper_circuit
from .text import GPT2_EOS, as_tokenizer, bos_id, need, single_token, single_tokens, tokenize_batch

TEMPLATE = "Then, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to"

NAMES = (
    "Mary John Tom James Dan Sid Martin Amy Lisa Michael Sarah Paul Mark Anna Kate Alex Jane Joe Emma Ben "
    "Jack Lucy David Laura Peter Ryan Alice Steve Rose Sam Emily Adam Chris Kelly Andrew Grace Eric Helen "
    "Kevin Maria Luke Anne Jason Claire Brian Julia Tim Susan Jacob Rachel"
).split()
PLACES = "store garden restaurant school hospital office station house park beach church library market cafe".split()
OBJECTS = "ring kiss bone basketball computer necklace drink snack apple book letter ball bottle cake".split()

CLASSES = {
    "name mover": [(9, 9), (10, 0), (9, 6)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative": [(10, 7), (11, 10)],
    "s2 inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}
# (sender class or INPUT, receiver class or OUTPUT, which of the receiver's inputs)
CONNECTIONS = [
    ("INPUT", "previous token", "qkv"), ("INPUT", "duplicate token", "qkv"), ("INPUT", "s2 inhibition", "q"),
    ("INPUT", "negative", "kv"), ("INPUT", "name mover", "kv"), ("INPUT", "backup name mover", "kv"),
    ("previous token", "induction", "kv"), ("induction", "s2 inhibition", "kv"),
    ("duplicate token", "s2 inhibition", "kv"), ("s2 inhibition", "negative", "q"),
    ("s2 inhibition", "name mover", "q"), ("s2 inhibition", "backup name mover", "q"),
    ("negative", "OUTPUT", ""), ("name mover", "OUTPUT", ""), ("backup name mover", "OUTPUT", ""),
]


def logit_diff(logits, task):
    """-(logit of the indirect object - logit of the subject), last position."""
    last = logits[:, -1]
    rows = np.arange(last.shape[0])
    return -(last[rows, task.labels["io"]] - last[rows, task.labels["s"]]).mean()


def ioi_task(tokenizer, n_examples: int = 100, seed: int = 0, bos: str | None = GPT2_EOS) -> Task:
    """IOI prompts for `tokenizer` (a path, or a tokenizers.Tokenizer)."""
    check_examples("ioi", n_examples)
    tok = as_tokenizer(tokenizer)
    names = need(single_tokens(tok, NAMES), 5, "names")
    places = need(single_tokens(tok, PLACES), 1, "places")
    objects = need(single_tokens(tok, OBJECTS), 1, "objects")
    rng = np.random.default_rng(seed)
    clean, corrupt, io, s = [], [], [], []
    for _ in range(n_examples):
        a, b, x, y, z = rng.choice(names, 5, replace=False)
        place, obj = rng.choice(places), rng.choice(objects)
        clean.append(TEMPLATE.format(A=a, B=b, PLACE=place, OBJECT=obj))
        # ABC: the IO, the first and the second subject slot each get another name.
        corrupt.append(f"Then, {x} and {y} went to the {place}. {z} gave a {obj} to")
        io.append(single_token(tok, " " + a))
        s.append(single_token(tok, " " + b))
    b_id = bos_id(tok, bos)
    clean_ids = tokenize_batch(tok, clean, b_id, "IOI")
    return Task(
        name="ioi",
        clean=clean_ids,
        corrupted=tokenize_batch(tok, corrupt, b_id, "IOI corrupted"),
        positions=np.array([clean_ids.shape[1] - 1]),
        metrics={"kl": kl_divergence, "logit_diff": logit_diff},
        labels={"io": np.asarray(io, np.int32), "s": np.asarray(s, np.int32)},
        vocab_labels=("io", "s"),
        description="IOI, ABBA template 1; KL or logit difference at the final position.",
    )


def _inputs(graph: CircuitGraph, heads, letters: str) -> list[str]:
    return [f"blocks.{l}.hook_{c}_input[{h}]" for l, h in heads for c in letters]


def ioi_canonical(graph: CircuitGraph) -> frozenset:
    """The ACDC paper's IOI circuit as edge names of `graph` (GPT-2 small, q/k/v split)."""
    L = graph.n_layers
    in_circuit = {lh for heads in CLASSES.values() for lh in heads}
    logits = f"blocks.{L - 1}.hook_resid_post"
    keep = set()
    for e in graph.edges:
        s, r = e.sender, e.receiver
        if e.kind == "qkv":
            if (s.layer, s.head) in in_circuit:
                keep.add(e.name)
            continue
        if s.kind == "head" and (s.layer, s.head) not in in_circuit:
            continue
        if r.kind in ("q", "k", "v") and (r.layer, r.head) not in in_circuit:
            continue
        # Circuit heads read no embedding or head directly, and write to the
        # logits only along the class connections added below.
        if r.kind in ("q", "k", "v") and s.kind in ("embed", "head"):
            continue
        if r.kind == "logits" and s.kind == "head":
            continue
        keep.add(e.name)

    def senders(cls):
        if cls == "INPUT":
            return [(-1, "blocks.0.hook_resid_pre")] + [(m, f"blocks.{m}.hook_mlp_out") for m in range(L)]
        return [(l, f"blocks.{l}.attn.hook_result[{h}]") for l, h in CLASSES[cls]]

    def receivers(cls, letters):
        if cls == "OUTPUT":
            return [(L + 1, logits)] + [(m, f"blocks.{m}.hook_mlp_in") for m in range(L)]
        return [(l, f"blocks.{l}.hook_{c}_input[{h}]") for l, h in CLASSES[cls] for c in letters]

    for src, dst, letters in CONNECTIONS:
        for l_from, sender in senders(src):
            for l_to, receiver in receivers(dst, letters):
                if l_to > l_from:
                    keep.add(f"{sender}->{receiver}")
    return frozenset(keep)


def ioi(model, tokenizer, n_examples: int = 100, seed: int = 0, bos: str | None = GPT2_EOS) -> Task:
    task = ioi_task(tokenizer, n_examples, seed, bos)
    return with_paper_circuit(task, model, "GPT-2 small", (12, 12, False), lambda: ioi_canonical(task.graph(model)))

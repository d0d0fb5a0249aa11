"""Greater-than (Hanna et al. 2023) on GPT-2 small, as in the ACDC paper.

"The {noun} lasted from the year 17YY to 17" -> years after YY. The
corrupted prompt replaces YY with "01". Metrics: "kl" (default) and
"prob_diff" = -(P(year > YY) - P(year <= YY)) over the two-digit year tokens.
Years are kept when " 17YY" tokenizes as [" 17", "YY"], for centuries 11-17.
As in the paper's code, prompts have no BOS token.
The canonical circuit is the ACDC paper's: heads 0.1, 0.3, 0.5, 5.5, 6.1,
6.9, 7.10, 8.11, 9.1 and MLPs 0-3 and 8-11, joined as below.
"""

from __future__ import annotations

import numpy as np

from ..errors import TaskError
from ..graph import CircuitGraph
from .base import Task, check_examples, kl_divergence, with_paper_circuit
from .text import as_tokenizer, bos_id, encode, need, single_token, single_tokens, tokenize_batch

TEMPLATE = "The {noun} lasted from the year {year} to {century}"
NOUNS = (
    "war siege reign trial journey project plan campaign program study treaty dispute conflict crisis "
    "expedition rebellion famine drought strike occupation revolution dynasty voyage tour"
).split()

GROUPS = {
    "0305": [(0, 3), (0, 5)],
    "01": [(0, 1)],
    "MEARLY": [(0, None), (1, None), (2, None), (3, None)],
    "AMID": [(5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)],
    "MLATE": [(8, None), (9, None), (10, None), (11, None)],
}
CONNECTED = [("01", "MEARLY"), ("01", "AMID"), ("0305", "AMID"), ("MEARLY", "AMID"), ("AMID", "MLATE")]


def prob_diff(logits, task):
    """-(P(year > YY) - P(year <= YY)) at the last position, over the 00..99 tokens."""
    import jax
    import jax.numpy as jnp

    probs = jax.nn.softmax(logits[:, -1], axis=-1)[:, task.labels["year_tokens"]]  # [batch, 100]
    later = jnp.arange(100)[None, :] > task.labels["yy"][:, None]
    return -jnp.where(later, probs, -probs).sum(-1).mean()


def _years(tok) -> list[str]:
    years = []
    for century in range(11, 18):
        ok = []
        for year in range(century * 100 + 2, century * 100 + 99):
            ids = encode(tok, f" {year}")
            if ids == [single_token(tok, f" {century}"), single_token(tok, f"{year % 100:02d}")] and None not in ids:
                ok.append(str(year))
        years += ok[1:-1]
    return years


def greaterthan_task(tokenizer, n_examples: int = 100, seed: int = 0, bos: str | None = None) -> Task:
    check_examples("greater-than", n_examples)
    tok = as_tokenizer(tokenizer)
    year_tokens = [single_token(tok, f"{i:02d}") for i in range(100)]
    if None in year_tokens:
        raise TaskError("greater-than needs the two-digit strings 00..99 to be single tokens in the tokenizer.")
    years = need(_years(tok), 1, "years")
    nouns = need(single_tokens(tok, NOUNS), 1, "nouns")
    rng = np.random.default_rng(seed)
    clean, corrupt, yy = [], [], []
    for _ in range(n_examples):
        year, noun = str(rng.choice(years)), str(rng.choice(nouns))
        clean.append(TEMPLATE.format(noun=noun, year=year, century=year[:2]))
        corrupt.append(TEMPLATE.format(noun=noun, year=year[:2] + "01", century=year[:2]))
        yy.append(int(year[2:]))
    b_id = bos_id(tok, bos)
    clean_ids = tokenize_batch(tok, clean, b_id, "greater-than")
    return Task(
        name="greater-than",
        clean=clean_ids,
        corrupted=tokenize_batch(tok, corrupt, b_id, "greater-than corrupted"),
        positions=np.array([clean_ids.shape[1] - 1]),
        metrics={"kl": kl_divergence, "prob_diff": prob_diff},
        labels={"yy": np.asarray(yy, np.int32), "year_tokens": np.asarray(year_tokens, np.int32)},
        vocab_labels=("year_tokens",),
        description="greater-than; KL or probability difference at the final position.",
    )


def _outputs(layer, head) -> list[str]:
    return [f"blocks.{layer}.hook_mlp_out" if head is None else f"blocks.{layer}.attn.hook_result[{head}]"]


def _inputs(layer, head) -> list[str]:
    if head is None:
        return [f"blocks.{layer}.hook_mlp_in"]
    return [f"blocks.{layer}.hook_{c}_input[{head}]" for c in "qkv"]


def greaterthan_canonical(graph: CircuitGraph) -> frozenset:
    """The ACDC paper's greater-than circuit as edge names of `graph`."""
    L = graph.n_layers
    logits = f"blocks.{L - 1}.hook_resid_post"
    edges = set()
    for group in ("0305", "01", "MEARLY"):  # the embedding feeds the early parts
        for l, h in GROUPS[group]:
            edges |= {f"blocks.0.hook_resid_pre->{r}" for r in _inputs(l, h)}
    for group in ("AMID", "MLATE"):  # the late parts write to the logits
        for l, h in GROUPS[group]:
            edges |= {f"{s}->{logits}" for s in _outputs(l, h)}
    for group in ("MEARLY", "MLATE"):  # MLPs within a group feed later ones
        for l1, _ in GROUPS[group]:
            for l2, _ in GROUPS[group]:
                if l1 < l2:
                    edges.add(f"blocks.{l1}.hook_mlp_out->blocks.{l2}.hook_mlp_in")
    for g1, g2 in CONNECTED:
        for l1, h1 in GROUPS[g1]:
            for l2, h2 in GROUPS[g2]:
                # a head reaches its own layer's MLP; otherwise the receiver must be later
                if l1 < l2 or (l1 == l2 and h1 is not None and h2 is None):
                    edges |= {f"{s}->{r}" for s in _outputs(l1, h1) for r in _inputs(l2, h2)}
    for l, h in sum(GROUPS.values(), []):
        if h is not None:
            edges |= {f"blocks.{l}.hook_{c}_input[{h}]->blocks.{l}.attn.hook_{c}[{h}]" for c in "qkv"}
    amid_last = max(l for l, _ in GROUPS["AMID"])
    for m1 in range(amid_last):  # the AMID heads read clean queries: all MLPs before them
        for m2 in range(m1 + 1, amid_last):
            edges.add(f"blocks.{m1}.hook_mlp_out->blocks.{m2}.hook_mlp_in")
    for l, h in GROUPS["AMID"]:
        edges |= {f"blocks.{m}.hook_mlp_out->blocks.{l}.hook_q_input[{h}]" for m in range(l)}
    return frozenset(edges)


def greaterthan(model, tokenizer, n_examples: int = 100, seed: int = 0, bos: str | None = None) -> Task:
    task = greaterthan_task(tokenizer, n_examples, seed, bos)
    return with_paper_circuit(task, model, "GPT-2 small", (12, 12, False),
                              lambda: greaterthan_canonical(task.graph(model)))

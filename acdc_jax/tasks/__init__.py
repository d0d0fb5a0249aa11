"""Tasks: clean and corrupted prompts, metrics, and canonical circuits.

``model, task = acdc_jax.tasks.get(name, checkpoint=..., tokenizer=...)``

===================  ==========================  =================================
task                 model                       needs
===================  ==========================  =================================
``tracr-reverse``    compiled with tracr-pypi    ``pip install '.[tracr]'``
``tracr-proportion`` compiled with tracr-pypi    ``pip install '.[tracr]'``
``induction``        ships with the package      nothing
``ioi``              GPT-2 small                 ``checkpoint``, ``tokenizer``
``greater-than``     GPT-2 small                 ``checkpoint``, ``tokenizer``
``docstring``        attn-only-4l                ``checkpoint``, ``tokenizer``
===================  ==========================  =================================

``checkpoint`` is any local checkpoint ``python -m converters`` reads;
``tokenizer`` a local tokenizer (see `text.load_tokenizer`; by default the
checkpoint directory's own). Nothing is downloaded. Your own prompts: `prompts.prompt_task`, or a JSON file of them
(`prompts.load_task`) given as the name, with a ``checkpoint``.
"""

from __future__ import annotations

from typing import Optional

from ..errors import TaskError
from .base import Task, check_examples, kl_divergence, squared_error
from .prompts import load_task, prompt_task
from .text import tokenizer_beside

NEEDS_WEIGHTS = {"ioi": "GPT-2 small", "greater-than": "GPT-2 small", "docstring": "attn-only-4l"}
TASK_BOS = "task default"  # `get`'s bos when not given: each task's own
TASKS = ("tracr-reverse", "tracr-proportion", "induction", "ioi", "greater-than", "docstring")


def get(name: str, checkpoint: Optional[str] = None, tokenizer: Optional[str] = None,
        n_examples: Optional[int] = None, seed: int = 0, bos: Optional[str] = TASK_BOS):
    """(model, task) for a named task, or for a task file (``*.json``, see
    `prompts.load_task`). Without `tokenizer`, the checkpoint directory's own
    tokenizer files are used where it has them. `bos`: the token put before
    every prompt of ioi, greater-than and docstring (None: none; by default
    the task's own, GPT-2's ``<|endoftext|>`` for IOI)."""
    if bos != TASK_BOS and name not in NEEDS_WEIGHTS:
        raise TaskError(f"bos (--bos) is for the tasks {tuple(NEEDS_WEIGHTS)}, not {name}"
                        + (": put it in the task file's \"bos\" field." if str(name).endswith(".json") else "."))
    if checkpoint is not None and tokenizer is None:
        tokenizer = tokenizer_beside(checkpoint)
    if str(name).endswith(".json"):
        if checkpoint is None:
            raise TaskError(f"Task file {name}: pass the model as checkpoint=DIR (any checkpoint "
                            "`python -m converters` reads).")
        if n_examples is not None:
            raise TaskError(f"Task file {name}: its prompts are given; do not pass n_examples (--examples).")
        task = load_task(name, tokenizer)
        return _convert(checkpoint), task
    if name not in TASKS:
        raise TaskError(f"Unknown task {name!r}; choose from {TASKS}, or give a task file (*.json).")
    check_examples(name, n_examples)
    kw = {} if n_examples is None else {"n_examples": n_examples}
    if bos != TASK_BOS:
        kw["bos"] = bos
    if name.startswith("tracr-"):
        if checkpoint is not None:
            raise TaskError(f"{name} compiles its own model; do not pass a checkpoint.")
        from .tracr import proportion_task, reverse_task

        return reverse_task(seed) if name == "tracr-reverse" else proportion_task(seed=seed, **kw)
    if name == "induction":
        from .induction import induction_task, load_induction_model

        model = load_induction_model() if checkpoint is None else _convert(checkpoint)
        return model, induction_task(seed=seed, **kw)
    if checkpoint is None or tokenizer is None:
        raise TaskError(
            f"Task {name} needs {NEEDS_WEIGHTS[name]} weights and its tokenizer as local files: pass "
            "checkpoint=DIR (a Hugging Face or TransformerLens checkpoint, or a converted model) and "
            "tokenizer=PATH. Weights are never downloaded."
        )
    model = _convert(checkpoint)
    if name == "ioi":
        from .ioi import ioi

        return model, ioi(model, tokenizer, seed=seed, **kw)
    if name == "greater-than":
        from .greaterthan import greaterthan

        return model, greaterthan(model, tokenizer, seed=seed, **kw)
    from .docstring import docstring

    return model, docstring(model, tokenizer, seed=seed, **kw)


def _convert(checkpoint: str):
    import converters

    return converters.convert(checkpoint)


__all__ = ["TASKS", "Task", "get", "kl_divergence", "load_task", "prompt_task", "squared_error"]

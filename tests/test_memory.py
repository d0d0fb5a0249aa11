"""The memory estimate against XLA's own buffer assignment of the compiled
batched pass (the vmapped program that accelerators run), on this backend."""

import jax
import numpy as np
import pytest

from acdc_jax.algorithms.attribution import setup
from acdc_jax.memory import layer_widths, pass_bytes, xla_pass_bytes
from acdc_jax.model import Transformer, TransformerConfig
from acdc_jax.scoring import Scorer
from acdc_jax.tasks.base import Task, kl_divergence


def _scorer(config, n_prompts, n_pos, chunk):
    model = Transformer(config, key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    task = Task("random", rng.integers(0, config.d_vocab, (n_prompts, n_pos)),
                rng.integers(0, config.d_vocab, (n_prompts, n_pos)), positions=np.array([n_pos - 1]),
                metrics={"kl": kl_divergence})
    graph, scorer, _ = setup(model, task, prompt_chunk=chunk)
    return model, graph, scorer


def _xla_bytes(s: Scorer, start: int, width: int, upstream: bool = False) -> int:
    measured = xla_pass_bytes(s, start, width, upstream)
    if measured is None:
        pytest.skip("this backend reports no memory analysis")
    return measured["total"]


@pytest.mark.parametrize("d_mlp, chunk", [(256, None), pytest.param(None, None, marks=pytest.mark.slow),
                                           pytest.param(256, 4, marks=pytest.mark.slow)])
def test_estimate_bounds_what_xla_allocates(d_mlp, chunk):
    config = TransformerConfig(n_layers=3, n_heads=4, d_model=64, d_head=16, d_mlp=d_mlp, d_vocab=500, n_ctx=32)
    model, graph, s = _scorer(config, 8, 12, chunk)
    for start in range(config.n_layers + 1):
        fixed, per = pass_bytes(model, graph, 8, 12, 1, start, chunk)
        for width in (1, 4) if start == 0 else (4,):
            for upstream in (False, True) if 0 < start < config.n_layers else (False,):
                used = _xla_bytes(s, start, width, upstream)
                estimate = fixed + width * per
                assert used <= estimate, (start, width, upstream, used, estimate)
                if not upstream:  # (passes that recompute few heads need less than estimated)
                    assert estimate <= 4 * used, (start, width, used, estimate)


def test_later_start_layers_fit_more_candidates():
    config = TransformerConfig(n_layers=4, n_heads=4, d_model=64, d_head=16, d_mlp=256, d_vocab=500, n_ctx=32)
    model = Transformer(config, key=jax.random.PRNGKey(0))
    graph = Task("t", np.zeros((2, 8), int), np.zeros((2, 8), int), positions=np.array([7]),
                 metrics={"kl": kl_divergence}).graph(model)
    per = [pass_bytes(model, graph, 64, 8, 1, start)[1] for start in range(config.n_layers + 1)]
    assert all(a > b for a, b in zip(per, per[1:]))  # fewer senders computed per candidate
    fixed, _ = pass_bytes(model, graph, 64, 8, 1, 0)
    widths = layer_widths(model, graph, 64, 8, 1, 1024, available=int((fixed + 6 * per[0]) / 0.7))
    assert widths[0] == 4 and widths == sorted(widths) and widths[-1] > 4 * widths[0]
    assert layer_widths(model, graph, 64, 8, 1, 16, available=1 << 40) == [16] * 5  # max_width caps them
    assert layer_widths(model, graph, 64, 8, 1, 16, available=0) == [1] * 5  # never below one

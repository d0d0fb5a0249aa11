
import os

import jax
import jax.random as jr
import numpy as np
import pytest

# As in Equinox's own suite: implicit dtype and rank promotion are errors, so
# library code states every broadcast and cast it relies on.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# The CLI keeps compiled programs on disk; tests that run it in this process
# must neither write to the user's cache nor load programs from earlier runs.
os.environ["ACDC_JAX_CACHE"] = "off"


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 (transformers', converted) and a KL task on
    random prompts: the ACDC tests' model."""
    from acdc_jax.tasks.base import Task, kl_divergence

    from .helpers import random_hf_gpt2

    _, model = random_hf_gpt2(tmp_path_factory.mktemp("acdc"), n_layer=2, n_embd=16, n_head=2, vocab=31, seed=4)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 31, (6, 7))
    task = Task("random-kl", clean, rng.integers(0, 31, (6, 7)), positions=np.array([5, 6]),
                metrics={"kl": kl_divergence})
    return model, task


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.PRNGKey(5678), 10_000))
    return lambda: next(keys)


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drop the compiled programs when the process holds many memory maps: each
    XLA CPU executable keeps a few, and a long session otherwise reaches the
    kernel's limit (vm.max_map_count, 65530 by default) and crashes in XLA."""
    yield
    try:
        with open("/proc/self/maps") as f:
            n_maps = sum(1 for _ in f)
    except OSError:  # not Linux
        return
    if n_maps > 20_000:
        jax.clear_caches()

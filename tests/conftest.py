
import jax
import jax.random as jr
import pytest

# As in Equinox's own suite: implicit dtype and rank promotion are errors, so
# library code states every broadcast and cast it relies on.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.PRNGKey(5678), 10_000))
    return lambda: next(keys)

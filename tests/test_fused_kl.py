"""The streamed KL divergence (`acdc_jax.fused_kl`) against the task's own
`kl_divergence` applied to the whole logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax.fused_kl import chunk_width, exact, kl_reference, low_rank_kl, weighted_mean
from acdc_jax.tasks.base import kl_divergence


class _Ref:
    def __init__(self, reference, weights=None):
        self.reference, self.weights = reference, weights


def _case(rng, cand=3, rows=5, rank=6, vocab=1000, spread=3.0):
    u = jnp.asarray(rng.normal(size=(cand, rows, rank)), jnp.float32)
    maps = jnp.asarray(rng.normal(size=(rank, vocab)) * 0.3, jnp.float32)
    pre = jnp.asarray(rng.normal(size=(rows, vocab)) * spread, jnp.float32)
    scale = jnp.asarray(1 + 0.1 * rng.normal(size=(cand, rows)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(vocab,)), jnp.float32)
    reference = jnp.asarray(pre * 1.02 + bias[None] + 0.2 * rng.normal(size=(rows, vocab)), jnp.float32)
    return u, maps, pre, scale, bias, reference


def _whole(u, maps, pre, scale, bias, reference, weights=None):
    """kl_divergence per candidate on the logits made whole."""
    logits = (pre[None] + jnp.einsum("cbr,rv->cbv", u, maps)) * scale[..., None] + bias[None, None]
    return np.array([float(kl_divergence(lg[:, None], _Ref(reference[:, None], weights))) for lg in logits])


@pytest.mark.parametrize("width", [128, 256, 1000, None])
@pytest.mark.parametrize("weighted", [False, True])
def test_streamed_kl_equals_the_whole_logits_kl(width, weighted):
    """Chunks of 128 and 256 leave a tail (1000 = 7 x 128 + 104); 1000 is one
    chunk; None is the width chosen for the shape."""
    rng = np.random.default_rng(0)
    args = _case(rng)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, size=(5, 1)), jnp.float32) if weighted else None
    u, maps, pre, scale, bias, reference = args
    kl, ok = low_rank_kl(u, maps, pre, scale, kl_reference(reference, bias), width=width)
    got = np.asarray(weighted_mean(kl, weights))
    want = _whole(*args, weights)
    assert bool(ok)
    assert want.min() > 0.05  # far enough from the reference to test something
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_no_base_numerator_means_zero():
    rng = np.random.default_rng(1)
    u, maps, pre, scale, bias, reference = _case(rng)
    got = low_rank_kl(u, maps, None, scale, kl_reference(reference, bias), width=256)[0].mean(-1)
    np.testing.assert_allclose(np.asarray(got), _whole(u, maps, jnp.zeros_like(pre), scale, bias, reference),
                               rtol=2e-6, atol=1e-7)


def test_large_logits_and_small_changes_stay_precise():
    """Logits of size 80 (exp would overflow without the running maximum)
    and candidates 1e-2 to 1e-5 away from the reference along a direction:
    the KL (1e-5 down to 1e-13) within 2e-7 + 0.1% of float64 arithmetic on
    the same float32 inputs."""
    rng = np.random.default_rng(2)
    vocab, rows = 700, 4
    reference = jnp.asarray(rng.normal(size=(rows, vocab)) * 20 + 80, jnp.float32)
    delta = jnp.asarray(10.0 ** -np.arange(2, 6), jnp.float32)[None, :, None]
    direction = jnp.asarray(rng.normal(size=(1, vocab)), jnp.float32)
    scale, bias = jnp.ones((1, rows), jnp.float32), jnp.zeros(vocab, jnp.float32)
    got = np.asarray(low_rank_kl(delta, direction, reference, scale, kl_reference(reference, bias), width=128)[0])[0]
    ref64 = np.asarray(reference, np.float64)
    logits64 = (np.asarray(reference + delta[0] * direction, np.float32)).astype(np.float64)  # the float32 logits
    log_p = ref64 - np.log(np.exp(ref64 - ref64.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref64.max(-1, keepdims=True)
    log_q = logits64 - np.log(np.exp(logits64 - logits64.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits64.max(-1, keepdims=True)
    want = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert np.all(np.isfinite(got))
    assert want[0] > 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-7)


@pytest.mark.parametrize("shift", [300.0, -300.0])
def test_candidates_far_from_the_reference_are_flagged_and_summed_again_with_a_running_maximum(shift):
    """One candidate's logits all move by 300 (softmax unchanged): its
    terms exp(l - LSE(lr)) overflow (or underflow to a zero sum) without a
    running maximum, which the flag reports; `exact` then sums the batch
    again with one, and every candidate's KL equals kl_divergence on the
    whole logits."""
    rng = np.random.default_rng(3)
    u, maps, pre, scale, bias, reference = _case(rng)
    maps = maps.at[0].set(1.0)  # a direction that moves every token alike
    u = u.at[1, :, 0].add(shift)
    plain = lambda running_max: low_rank_kl(u, maps, pre, scale, kl_reference(reference, bias), width=256,
                                            running_max=running_max)
    assert not bool(plain(False)[1])
    assert bool(plain(True)[1])
    got = exact(plain).mean(-1)
    want = _whole(u, maps, pre, scale, bias, reference)
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=5e-5)  # logits of 300 carry float32 rounding of 3e-5
    keep = np.array([0, 2])
    near = lambda running_max: low_rank_kl(u[keep], maps, pre, scale[keep], kl_reference(reference, bias), width=256,
                                           running_max=running_max)
    assert bool(near(False)[1])  # without the far candidate the plain sums hold
    np.testing.assert_allclose(np.asarray(near(False)[0]), np.asarray(near(True)[0]), rtol=2e-6, atol=1e-7)


def test_maps_read_by_head_equal_the_maps_gathered_first():
    """With `heads`, each chunk reads the listed heads' rows of every head's
    maps [n_heads, d_head, vocab] (repeats allowed, as padding makes them):
    the KL is that of the maps gathered whole, and of the whole logits."""
    rng = np.random.default_rng(4)
    u, _, pre, scale, bias, reference = _case(rng, rank=3 * 4)
    every = jnp.asarray(rng.normal(size=(5, 4, 1000)) * 0.3, jnp.float32)
    heads = jnp.asarray([3, 0, 3], jnp.int32)
    gathered = np.asarray(every)[np.asarray(heads)].reshape(12, 1000)
    got = low_rank_kl(u, every, pre, scale, kl_reference(reference, bias), width=128, heads=heads)[0].mean(-1)
    np.testing.assert_allclose(np.asarray(got), _whole(u, jnp.asarray(gathered), pre, scale, bias, reference),
                               rtol=2e-6, atol=1e-7)


def test_chunks_fit_the_cache_and_the_vocabulary():
    assert chunk_width(640, 48262) == 512  # 640 rows x 512 x 4 bytes = 1.3 MB
    assert chunk_width(1, 48262) == 4096
    assert chunk_width(1, 500) == 500


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "none"])
def test_residual_kl_follows_each_final_normalisation(norm):
    """`residual_kl` splits ln_final into numerator, scale and bias; for each
    mode it equals KL of the model's own ln_final and unembedding."""
    from acdc_jax.checkpoint import fill_model, parameter_shapes
    from acdc_jax.fused_kl import reference_arrays, residual_kl
    from acdc_jax.model import TransformerConfig

    c = TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=300, n_ctx=8, normalization=norm)
    rng = np.random.default_rng(1)
    model = fill_model(c, {n: (n.endswith(".w") + 0.3 * rng.standard_normal(s)).astype(np.float32)
                           for n, s in parameter_shapes(c).items()})
    # residuals with a large mean, so that centring or not matters
    x = jnp.asarray(rng.normal(size=(3, 2, 4, 16)) + 2.0, jnp.float32)
    reference = jnp.asarray(rng.normal(size=(2, 4, 300)), jnp.float32)
    arrays = {"reference": reference, "weights": None}
    got, ok = residual_kl(model, x, arrays)
    want = [float(kl_divergence(model.unembed(model.ln_final(xc)), _Ref(reference))) for xc in x]
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # the reference made once per run (as a Scorer makes it) gives the same KL
    made = reference_arrays(model, arrays)
    assert "kl" in made and "kl" not in arrays
    np.testing.assert_allclose(np.asarray(residual_kl(model, x, made)[0]), want, rtol=1e-5)

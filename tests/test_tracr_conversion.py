"""The converted tracr models against tracr's own forward pass, on every input
of length 1 to 4 (plus BOS) over the program's vocabulary."""

import itertools

import equinox as eqx

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tracr")

from acdc_jax.tasks.tracr_programs import compile_tracr, compile_tracr_model  # noqa: E402


def _batches(assembled, vocab):
    """(token batch, list of input sequences) per length."""
    for n in range(1, 5):
        seqs = [["BOS", *s] for s in itertools.product(sorted(vocab), repeat=n)]
        yield jnp.asarray([assembled.input_encoder.encode(s) for s in seqs]), seqs


def test_reverse_decodes_like_tracr_for_every_input():
    assembled, _ = compile_tracr("reverse")
    model = compile_tracr_model("reverse")
    tracr_forward = jax.jit(assembled.forward)
    out_vocab = sorted(assembled.output_encoder.encoding_map, key=assembled.output_encoder.encoding_map.get)
    checked = 0
    for tokens, seqs in _batches(assembled, {1, 2, 3}):
        ref = tracr_forward(assembled.params, tokens)
        logits, acts = eqx.filter_jit(lambda m, t: m.run_with_senders(t))(model, tokens)
        ours = np.asarray(logits).argmax(-1)
        for i, seq in enumerate(seqs[:3]):  # tracr's own apply() on a few, to pin the decoding convention
            assert ["BOS"] + [out_vocab[j] for j in ours[i, 1:]] == assembled.apply(seq).decoded
        tracr_ids = np.asarray(ref.unembedded_output)
        np.testing.assert_array_equal(ours[:, 1:], tracr_ids[:, 1:])
        # The final residual stream matches tracr's to float32 precision.
        resid = acts.tok + acts.pos + acts.heads.sum((1, 2)) + acts.mlps.sum(1)
        np.testing.assert_allclose(np.asarray(resid), np.asarray(ref.transformer_output.residuals[-1]), atol=1e-5)
        checked += len(seqs)
    assert checked == 3 + 9 + 27 + 81


def test_proportion_outputs_match_tracr_for_every_input():
    assembled, _ = compile_tracr("proportion")
    model = compile_tracr_model("proportion")
    tracr_forward = jax.jit(assembled.forward)
    for tokens, seqs in _batches(assembled, {"w", "x", "y", "z"}):
        ref = np.asarray(tracr_forward(assembled.params, tokens).unembedded_output)
        ours = np.asarray(eqx.filter_jit(lambda m, t: m(t))(model, tokens))[..., 0]
        np.testing.assert_allclose(ours[:, 1:], ref[:, 1:], atol=1e-5)
        np.testing.assert_allclose(ours[0, 1:], np.asarray(assembled.apply(seqs[0]).unembedded[0])[1:], atol=1e-5)

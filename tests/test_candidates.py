"""Candidate circuits as cuts from one circuit: the dense masks they stand for."""

import numpy as np
import pytest

from acdc_jax.candidates import Candidates


def _dense(base, cuts, width):
    """The masks by hand: each candidate's copy of the base with its edges zeroed, the last repeated."""
    rows = []
    for cut in cuts:
        m = base.copy()
        m[list(cut)] = 0.0
        rows.append(m)
    return np.stack(rows + [rows[-1]] * (width - len(rows)))


def test_masks_on_host_and_device_equal_the_cuts():
    rng = np.random.default_rng(0)
    base = (rng.uniform(size=50) > 0.3).astype(np.float32)
    cuts = [[], [3], [3, 7, 7, 40], rng.choice(50, 20, replace=False).tolist()]
    cands = Candidates(base, cuts)
    for width in (4, 8):
        want = _dense(base, cuts, width)
        np.testing.assert_array_equal(cands.masks(width), want)
        np.testing.assert_array_equal(np.asarray(cands.on_device(width, np.float32)), want)
    changed = sorted({e for c in cuts for e in c if base[e] != 0})
    assert cands.changed.tolist() == changed


def test_from_masks_recovers_the_cuts_and_rejects_other_masks():
    base = np.ones(10, np.float32)
    base[2] = 0.0
    masks = _dense(base, [[1], [1, 5], []], 3)
    cands = Candidates.from_masks(masks, base)
    np.testing.assert_array_equal(cands.masks(), masks)
    np.testing.assert_array_equal(Candidates.from_masks(masks).base, base)  # the base inferred: the largest values
    grown = masks.copy()
    grown[0, 2] = 1.0  # an edge the base does not have
    with pytest.raises(ValueError, match="not the base circuit"):
        Candidates.from_masks(grown, base)
    with pytest.raises(ValueError, match="must lie in"):
        Candidates(base, [[10]])
    with pytest.raises(ValueError, match="do not fit"):
        Candidates(base, [[1], [2]]).masks(1)

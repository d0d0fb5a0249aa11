"""Sharding over devices gives the results of one device: ACDC decisions are
identical, and metrics, mask gradients and the other methods' edge scores
agree to float32 rounding. Runs in a
subprocess with four host CPU devices (XLA_FLAGS must be set before jax starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from acdc_jax.sharding import make_mesh, parse_mesh, round_width


def _run(name, n):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    script = Path(__file__).with_name("sharded_run.py")
    out = subprocess.run([sys.executable, str(script), name, str(n)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,n", [("tracr-proportion", 48), pytest.param("induction", 16, marks=pytest.mark.slow)])
def test_meshes_match_one_device(name, n):
    if name == "tracr-proportion":
        pytest.importorskip("tracr")
    out = _run(name, n)
    assert out["devices"] == 4
    one = out["runs"]["one"]
    for label in ("4x1", "2x2", "1x4"):
        runs = out["runs"][label]
        for tau in ("0.001", "0.05", "nodes 0.001", "nodes 0.05"):
            assert runs[tau]["decisions"] == one[tau]["decisions"], (label, tau)
            np.testing.assert_allclose(runs[tau]["metrics"], one[tau]["metrics"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runs["grads"]["values"], one["grads"]["values"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runs["grads"]["grads"], one["grads"]["grads"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(runs["grads"]["eap_ig"], one["grads"]["eap_ig"], rtol=1e-4, atol=1e-6)
        _same_method_scores(runs["methods"], one["methods"], label)
    # "auto": exact patching spreads candidates, the gradient methods (one mask at a time) spread prompts
    _same_method_scores(out["auto"], one["methods"], "auto")
    assert out["auto"]["exact_patching"]["mesh"] == {"candidates": 4, "prompts": 1}
    assert out["auto"]["edge_pruning"]["mesh"] == {"candidates": 1, "prompts": 4}
    assert out["auto"]["subnetwork_probing"]["mesh"] == {"candidates": 1, "prompts": 4}
    # prompt shards divide both counts; the other devices hold copies, so every device (and host) takes part
    assert out["auto_shapes"] == {"48": {"candidates": 1, "prompts": 4}, "6": {"candidates": 2, "prompts": 2},
                                  "7": {"candidates": 4, "prompts": 1}}
    # The runs must have something to agree on: some edges removed, some kept.
    assert np.abs(one["grads"]["eap_ig"]).max() > 0
    for run in ("0.05", "nodes 0.05"):
        kept = [k for _, tried, k in one[run]["decisions"] if tried]
        assert any(kept) and not all(kept), run
    for name, run in one["methods"].items():
        finite = np.asarray(run["scores"])[np.isfinite(run["scores"])]
        assert np.ptp(finite) > 0, name


def _same_method_scores(runs, one, label):
    for name in ("exact_patching", "edge_pruning", "subnetwork_probing"):
        np.testing.assert_allclose(runs[name]["scores"], one[name]["scores"], rtol=1e-4, atol=1e-6, err_msg=(label, name))


def test_mesh_arguments():
    assert parse_mesh(None) is None and parse_mesh("none") is None
    assert dict(parse_mesh("1x1").shape) == {"candidates": 1, "prompts": 1}
    mesh = make_mesh(1, 1)
    assert parse_mesh(mesh) is mesh
    with pytest.raises(ValueError, match="CxP"):
        parse_mesh("four")
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh(4, 2)
    assert round_width(5, make_mesh(1, 1)) == 5


def test_prompts_must_divide(tmp_path):
    pytest.importorskip("tracr")
    from acdc_jax import tasks
    from acdc_jax.acdc import acdc

    model, task = tasks.get("tracr-reverse")
    with pytest.raises(ValueError, match="split evenly"):
        acdc(model, task, 0.1, progress=False, mesh=_fake_mesh(prompts=4))


def _fake_mesh(prompts):
    class Fake:
        shape = {"candidates": 1, "prompts": prompts}

    return Fake()

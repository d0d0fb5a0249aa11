"""Against auto-circuit's ACDC, an independent PyTorch implementation: given
auto-circuit's edge order, acdc-jax (sequential and batched) keeps exactly the
edges auto-circuit keeps. auto-circuit needs its own virtual environment (see
benchmarks/auto_circuit_acdc.py); set ACDC_JAX_AUTO_CIRCUIT_PYTHON to its
interpreter to run this test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from acdc_jax.acdc import acdc
from acdc_jax.tasks.base import Task, kl_divergence

PYTHON = os.environ.get("ACDC_JAX_AUTO_CIRCUIT_PYTHON")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(not PYTHON, reason="set ACDC_JAX_AUTO_CIRCUIT_PYTHON to a venv with auto-circuit")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import converters

    sys.path.insert(0, str(BENCH))
    from bench_acdc import ATTN_ONLY_4L, random_tl_checkpoint

    tmp = tmp_path_factory.mktemp("ac")
    cfg = dict(ATTN_ONLY_4L, n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, d_vocab_out=50)
    random_tl_checkpoint(tmp / "model", cfg)
    rng = np.random.default_rng(0)
    clean, corrupted = rng.integers(0, 50, (6, 7)), rng.integers(0, 50, (6, 7))
    np.savez(tmp / "prompts.npz", clean=clean, corrupted=corrupted)
    task = Task("random", clean, corrupted, positions=np.array([6]), metrics={"kl": kl_divergence},
                graph_options=dict(split_qkv=True, qkv_edges=False, split_embed=False))
    return converters.convert(tmp / "model", format="transformer-lens"), task, tmp


@pytest.mark.parametrize("tau", [3e-4, 3e-3, 3e-2])
def test_same_circuit_as_auto_circuit_in_its_order(checkpoint, tau):
    model, task, tmp = checkpoint
    out = subprocess.run([PYTHON, str(BENCH / "auto_circuit_acdc.py"), str(tmp / "model"), str(tmp / "prompts.npz"),
                          repr(tau)], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert theirs["n_edges"] == task.graph(model).n_edges
    for mode in ("sequential", "batched"):
        ours = acdc(model, task, tau, mode=mode, order=theirs["order"], progress=False)
        assert sorted(ours.edges) == theirs["kept"]

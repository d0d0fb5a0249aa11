"""Several hosts: two processes with two CPU devices each join through
`jax.distributed.initialize` (gloo collectives) and run ACDC on a mesh over all
four devices. Both make the decisions of a single-device run, and only
process 0 writes the decision log."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from acdc_jax.acdc import acdc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mesh", [pytest.param("auto", marks=pytest.mark.slow), "2x2"])
def test_two_processes_match_one_device(tmp_path, mesh):
    pytest.importorskip("tracr")
    from acdc_jax import tasks

    script = Path(__file__).with_name("multihost_run.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port, log = _free_port(), tmp_path / "decisions.jsonl"
    procs = [subprocess.Popen([sys.executable, str(script), str(i), "2", str(port), mesh, str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1]) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    model, task = tasks.get("tracr-proportion", n_examples=48)
    one = acdc(model, task, 0.05, progress=False)
    expected = [[d.edge, d.tried, d.kept] for d in one.decisions]
    assert sorted(o["process"] for o in outs) == [0, 1] and all(o["devices"] == 4 for o in outs)
    for o in outs:
        assert o["decisions"] == expected
        np.testing.assert_allclose(o["metrics"], [d.metric_after for d in one.decisions if d.tried],
                                   rtol=1e-5, atol=1e-6)
    assert len(log.read_text().splitlines()) == 1 + len(expected)

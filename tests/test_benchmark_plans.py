"""`benchmarks/run_all.py`'s plans stay runnable: every command it would
start, on a CPU and on an accelerator, is accepted by its script's argument
parser, and `benchmarks/device_run.sh` names only benchmarks of the
accelerator plan. A GPU lease is 15 minutes, so a typo found there costs one."""

import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class Parsed(Exception):
    """Raised by the patched parser once a script's arguments parse, so that nothing runs."""


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    return importlib.import_module("run_all")


def _args(**kw):
    return argparse.Namespace(**{"sweep_seconds": None, "cpu_sweep_seconds": 300.0, "auto_circuit_python": None, **kw})


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu", "accelerator"])
@pytest.mark.parametrize("args", [_args(), _args(sweep_seconds=60.0, auto_circuit_python=sys.executable)],
                         ids=["defaults", "options"])
def test_every_planned_command_parses(run_all, cpu, args):
    runs = run_all.plan(cpu, args)
    assert "sweep" in runs and ("sweep-tf32-cold" in runs) == (not cpu)
    for name, (script, *argv) in runs.items():
        assert (BENCHMARKS / script).is_file(), (name, script)
        main = importlib.import_module(Path(script).stem).main
        with pytest.raises(Parsed) as parsed:  # an argparse error would raise SystemExit instead
            main(argv)
        if name == "sweep" and args.sweep_seconds is not None:  # --sweep-seconds reaches the sweep
            assert parsed.value.args[0].stop_after == args.sweep_seconds


def test_device_run_names_accelerator_benchmarks(run_all):
    shell = (BENCHMARKS / "device_run.sh").read_text()
    names = re.search(r"set -- --only (.*?) --timeout", shell, re.S).group(1).replace("\\\n", " ").split()
    assert len(names) > 3
    assert set(names) <= set(run_all.plan(False, _args())), set(names) - set(run_all.plan(False, _args()))

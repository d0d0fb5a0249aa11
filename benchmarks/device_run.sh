#!/usr/bin/env bash
# The GPU figures in one command, for a short lease on a lent accelerator
# (no network there: the project runs from the checkout on PYTHONPATH, with the
# image's JAX). From the repository root:
#
#   bash benchmarks/device_run.sh                      # the default plan below, stopped after 550 s in all
#   bash benchmarks/device_run.sh --only precision methods speculation sparse --timeout 240
#
# A lease is 15 minutes of device time, the start (about 30 s) included. On
# the first H200 (2026-12-04) each pass program took 14-27 s to compile, so the
# default plan first times the sweep's first programs' compilation as XLA is
# set up and with each of two GPU autotuners off, then runs the sweep, 20 s of
# it under the profiler and ACDC at one threshold, all three under the XLA
# flags that compiled fastest, each benchmark writing its JSON as it goes.
#
# Arguments go to benchmarks/run_all.py. The precision and methods benchmarks
# compile tracr programs: carry wheels of tracr-pypi 1.0.0, dm-haiku and jmp
# for the machine's Python in .whl/ (benchmarks/README.md, "Every benchmark
# on any backend", has the pip download line); they are installed into
# /tmp/site. Every JSON written goes
# back packed as $OUT/results.tar.gz (the device tool returns few files).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, equinox; print('jax', jax.__version__, 'equinox', equinox.__version__, jax.devices())" || exit 1
if [ $# -eq 0 ]; then
  set -- --only compile compile-no-autotune compile-no-fusion-autotuner sweep-tf32 sweep-trace acdc-one-tau \
    memory host patching --timeout 180 --total 550 --sweep-seconds 120 --adopt-fastest-compile
fi
python3 benchmarks/run_all.py "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/results.tar.gz" benchmarks/results
  # a profile (sweep-trace) comes back apart: the tool returns files of 16 MB at most
  [ -d benchmarks/trace ] && tar -czf "$OUT/trace.tar.gz" benchmarks/trace
fi
exit $rc

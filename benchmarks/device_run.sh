#!/usr/bin/env bash
# The GPU figures in one command, for a short lease on a lent accelerator
# (no network there: the project runs from the checkout on PYTHONPATH, with the
# image's JAX). From the repository root:
#
#   bash benchmarks/device_run.sh                      # the default plan below, stopped after 550 s in all
#   bash benchmarks/device_run.sh --only precision methods speculation sparse --timeout 240
#
# A lease is 15 minutes of device time, the start (about 30 s) included. The
# default plan runs the GPT-2-small-shaped sweep in TF32 (near ties no longer
# rescored: on the second H200 lease the rescoring full passes took 87% of the
# GPU's time) twice, compiling its programs into a new directory and then in a
# fresh process loading them from there (compiling was 70 s of the first
# lease's 156 s; the cold run compiles each layer's cover in background threads,
# and a third run, its baseline, compiles each when first needed into a
# directory of its own), 20 s of it under the profiler, ACDC at one threshold, then the
# sweep with rescoring and in bf16, ACDC from programs kept on disk and the
# memory benchmark, each writing its JSON as it goes. XLA's autotuning stays
# on: switched off it compiled 30% faster and ran the passes 1.7-2.9x slower
# (`compile-no-autotune`, kept by name with --adopt-fastest-compile).
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
  set -- --only sweep-tf32-cold sweep-tf32-warm sweep-tf32-covers-when-needed sweep-trace acdc-one-tau \
    sweep-tf32-rescoring sweep-bf16 acdc-disk-cache memory \
    --timeout 200 --total 550 --sweep-seconds 120
fi
python3 benchmarks/run_all.py "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/results.tar.gz" benchmarks/results
  # a profile (sweep-trace) comes back apart, its Perfetto file alone, in parts: the tool returns at
  # most 8 files of 16 MB (join them with cat)
  find benchmarks/trace -name '*.trace.json.gz' 2>/dev/null | head -1 | xargs -r -I{} split -b 15M {} "$OUT/trace.json.gz.part_"
fi
exit $rc

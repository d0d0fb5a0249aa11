"""Every benchmark on whatever backend JAX finds (CPU, GPU or TPU).

Each benchmark runs in its own process and writes its JSON under
benchmarks/results/ (named by backend and device kind); this script adds a
summary, run_all-<backend>-<device>.json, with each one's command, exit status
and wall time. On a CPU the sizes are cut so that the whole takes well under an
hour (the GPT-2-small-shaped sweep stops after --cpu-sweep-seconds and records
a projection); on an accelerator everything runs at full size.

On an accelerator `sweep-tf32-cold` and then `sweep-tf32-warm` run the TF32
sweep with its programs kept in a new directory: the first compiles them, the
second (a fresh process) loads them, as a second CLI run would.

    python benchmarks/run_all.py [--only sweep acdc host memory programs patching precision methods sparse ...] [--timeout S]
                                 [--total S] [--sweep-seconds S] [--auto-circuit-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, print_table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


# Variants: the same benchmark under other XLA flags, its JSON named with the tag. On an H200 a pass
# program took 14-27 s to compile (benchmarks/README.md); XLA's GPU autotuning is the suspect.
NO_AUTOTUNE = {"XLA_FLAGS": "--xla_gpu_autotune_level=0", "ACDC_JAX_BENCH_TAG": "no-autotune"}
NO_FUSION_AUTOTUNER = {"XLA_FLAGS": "--xla_gpu_experimental_enable_fusion_autotuner=false",
                       "ACDC_JAX_BENCH_TAG": "no-fusion-autotuner"}
VARIANTS = {"acdc-no-autotune": NO_AUTOTUNE, "compile-no-autotune": NO_AUTOTUNE,
            "compile-no-fusion-autotuner": NO_FUSION_AUTOTUNER, "sweep-trace": {"ACDC_JAX_BENCH_TAG": "traced"}}


def fastest_compile_variant(names: list[str], since: float) -> tuple[str, dict]:
    """(name, VARIANTS entry) of the compile run among `names` whose JSON,
    written after `since`, has every program and the least compile seconds in all."""
    best, best_s = ("compile", {}), None
    for name in names:
        tag = VARIANTS.get(name, {}).get("ACDC_JAX_BENCH_TAG")
        for path in RESULTS.glob(f"bench_compile{'-' + tag if tag else ''}-{jax.default_backend()}-*.json"):
            rows = json.loads(path.read_text())["rows"]
            if path.stat().st_mtime < since or len(rows) < 5:
                continue
            total = sum(r["compile_s"] for r in rows)
            print(f"   {name}: {total:.1f} s compiling in all")
            if best_s is None or total < best_s:
                best, best_s = (name, VARIANTS.get(name, {})), total
    return best


def plan(cpu: bool, args) -> dict[str, list[str]]:
    stop = args.sweep_seconds if args.sweep_seconds is not None else (args.cpu_sweep_seconds if cpu else None)
    sweep = ["bench_gpt2_sweep.py"] + (["--stop-after", str(stop)] if stop is not None else [])
    runs = {
        "patching": ["bench_patching.py"],
        # single dense passes by start layer against the loop's full pass (a sweep's early-layer cost)
        "pass": ["bench_pass.py"] if cpu else ["bench_pass.py", "--n-prompts", "100", "--width", "16",
                                               "--precision", "tensorfloat32"],
        "compile": ["bench_compile.py"],
        "acdc": ["bench_acdc.py", "--n-prompts", "10"] if cpu else ["bench_acdc.py"],
        "methods": ["roc_table.py"],
        "precision": ["bench_precision.py"],
        "host": ["bench_host_overhead.py"],
        "memory": ["bench_memory.py"],
        "programs": ["bench_programs.py"],
        "speculation": ["bench_speculation.py"],
        # on an accelerator: whether sparse programs pay there at all (auto weighs that against compiling)
        "sparse": ["bench_sparse.py", "--n-prompts"] + (["10", "40"] if cpu else ["40", "160", "--modes", "off", "on"]),
        "sweep": sweep,
    }
    if args.auto_circuit_python:
        runs["acdc"] += ["--auto-circuit-python", args.auto_circuit_python]
    if not cpu:  # TF32 tensor cores (JAX's default for float32 on NVIDIA GPUs) and bf16
        runs["acdc-one-tau"] = ["bench_acdc.py", "--taus", "0.1"]
        runs["acdc-no-autotune"] = runs["acdc-one-tau"]  # with VARIANTS' XLA flags
        runs["compile-no-autotune"] = runs["compile-no-fusion-autotuner"] = runs["compile"]
        runs["sweep-tf32"] = sweep + ["--precision", "tensorfloat32"]  # near ties not rescored (acdc's TF32 default)
        runs["sweep-tf32-rescoring"] = runs["sweep-tf32"] + ["--rescore-ties", "on"]  # the loop's exact decisions
        # the same sweep twice with its programs kept on disk, as the CLI keeps them: this process's own
        # directory, so the first run compiles (and fills it) and the second loads them
        cache = str(Path(tempfile.gettempdir()) / f"acdc-jax-sweep-cache-{os.getpid()}")
        runs["sweep-tf32-cold"] = runs["sweep-tf32-warm"] = runs["sweep-tf32"] + ["--disk-cache", cache]
        # the cold run's baseline: each layer's cover compiled when first needed, not in background threads
        # (its own new directory, so that it compiles and writes to disk as the cold run does)
        runs["sweep-tf32-covers-when-needed"] = runs["sweep-tf32"] + ["--covers-ahead", "off",
                                                                      "--disk-cache", cache + "-when-needed"]
        runs["acdc-disk-cache"] = runs["acdc-one-tau"] + ["--disk-cache"]  # programs kept on disk, a fresh process
        # 20 s of the TF32 sweep under jax.profiler, into benchmarks/trace (device_run.sh packs it apart);
        # after sweep-tf32-cold its programs load from disk, so the 20 s are passes
        runs["sweep-trace"] = ["bench_gpt2_sweep.py", "--stop-after", "20", "--precision", "tensorfloat32",
                               "--trace", "benchmarks/trace", "--disk-cache", cache]
        runs["sweep-bf16"] = sweep + ["--dtype", "bfloat16"]
        if jax.device_count() > 1:
            runs["sweep-all-devices"] = sweep + ["--mesh", "auto"]
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+",
                        help="a subset of: patching acdc methods precision host sweep ..., run in the order given")
    parser.add_argument("--auto-circuit-python", help="interpreter of a venv with auto-circuit (see bench_acdc.py)")
    parser.add_argument("--cpu-sweep-seconds", type=float, default=300.0)
    parser.add_argument("--sweep-seconds", type=float, help="stop the GPT-2-small sweep after this long, on any backend")
    parser.add_argument("--timeout", type=float, help="seconds each benchmark may run before it is stopped")
    parser.add_argument("--total", type=float, help="seconds for the whole run: later benchmarks get what is left")
    parser.add_argument("--adopt-fastest-compile", action="store_true",
                        help="run the benchmarks after the compile runs under the XLA flags of the one that compiled "
                             "fastest (their JSON tagged with its name)")
    args = parser.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    runs = plan(cpu, args)
    unknown = set(args.only or []) - set(runs)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {sorted(runs)}")
    rows, began, began_wall, ran = [], time.perf_counter(), time.time(), set()
    for name in args.only or runs:
        command = runs[name]
        cmd = [sys.executable, str(HERE / command[0]), *command[1:]]
        limits = [t for t in (args.timeout, None if args.total is None else args.total - (time.perf_counter() - began))
                  if t is not None]
        limit = min(limits) if limits else None
        if limit is not None and limit < 10:
            rows.append({"benchmark": name, "command": " ".join(command), "exit": "not run (--total)", "seconds": 0})
            continue
        env = {**os.environ, **VARIANTS.get(name, {})}
        compiled = [n for n in (args.only or runs) if n.startswith("compile") and n in ran]
        if (args.adopt_fastest_compile and compiled and not name.startswith("compile")
                and "XLA_FLAGS" not in VARIANTS.get(name, {})):
            fastest, flags = fastest_compile_variant(compiled, began_wall)
            if flags:
                tag = "-".join(filter(None, [env.get("ACDC_JAX_BENCH_TAG"), flags["ACDC_JAX_BENCH_TAG"]]))
                env.update(XLA_FLAGS=flags["XLA_FLAGS"], ACDC_JAX_BENCH_TAG=tag)
                print(f"   under {fastest}'s flags, the fastest to compile", flush=True)
        print(f"== {name}: {' '.join(cmd[1:])}" + (f" with {VARIANTS[name]}" if name in VARIANTS else ""), flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=HERE.parent, timeout=limit, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        ran.add(name)
        rows.append({"benchmark": name, "command": " ".join(command), "exit": rc,
                     "seconds": round(time.perf_counter() - start, 1), "xla_flags": env.get("XLA_FLAGS")})
    print_table(rows, ["benchmark", "exit", "seconds", "command"])
    write_json("run_all", {"environment": environment(), "rows": rows})
    return 1 if any(r["exit"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

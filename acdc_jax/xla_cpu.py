"""XLA on a CPU: a guard against its wrong results, and flags that compile faster.

jaxlib 0.10 hands some reductions to YNNPACK on CPUs ("YNN fusions"). A
fused reduction over the last axis whose output has more than 2^15 elements,
such as KL divergence (a sum of p * log_softmax) vmapped over a batch of
candidate circuits, then returns wrong values for the elements past 2^15: a
batched ACDC pass of 32 candidates on the induction task (50 prompts x 28
positions each) scored its candidates 23-31 as other candidates. Importing
acdc_jax turns that fusion off when JAX has not started its CPU backend yet
(`FLAG`, added to ``XLA_FLAGS``; only where this jaxlib documents the flag and
its "-" syntax, since XLA aborts on unknown flags and values, and not where a
GPU or TPU plugin will run the passes). `check` runs a small case of the bug on the CPU
backend and raises if the results are still wrong.

Where no GPU or TPU plugin is installed it also adds the `FAST` flags, each
unless ``XLA_FLAGS`` names it: on a CPU a batched run's first call is mostly
compiling. Both made the benchmark model's runs (40 prompts, tau 0.1) compile
faster and run no slower: the classic fusion emitters (backend compiling
21.5-25.8 s against 29.7-31.8 s with the newer ones) and LLVM's "less"
optimisation level instead of XLA's default 3 (docs/performance.md, "XLA on a CPU").
Any of these flags already in ``XLA_FLAGS`` is left as it is.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import mmap
import os

import numpy as np

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
FAST = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=1")
_checked = False


def _in_jaxlib(texts: set) -> set:
    """Which of `texts` (flag names and help) jaxlib's libraries hold; each
    library is read once, however many flags are asked about."""
    spec = importlib.util.find_spec("jaxlib")
    found: set = set()
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in glob.glob(os.path.join(folder, "*.so")):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                found |= {t for t in texts - found if m.find(t) >= 0}
            if found == texts:
                return found
    return found


def _accelerator_plugin() -> bool:
    """A GPU or TPU plugin is installed: JAX will run the passes there, not on the CPU."""
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def _name(flag: str) -> str:
    return flag.split("=")[0].lstrip("-")


def set_flags() -> bool:
    """Add `FLAG` and the `FAST` flags to ``XLA_FLAGS`` (each unless named
    there) before JAX starts its backends, where this jaxlib knows them and
    no GPU or TPU plugin is installed. True when `FLAG` is in effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    guarded = _name(FLAG) in flags
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return guarded
    except (ImportError, AttributeError):
        return guarded
    # XLA aborts on an unknown flag or value: only where this jaxlib documents them, and only for CPU runs
    if _accelerator_plugin():
        return guarded
    ynn = {_name(FLAG).encode(), b"YNN fusion types", b"'+' or '-' prefix"}
    wanted = [f for f in FAST if _name(f) not in flags]
    known = _in_jaxlib({_name(f).encode() for f in wanted} | (set() if guarded else ynn))
    added = [f for f in wanted if _name(f).encode() in known]
    if not guarded and ynn <= known:
        added.append(FLAG)
        guarded = True
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return guarded


def check() -> None:
    """Raise if the CPU backend gets a reduction of more than 2^15 rows wrong
    (once per process; nothing on other backends)."""
    global _checked
    import jax
    import jax.numpy as jnp

    if _checked or jax.default_backend() != "cpu":
        return
    rng = np.random.default_rng(0)  # KL's pattern: 2 x 20,000 rows of 8 logits, rows as [200, 100]
    x, p = rng.normal(size=(2, 200, 100, 8)).astype(np.float32), rng.random((200, 100, 8)).astype(np.float32)
    weights = rng.random((200, 100)).astype(np.float32)
    metric = jax.vmap(lambda a, p, w: (jnp.sum(p * jax.nn.log_softmax(a, axis=-1), -1) * w).sum(), (0, None, None))
    got = np.asarray(jax.jit(metric)(x, p, weights))
    x64 = x.astype(np.float64)
    log_softmax = x64 - np.log(np.exp(x64).sum(-1, keepdims=True))
    want = ((p * log_softmax).sum(-1) * weights).sum(axis=(1, 2))
    if not np.allclose(got, want, rtol=1e-4):
        raise RuntimeError(
            "This jaxlib's CPU backend computes large fused reductions wrongly (XLA's YNNPACK reduce fusion), "
            f"which would give wrong metrics. Start Python with XLA_FLAGS='{FLAG}' (or import acdc_jax before "
            "running any JAX computation, which sets it), or install another jaxlib.")
    _checked = True

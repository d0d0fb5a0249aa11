"""A guard against wrong results from XLA's CPU backend.

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

Under the same conditions it also adds `FAST_COMPILE`: XLA's newer CPU
fusion emitters took 20-30% longer to compile a batched run's programs (the
benchmark model, 40 prompts, tau 0.1: 29.7-31.8 s of backend compiling
against 21.5-25.8 s with the classic emitters, whose passes ran as fast or
faster), and on a CPU the compiling is most of a run's first call. Either
flag already in ``XLA_FLAGS`` is left as it is.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import mmap
import os

import numpy as np

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
_checked = False


def _jaxlib_knows(*texts: bytes) -> bool:
    """Whether one of jaxlib's libraries holds all of `texts` (flag names and help)."""
    spec = importlib.util.find_spec("jaxlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in glob.glob(os.path.join(folder, "*.so")):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if all(m.find(t) >= 0 for t in texts):
                    return True
    return False


def _accelerator_plugin() -> bool:
    """A GPU or TPU plugin is installed: JAX will run the passes there, not on the CPU."""
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def turn_off_ynn_reductions() -> bool:
    """Add `FLAG` (and `FAST_COMPILE`) to ``XLA_FLAGS`` unless it is set,
    JAX's backends have started, or jaxlib does not know it. True when
    `FLAG` is in effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return True
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    # XLA aborts on an unknown flag or value: only where this jaxlib documents both, and only for CPU runs
    if _accelerator_plugin() or not _jaxlib_knows(b"xla_cpu_experimental_ynn_fusion_type", b"YNN fusion types",
                                                   b"'+' or '-' prefix"):
        return False
    if "xla_cpu_use_fusion_emitters" not in flags and _jaxlib_knows(b"xla_cpu_use_fusion_emitters"):
        flags = f"{flags} {FAST_COMPILE}"
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


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

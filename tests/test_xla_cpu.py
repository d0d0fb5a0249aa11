"""The guard against XLA CPU's wrong large fused reductions (acdc_jax/xla_cpu.py)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import acdc_jax  # noqa: F401  (sets the flag before JAX starts, as in every test process)
from acdc_jax.tasks.base import kl_divergence


def test_a_vmapped_kl_over_many_rows_equals_one_candidate_at_a_time():
    """32 candidates x 50 prompts x 28 positions: on jaxlib 0.10.2 without the
    flag, the candidates past row 2^15 of the reduction came back wrong."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(32, 50, 28, 49)).astype(np.float32))
    task = type("T", (), {"reference": rng.normal(size=(50, 28, 49)).astype(np.float32),
                          "weights": (rng.random((50, 28)) > 0.5).astype(np.float32)})()
    batched = np.asarray(jax.jit(jax.vmap(lambda x: kl_divergence(x, task)))(logits))
    one = np.array([float(jax.jit(lambda x: kl_divergence(x, task))(logits[k])) for k in range(32)])
    np.testing.assert_allclose(batched, one, rtol=1e-5)


def test_the_check_refuses_a_backend_that_miscomputes():
    """With JAX started before acdc_jax (so the flag could not be set), the
    check raises exactly when the backend gets the reduction wrong."""
    code = textwrap.dedent("""
        import jax
        jax.numpy.zeros(1).block_until_ready()  # the CPU backend starts here, without the flag
        from tests.test_xla_cpu import test_a_vmapped_kl_over_many_rows_equals_one_candidate_at_a_time as kl_case
        try:
            kl_case()
            wrong = False
        except AssertionError:
            wrong = True
        from acdc_jax import xla_cpu
        try:
            xla_cpu.check()
            raised = False
        except RuntimeError as e:
            raised = "XLA_FLAGS" in str(e)
        print(wrong, raised)
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wrong, raised = out.stdout.split()[-2:]
    assert wrong == raised, (wrong, raised)


def test_fast_compile_flags_unless_the_user_chose():
    """A fresh process gets the flags that compile faster (classic CPU fusion
    emitters, LLVM's "less" optimisation) beside the YNN flag; a flag that
    XLA_FLAGS already names keeps its value, and the others are still added."""
    code = "import os, acdc_jax; print(os.environ['XLA_FLAGS'])"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "XLA_FLAGS": "--xla_backend_optimization_level=3"},
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and chosen.returncode == 0, plain.stderr[-2000:] + chosen.stderr[-2000:]
    from acdc_jax.xla_cpu import FAST, FLAG
    assert plain.stdout.split() == [*FAST, FLAG]
    assert chosen.stdout.split() == ["--xla_backend_optimization_level=3", "--xla_cpu_use_fusion_emitters=false", FLAG]

"""JAX_PLATFORMS=cuda (or tpu) must not remove the host backend diffusers' Flax loaders use."""

import os
import subprocess
import sys


def test_accelerator_only_platforms_keep_the_cpu_backend_last():
    code = "import jax, jaxcond; print(jax.config.jax_platforms)"
    env = dict(os.environ, JAX_PLATFORMS="cuda")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cuda,cpu"  # the accelerator stays the default device

"""jaxcond.xla's CPU runtime settings, in processes with one CPU device (as the demo runs)."""

import json
import os
import subprocess
import sys

from conftest import ROOT

# A program whose temporary buffer XLA must allocate at every call: the [8192, 2048] float32
# product (64 MiB, 16384 pages) is materialised before the second product reads it.
PROGRAM = """
import json, resource, sys
import jax, jax.numpy as jnp
from jaxcond import xla
applied = xla.cpu_runtime() if sys.argv[1] == "on" else None
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
x, w, v = jnp.ones((8192, 64)) / 64, jnp.ones((64, 2048)), jnp.ones((2048, 8))
assert f.lower(x, w, v).compile().memory_analysis().temp_size_in_bytes >= 2**26
for _ in range(10):  # the heap grows to its working size
    y = f(x, w, v).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = f(x, w, v).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 10
print(json.dumps({"devices": jax.local_device_count(), "applied": applied, "faults": faults,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch"), "y": float(y.sum())}))
"""


def _calls(setting: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROGRAM, setting], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_runtime_reuses_the_temporary_buffer():
    """With jax's defaults every call maps its 64 MiB temporary afresh and faults in its
    pages (so this test fails if a jax release stops doing that, and the settings would be
    dead weight); after `cpu_runtime()` the calls reuse the memory, with the same results."""
    off, on = _calls("off"), _calls("on")
    assert off["devices"] == on["devices"] == 1
    assert off["async"] and not on["async"]
    assert on["applied"] is True
    assert off["faults"] > 10_000, off
    assert on["faults"] < 1_000, on
    assert on["y"] == off["y"]

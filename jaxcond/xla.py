"""XLA compiler options of jaxcond's compiled functions, per platform.

Only measured choices live here; `benchmarks/step_time.py` prints the ratio of each
against jax's own defaults. They change how XLA fuses and schedules, so float results
round differently (params compared across topologies after a few Adam steps differed
by up to ~3e-4 with the option below, under 1e-4 without); dropout masks, timesteps and
noise are integer/bit derivations and keep their bits either way.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent in jax 0.10

log = logging.getLogger("jaxcond")

# XLA:CPU's YNNPACK fusions, on by default in jaxlib 0.10. With one or two CPU devices in
# the process (a real CPU run, such as the demo) they made the demo's train step slower on
# 2 cores (benchmarks/step_time.py, jaxopts/sharded: 1.34x with one device, 1.14x with
# two), so the empty list turns them off. With 8 simulated CPU devices sharing those
# cores (the tests, `--devices 8` benchmarks) turning them off made it 1.14x slower
# instead, so there jax's defaults stay. CPU only: the GPU and TPU compilers never see it.
_FEW_DEVICES_CPU = {"xla_cpu_experimental_ynn_fusion_type": ""}
_FEW_DEVICES = 2


def options(platform: str, local_devices: int | None = None) -> dict[str, Any]:
    """jaxcond's compiler options for `platform` ("cpu", "gpu", "tpu", ...) in a process
    with `local_devices` devices of it (default: as many as this process has)."""
    if platform != "cpu":
        return {}
    if local_devices is None:
        local_devices = jax.local_device_count(platform)
    return dict(_FEW_DEVICES_CPU) if local_devices <= _FEW_DEVICES else {}


def use_cpu_devices(n: int) -> None:
    """Splits this process's CPU into `n` XLA devices (config.mesh.cpu_devices), so that a
    CPU run is data-parallel over them, each device stepping its share of the batch on its
    own thread: on 2 cores the demo's step took 0.92x the time on 2 devices as on one
    (benchmarks/step_time.py --devices 2), one device's program leaving a core idle
    between its many small ops.

    Must run before the CPU backend starts. `n` < 1 (validated later with the rest of the
    config) keeps jax's count, and so does an explicit
    --xla_force_host_platform_device_count in XLA_FLAGS (the tests' 8 simulated devices);
    a backend already started (a library caller that used JAX first) keeps its devices,
    with a log line. GPU and TPU runs are unaffected: their mesh never holds CPU devices.
    """
    if not isinstance(n, int) or n < 1:
        return
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if xla_bridge.backends_are_initialized():
        if jax.config.jax_num_cpu_devices != n:
            log.info("config.mesh.cpu_devices = %d not applied: JAX was already started in this "
                     "process (with %d CPU devices)", n, len(jax.devices("cpu")))
        return
    jax.config.update("jax_num_cpu_devices", n)


def jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` with the options of the default backend's platform,
    looked up at the first call (so importing jaxcond never initialises a backend)."""
    by_platform: dict[str, Callable] = {}

    def jitted() -> Callable:
        platform = jax.default_backend()
        if platform not in by_platform:
            by_platform[platform] = jax.jit(fun, compiler_options=options(platform), **jit_kwargs)
        return by_platform[platform]

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        return jitted()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)  # as jax.jit's
    return call

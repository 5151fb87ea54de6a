"""How jaxcond has XLA compile and run its functions, per platform: compiler options,
the CPU runtime of a process that computes on one CPU device, and where compiled
programs are kept between processes.

Only measured choices live here; `benchmarks/step_time.py`, `benchmarks/cpu_runtime.py`
and `benchmarks/compile_cache.py` print the ratio of each against jax's own defaults. The
compiler options change how XLA fuses and schedules, so float results round differently
(params compared across topologies after a few Adam steps differed by up to ~3e-4 with
the option below, under 1e-4 without); dropout masks, timesteps and noise are integer/bit
derivations and keep their bits either way. The runtime settings change where memory comes
from, and the compilation cache where a program comes from, not a number.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform as platform_lib
from collections.abc import Callable
from typing import Any

import jax

from jaxcond import storage
from jaxcond.checks import ConfigError
from jaxcond.outputs import make_output_dir

log = logging.getLogger("jaxcond")

# XLA:CPU's YNNPACK fusions, on by default in jaxlib 0.10. With one CPU device in the
# process (a real CPU run, such as the demo) they made the demo's train step 1.12x slower
# on 2 cores (benchmarks/step_time.py, jaxopts/sharded), so the empty list turns them off.
# With 8 simulated CPU devices sharing those cores (the tests, `--devices 8` benchmarks)
# turning them off made it 1.14x slower instead, so there jax's defaults stay.
# Never with several devices anyway: with the option, a data=2 mesh of 2 CPU devices gave
# wrong samples in the first two rows of each device's shard (jaxlib 0.10.2;
# the same program with jax's defaults, or on one device, matched within one uint8 step;
# docs/upstream/xla_cpu_ynn_two_devices.py is a standalone repro to rerun after upgrades).
# CPU only: the GPU and TPU compilers never see the option.
_ONE_DEVICE_CPU = {"xla_cpu_experimental_ynn_fusion_type": ""}


def options(platform: str, local_devices: int | None = None) -> dict[str, Any]:
    """jaxcond's compiler options for `platform` ("cpu", "gpu", "tpu", ...) in a process
    with `local_devices` devices of it (default: as many as this process has)."""
    if platform != "cpu":
        return {}
    if local_devices is None:
        local_devices = jax.local_device_count(platform)
    return dict(_ONE_DEVICE_CPU) if local_devices == 1 else {}


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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def cpu_runtime() -> bool:
    """Makes this process's one-device CPU computations reuse their memory; True if it did.

    Call it once, before jax creates its backends (after `jax.distributed.initialize`).
    XLA:CPU allocates each execution's temporary buffer afresh (~160 MB for the demo's
    train step). glibc serves such a block with mmap and unmaps it when freed, so every
    step the kernel faulted in and zeroed ~40,000 pages: ~0.1 s of system time per step of
    ~0.3 s on 2 cores. Two settings let the block be reused instead:
    - one-device CPU computations run inline in the calling thread (jax's
      `jax_cpu_enable_async_dispatch` off), so the block comes from the main thread's heap:
      blocks this large allocated by other threads would always be mmapped;
    - glibc takes large blocks from that heap instead of mmap, and keeps freed memory
      (the process holds its peak heap size until it exits).
    Only where the computations run on the CPU (on GPU/TPU hosts the large host buffers
    are checkpoints and weights, better returned to the system) and with glibc.
    Multi-device CPU computations are dispatched asynchronously whatever the flag says.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if jax.default_backend() != "cpu" or platform_lib.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def compilation_cache(directory: str) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` ("" = off), a folder or a
    Cloud Storage URL (gs://BUCKET/path); returns the directory in use, or None.

    Call it before the process compiles anything (jax decides once per process).
    JAX_COMPILATION_CACHE_DIR, jax's own setting, wins when set. jax keys each program by
    its HLO, compiler options, devices and jax version, so a cached program is the one a
    fresh compile would give (the bits do not change), and stores only programs that took
    over a second to compile. Only process 0 of a multi-host run writes, so there the
    directory should be one all hosts read: a gs:// URL, NFS or a GCS FUSE mount. jax
    reads and writes gs:// itself (etils.epath over gcsfs, which honours
    STORAGE_EMULATOR_HOST). A directory that cannot be written (no bucket, no permission,
    no credentials) is logged and skipped: the run then compiles as without a cache.
    Raises ValueError for a file, or a URL of another scheme or without a bucket.
    """
    current = jax.config.jax_compilation_cache_dir
    if current or not directory:
        return current or None
    if storage.is_url(directory):
        try:
            storage.check_url(directory, "--compilation_cache")
        except ConfigError as e:  # a mistyped flag: refused, as a file is
            raise ValueError(f"{e}, or --compilation_cache= to turn the cache off") from None
        path = storage.absolute(directory)
    else:
        path = os.path.abspath(os.path.expanduser(directory))
        if os.path.exists(path) and not os.path.isdir(path):  # a mistyped flag, not a passing problem
            raise ValueError(f"--compilation_cache {directory}: is a file, not a folder; pass a folder, or "
                             "--compilation_cache= to turn the cache off")
    try:
        # Proven once, up front: jax itself would warn at every write to a missing bucket.
        make_output_dir(path, "the folder")
    except ConfigError as e:
        log.warning("no compilation cache (--compilation_cache %s: %s); compiling every program afresh. "
                    "Pass a writable directory, or --compilation_cache= to turn it off.", directory, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path

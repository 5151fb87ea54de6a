"""Accelerator chips as `jaxcond plan` judges them: memory per chip, peak dense bfloat16
FLOP/s and memory bandwidth, from the vendors' published specifications.

TPU topologies are named as Cloud TPU names them (`v5e:2x2`, `v5p:2x2x1`, `v4:2x2x1`,
`v6e:4x4`); their devices come from libtpu's compiler (`jax.experimental.topologies`),
so no TPU is needed to compile for one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

import jaxcond
from jaxcond.checks import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # memory per device (for a TPU chip: per chip, one device each)
    peak_bf16_flops: float  # dense, per second, per device
    hbm_bytes_per_s: float


TPUS = {"v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9),
        "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
        "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
        "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9)}
# Matched against jax's device_kind; memory comes from the device itself when it says.
GPUS = {"H200": Chip("NVIDIA H200", 141 * 10**9, 989e12, 4800e9),
        "H100": Chip("NVIDIA H100 SXM", 80 * 10**9, 989e12, 3350e9),
        "A100": Chip("NVIDIA A100", 80 * 10**9, 312e12, 2039e9),
        "L40S": Chip("NVIDIA L40S", 48 * 10**9, 362e12, 864e9),
        "L4": Chip("NVIDIA L4", 24 * 10**9, 121e12, 300e9),
        "RTX 4090": Chip("NVIDIA GeForce RTX 4090", 24 * 10**9, 165e12, 1008e9),
        "RTX 3090": Chip("NVIDIA GeForce RTX 3090", 24 * 10**9, 71e12, 936e9)}
# Accelerator types libtpu expects in its environment (else it probes cloud metadata).
_ACCELERATOR = {"v4": "v4-{cores}", "v5e": "v5litepod-{chips}", "v5p": "v5p-{cores}", "v6e": "v6e-{chips}"}
_TOPOLOGY = re.compile(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})")


def topology_devices(name: str) -> tuple[list, Chip]:
    """The devices of TPU topology `name` (e.g. `v5e:2x2`) to compile for, and its chip."""
    m = _TOPOLOGY.fullmatch(name)
    if not m:
        raise ConfigError(f"--topology {name!r}: expected a TPU topology such as v5e:2x2, v5e:4x4, "
                          f"v5p:2x2x1, v4:2x2x1 or v6e:2x2 (chips {', '.join(TPUS)})")
    generation, dims = m.group(1), m.group(2)
    chips = math.prod(int(d) for d in dims.split("x"))
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology {name!r}: compiling for a TPU needs libtpu, which is not installed: "
                          "pip install 'jaxcond[tpu]' (or JAXCOND_EXTRA=tpu bash launch/local.sh setup)")
    want = {"TPU_ACCELERATOR_TYPE": _ACCELERATOR[generation].format(chips=chips, cores=2 * chips),
            "TPU_WORKER_HOSTNAMES": "localhost"}
    for k, v in want.items():  # a user's own settings are kept, jaxcond's placeholders replaced
        if os.environ.get(k) in (None, jaxcond.TPU_PLACEHOLDERS[k]):
            os.environ[k] = v
    # Only compiling, no TPU touched: several such processes (tests, benchmarks) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        shape = [int(d) for d in dims.split("x")] + [1] * (3 - len(dims.split("x")))
        # A host holds 2x2 chips (v5p, v4: 2x2x1); a slice smaller than that is one host.
        small = {"chips_per_host_bounds": tuple(shape)} if chips < 4 else {}
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, **small)
    except Exception as e:  # a shape libtpu does not know, a broken install
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--topology {name!r}: libtpu cannot describe it ({detail}); use a topology "
                          "Cloud TPU offers, e.g. v5e:2x2 or v5p:2x2x1") from None
    return list(topology.devices), TPUS[generation]


def local_chip(device: jax.Device) -> Chip | None:
    """The chip of a local device (GPU or TPU), its memory as the device reports it; None
    for a CPU or an unknown kind."""
    kind = device.device_kind
    table = {**{c.name: c for c in TPUS.values()}, **GPUS}
    chip = next((c for key, c in table.items() if key in kind), None)
    if chip is None and device.platform == "tpu":
        gen = {"TPU v5 lite": "v5e", "TPU v6 lite": "v6e", "TPU v5": "v5p", "TPU v4": "v4"}
        chip = next((TPUS[g] for k, g in gen.items() if kind.startswith(k)), None)
    if chip is None:
        return None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return dataclasses.replace(chip, name=kind, hbm_bytes=int(limit)) if limit else chip

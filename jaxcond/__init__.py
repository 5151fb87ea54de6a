"""jaxcond: text-to-image diffusion training with conditional dropout inside the compiled step."""

import importlib.util
import os

import jax

# diffusers' Flax loaders stage weights on the host CPU backend (jax.local_devices(backend=
# "cpu")), which JAX_PLATFORMS=cuda or =tpu removes: keep it, after the accelerator, so
# the default device is unchanged. Effective until JAX first creates its backends.
_platforms = [p for p in (jax.config.jax_platforms or "").split(",") if p]
if _platforms and "cpu" not in _platforms:
    jax.config.update("jax_platforms", ",".join(_platforms + ["cpu"]))

# libtpu (the `tpu` extra, which `jaxcond plan` compiles with) loads on machines without a TPU
# too, and there prints a screen of warnings about its unset topology variables. Where jax
# finds no TPU chip on the PCI bus, give it quiet placeholders; `hardware.topology_devices`
# replaces them with the topology it compiles for.
TPU_PLACEHOLDERS = {"TPU_ACCELERATOR_TYPE": "v5litepod-1", "TPU_WORKER_HOSTNAMES": "localhost"}


def _no_tpu_chip() -> bool:
    try:
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
    except (ImportError, AttributeError, OSError):
        return False  # unsure: leave libtpu's own start-up alone


if importlib.util.find_spec("libtpu") is not None and _no_tpu_chip():
    for _k, _v in TPU_PLACEHOLDERS.items():
        os.environ.setdefault(_k, _v)

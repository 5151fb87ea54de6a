"""jaxcond: text-to-image diffusion training with conditional dropout inside the compiled step."""

import jax

# diffusers' Flax loaders stage weights on the host CPU backend (jax.local_devices(backend=
# "cpu")), which JAX_PLATFORMS=cuda or =tpu removes: keep it, after the accelerator, so
# the default device is unchanged. Effective until JAX first creates its backends.
_platforms = [p for p in (jax.config.jax_platforms or "").split(",") if p]
if _platforms and "cpu" not in _platforms:
    jax.config.update("jax_platforms", ",".join(_platforms + ["cpu"]))

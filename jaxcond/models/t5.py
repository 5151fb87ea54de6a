"""transformers' Flax T5 encoder as the sd3 family uses it: PyTorch's key layout in and
out, and the one call of it that this JAX refuses."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

# PyTorch's T5 names its gated projections `wi_0`/`wi_1`, which convert's rule would read
# as list entries `wi.0`; and it ties `encoder.embed_tokens` to `shared` (one tensor).
_GATED = re.compile(r"\.wi_(\d)\.")
_TIED = "encoder.embed_tokens.weight"


def from_pytorch(tensors: Mapping) -> dict:
    """A PyTorch T5EncoderModel state dict keyed as `convert.from_pytorch` reads it."""
    out = {_GATED.sub(r".wi.\1.", k): v for k, v in tensors.items() if k != _TIED}
    if "shared.weight" not in out and _TIED in tensors:
        out["shared.weight"] = tensors[_TIED]
    return out


def to_pytorch(tensors: Mapping) -> dict:
    """`convert.to_pytorch` of a Flax T5 encoder keyed as PyTorch's T5EncoderModel."""
    return {re.sub(r"\.wi\.(\d)\.", r".wi_\1.", k): v for k, v in tensors.items()}


class _NumpyWithOldClip:
    """jax.numpy, but `clip` also takes the `a_min`/`a_max` names that JAX removed."""

    def __getattr__(self, name: str):
        return getattr(jnp, name)

    @staticmethod
    def clip(x, a_min=None, a_max=None):
        return jnp.clip(x, min=a_min, max=a_max)


def patch_flax_t5() -> None:
    """transformers' Flax T5 calls `jnp.clip(..., a_max=)`, which this JAX refuses: its
    module (only it) gets a jax.numpy whose clip takes those names."""
    from transformers.models.t5 import modeling_flax_t5

    if not isinstance(modeling_flax_t5.jnp, _NumpyWithOldClip):
        modeling_flax_t5.jnp = _NumpyWithOldClip()

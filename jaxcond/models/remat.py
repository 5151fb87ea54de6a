"""Rematerialisation (gradient checkpointing) inside diffusers' Flax UNet.

`model.remat` names a policy: `none` keeps every activation for the backward pass;
`blocks` keeps only what enters and leaves each UNet block (down, mid, up) and recomputes
the rest of a block during its backward pass; `blocks_keep_matmuls` recomputes only the
cheap ops inside a block (normalisations, activations, elementwise), keeping matmul and
convolution outputs (jax.checkpoint_policies.dots_saveable). The result is the same to
float rounding; the cost is a second forward pass of what is recomputed.

diffusers builds its blocks in `FlaxUNet2DConditionModel.setup` from names in its module,
so `blocks_remat` puts `flax.linen.remat` versions under those names while a UNet is
applied (setup runs inside `apply`); parameters and their names are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax

POLICIES = {"none": None, "blocks": "everything", "blocks_keep_matmuls": jax.checkpoint_policies.dots_saveable}
_BLOCKS = ("FlaxCrossAttnDownBlock2D", "FlaxDownBlock2D", "FlaxUNetMidBlock2DCrossAttn", "FlaxCrossAttnUpBlock2D",
           "FlaxUpBlock2D")


@contextlib.contextmanager
def blocks_remat(policy: str) -> Iterator[None]:
    """While open, UNets built by diffusers rematerialise each block by `policy`."""
    if POLICIES[policy] is None:
        yield
        return
    from diffusers.models.unets import unet_2d_condition_flax as unet_module

    saved = {name: getattr(unet_module, name) for name in _BLOCKS}
    keep = POLICIES[policy]
    try:
        for name, cls in saved.items():
            setattr(unet_module, name, nn.remat(cls, policy=None if keep == "everything" else keep))
        yield
    finally:
        for name, cls in saved.items():
            setattr(unet_module, name, cls)

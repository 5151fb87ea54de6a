"""Flux transformer weights between jaxcond's Flax params and diffusers' PyTorch layout (the
keys of `FluxTransformer2DModel.state_dict()` and of its safetensors files, sharded or not),
numpy or jax arrays in, numpy out.

The Flax modules carry diffusers' names, so `jaxcond.models.convert`'s one rule maps every
parameter (`single_transformer_blocks_3/attn/norm_q/scale` is
`single_transformer_blocks.3.attn.norm_q.weight`; `transformer_blocks_0/attn/to_out_0/kernel`
is `transformer_blocks.0.attn.to_out.0.weight`, transposed). The model has no buffers: the
rotary embeddings are recomputed from the position ids, so every tensor is a parameter.
Black Forest Labs' original single-file layout (`double_blocks.*`, fused qkv) is not this
one and is refused with a hint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcond.models import convert
from jaxcond.models.convert import WeightsMismatch
from jaxcond.models.flux import Flux, FluxConfig

_GUIDANCE = "time_text_embed.guidance_embedder."
_ORIGINAL_LAYOUT = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.")


def param_shapes(config: FluxConfig) -> dict:
    """The Flax param tree of `config` as ShapeDtypeStructs (float32), without allocating it."""
    c = config
    args = (jnp.zeros((1, 1, c.in_channels)), jnp.zeros((1, 1, c.joint_attention_dim)),
            jnp.zeros((1, c.pooled_projection_dim)), jnp.zeros((1,)),
            jnp.zeros((1, len(c.axes_dims_rope))), jnp.zeros((1, len(c.axes_dims_rope))),
            jnp.zeros((1,)) if c.guidance_embeds else None)
    return jax.eval_shape(lambda: Flux(c).init(jax.random.key(0), *args))["params"]


def from_diffusers(state_dict: Mapping[str, Any], config: FluxConfig, source: str = "checkpoint") -> dict:
    """diffusers' PyTorch state dict (numpy or jax arrays, any float dtype) -> float32 Flax params.

    Every tensor must be used and every parameter present with its shape; otherwise
    WeightsMismatch lists the missing, unexpected and mis-shaped keys, with a hint when the
    file is for the other guidance variant or in the original (non-diffusers) layout.
    """
    try:
        return convert.from_pytorch(state_dict, param_shapes(config), source)
    except WeightsMismatch as e:
        hint = _hint(state_dict, config)
        raise WeightsMismatch(f"{e}\n{hint}" if hint else str(e)) from None


def _hint(state_dict: Mapping[str, Any], config: FluxConfig) -> str | None:
    if any(k.startswith(_ORIGINAL_LAYOUT) for k in state_dict):
        return ("the keys are Black Forest Labs' original layout (double_blocks.*, single_blocks.*), not diffusers' "
                "FluxTransformer2DModel layout: use the diffusers-format transformer/ folder")
    has_guidance = any(k.startswith(_GUIDANCE) for k in state_dict)
    if has_guidance != config.guidance_embeds:
        return (f"the file {'has' if has_guidance else 'lacks'} a guidance embedder ({_GUIDANCE}*) but the config "
                f"says guidance_embeds={config.guidance_embeds}: FLUX.1-dev embeds guidance, FLUX.1-schnell does not")
    return None


def to_diffusers(params: Mapping, config: FluxConfig) -> dict[str, np.ndarray]:
    """Flax params of `config` -> diffusers' PyTorch state dict (same dtypes), ready for
    `FluxTransformer2DModel.load_state_dict(strict=True)`."""
    convert.check_fits(params, param_shapes(config), "params")
    return {k: np.asarray(v) for k, v in convert.to_pytorch(params).items()}

"""MMDiT weights between jaxcond's Flax params and diffusers' PyTorch layout (the keys of
`SD3Transformer2DModel.state_dict()` and of its safetensors files), numpy in and out.

The Flax modules carry diffusers' names, so `jaxcond.models.convert`'s one rule maps every
parameter (`transformer_blocks_3/attn/to_out_0/kernel` is `transformer_blocks.3.attn.to_out.0.weight`,
transposed). The one tensor that is not a parameter is `pos_embed.pos_embed`, PatchEmbed's
fixed sin-cos table, which the Flax model recomputes instead of training: loading checks that
the file's table is the one the config implies (a different one means a file made for another
`sample_size` or `pos_embed_max_size`), exporting writes it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcond.models import convert
from jaxcond.models.convert import WeightsMismatch
from jaxcond.models.mmdit import MMDiT, MMDiTConfig, pos_embed_table

_POS_EMBED = "pos_embed.pos_embed"


def param_shapes(config: MMDiTConfig) -> dict:
    """The Flax param tree of `config` as ShapeDtypeStructs (float32), without allocating it."""
    c, p = config, config.patch_size
    args = (jnp.zeros((1, c.in_channels, p, p)), jnp.zeros((1, 1, c.joint_attention_dim)),
            jnp.zeros((1, c.pooled_projection_dim)), jnp.zeros((1,)))
    return jax.eval_shape(lambda: MMDiT(c).init(jax.random.key(0), *args))["params"]


def from_diffusers(state_dict: Mapping[str, Any], config: MMDiTConfig, source: str = "checkpoint") -> dict:
    """diffusers' PyTorch state dict (numpy or jax arrays, any float dtype) -> float32 Flax params.

    Every tensor must be used and every parameter present with its shape; otherwise
    WeightsMismatch lists the missing, unexpected and mis-shaped keys.
    """
    tensors = dict(state_dict)
    stored, table = tensors.pop(_POS_EMBED, None), pos_embed_table(config)
    problem = _table_problem(stored, table, config)
    try:
        params = convert.from_pytorch(tensors, param_shapes(config), source)
    except WeightsMismatch as e:
        raise WeightsMismatch(f"{e}\n{problem}" if problem else str(e)) from None
    if problem:
        raise WeightsMismatch(f"{source} does not fit the model its config describes: {problem}")
    return params


def _table_problem(stored: Any, table: np.ndarray, config: MMDiTConfig) -> str | None:
    if stored is None:
        return f"{_POS_EMBED} (the position table, shape {table.shape}) is missing"
    if tuple(stored.shape) != table.shape:
        return f"{_POS_EMBED}: checkpoint {tuple(stored.shape)}, model wants {table.shape}"
    # Within the rounding of the stored dtype (checkpoints hold it in bfloat16 too); another
    # sample_size or pos_embed_max_size moves most entries by far more.
    atol = max(1e-6, float(jnp.finfo(stored.dtype).eps))
    error = float(np.abs(np.asarray(stored, np.float32) - table).max())
    if not error <= atol:
        return (f"{_POS_EMBED} differs by up to {error:.3g} from the sin-cos table of sample_size={config.sample_size}, "
                f"patch_size={config.patch_size}, pos_embed_max_size={config.pos_embed_max_size}; "
                "is the config the file's own?")
    return None


def to_diffusers(params: Mapping, config: MMDiTConfig) -> dict[str, np.ndarray]:
    """Flax params of `config` -> diffusers' PyTorch state dict (same dtypes), the
    position table included, ready for `SD3Transformer2DModel.load_state_dict(strict=True)`."""
    convert.check_fits(params, param_shapes(config), "params")
    tensors = {k: np.asarray(v) for k, v in convert.to_pytorch(params).items()}
    tensors[_POS_EMBED] = pos_embed_table(config)
    return tensors

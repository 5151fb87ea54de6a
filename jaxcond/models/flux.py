"""The transformer of Flux.1 (dev, schnell) in Flax: diffusers' `FluxTransformer2DModel`
(diffusers 0.39) module for module, so its PyTorch weights load by the one naming rule of
`jaxcond.models.convert` (`flux_convert` holds the conversion).

The model sees tokens, not images: FluxPipeline packs each 2x2 patch of the [B, C, H, W]
latents into one token of 4C channels (`pack_latents`) and gives every token three integer
position ids (`image_ids`; the text tokens' ids are zeros, `text_ids`). Positions enter only
through rotary embeddings (RoPE) of the queries and keys: the head dimension is split into
`axes_dims_rope` parts, one per id axis. The timestep (and, for guidance-distilled dev, the
guidance scale) and the pooled CLIP text predict every block's modulations.

`num_layers` double-stream blocks keep text and image tokens apart, each with its own
projections, norms and feed-forward, but attend jointly over [text tokens, image tokens]
with RMS-normed queries and keys. Then `num_single_layers` single-stream blocks treat the
concatenation as one sequence: attention and an MLP in parallel from the same modulated
input, mixed by one output projection. Only the image tokens reach the output.

Params are float32; `dtype` is the compute dtype (params cast to bfloat16 by the trainer
work too). Norm statistics, the timestep sinusoids and the rotary embeddings are computed in
float32 whatever `dtype` is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcond.models.mmdit import (
    FeedForward,
    layer_class,
    Modulation,
    RMSNorm,
    TwoLayerMLP,
    layer_norm,
    modulate,
    timestep_embedding,
)

_THETA = 10000.0  # FluxPosEmbed's rotary base
_MLP_RATIO = 4  # single-stream blocks' MLP width, in multiples of the model width
_TIME_SCALE = 1000.0  # the model multiplies timestep and guidance by this before the sinusoid


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The fields of diffusers' FluxTransformer2DModel config (its defaults: Flux.1's
    12B layout; `guidance_embeds` is true for dev, false for schnell). `out_channels`
    None means in_channels, as in diffusers; it is stored resolved."""

    patch_size: int = 1  # only sizes proj_out: the pipeline does the patching (pack_latents)
    in_channels: int = 64  # channels of a packed token: 4 x the VAE's latent channels
    out_channels: int | None = None
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # width of the T5 hidden states
    pooled_projection_dim: int = 768  # width of the pooled CLIP embedding
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # head-dim share of each position-id axis

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        problems = []
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            problems.append(f"axes_dims_rope={self.axes_dims_rope}: every axis needs a positive even share "
                            "(the rotary embedding turns pairs of channels)")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(f"axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, but the "
                            f"rotary embedding covers the whole head: attention_head_dim={self.attention_head_dim}")
        for name in ("patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if problems:
            raise ValueError("Flux config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> FluxConfig:
        """From a diffusers `transformer/config.json` (its `_class_name`-like keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"Flux config: unknown fields {unknown}")
        return cls(**{k: v for k, v in config.items() if k in fields})

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `config.json` of this model."""
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", **d}


# -- what FluxPipeline prepares -------------------------------------------------------------------

def pack_latents(latents: jax.Array) -> jax.Array:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FluxPipeline._pack_latents. Each 2x2 patch becomes a
    token (row-major over the patch grid), its channels ordered (c, row in patch, column)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux: latents of {h}x{w} need even sides to pack into 2x2 patches")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    return jnp.transpose(x, (0, 2, 4, 1, 3, 5)).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: jax.Array, height: int, width: int) -> jax.Array:
    """[B, height/2 * width/2, 4C] -> [B, C, height, width], the inverse of `pack_latents`
    (FluxPipeline._unpack_latents, with `height` and `width` in latent pixels rather than image
    pixels and a VAE factor)."""
    b, n, c4 = packed.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"Flux: {n} tokens of {c4} channels do not unpack into latents of {height}x{width}")
    x = packed.reshape(b, height // 2, width // 2, c4 // 4, 2, 2)
    return jnp.transpose(x, (0, 3, 1, 4, 2, 5)).reshape(b, c4 // 4, height, width)


def image_ids(height: int, width: int) -> jax.Array:
    """[height * width, 3] float32 position ids of a height x width grid of packed tokens
    (the latents' sides / 2): (0, row, column) in row-major order, as
    FluxPipeline._prepare_latent_image_ids(batch, height, width, ...)."""
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    return jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).reshape(height * width, 3)


def text_ids(length: int) -> jax.Array:
    """[length, 3] zeros: the text tokens' position ids in FluxPipeline.encode_prompt."""
    return jnp.zeros((length, 3), jnp.float32)


# -- rotary embeddings ----------------------------------------------------------------------------

def rope_angles(ids: jax.Array, axes_dims: tuple[int, ...]) -> jax.Array:
    """[S, n_axes] position ids -> [S, head_dim / 2] float32 angles: FluxPosEmbed, one angle per
    pair of channels, axis after axis, position * THETA^(-2i / axis_dim). The frequencies are
    computed in float64 as diffusers does, the products in float32 (diffusers multiplies in
    float64: a relative difference of float32's rounding, ~1e-5 rad at position 128)."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / _THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        parts.append(ids[:, axis].astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None])
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """[B, S, heads, head_dim] rotated pair by pair (channels 2i, 2i+1 as a complex number) by
    [S, head_dim / 2] angles given as cos and sin: diffusers' apply_rotary_emb(use_real=True,
    use_real_unbind_dim=-1), in float32, back in x's dtype."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    return jnp.stack([re * c - im * s, im * c + re * s], axis=-1).reshape(x.shape).astype(x.dtype)


# -- blocks ---------------------------------------------------------------------------------------

class FluxAttention(nn.Module):
    """diffusers' FluxAttention under FluxAttnProcessor. Queries and keys are RMS-normed per
    head, then rotated by `rope` (cos, sin over the whole sequence). With `context` (the
    double-stream blocks) the text tokens get their own projections and norms and come
    first in the joint sequence; the output is split back, image part through `to_out_0`,
    text part through `to_add_out`. Without it (single-stream) the heads are returned
    unprojected: the block's proj_out mixes them with its MLP."""

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    def _heads(self, name: str, x: jax.Array, norm: str | None = None) -> jax.Array:
        y = nn.Dense(self.heads * self.head_dim, dtype=self.dtype, name=name)(x)
        y = y.reshape(*x.shape[:2], self.heads, self.head_dim)
        return RMSNorm(self.dtype, name=norm)(y) if norm else y

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], context: jax.Array | None = None):
        q, k, v = self._heads("to_q", x, "norm_q"), self._heads("to_k", x, "norm_k"), self._heads("to_v", x)
        if context is not None:
            q = jnp.concatenate([self._heads("add_q_proj", context, "norm_added_q"), q], axis=1)
            k = jnp.concatenate([self._heads("add_k_proj", context, "norm_added_k"), k], axis=1)
            v = jnp.concatenate([self._heads("add_v_proj", context), v], axis=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        if context is None:
            return out
        n, width = context.shape[1], x.shape[-1]
        return (nn.Dense(width, dtype=self.dtype, name="to_out_0")(out[:, n:]),
                nn.Dense(width, dtype=self.dtype, name="to_add_out")(out[:, :n]))


class FluxTransformerBlock(nn.Module):
    """diffusers' FluxTransformerBlock (double-stream): (x, context) -> (context, x), each
    stream modulated by its own AdaLayerNormZero (`norm1`, `norm1_context`)."""

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]):
        dim, dt = x.shape[-1], self.dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Modulation(6, dim, dt, name="norm1")(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
            6, dim, dt, name="norm1_context")(temb)
        attn_x, attn_context = FluxAttention(self.heads, self.head_dim, dt, name="attn")(
            modulate(layer_norm(x), shift_msa, scale_msa), rope,
            modulate(layer_norm(context), c_shift_msa, c_scale_msa))

        x = x + gate_msa[:, None] * attn_x
        x = x + gate_mlp[:, None] * FeedForward(dt, name="ff")(modulate(layer_norm(x), shift_mlp, scale_mlp))
        context = context + c_gate_msa[:, None] * attn_context
        ff_context = FeedForward(dt, name="ff_context")(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return context + c_gate_mlp[:, None] * ff_context, x


class FluxSingleTransformerBlock(nn.Module):
    """diffusers' FluxSingleTransformerBlock over the joint [text, image] sequence: one
    AdaLayerNormZeroSingle (`norm`), attention and a GELU MLP side by side, `proj_out` over
    both, gated residual. (diffusers concatenates and splits the streams around every
    block; here they stay concatenated through all of them, which computes the same.)"""

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        dim, dt = h.shape[-1], self.dtype
        shift, scale, gate = Modulation(3, dim, dt, name="norm")(temb)
        normed = modulate(layer_norm(h), shift, scale)
        mlp = jax.nn.gelu(nn.Dense(_MLP_RATIO * dim, dtype=dt, name="proj_mlp")(normed), approximate=True)
        attn = FluxAttention(self.heads, self.head_dim, dt, name="attn")(normed, rope)
        return h + gate[:, None] * nn.Dense(dim, dtype=dt, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))


class TimeTextEmbed(nn.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings (schnell) or, with `guidance`,
    CombinedTimestepGuidanceTextProjEmbeddings (dev): the sinusoids of the (already x1000)
    timestep and guidance and the pooled text, each through a two-layer MLP, summed."""

    dim: int
    guidance: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array) -> jax.Array:
        dt = self.dtype
        emb = TwoLayerMLP(self.dim, dt, name="timestep_embedder")(timestep_embedding(timestep).astype(dt))
        if self.guidance:
            emb = emb + TwoLayerMLP(self.dim, dt, name="guidance_embedder")(timestep_embedding(guidance).astype(dt))
        return emb + TwoLayerMLP(self.dim, dt, name="text_embedder")(pooled)


class Flux(nn.Module):
    """FluxTransformer2DModel.forward: (packed latents [B, S, in_channels], T5 hidden states
    [B, L, joint_attention_dim], pooled CLIP [B, pooled_projection_dim], timestep [B] (sigma
    in [0, 1]: FluxPipeline passes t / 1000 and the model multiplies by 1000), img_ids [S, 3],
    txt_ids [L, 3], guidance [B] (the guidance scale itself, e.g. 3.5; required exactly when
    `guidance_embeds`)) -> [B, S, patch_size^2 * out_channels], the flow prediction as packed
    tokens. A scalar timestep or guidance applies to the whole batch. `remat_layers` and
    per-block FSDP gathers: as `mmdit.layer_class`."""

    config: FluxConfig
    dtype: jnp.dtype = jnp.float32
    remat_layers: bool = False

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
        c, dt = self.config, self.dtype
        b, n_img, n_txt = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
        _check_inputs(c, n_img, n_txt, img_ids, txt_ids, guidance)

        def per_example(v: jax.Array) -> jax.Array:
            return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,)) * _TIME_SCALE

        x = nn.Dense(c.inner_dim, dtype=dt, name="x_embedder")(hidden_states)
        temb = TimeTextEmbed(c.inner_dim, c.guidance_embeds, dt, name="time_text_embed")(
            per_example(timestep), per_example(guidance) if c.guidance_embeds else None, pooled_projections)
        context = nn.Dense(c.inner_dim, dtype=dt, name="context_embedder")(encoder_hidden_states)
        angles = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=0), c.axes_dims_rope)
        rope = (jnp.cos(angles), jnp.sin(angles))

        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        double, single = (layer_class(cls, self.remat_layers) for cls in (FluxTransformerBlock,
                                                                          FluxSingleTransformerBlock))
        for i in range(c.num_layers):
            block = double(heads, head_dim, dt, name=f"transformer_blocks_{i}")
            context, x = block(x, context, temb, rope)
        h = jnp.concatenate([context, x], axis=1)
        for i in range(c.num_single_layers):
            h = single(heads, head_dim, dt, name=f"single_transformer_blocks_{i}")(h, temb, rope)
        x = h[:, n_txt:]

        scale, shift = Modulation(2, c.inner_dim, dt, name="norm_out")(temb)  # AdaLayerNormContinuous: scale first
        out = c.patch_size * c.patch_size * c.out_channels
        return nn.Dense(out, dtype=dt, name="proj_out")(modulate(layer_norm(x), shift, scale))


def _check_inputs(c: FluxConfig, n_img: int, n_txt: int, img_ids: jax.Array, txt_ids: jax.Array,
                  guidance: jax.Array | None) -> None:
    """Shape errors named in the model's terms at trace time, rather than deep in a block."""
    axes = len(c.axes_dims_rope)
    for name, ids, n in (("img_ids", img_ids, n_img), ("txt_ids", txt_ids, n_txt)):
        if ids.shape != (n, axes):
            raise ValueError(f"Flux: {name} of shape {tuple(ids.shape)}; want ({n}, {axes}): one row of "
                             f"{axes} position ids per token, no batch axis")
    if c.guidance_embeds and guidance is None:
        raise ValueError("Flux: this model embeds the guidance scale (guidance_embeds, FLUX.1-dev): pass guidance")
    if not c.guidance_embeds and guidance is not None:
        raise ValueError("Flux: this model has no guidance embedding (guidance_embeds=False, FLUX.1-schnell): "
                         "pass guidance=None")

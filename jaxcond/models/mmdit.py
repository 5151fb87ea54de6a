"""The MMDiT of Stable Diffusion 3 and 3.5 in Flax: diffusers' `SD3Transformer2DModel`
(diffusers 0.39) module for module, so its PyTorch weights load by the one naming rule of
`jaxcond.models.convert` (`mmdit_convert` holds the conversion).

Image latents [B, C, H, W] are cut into 2x2 patches (tokens) plus a fixed sin-cos position
table; the text hidden states are projected to the same width; each joint block normalises
both streams with modulations predicted from (timestep, pooled text), attends over the
concatenation [image tokens, text tokens], and runs a feed-forward per stream. SD3.5 adds
RMS norms on queries and keys (`qk_norm="rms_norm"`), and SD3.5-medium (MMDiT-X) a second
self-attention over the image tokens alone in its first blocks (`dual_attention_layers`).
The last block only reads the text (`context_pre_only`): its text outputs are never used.

Params are float32; `dtype` is the compute dtype. Norm statistics, the timestep sinusoid
and the position table are computed in float32 whatever `dtype` is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcond import sharding

_EPS = 1e-6  # every layer norm and RMS norm of the model
_TIME_CHANNELS = 256  # width of the timestep sinusoid


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of diffusers' SD3Transformer2DModel config (its defaults: SD3's
    original 2B layout with 18 layers; real checkpoints spell every field out)."""

    sample_size: int = 128  # latent side the position table is centred for
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text hidden states
    caption_projection_dim: int = 1152  # must equal heads * head_dim
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96  # the position table covers this many patches per side
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        problems = []
        if self.qk_norm not in (None, "rms_norm"):
            problems.append(f"qk_norm={self.qk_norm!r}: only None (SD3) and 'rms_norm' (SD3.5) are implemented")
        if self.caption_projection_dim != self.inner_dim:
            problems.append(f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads * "
                            f"attention_head_dim = {self.inner_dim}: the text tokens join the image tokens' attention")
        if not all(0 <= i < self.num_layers for i in self.dual_attention_layers):
            problems.append(f"dual_attention_layers={self.dual_attention_layers}: indices must be in "
                            f"[0, num_layers={self.num_layers})")
        if not self.pos_embed_max_size:
            problems.append("pos_embed_max_size must be set (every SD3 and SD3.5 checkpoint sets it)")
        if self.inner_dim % 4:
            problems.append(f"heads * head_dim = {self.inner_dim} must be a multiple of 4 (the 2D sin-cos table)")
        if problems:
            raise ValueError("MMDiT config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> MMDiTConfig:
        """From a diffusers `transformer/config.json` (its `_class_name`-like keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"MMDiT config: unknown fields {unknown}")
        values = {k: v for k, v in config.items() if k in fields}
        if values.get("out_channels", 0) is None:  # diffusers' spelling of "same as in_channels"
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        return cls(**values)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `config.json` of this model."""
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": "SD3Transformer2DModel", **d}


# -- fixed tables ------------------------------------------------------------------------------

def sincos_table_1d(config: MMDiTConfig) -> np.ndarray:
    """[pos_embed_max_size, inner_dim / 2]: the sin-cos embedding of each patch row (or
    column) index. Positions are scaled so that `sample_size` latents span the same range
    as at training; float32 positions and float64 frequencies as diffusers computes them,
    so the table equals the `pos_embed.pos_embed` buffer of its checkpoints bit for bit."""
    n, dim = config.pos_embed_max_size, config.inner_dim // 2
    base = config.sample_size // config.patch_size
    positions = np.arange(n, dtype=np.float32) / np.float32(n / base)
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def pos_embed_table(config: MMDiTConfig) -> np.ndarray:
    """[1, pos_embed_max_size ** 2, inner_dim]: the whole 2D table, PatchEmbed's buffer."""
    table = sincos_table_1d(config)
    return _grid(table, table, np)[None]


def _grid(rows: Any, cols: Any, xp: Any) -> Any:
    """The 2D embeddings of rows x cols ([h, d], [w, d]) -> [h * w, 2d] in numpy or jax (`xp`):
    the column's embedding first, then the row's, tokens in row-major order, as diffusers lays
    it out."""
    h, w, d = rows.shape[0], cols.shape[0], rows.shape[1]
    return xp.concatenate([xp.broadcast_to(cols[None], (h, w, d)), xp.broadcast_to(rows[:, None], (h, w, d))],
                          axis=-1).reshape(h * w, 2 * d)


def timestep_embedding(timestep: jax.Array) -> jax.Array:
    """[B] -> [B, 256]: cos then sin of t * 10000^(-i/128) (diffusers' Timesteps with
    flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = _TIME_CHANNELS // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = timestep.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


# -- layers ------------------------------------------------------------------------------------

def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without scale or bias (elementwise_affine=False), statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


def modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return normed * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """Over the last axis with a learned scale (PyTorch's `weight`)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + _EPS)
        return (x32 * scale).astype(self.dtype)


class Modulation(nn.Module):
    """The `linear(silu(temb))` of diffusers' AdaLayerNormZero (6 chunks), SD35AdaLayerNormZeroX
    (9) and AdaLayerNormContinuous (2: scale, then shift), split into its chunks."""

    chunks: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        emb = nn.Dense(self.chunks * self.dim, dtype=self.dtype, name="linear")(nn.silu(temb))
        return jnp.split(emb, self.chunks, axis=-1)


class TwoLayerMLP(nn.Module):
    """linear_1, silu, linear_2: diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act_fn="silu")."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class GELUProj(nn.Module):
    """diffusers' GELU(approximate="tanh"): a projection, then the tanh-approximated GELU."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(nn.Dense(self.dim, dtype=self.dtype, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): width x4, GELU, back (its
    `net.1` is a dropout, without weights)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(GELUProj(4 * dim, self.dtype, name="net_0")(x))


class Attention(nn.Module):
    """diffusers' Attention under JointAttnProcessor2_0. Without `context`: self-attention
    over `x`. With it: the text tokens get their own projections (`add_*_proj`, `norm_added_*`)
    and join the image tokens' keys and values; the output is split back into the two
    streams, the text part projected by `to_add_out` unless `context_pre_only`."""

    heads: int
    head_dim: int
    qk_norm: str | None
    context_pre_only: bool = False
    dtype: jnp.dtype = jnp.float32

    def _heads(self, name: str, x: jax.Array, norm: str | None = None) -> jax.Array:
        y = nn.Dense(self.heads * self.head_dim, dtype=self.dtype, name=name)(x)
        y = y.reshape(*x.shape[:2], self.heads, self.head_dim)
        return RMSNorm(self.dtype, name=norm)(y) if norm and self.qk_norm else y

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        q, k, v = self._heads("to_q", x, "norm_q"), self._heads("to_k", x, "norm_k"), self._heads("to_v", x)
        if context is not None:
            q = jnp.concatenate([q, self._heads("add_q_proj", context, "norm_added_q")], axis=1)
            k = jnp.concatenate([k, self._heads("add_k_proj", context, "norm_added_k")], axis=1)
            v = jnp.concatenate([v, self._heads("add_v_proj", context)], axis=1)
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        n, width = x.shape[1], x.shape[-1]
        x_out = nn.Dense(width, dtype=self.dtype, name="to_out_0")(out[:, :n])
        if context is None:
            return x_out
        if self.context_pre_only:
            return x_out, None
        return x_out, nn.Dense(width, dtype=self.dtype, name="to_add_out")(out[:, n:])


class JointTransformerBlock(nn.Module):
    """diffusers' JointTransformerBlock: (context, x) -> (context or None, x)."""

    heads: int
    head_dim: int
    qk_norm: str | None
    context_pre_only: bool = False
    dual_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array):
        dim, dt = x.shape[-1], self.dtype
        mod = Modulation(9 if self.dual_attention else 6, dim, dt, name="norm1")(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        normed = layer_norm(x)
        if self.context_pre_only:  # AdaLayerNormContinuous: scale comes before shift
            c_scale, c_shift = Modulation(2, dim, dt, name="norm1_context")(temb)
            c_normed = modulate(layer_norm(context), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
                6, dim, dt, name="norm1_context")(temb)
            c_normed = modulate(layer_norm(context), c_shift_msa, c_scale_msa)

        attn = Attention(self.heads, self.head_dim, self.qk_norm, self.context_pre_only, dt, name="attn")
        attn_x, attn_context = attn(modulate(normed, shift_msa, scale_msa), c_normed)
        x = x + gate_msa[:, None] * attn_x
        if self.dual_attention:  # MMDiT-X: the same normalised x, modulated a second way
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            attn2 = Attention(self.heads, self.head_dim, self.qk_norm, dtype=dt, name="attn2")
            x = x + gate_msa2[:, None] * attn2(modulate(normed, shift_msa2, scale_msa2))
        x = x + gate_mlp[:, None] * FeedForward(dt, name="ff")(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return None, x

        context = context + c_gate_msa[:, None] * attn_context
        ff_context = FeedForward(dt, name="ff_context")(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return context + c_gate_mlp[:, None] * ff_context, x


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed for SD3: [B, C, H, W] -> [B, H/p * W/p, dim] by a stride-p
    convolution, plus the centre crop of the position table that fits the latent."""

    config: MMDiTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        c = self.config
        b, _, height, width = latents.shape
        p, n = c.patch_size, c.pos_embed_max_size
        h, w = height // p, width // p
        if height % p or width % p or max(h, w) > n:
            raise ValueError(f"MMDiT: latents of {height}x{width} need sides that are multiples of patch_size={p} "
                             f"and at most pos_embed_max_size * patch_size = {n * p}")
        x = nn.Conv(c.inner_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="proj")(jnp.transpose(latents, (0, 2, 3, 1)))
        # Only the crop's rows and columns enter the program as constants, not the whole table.
        top, left = (n - h) // 2, (n - w) // 2
        table = sincos_table_1d(c)
        pos = _grid(jnp.asarray(table[top:top + h]), jnp.asarray(table[left:left + w]), jnp)
        return (x.reshape(b, h * w, c.inner_dim) + pos[None]).astype(self.dtype)


class TimeTextEmbed(nn.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings: the timestep's sinusoid and the pooled
    text, each through a two-layer MLP, summed."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        t = TwoLayerMLP(self.dim, self.dtype, name="timestep_embedder")(timestep_embedding(timestep).astype(self.dtype))
        return t + TwoLayerMLP(self.dim, self.dtype, name="text_embedder")(pooled)


def layer_class(cls: type, remat: bool) -> type:
    """The block class `cls` as a transformer applies it: under `sharding.gathering` (FSDP)
    each block gathers its own params where it runs, and with `remat` it is recomputed in
    the backward pass, the gather included, so a step never holds every block gathered."""
    if sharding.gathering_active():
        cls = sharding.gathering_own_params(cls)
    return nn.remat(cls) if remat else cls


class MMDiT(nn.Module):
    """SD3Transformer2DModel.forward: (latents [B, C, H, W], text hidden states [B, L,
    joint_attention_dim], pooled text [B, pooled_projection_dim], timestep [B]) ->
    [B, out_channels, H, W]. H and W must be multiples of patch_size, with at most
    pos_embed_max_size patches per side.

    `remat_layers`: each joint block is recomputed in the backward pass (`model.remat =
    layers`). Inside `sharding.gathering` each block gathers its own params where it runs
    (inside the recomputed region), so an FSDP step never holds the whole transformer
    gathered; the caller gathers the params outside the blocks."""

    config: MMDiTConfig
    dtype: jnp.dtype = jnp.float32
    remat_layers: bool = False

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, timestep: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        b, _, height, width = hidden_states.shape
        p, dim = c.patch_size, c.inner_dim
        x = PatchEmbed(c, dt, name="pos_embed")(hidden_states)
        temb = TimeTextEmbed(dim, dt, name="time_text_embed")(timestep, pooled_projections)
        context = nn.Dense(c.caption_projection_dim, dtype=dt, name="context_embedder")(encoder_hidden_states)

        block_cls = layer_class(JointTransformerBlock, self.remat_layers)
        for i in range(c.num_layers):
            block = block_cls(c.num_attention_heads, c.attention_head_dim, c.qk_norm,
                                          context_pre_only=i == c.num_layers - 1,
                                          dual_attention=i in c.dual_attention_layers, dtype=dt,
                                          name=f"transformer_blocks_{i}")
            context, x = block(x, context, temb)

        scale, shift = Modulation(2, dim, dt, name="norm_out")(temb)
        x = nn.Dense(p * p * c.out_channels, dtype=dt, name="proj_out")(modulate(layer_norm(x), shift, scale))
        x = x.reshape(b, height // p, width // p, p, p, c.out_channels)
        return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, c.out_channels, height, width)

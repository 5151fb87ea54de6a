"""Stable Diffusion 3 / 3.5: jaxcond's MMDiT conditioned by CLIP-L, CLIP-G and T5-XXL.

Loaded from a diffusers-format folder or hub id (`transformer/`, `text_encoder/`,
`text_encoder_2/` (CLIPTextModelWithProjection), `text_encoder_3/` (T5EncoderModel),
`tokenizer/`, `tokenizer_2/`, `tokenizer_3/`, `vae/`) with PyTorch safetensors weights:
the MMDiT through `mmdit_convert`, the rest into transformers' and diffusers' Flax classes
(`jaxcond.models.load`).

Five conditioners, one per encoder output, so that a dropout group over one encoder's
conditioners drops exactly what StableDiffusion3Pipeline drops for a missing encoder:
`clip_l`, `clip_g` (penultimate hidden states, [77, width]), `t5` (last hidden state,
[model.t5_max_length, 4096]), `pooled_l`, `pooled_g` (the CLIP projections, which the
pipeline concatenates into the pooled vector). `denoise` assembles the joint context from
whatever it is given exactly as the pipeline's `encode_prompt` does: CLIP-L and CLIP-G
side by side on the features, zero-padded to T5's width, then T5's tokens after them.

Latents follow SD3's VAE convention: x0 = (z - shift_factor) * scaling_factor, decoded
from x0 / scaling_factor + shift_factor. A folder without `vae/` (the CPU demo,
jaxcond.models.sd3_demo) is pixel-space: x0 = images / 127.5 - 1, NCHW; it trains and
samples, but no diffusers pipeline runs it, so it is not exported. The network's timestep input is sigma * 1000
(jaxcond.flow). LoRA and text-encoder fine-tuning are not implemented for this family.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcond import flow, sharding
from jaxcond.checks import ConfigError, check, int_at_least
from jaxcond.models import convert, dit_parts, load, mmdit_convert, t5
from jaxcond.models.family import DIFFUSERS_VERSION, Family, Params
from jaxcond.models.mmdit import MMDiT, MMDiTConfig
from jaxcond.models.unet_clip import _quiet_deprecations

CLIPS = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G
T5 = "text_encoder_3"
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
PARTS = ("transformer", *CLIPS, T5, *TOKENIZERS)  # and vae/, or the model is pixel-space
BLOCKS = "transformer_blocks_"  # param names of the joint blocks, which gather their own params
CONDITIONERS = ("clip_l", "clip_g", "t5", "pooled_l", "pooled_g")
MAX_T5_LENGTH = 512  # StableDiffusion3Pipeline refuses a longer max_sequence_length
# The config files (no weights, no tokenizer vocabularies) of these hub models ship with
# jaxcond, so their parameter shapes are known offline (`jaxcond plan`).
SHIPPED = {"stabilityai/stable-diffusion-3.5-medium": "sd35_medium",
           "stabilityai/stable-diffusion-3.5-large": "sd35_large"}
def model_index() -> dict:
    """The `model_index.json` of StableDiffusion3Pipeline for these parts."""
    return {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "image_encoder": [None, None], "feature_extractor": [None, None]}


def scheduler_config(shift: float = flow.DEFAULT_SHIFT) -> dict:
    """SD3's scheduler, for a source without one (`jaxcond export` writes the run's own)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": flow.NUM_TRAIN_TIMESTEPS, "shift": shift}


def _check_parts(source: str, path: str, clip_skip: int) -> tuple[MMDiTConfig, Any, Any, int]:
    """The transformer's config, the CLIP-L and CLIP-G configs and T5's width, once their
    configs (before any weights are read) show that the parts fit together."""
    latent = os.path.isdir(os.path.join(path, "vae"))
    configs = dit_parts.read_configs(source, path, ("transformer", *CLIPS, T5) + (("vae",) if latent else ()), "SD3")
    try:
        c = MMDiTConfig.from_diffusers(configs["transformer"])
    except ValueError as e:
        raise ConfigError(f"{path}/transformer/config.json: {e}") from None
    from transformers import CLIPTextConfig, T5Config

    # transformers' config classes: they fill in the fields a config.json leaves at their defaults.
    clip_l, clip_g = (CLIPTextConfig.from_dict(configs[n]) for n in CLIPS)
    layers = min(clip_l.num_hidden_layers, clip_g.num_hidden_layers)
    if not 1 <= clip_skip < layers:
        raise ConfigError(f"config.model.clip_skip = {clip_skip}: the CLIP encoders have {layers} layers; use 1 "
                          f"(the penultimate, SD3's own) up to {layers - 1}")
    t5_width = T5Config.from_dict(configs[T5]).d_model
    channels = configs["vae"].get("latent_channels", 4) if latent else 3  # pixel-space: RGB
    widths, projections = (clip_l.hidden_size, clip_g.hidden_size), (clip_l.projection_dim, clip_g.projection_dim)
    problems = []
    if t5_width != c.joint_attention_dim:
        problems.append(f"T5 gives {t5_width} features but the transformer attends to {c.joint_attention_dim}")
    if sum(widths) > t5_width:
        problems.append(f"the CLIP widths {widths[0]} + {widths[1]} exceed T5's {t5_width}")
    if sum(projections) != c.pooled_projection_dim:
        problems.append(f"the CLIP projections {projections[0]} + {projections[1]} do not make the transformer's "
                        f"pooled_projection_dim {c.pooled_projection_dim}")
    if channels != c.in_channels or channels != c.out_channels:
        problems.append(f"the {'VAE makes' if latent else 'images (no vae/) have'} {channels} channels, the "
                        f"transformer takes {c.in_channels} and makes {c.out_channels}")
    if problems:
        raise ConfigError(f"config.model.source = {source!r}: its parts do not belong together ("
                          + "; ".join(problems) + ")")
    return c, clip_l, clip_g, t5_width




class SD3(Family):
    """StableDiffusion3Pipeline's models: MMDiT + CLIP-L + CLIP-G + T5 + a 16-channel VAE.
    A folder without `vae/` is pixel-space, as unet_clip's: x0 is the RGB image in [-1, 1]."""

    latent = True

    def __init__(self, source: str, dtype: jnp.dtype = jnp.float32, clip_skip: int = 1, t5_max_length: int = 256,
                 remat: str = "none", frozen_dtype: str = "float32", shapes_only: bool = False):
        """`source`: a diffusers-format folder or hub id. `clip_skip`: 1 = the CLIP encoders'
        penultimate layer (the pipeline's clip_skip=None), 2 = the one before (its clip_skip=1), ...
        `t5_max_length`: T5 tokens per caption (the pipeline's max_sequence_length).
        `remat`: none | layers (each joint block recomputed in the backward pass, where it
        also gathers its FSDP-sharded params again) | full (the whole MMDiT recomputed).
        `shapes_only`: params are shapes from the configs alone, which for the SD3.5 hub ids
        ship with jaxcond; without tokenizer vocabularies the token ids are zeros."""
        _quiet_deprecations()
        t5.patch_flax_t5()
        from transformers import FlaxCLIPTextModelWithProjection

        described = f"a diffusers-format SD3 folder ({', '.join(PARTS)}, vae)"
        path = dit_parts.resolve(source, SHIPPED, PARTS, "sd3", described, shapes_only)
        self.path, self.dtype, self.remat, self.frozen_dtype = path, dtype, remat, frozen_dtype
        self.config, clip_l, clip_g, t5_width = _check_parts(source, path, clip_skip)
        self.clip_skip, weights = clip_skip, not shapes_only
        self.transformer = MMDiT(self.config, dtype=dtype, remat_layers=remat == "layers")
        self.patch_size = self.config.patch_size
        if weights:
            tensors = load.pytorch_tensors(os.path.join(path, "transformer"), "diffusers")
            params = mmdit_convert.from_diffusers(tensors, self.config, source=os.path.join(path, "transformer"))
        else:
            params = mmdit_convert.param_shapes(self.config)
        self.trainable, self.frozen, self.text_models = {"transformer": params}, {}, {}
        for name in CLIPS:
            self.text_models[name], self.frozen[name] = load.transformers_part(
                FlaxCLIPTextModelWithProjection, os.path.join(path, name), dtype, weights=weights)
        self.text_models[T5], self.frozen[T5] = dit_parts.load_t5(path, T5, dtype, weights)
        self.latent = os.path.isdir(os.path.join(path, "vae"))
        if self.latent:
            self.vae, self.quant, self.scale, self.shift, self.frozen["vae"] = dit_parts.load_vae(
                os.path.join(path, "vae"), dtype, weights, "SD3")

        self.tokenizers, self.max_length = dit_parts.load_tokenizers(path, TOKENIZERS[:2], TOKENIZERS[2], weights)
        self.t5_max_length = t5_max_length
        self.lengths = (self.max_length, self.max_length, t5_max_length)  # the pipeline's CLIP limit is tokenizer/'s

        self.conditioners = {"clip_l": (self.max_length, clip_l.hidden_size),
                             "clip_g": (self.max_length, clip_g.hidden_size), "t5": (t5_max_length, t5_width),
                             "pooled_l": (clip_l.projection_dim,), "pooled_g": (clip_g.projection_dim,)}
        self.frozen = dit_parts.cast_frozen(self.frozen, frozen_dtype)
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.latent else 1
        c = self.config
        self.sample_shape = (c.in_channels, c.sample_size, c.sample_size)
        self.image_size = c.sample_size * vae_factor
        self.size_multiple = vae_factor * c.patch_size

    @classmethod
    def check_config(cls, model: ml_collections.ConfigDict) -> None:
        dit_parts.check_model(model, "sd3", "stabilityai/stable-diffusion-3.5-medium")
        int_at_least("model.clip_skip", model.clip_skip, 1)
        n = model.get("t5_max_length", 256)
        check(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_T5_LENGTH, "model.t5_max_length", n,
              f"must be an integer in [1, {MAX_T5_LENGTH}] (StableDiffusion3Pipeline's max_sequence_length)")

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                    resolution: int, shapes_only: bool = False) -> SD3:
        return cls(model.source, dtype=dtype, clip_skip=model.clip_skip, t5_max_length=model.get("t5_max_length", 256),
                   remat=model.get("remat", "none"), frozen_dtype=model.get("frozen_dtype", "float32"),
                   shapes_only=shapes_only)

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """[B, 77 + 77 + t5_max_length]: CLIP-L's, CLIP-G's and T5's ids side by side."""
        return dit_parts.tokenize_side_by_side(self.tokenizers, self.lengths, captions)

    def overlong(self, captions: Sequence[str]) -> np.ndarray:
        return dit_parts.overlong_in_any(self.tokenizers, self.lengths, captions)

    def encode(self, params: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        n = self.max_length
        cond = {}
        for name, ids, suffix in ((CLIPS[0], tokens[:, :n], "l"), (CLIPS[1], tokens[:, n:2 * n], "g")):
            out = self.text_models[name](input_ids=ids, params=params[name], train=False, output_hidden_states=True)
            cond[f"clip_{suffix}"] = out.hidden_states[-(self.clip_skip + 1)]
            cond[f"pooled_{suffix}"] = out.text_embeds
        cond["t5"] = self.text_models[T5](input_ids=tokens[:, 2 * n:], params=params[T5], train=False).last_hidden_state
        return cond

    def joint_context(self, cond: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(context [B, 77 + t5_max_length, joint_attention_dim], pooled [B, pooled_projection_dim])
        from the five conditioners, as StableDiffusion3Pipeline.encode_prompt builds them."""
        clip = jnp.concatenate([cond["clip_l"], cond["clip_g"]], axis=-1)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, self.config.joint_attention_dim - clip.shape[-1])))
        context = jnp.concatenate([clip.astype(self.dtype), cond["t5"].astype(self.dtype)], axis=1)
        pooled = jnp.concatenate([cond["pooled_l"], cond["pooled_g"]], axis=-1).astype(self.dtype)
        return context, pooled

    def denoise(self, params: Params, x_t: jax.Array, t: jax.Array,
                cond: Mapping[str, jax.Array]) -> jax.Array:
        """The velocity prediction; `t` is sigma * 1000 (float) per example."""
        context, pooled = self.joint_context(cond)

        def apply(p: Params, x: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
            return self.transformer.apply({"params": p}, x, context, pooled, t)

        if self.remat == "full":
            apply = jax.checkpoint(apply)
        # The joint blocks gather their own params, one at a time (MMDiT); the rest here.
        p = {k: v if k.startswith(BLOCKS) else sharding.gather(v) for k, v in params["transformer"].items()}
        out = apply(p, x_t.astype(self.dtype), context, pooled)
        return out.astype(jnp.float32)

    def image_moments(self, frozen: Params, images: jax.Array) -> jax.Array:
        """The VAE encoder's mean and std stacked on channels, NCHW [B, 2C, h, w] (unscaled);
        pixel-space: x0 itself."""
        if not self.latent:
            return self.images_to_x0(frozen, images)
        from diffusers.models.vae_flax import FlaxDiagonalGaussianDistribution

        def encode(m, x):
            h = m.encoder(x, deterministic=True)
            return FlaxDiagonalGaussianDistribution(m.quant_conv(h) if self.quant["quant_conv"] else h)

        x = images.astype(self.dtype) / 127.5 - 1.0  # NHWC, as the Flax encoder takes it
        dist = self.vae.apply({"params": frozen["vae"]}, x, method=encode)
        return jnp.transpose(jnp.concatenate([dist.mean, dist.std], axis=-1).astype(jnp.float32), (0, 3, 1, 2))

    def draw_x0(self, moments: jax.Array, key: jax.Array) -> jax.Array:
        if not self.latent:
            return moments
        mean, std = jnp.split(moments, 2, axis=1)
        return (mean + std * jax.random.normal(key, mean.shape) - self.shift) * self.scale

    def images_to_x0(self, frozen: Params, images: jax.Array) -> jax.Array:
        """The VAE's mean, shifted and scaled; pixel-space: pixels in [-1, 1], NCHW."""
        if not self.latent:
            return jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))
        mean = jnp.split(self.image_moments(frozen, images), 2, axis=1)[0]
        return (mean - self.shift) * self.scale

    def x0_to_images(self, frozen: Params, x0: jax.Array) -> jax.Array:
        def decode(m, z):
            return m.decoder(m.post_quant_conv(z) if self.quant["post_quant_conv"] else z, deterministic=True)

        if self.latent:
            z = jnp.transpose(x0 / self.scale + self.shift, (0, 2, 3, 1)).astype(self.dtype)
            x = self.vae.apply({"params": frozen["vae"]}, z, method=decode).astype(jnp.float32)
        else:
            x = jnp.transpose(x0, (0, 2, 3, 1)).astype(jnp.float32)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def save(self, path: str, trainable: Params) -> None:
        """A folder StableDiffusion3Pipeline loads: the transformer in diffusers' PyTorch
        layout, every other part copied from the source as it is there (they are frozen)."""
        if not self.latent:
            raise ConfigError(f"{self.path} is a pixel-space SD3 (no vae/), which StableDiffusion3Pipeline cannot "
                              "run; sample it with jaxcond sample --run instead of exporting")
        folder = os.path.join(path, "transformer")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**self.config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION}, f, indent=2)
        tensors = mmdit_convert.to_diffusers(jax.device_get(trainable["transformer"]), self.config)
        convert.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tensors,
                                  metadata={"format": "pt"})
        for sub in (*CLIPS, T5, *TOKENIZERS, "vae"):
            shutil.copytree(os.path.join(self.path, sub), os.path.join(path, sub), dirs_exist_ok=True)
        scheduler = os.path.join(self.path, "scheduler", "scheduler_config.json")
        os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(dit_parts.read_json(scheduler) if os.path.isfile(scheduler) else scheduler_config(), f, indent=2)

    def pipeline_index(self, force_zeros_for_empty_prompt: bool) -> dict | None:
        """StableDiffusion3Pipeline (it has no force_zeros setting: pass zero negative
        embeddings for zeros nulls, see jaxcond.json); none runs a pixel-space one."""
        return model_index() if self.latent else None

    def encoding_key(self) -> dict:
        key = {"clip_skip": self.clip_skip, "t5_max_length": self.t5_max_length, "dtype": jnp.dtype(self.dtype).name,
               "text_encoders": [*CLIPS, T5]}
        if self.frozen_dtype != "float32":
            key["frozen_dtype"] = self.frozen_dtype
        return key

    def export_manifest(self) -> dict:
        """What StableDiffusion3Pipeline must be called with to encode captions as training did."""
        return {"clip_skip": self.clip_skip, "t5_max_length": self.t5_max_length,
                "pipeline_kwargs": {"max_sequence_length": self.t5_max_length,
                                    "clip_skip": None if self.clip_skip == 1 else self.clip_skip - 1}}


FAMILY = SD3

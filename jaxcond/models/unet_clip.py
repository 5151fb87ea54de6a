"""A diffusers Flax UNet conditioned by a transformers Flax CLIP text encoder.

Loaded from a diffusers-format folder (`unet/`, `text_encoder/`, `tokenizer/`) or hub id,
with Flax or PyTorch safetensors weights (`jaxcond.models.load`): the layout of Stable
Diffusion 1.x/2.x checkpoints and of the built-in demo model. This module is
the only place that touches diffusers/transformers: the pins in pyproject.toml exist
because their later releases removed these Flax classes.

With a `vae/` (diffusers `FlaxAutoencoderKL`) the model is latent-space, as Stable
Diffusion is: x0 is drawn in the step from the encoder's Gaussian and scaled by the VAE's
`scaling_factor`. Without one (the demo) it is pixel-space. Conditioners: `text` (the
encoder's last hidden states, for cross-attention) and, when the UNet has the SDXL-style
`text_time` added embedding, `pooled` (the pooled caption vector).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcond.models import convert, load
from jaxcond.models.family import Family, Params


def _quiet_deprecations() -> None:
    # Both libraries warn on every Flax model construction that Flax is going away; we pin
    # the last releases that have it (README) so the warning tells the user nothing.
    import logging

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


class UNetCLIP(Family):
    """diffusers `FlaxUNet2DConditionModel` + transformers `FlaxCLIPTextModel`."""

    def __init__(self, source: str, dtype: jnp.dtype = jnp.float32, clip_skip: int = 1):
        """`source`: a diffusers-format folder or hub id (jaxcond.models.load).

        `clip_skip`: 1 conditions on the text encoder's last layer; 2 on the penultimate
        (normalised by the final layer norm, as diffusers' pipelines do), and so on.
        """
        _quiet_deprecations()
        from diffusers import FlaxUNet2DConditionModel
        from transformers import CLIPTokenizer, FlaxCLIPTextModel

        path = load.resolve(source)
        for sub in ("unet", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise FileNotFoundError(
                    f"model folder {path!r} has no {sub}/ subfolder; expected a diffusers-format "
                    "folder with unet/, text_encoder/ and tokenizer/")
        self.path = path
        self.unet, unet_params = load.diffusers_part(FlaxUNet2DConditionModel, os.path.join(path, "unet"), dtype)
        self.text_encoder, text_params = load.transformers_part(
            FlaxCLIPTextModel, os.path.join(path, "text_encoder"), dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        self.dtype = dtype
        self.trainable = {"unet": unet_params}
        self.frozen = {"text_encoder": text_params}
        self.latent = os.path.isdir(os.path.join(path, "vae"))
        if self.latent:
            from diffusers import FlaxAutoencoderKL

            self.vae, self.frozen["vae"] = load.diffusers_part(FlaxAutoencoderKL, os.path.join(path, "vae"), dtype)
        layers = self.text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip = {clip_skip}: must be in [1, {layers}] (the text encoder's layers)")
        self.clip_skip = clip_skip

        ucfg, tcfg = self.unet.config, self.text_encoder.config
        self.max_length = self.tokenizer.model_max_length
        self.conditioners = {"text": (self.max_length, tcfg.hidden_size)}
        self.uses_pooled = ucfg.addition_embed_type == "text_time"
        if self.uses_pooled:
            self.conditioners["pooled"] = (tcfg.hidden_size,)
            n_time_ids = (ucfg.projection_class_embeddings_input_dim - tcfg.hidden_size) // ucfg.addition_time_embed_dim
            size = ucfg.sample_size
            # SDXL-style micro-conditioning (original size, crop, target size); constant here
            # because the demo renders at the training size without cropping.
            self.time_ids = np.array([size, size, 0, 0, size, size][:n_time_ids], np.float32)
        self.sample_shape = (ucfg.in_channels, ucfg.sample_size, ucfg.sample_size)
        if self.latent and ucfg.in_channels != self.vae.config.latent_channels:
            raise FileNotFoundError(f"{path}: the UNet takes {ucfg.in_channels} channels but the VAE makes "
                                    f"{self.vae.config.latent_channels}; unet/ and vae/ do not belong together")

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="np").input_ids
        return ids.astype(np.int32)

    def encode(self, frozen: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        out = self.text_encoder(input_ids=tokens, params=frozen["text_encoder"], train=False,
                                output_hidden_states=self.clip_skip > 1)
        text = out.last_hidden_state
        if self.clip_skip > 1:
            text = self.text_encoder.module.apply(
                {"params": frozen["text_encoder"]}, out.hidden_states[-self.clip_skip],
                method=lambda m, h: m.text_model.final_layer_norm(h))
        cond = {"text": text}
        if self.uses_pooled:
            cond["pooled"] = out.pooler_output
        return cond

    def denoise(self, trainable: Params, x_t: jax.Array, t: jax.Array,
                cond: Mapping[str, jax.Array]) -> jax.Array:
        added = None
        if self.uses_pooled:
            b = x_t.shape[0]
            added = {"text_embeds": cond["pooled"],
                     "time_ids": jnp.broadcast_to(jnp.asarray(self.time_ids), (b, self.time_ids.size))}
        out = self.unet.apply({"params": trainable["unet"]}, x_t.astype(self.dtype), t,
                              cond["text"].astype(self.dtype), added_cond_kwargs=added, train=False)
        return out.sample.astype(jnp.float32)

    def images_to_x0(self, frozen: Params, images: jax.Array) -> jax.Array:
        """Pixels in [-1, 1], NCHW; for a latent model the VAE's mean, scaled."""
        if self.latent:
            mean = self.image_moments(frozen, images)[:, :self.vae.config.latent_channels]
            return mean * self.vae.config.scaling_factor
        return jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))

    def x0_to_images(self, frozen: Params, x0: jax.Array) -> jax.Array:
        if self.latent:
            x0 = self.vae.apply({"params": frozen["vae"]}, x0 / self.vae.config.scaling_factor,
                                method=self.vae.decode).sample.astype(jnp.float32)
        x = jnp.transpose(x0, (0, 2, 3, 1))
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def image_moments(self, frozen: Params, images: jax.Array) -> jax.Array:
        """Latent: the encoder's mean and std stacked on channels, NCHW [B, 2C, h, w]."""
        if not self.latent:
            return self.images_to_x0(frozen, images)
        x = jnp.transpose(images.astype(self.dtype) / 127.5 - 1.0, (0, 3, 1, 2))
        dist = self.vae.apply({"params": frozen["vae"]}, x, method=self.vae.encode).latent_dist
        both = jnp.concatenate([dist.mean, dist.std], axis=-1).astype(jnp.float32)
        return jnp.transpose(both, (0, 3, 1, 2))

    def draw_x0(self, moments: jax.Array, key: jax.Array) -> jax.Array:
        if not self.latent:
            return moments
        mean, std = jnp.split(moments, 2, axis=1)
        return (mean + std * jax.random.normal(key, mean.shape)) * self.vae.config.scaling_factor

    def save(self, path: str, trainable: Params) -> None:
        """A diffusers-format folder: every part in Flax and PyTorch safetensors layouts."""
        parts = [("unet", self.unet, trainable["unet"], "diffusion_pytorch_model"),
                 ("text_encoder", self.text_encoder, self.frozen["text_encoder"], "model")]
        if self.latent:
            parts.append(("vae", self.vae, self.frozen["vae"], "diffusion_pytorch_model"))
        for sub, model, params, stem in parts:
            folder = os.path.join(path, sub)
            params = jax.device_get(params)
            model.save_pretrained(folder, params=params)
            convert.write_safetensors(os.path.join(folder, f"{stem}.safetensors"), convert.to_pytorch(params),
                                      metadata={"format": "pt"})
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))

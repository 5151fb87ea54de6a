"""The one interface between the trainer and any model.

A family is one module under `jaxcond/models/` (or any importable module) defining
`FAMILY`, its `Family` subclass; `config.model.family` names the module
(`jaxcond.models.registry`). The family builds itself from `config.model`
(`from_config`), checks its own fields (`check_config`) and knows how it is exported
(`save`, `pipeline_index`, `save_single_file`, `export_manifest`): nothing else in
jaxcond names a concrete family.

A family owns everything model-specific: tokenizing captions (on the host), encoding
them into named conditioners, mapping images to the diffusion space (pixels or VAE
latents) and back, and the denoiser. The train step and sampler only see this
interface, so the backing implementation (today diffusers' and transformers' Flax
models) can be replaced without touching them.

Params come in two trees keyed by part (`unet`, `text_encoder`, `vae`, ...): `trainable`
(what the optimizer updates: the denoiser, and the text encoders when they are fine-tuned)
and `frozen` (never given optimizer state, never checkpointed, always reloaded from the
model source). Functions that read any part take the union `{**frozen, **trainable}`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Params = Any
# Written into exported configs: the diffusers release whose layouts jaxcond reads and writes.
DIFFUSERS_VERSION = "0.39.0"


class Family(abc.ABC):
    """A text-to-image model as the trainer sees it."""

    #: Conditioner name -> shape without the batch dimension.
    conditioners: Mapping[str, tuple[int, ...]]
    #: Shape of one sample in the diffusion space (C, H, W).
    sample_shape: tuple[int, ...]
    #: Image heights and widths must be multiples of this: the factor by which the model
    #: (VAE and UNet levels) downsamples, so its skip connections line up.
    size_multiple: int = 1
    #: The pretrained weights, as loaded.
    trainable: Params
    frozen: Params

    #: Tokens per caption, start and end included; `tokenize` cuts longer captions.
    max_length: int

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                    resolution: int, shapes_only: bool = False) -> Family:
        """The family of `config.model` (`model`), computing in `dtype`. `workdir` is the run
        directory (a family built locally may keep its files there); `resolution` the
        training image side. `shapes_only`: `trainable` and `frozen` may hold only shapes
        (jax.ShapeDtypeStruct), for compiling the step without weights (`jaxcond plan`).
        Every family the registry serves defines it."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    @classmethod
    def check_config(cls, model: ml_collections.ConfigDict) -> None:
        """Raises ConfigError for a bad field of `config.model`, before anything loads."""

    @classmethod
    def config_size_multiple(cls, model: ml_collections.ConfigDict) -> int | None:
        """`size_multiple` as known from the config alone, so bad image sizes are refused
        before loading; None when only the loaded model knows it."""
        return None

    @abc.abstractmethod
    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """Host-side: int32 token ids [B, ...]."""

    @abc.abstractmethod
    def overlong(self, captions: Sequence[str]) -> np.ndarray:
        """Host-side: bool [B], True where `tokenize` cuts the caption's end off, so the
        data report can count text the model never sees."""

    #: Conditioners the data supplies per example rather than the text encoders (SDXL's
    #: time_ids: original size, crop offsets, target size).
    batch_conditioners: tuple[str, ...] = ()

    @abc.abstractmethod
    def encode(self, params: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        """In-step: token ids -> {conditioner: [B, ...]} for all but batch_conditioners.
        `params` holds the text encoders, trainable or frozen."""

    def sampling_conditioners(self, n: int) -> dict[str, np.ndarray]:
        """The batch_conditioners of `n` samples generated at the model's own size."""
        return {}

    @abc.abstractmethod
    def denoise(self, params: Params, x_t: jax.Array, t: jax.Array,
                cond: Mapping[str, jax.Array]) -> jax.Array:
        """In-step: the network output for noisy samples `x_t` at timesteps `t`. `params`:
        frozen and trainable parts together (LoRA keeps the base in the frozen ones)."""

    @abc.abstractmethod
    def images_to_x0(self, frozen: Params, images: jax.Array) -> jax.Array:
        """In-step: uint8 [B, H, W, 3] images -> clean samples [B, *sample_shape]."""

    @abc.abstractmethod
    def x0_to_images(self, frozen: Params, x0: jax.Array) -> jax.Array:
        """In-step: clean samples -> uint8 [B, H, W, 3] images."""

    @abc.abstractmethod
    def save(self, path: str, trainable: Params) -> None:
        """Writes the model with these trainable params where its usual tools load it."""

    def pipeline_index(self, force_zeros_for_empty_prompt: bool) -> dict | None:
        """The `model_index.json` of the exported folder (the diffusers pipeline that loads
        it), or None when no diffusers pipeline runs this model."""
        return None

    def single_file_refusal(self) -> str | None:
        """Why `save_single_file` cannot write this model (None: it can)."""
        return "this model family has no single-file layout; export without --single_file"

    def save_single_file(self, path: str, trainable: Params) -> None:
        """Writes the model with these trainable params as one `.safetensors` file."""
        raise NotImplementedError(f"{type(self).__name__} has no single-file layout")

    #: A transformer's patch side in the diffusion space (1: no patches): a sample of
    #: shape (C, H, W) is H * W / patch_size**2 tokens, which Flux's resolution-dependent
    #: flow shift reads.
    patch_size: int = 1

    #: The LoRA spec (`jaxcond.models.lora.Spec`) when only adapters train, else None.
    lora: Any = None

    def save_lora(self, path: str, trainable: Params, layout: str) -> None:
        """Writes the trained LoRA adapters as one `.safetensors` in `layout` ("diffusers"
        or "kohya")."""
        raise NotImplementedError(f"{type(self).__name__} trains no LoRA adapters")

    def encoding_key(self) -> dict:
        """Every setting besides the frozen weights that changes what `encode` and
        `image_moments` return (JSON values): a cache of their outputs is keyed by it."""
        return {}

    def export_manifest(self) -> dict:
        """Family-specific settings an exported model must be used with (jaxcond.json)."""
        return {}

    #: True when samples live in a VAE's latent space: x0 is then drawn, in the step, from
    #: the encoder's distribution, and a cache stores that distribution, not pixels.
    latent: bool = False

    def image_moments(self, frozen: Params, images: jax.Array) -> jax.Array:
        """In-step: uint8 images -> what x0 is drawn from (a pixel family: x0 itself)."""
        return self.images_to_x0(frozen, images)

    def draw_x0(self, moments: jax.Array, key: jax.Array) -> jax.Array:
        """In-step: x0 from `image_moments` output (a pixel family: no randomness)."""
        return moments

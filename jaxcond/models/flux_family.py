"""Flux.1 (dev, schnell): jaxcond's Flux transformer conditioned by T5-XXL and CLIP-L.

Registered as `config.model.family = "flux"` (this module: flux.py is the transformer).
Loaded from a diffusers-format folder or hub id (`transformer/` FluxTransformer2DModel
through `flux_convert`, `text_encoder/` CLIPTextModel, `text_encoder_2/` T5EncoderModel,
`tokenizer/`, `tokenizer_2/`, `vae/` AutoencoderKL) with PyTorch safetensors weights.

Two conditioners, as FluxPipeline.encode_prompt makes them: `t5`, T5's last hidden state
[model.t5_max_length, 4096] (the pipeline's max_sequence_length: 512 for dev, 256 for
schnell by default), and `pooled`, CLIP-L's pooled output [768] (the end-of-text token's
final state, no projection), which the transformer embeds with the timestep. `denoise`
packs x_t [B, 16, H, W] into 2x2 patches, gives the image tokens their (0, row, column)
ids and the text tokens zeros, and unpacks the prediction back to [B, 16, H, W]: the same
tensors the pipeline feeds its transformer. The network is given jaxcond's sigma * 1000
(jaxcond.flow) and divides it back: Flux's transformer takes sigma in [0, 1].

Latents follow Flux's VAE: x0 = (z - shift_factor) * scaling_factor (0.1159, 0.3611),
decoded from x0 / scaling_factor + shift_factor; no quant convs (as SD3's, whose VAE
methods this family reuses). Image sides are multiples of 16 (VAE factor 8 x patch 2), and
a sample has (H / 16) * (W / 16) image tokens, which Flux's resolution-dependent flow shift
reads (`patch_size = 2`; config.diffusion.flow_shift_mode = "resolution").

Guidance embedding. FLUX.1-dev is guidance-distilled: its transformer embeds a guidance
value (the pipeline's `guidance_scale`, 3.5 by default at inference). Fine-tuning feeds it
a fixed value, `config.model.flux_guidance` (default 1.0, as kohya's and SimpleTuner's
training defaults), in training and in jaxcond's sampler alike, and an export records it
as the pipeline's `guidance_scale`. FLUX.1-schnell has no guidance embedding: it refuses
any other value than the default, which would otherwise silently do nothing.

Caption dropout on dev. The dropped-caption branch trains what the model is given for the
empty prompt: with `empty` nulls (the default in configs/flux_dev.py) a dropped example
sees T5's and CLIP's encodings of "", exactly what FluxPipeline encodes for
negative_prompt="" when it runs true classifier-free guidance (`true_cfg_scale > 1`).
So jaxcond's guidance scale g is FluxPipeline's `true_cfg_scale` = g with
negative_prompt="" (jaxcond.json's `cfg_scale_kwarg`), and `guidance_scale` stays the
distilled embedding's value. Guidance-distilled dev is usually sampled without CFG:
jaxcond's guidance scale 1 is the conditional prediction alone.

LoRA and text-encoder fine-tuning are not implemented for this family.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcond import flow, sharding
from jaxcond.checks import ConfigError, check
from jaxcond.models import convert, dit_parts, flux_convert, load, sd3, t5
from jaxcond.models.family import DIFFUSERS_VERSION, Family, Params
from jaxcond.models.flux import Flux, FluxConfig, image_ids, pack_latents, text_ids, unpack_latents
from jaxcond.models.unet_clip import _quiet_deprecations

CLIP, T5 = "text_encoder", "text_encoder_2"
TOKENIZERS = ("tokenizer", "tokenizer_2")
PARTS = ("transformer", CLIP, T5, *TOKENIZERS, "vae")
CONDITIONERS = ("t5", "pooled")
MAX_T5_LENGTH = 512  # FluxPipeline refuses a longer max_sequence_length
# T5 tokens per caption when model.t5_max_length is unset: FluxPipeline's default for dev;
# schnell was distilled with 256 (its model card's max_sequence_length).
DEFAULT_T5_LENGTH = {True: 512, False: 256}
DEFAULT_GUIDANCE = 1.0  # the guidance embedding's value in fine-tuning (kohya, SimpleTuner)
PATCH = 2  # FluxPipeline packs 2x2 latent patches into one token
BLOCKS = ("transformer_blocks_", "single_transformer_blocks_")  # they gather their own params
# The config files (no weights, no tokenizer vocabularies) of these hub models ship with
# jaxcond, so their parameter shapes are known offline (`jaxcond plan`).
SHIPPED = {"black-forest-labs/FLUX.1-dev": "flux_dev", "black-forest-labs/FLUX.1-schnell": "flux_schnell"}


def model_index() -> dict:
    """The `model_index.json` of FluxPipeline for these parts."""
    return {"_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "image_encoder": [None, None], "feature_extractor": [None, None]}


def scheduler_config(dev: bool = True) -> dict:
    """Flux's scheduler, for a source without one (`jaxcond export` writes the run's own):
    dev's resolution-dependent shift, schnell's none."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": flow.NUM_TRAIN_TIMESTEPS, "shift": 3.0 if dev else 1.0,
            "use_dynamic_shifting": dev, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096}


def _check_parts(source: str, path: str) -> tuple[FluxConfig, Any, int, dict]:
    """The transformer's config, CLIP's, T5's width and the VAE's config, once their
    configs (before any weights are read) show that the parts fit together."""
    configs = dit_parts.read_configs(source, path, ("transformer", CLIP, T5, "vae"), "Flux")
    try:
        c = FluxConfig.from_diffusers(configs["transformer"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}/transformer/config.json: {e}") from None
    from transformers import CLIPTextConfig, T5Config

    clip = CLIPTextConfig.from_dict(configs[CLIP])
    t5_width = T5Config.from_dict(configs[T5]).d_model
    channels = configs["vae"].get("latent_channels", 4)
    problems = []
    if t5_width != c.joint_attention_dim:
        problems.append(f"T5 gives {t5_width} features but the transformer attends to {c.joint_attention_dim}")
    if clip.hidden_size != c.pooled_projection_dim:
        problems.append(f"CLIP pools {clip.hidden_size} features but the transformer's pooled_projection_dim is "
                        f"{c.pooled_projection_dim}")
    if PATCH * PATCH * channels != c.in_channels or c.out_channels != c.in_channels:
        problems.append(f"the VAE makes {channels} channels, {PATCH}x{PATCH} patches of which are "
                        f"{PATCH * PATCH * channels}, but the transformer takes {c.in_channels} and makes "
                        f"{c.out_channels}")
    if c.patch_size != 1:
        problems.append(f"transformer patch_size {c.patch_size}: FluxPipeline packs the patches, so it is 1")
    if problems:
        raise ConfigError(f"config.model.source = {source!r}: its parts do not belong together ("
                          + "; ".join(problems) + ")")
    return c, clip, t5_width, configs["vae"]


class FluxFamily(Family):
    """FluxPipeline's models: the Flux transformer + CLIP-L (pooled) + T5 + a 16-channel VAE."""

    latent = True
    patch_size = PATCH

    def __init__(self, source: str, dtype: jnp.dtype = jnp.float32, t5_max_length: int | None = None,
                 guidance: float = DEFAULT_GUIDANCE, resolution: int | None = None, remat: str = "none",
                 frozen_dtype: str = "float32", shapes_only: bool = False):
        """`source`: a diffusers-format folder or hub id. `t5_max_length`: T5 tokens per
        caption (None: 512 for dev, 256 for schnell). `guidance`: the value dev's guidance
        embedding is fed (schnell: only the default). `resolution`: the image side samples are
        drawn at (None: the VAE's sample_size). `remat`: none | layers (each block recomputed
        in the backward pass, gathering its FSDP-sharded params there again) | full. `shapes_only`: params are shapes from the configs
        alone, which for the FLUX.1 hub ids ship with jaxcond; without tokenizer vocabularies
        the token ids are zeros."""
        _quiet_deprecations()
        t5.patch_flax_t5()
        from transformers import FlaxCLIPTextModel

        described = f"a diffusers-format Flux folder ({', '.join(PARTS)})"
        path = dit_parts.resolve(source, SHIPPED, PARTS, "flux", described, shapes_only)
        self.config, clip, t5_width, vae_config = _check_parts(source, path)
        dev = self.config.guidance_embeds
        if not dev and guidance != DEFAULT_GUIDANCE:
            raise ConfigError(f"config.model.flux_guidance = {guidance!r}: {source} has no guidance embedding "
                              f"(FLUX.1-schnell-like); leave it at {DEFAULT_GUIDANCE}")
        self.path, self.dtype, self.remat, self.frozen_dtype = path, dtype, remat, frozen_dtype
        self.guidance, weights = float(guidance), not shapes_only
        self.transformer = Flux(self.config, dtype=dtype, remat_layers=remat == "layers")
        if weights:
            folder = os.path.join(path, "transformer")
            params = flux_convert.from_diffusers(load.pytorch_tensors(folder, "diffusers"), self.config, source=folder)
        else:
            params = flux_convert.param_shapes(self.config)
        self.trainable, self.frozen, self.text_models = {"transformer": params}, {}, {}
        self.text_models[CLIP], self.frozen[CLIP] = load.transformers_part(
            FlaxCLIPTextModel, os.path.join(path, CLIP), dtype, weights=weights)
        self.text_models[T5], self.frozen[T5] = dit_parts.load_t5(path, T5, dtype, weights)
        self.vae, self.quant, self.scale, self.shift, self.frozen["vae"] = dit_parts.load_vae(
            os.path.join(path, "vae"), dtype, weights, "Flux")
        self.tokenizers, self.max_length = dit_parts.load_tokenizers(path, TOKENIZERS[:1], TOKENIZERS[1], weights)
        self.t5_max_length = DEFAULT_T5_LENGTH[dev] if t5_max_length is None else t5_max_length
        self.lengths = (self.max_length, self.t5_max_length)  # the pipeline's CLIP limit is tokenizer/'s
        self.conditioners = {"t5": (self.t5_max_length, t5_width), "pooled": (clip.hidden_size,)}
        self.frozen = dit_parts.cast_frozen(self.frozen, frozen_dtype)

        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size_multiple = vae_factor * PATCH
        self.image_size = resolution or vae_config.get("sample_size", 1024)
        if self.image_size % self.size_multiple:
            raise ConfigError(f"config.data.resolution = {self.image_size}: Flux's images have sides that are "
                              f"multiples of {self.size_multiple} (VAE factor {vae_factor} x patch {PATCH})")
        side = self.image_size // vae_factor
        self.sample_shape = (self.config.in_channels // (PATCH * PATCH), side, side)

    # The VAE is SD3's layout (16 channels, shift and scale, no quant convs): the same code.
    image_moments = sd3.SD3.image_moments
    draw_x0 = sd3.SD3.draw_x0
    images_to_x0 = sd3.SD3.images_to_x0
    x0_to_images = sd3.SD3.x0_to_images

    @classmethod
    def check_config(cls, model: ml_collections.ConfigDict) -> None:
        dit_parts.check_model(model, "flux", "black-forest-labs/FLUX.1-dev")
        check(model.get("clip_skip", 1) == 1, "model.clip_skip", model.get("clip_skip"),
              "Flux reads CLIP's pooled output, which clip_skip does not change; leave it at 1")
        n = model.get("t5_max_length")
        check(n is None or (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_T5_LENGTH),
              "model.t5_max_length", n, f"must be an integer in [1, {MAX_T5_LENGTH}] (FluxPipeline's "
              "max_sequence_length), or None for the variant's default")
        g = model.get("flux_guidance", DEFAULT_GUIDANCE)
        check(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0,
              "model.flux_guidance", g, "must be a number >= 0 (the value FLUX.1-dev's guidance embedding is "
              "fed; 1.0 for fine-tuning)")

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                    resolution: int, shapes_only: bool = False) -> FluxFamily:
        return cls(model.source, dtype=dtype, t5_max_length=model.get("t5_max_length"),
                   guidance=model.get("flux_guidance", DEFAULT_GUIDANCE), resolution=resolution,
                   remat=model.get("remat", "none"), frozen_dtype=model.get("frozen_dtype", "float32"),
                   shapes_only=shapes_only)

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """[B, 77 + t5_max_length]: CLIP's and T5's ids side by side."""
        return dit_parts.tokenize_side_by_side(self.tokenizers, self.lengths, captions)

    def overlong(self, captions: Sequence[str]) -> np.ndarray:
        return dit_parts.overlong_in_any(self.tokenizers, self.lengths, captions)

    def encode(self, params: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        n = self.max_length
        clip = self.text_models[CLIP](input_ids=tokens[:, :n], params=params[CLIP], train=False)
        hidden = self.text_models[T5](input_ids=tokens[:, n:], params=params[T5], train=False).last_hidden_state
        return {"t5": hidden, "pooled": clip.pooler_output}

    def denoise(self, params: Params, x_t: jax.Array, t: jax.Array,
                cond: Mapping[str, jax.Array]) -> jax.Array:
        """The velocity prediction [B, C, H, W]; `t` is sigma * 1000 (float) per example."""
        b, _, h, w = x_t.shape
        context, pooled = cond["t5"].astype(self.dtype), cond["pooled"].astype(self.dtype)
        sigma = jnp.asarray(t, jnp.float32) / flow.NUM_TRAIN_TIMESTEPS  # FluxPipeline passes t / 1000
        guidance = jnp.full((b,), self.guidance, jnp.float32) if self.config.guidance_embeds else None
        img, txt = image_ids(h // PATCH, w // PATCH), text_ids(context.shape[1])

        def apply(p: Params, x: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
            return self.transformer.apply({"params": p}, x, context, pooled, sigma, img, txt, guidance)

        if self.remat == "full":
            apply = jax.checkpoint(apply)
        # The blocks gather their own params, one at a time (mmdit.layer_class); the rest here.
        p = {k: v if k.startswith(BLOCKS) else sharding.gather(v) for k, v in params["transformer"].items()}
        out = apply(p, pack_latents(x_t.astype(self.dtype)), context, pooled)
        return unpack_latents(out, h, w).astype(jnp.float32)

    def save(self, path: str, trainable: Params) -> None:
        """A folder FluxPipeline loads: the transformer in diffusers' PyTorch layout, every
        other part copied from the source as it is there (they are frozen)."""
        folder = os.path.join(path, "transformer")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**self.config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION}, f, indent=2)
        tensors = flux_convert.to_diffusers(jax.device_get(trainable["transformer"]), self.config)
        convert.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tensors,
                                  metadata={"format": "pt"})
        for sub in (CLIP, T5, *TOKENIZERS, "vae"):
            shutil.copytree(os.path.join(self.path, sub), os.path.join(path, sub), dirs_exist_ok=True)
        scheduler = os.path.join(self.path, "scheduler", "scheduler_config.json")
        os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(dit_parts.read_json(scheduler) if os.path.isfile(scheduler)
                      else scheduler_config(self.config.guidance_embeds), f, indent=2)

    def pipeline_index(self, force_zeros_for_empty_prompt: bool) -> dict | None:
        """FluxPipeline (it has no force_zeros setting: zeros nulls are passed to it as
        negative_prompt_embeds and negative_pooled_prompt_embeds)."""
        return model_index()

    def encoding_key(self) -> dict:
        key = {"t5_max_length": self.t5_max_length, "dtype": jnp.dtype(self.dtype).name,
               "text_encoders": [CLIP, T5], "pooled": "clip_pooler_output"}
        if self.frozen_dtype != "float32":
            key["frozen_dtype"] = self.frozen_dtype
        return key

    def export_manifest(self) -> dict:
        """What FluxPipeline must be called with to encode captions and embed guidance as
        training did; jaxcond's guidance scale is its true_cfg_scale."""
        kwargs = {"max_sequence_length": self.t5_max_length}
        if self.config.guidance_embeds:
            kwargs["guidance_scale"] = self.guidance
        return {"t5_max_length": self.t5_max_length,
                "flux_guidance": self.guidance if self.config.guidance_embeds else None,
                "cfg_scale_kwarg": "true_cfg_scale", "pipeline_kwargs": kwargs}


FAMILY = FluxFamily

"""A diffusers Flax UNet conditioned by a transformers Flax CLIP text encoder.

Loaded from a diffusers-format folder (`unet/`, `text_encoder/`, `tokenizer/`, and for
SDXL `text_encoder_2/`, `tokenizer_2/`) or hub id, with Flax or PyTorch safetensors weights
(`jaxcond.models.load`): the layout of Stable Diffusion 1.x/2.x and SDXL checkpoints and of
the built-in demo model. This module is
the only place that touches diffusers/transformers: the pins in pyproject.toml exist
because their later releases removed these Flax classes.

With a `vae/` (diffusers `FlaxAutoencoderKL`) the model is latent-space, as Stable
Diffusion is: x0 is drawn in the step from the encoder's Gaussian and scaled by the VAE's
`scaling_factor`. Without one (the demo) it is pixel-space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcond import sharding
from jaxcond.checks import ConfigError, check, int_at_least, one_of
from jaxcond.models import convert, load, lora as lora_lib, remat as remat_lib, single_file
from jaxcond.models.family import DIFFUSERS_VERSION, Family, Params



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
    """diffusers `FlaxUNet2DConditionModel` + one or two transformers CLIP text encoders.

    One encoder (`text_encoder/`, Stable Diffusion 1.x/2.x and the demo): conditioner
    `text`, its hidden states; with a `text_time` UNet also `pooled` (its pooled output)
    and `time_ids`. Two encoders (`text_encoder_2/` as well, SDXL): `text` and `text_2`
    (concatenated for cross-attention), `pooled` (encoder 2's projection) and `time_ids`
    (original size, crop top-left, target size: per example, from the batch).
    """

    def __init__(self, source: str, dtype: jnp.dtype = jnp.float32, clip_skip: int = 1,
                 train_text_encoder: bool = False, base: str = "", remat: str = "none", shapes_only: bool = False,
                 lora: lora_lib.Spec | None = None, lora_init: str = "", frozen_dtype: str = "float32",
                 scan_layers: bool = False):
        """`source`: a diffusers-format folder or hub id, or a single-file `.safetensors`
        in the original SD 1.x / SDXL layout with `base` naming a diffusers folder or hub id
        of its family for the configs and tokenizers (jaxcond.models.load).

        `clip_skip`: one encoder: 1 = its last layer, 2 = the penultimate normalised by
        the final layer norm (as diffusers' SD pipelines do), ... Two encoders: SDXL's
        convention, 1 = the penultimate layer un-normalised (what SDXL was trained on),
        2 = the one before, ...
        `train_text_encoder`: the encoders join the trainable params.
        `remat`: the UNet's rematerialisation policy (`jaxcond.models.remat`).
        `shapes_only`: params are shapes (jax.ShapeDtypeStruct) read from the configs alone,
        which for the hub ids of SD 1.5, 2.1 and SDXL ship with jaxcond: a model to compile
        (`jaxcond plan`), never to run. Without a tokenizer vocabulary its token ids are zeros.
        `lora`: train LoRA adapters of the UNet (and of the text encoders with
        `train_text_encoder`) instead of their weights, from `lora_init` (a LoRA file) if
        given (`jaxcond.models.lora`). `frozen_dtype`: how frozen weights are stored.
        `scan_layers`: each spatial transformer scans over its blocks (`jaxcond.models.remat`).
        """
        _quiet_deprecations()
        from diffusers import FlaxUNet2DConditionModel
        from transformers import CLIPTokenizer, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

        tensors: dict[str, dict | None] = {}
        if shapes_only:
            path = load.resolve_configs(base if source.endswith(".safetensors") else source)
        elif os.path.isfile(source) and source.endswith(".safetensors"):
            if not base:
                raise FileNotFoundError(
                    f"{source} is a single-file checkpoint, which carries no config: set config.model.base "
                    "to a diffusers folder or hub id of its family (its weights are not read)")
            path, tensors = load.single_file(source, base)
        else:
            path = load.resolve(source)
        for sub in ("unet", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise FileNotFoundError(
                    f"model folder {path!r} has no {sub}/ subfolder; expected a diffusers-format "
                    "folder with unet/, text_encoder/ and tokenizer/")
        self.path, self.dtype, self.remat, self.scan_layers = path, dtype, remat, scan_layers
        weights = not shapes_only
        self.unet, unet_params = load.diffusers_part(FlaxUNet2DConditionModel, os.path.join(path, "unet"), dtype,
                                                     tensors.get("unet"), weights)
        self.trainable, self.frozen = {"unet": unet_params}, {}
        self.encoders = ["text_encoder"] + (["text_encoder_2"] if os.path.isdir(os.path.join(path, "text_encoder_2"))
                                            else [])
        self.text_models, self.tokenizers = {}, []
        for i, name in enumerate(self.encoders):
            cls = FlaxCLIPTextModel if i == 0 else FlaxCLIPTextModelWithProjection
            self.text_models[name], params = load.transformers_part(cls, os.path.join(path, name), dtype,
                                                                    tensors.get(name), weights)
            (self.trainable if train_text_encoder else self.frozen)[name] = params
            tokenizer = os.path.join(path, "tokenizer" if i == 0 else "tokenizer_2")
            if weights or os.path.isfile(os.path.join(tokenizer, "vocab.json")):
                self.tokenizers.append(CLIPTokenizer.from_pretrained(tokenizer))
            else:
                with open(os.path.join(tokenizer, "tokenizer_config.json")) as f:
                    self.max_length = json.load(f)["model_max_length"]
        self.latent = os.path.isdir(os.path.join(path, "vae"))
        if self.latent:
            from diffusers import FlaxAutoencoderKL

            self.vae, self.frozen["vae"] = load.diffusers_part(FlaxAutoencoderKL, os.path.join(path, "vae"), dtype,
                                                               tensors.get("vae"), weights)
        layers = min(m.config.num_hidden_layers for m in self.text_models.values())
        if not 1 <= clip_skip < layers + (len(self.encoders) == 1):
            raise ConfigError(f"config.model.clip_skip = {clip_skip}: this model's text encoders have {layers} "
                              "layers; use 1 (the last) up to their count")
        self.clip_skip = clip_skip
        if self.tokenizers:
            self.max_length = self.tokenizers[0].model_max_length
        if any(t.model_max_length != self.max_length for t in self.tokenizers):
            raise FileNotFoundError(f"{path}: tokenizer/ and tokenizer_2/ have different lengths")

        ucfg = self.unet.config
        widths = [self.text_models[n].config.hidden_size for n in self.encoders]
        self.conditioners = {"text": (self.max_length, widths[0])}
        if len(self.encoders) == 2:
            self.conditioners["text_2"] = (self.max_length, widths[1])
        if ucfg.cross_attention_dim != sum(widths):
            raise FileNotFoundError(f"{path}: the UNet attends to {ucfg.cross_attention_dim} features but the "
                                    f"text encoders give {sum(widths)}; the parts do not belong together")
        self.uses_pooled = ucfg.addition_embed_type == "text_time"
        if self.uses_pooled:
            last = self.text_models[self.encoders[-1]].config
            pooled = last.projection_dim if len(self.encoders) == 2 else last.hidden_size
            n_ids = (ucfg.projection_class_embeddings_input_dim - pooled) // ucfg.addition_time_embed_dim
            if n_ids != 6:
                raise FileNotFoundError(f"{path}: the UNet's text_time embedding takes {n_ids} time ids; "
                                        "jaxcond builds SDXL's 6 (original size, crop top-left, target size)")
            self.conditioners["pooled"] = (pooled,)
            self.conditioners["time_ids"] = (6,)
            self.batch_conditioners = ("time_ids",)
        self.lora = lora
        if lora:
            lora_lib.attach(self.trainable, self.frozen, lora, len(self.encoders) == 2, shapes_only, lora_init)
        self.frozen_dtype = frozen_dtype
        if frozen_dtype != "float32":
            self.frozen = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) if isinstance(x, jax.ShapeDtypeStruct)
                else jnp.asarray(x, jnp.bfloat16), self.frozen)
        self.sample_shape = (ucfg.in_channels, ucfg.sample_size, ucfg.sample_size)
        vae_factor = 1
        if self.latent:
            if ucfg.in_channels != self.vae.config.latent_channels:
                raise FileNotFoundError(f"{path}: the UNet takes {ucfg.in_channels} channels but the VAE makes "
                                        f"{self.vae.config.latent_channels}; unet/ and vae/ do not belong together")
            vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = ucfg.sample_size * vae_factor
        self.size_multiple = vae_factor * 2 ** (len(ucfg.block_out_channels) - 1)

    @classmethod
    def check_config(cls, model: ml_collections.ConfigDict) -> None:
        int_at_least("model.clip_skip", model.clip_skip, 1)
        check(not model.source.endswith(".safetensors") or bool(model.base), "model.base",
              model.base, "a single-file model.source carries no config: name a diffusers folder or hub id "
              "of its family, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
        check(isinstance(model.train_text_encoder, bool), "model.train_text_encoder",
              model.train_text_encoder, "must be True or False")
        one_of("model.remat", model.get("remat", "none"), tuple(remat_lib.POLICIES))
        check(isinstance(model.get("scan_layers", False), bool), "model.scan_layers", model.get("scan_layers"),
              "must be True or False")
        one_of("model.frozen_dtype", model.get("frozen_dtype", "float32"), ("float32", "bfloat16"))
        if "lora" in model:
            lora_lib.validate(model.lora)
            check(not model.lora.init_from or model.lora.rank > 0, "model.lora.init_from", model.lora.init_from,
                  "set config.model.lora.rank (the file's rank) to train from a LoRA file")

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                    resolution: int, shapes_only: bool = False) -> UNetCLIP:
        return cls(model.source, dtype=dtype, clip_skip=model.clip_skip,
                   train_text_encoder=model.train_text_encoder, base=model.base, remat=model.get("remat", "none"),
                   shapes_only=shapes_only, **extra_args(model))

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        if not self.tokenizers:  # shapes only: compiled, never run
            return np.zeros((len(captions),) + ((len(self.encoders),) if len(self.encoders) == 2 else ())
                            + (self.max_length,), np.int32)
        ids = [t(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                 return_tensors="np").input_ids.astype(np.int32) for t in self.tokenizers]
        return ids[0] if len(ids) == 1 else np.stack(ids, axis=1)  # [B, T] or [B, 2, T]

    def overlong(self, captions: Sequence[str]) -> np.ndarray:
        # SDXL's two tokenizers share one vocabulary and limit: they split every caption alike.
        ids = self.tokenizers[0](list(captions), truncation=False, verbose=False).input_ids
        return np.array([len(i) > self.max_length for i in ids], bool)

    def _hidden(self, name: str, params: Params, tokens: jax.Array) -> tuple[jax.Array, Any]:
        model = self.text_models[name]
        # A fine-tuned encoder is gathered whole (FSDP); frozen ones are left to XLA.
        trained = name in self.trainable or name + lora_lib.LORA in self.trainable
        p = lora_lib.part(params, name, self.lora)
        p = sharding.gather(p) if trained else p
        out = model(input_ids=tokens, params=p, train=False, output_hidden_states=True)
        if len(self.encoders) == 2:  # SDXL: a penultimate (or earlier) layer, as is
            return out.hidden_states[-(self.clip_skip + 1)], out
        if self.clip_skip == 1:
            return out.last_hidden_state, out
        return model.module.apply({"params": p}, out.hidden_states[-self.clip_skip],
                                  method=lambda m, h: m.text_model.final_layer_norm(h)), out

    def encode(self, params: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        if len(self.encoders) == 1:
            text, out = self._hidden("text_encoder", params, tokens)
            cond = {"text": text}
            if self.uses_pooled:
                cond["pooled"] = out.pooler_output
            return cond
        text, _ = self._hidden("text_encoder", params, tokens[:, 0])
        text_2, out = self._hidden("text_encoder_2", params, tokens[:, 1])
        cond = {"text": text, "text_2": text_2}
        if self.uses_pooled:
            cond["pooled"] = out.text_embeds
        return cond

    def sampling_conditioners(self, n: int) -> dict[str, np.ndarray]:
        """Uncropped, at the model's size: what SDXL pipelines pass by default."""
        if not self.uses_pooled:
            return {}
        s = self.image_size
        return {"time_ids": np.tile(np.array([s, s, 0, 0, s, s], np.float32), (n, 1))}

    def denoise(self, params: Params, x_t: jax.Array, t: jax.Array,
                cond: Mapping[str, jax.Array]) -> jax.Array:
        added = None
        if self.uses_pooled:
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        context = cond["text"] if "text_2" not in cond else jnp.concatenate([cond["text"], cond["text_2"]], -1)
        # FSDP: the layers gather their own params as they run (remat_lib); the rest here.
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x if any(str(getattr(k, "key", k)).startswith(remat_lib.LAYER_SCOPES) for k in path)
            else sharding.gather(x), lora_lib.part(params, "unet", self.lora))

        def apply(params: Params, x_t: jax.Array, context: jax.Array, added: Any) -> jax.Array:
            with remat_lib.wrapped(self.remat, self.scan_layers):  # the blocks are built inside apply
                return self.unet.apply({"params": params}, x_t, t, context, added_cond_kwargs=added,
                                       train=False).sample

        if self.remat == "full":
            apply = jax.checkpoint(apply)
        return apply(params, x_t.astype(self.dtype), context.astype(self.dtype), added).astype(jnp.float32)

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
        params = lora_lib.merged({**self.frozen, **trainable}, self.lora)
        parts = [("unet", self.unet, "diffusion_pytorch_model")]
        parts += [(name, self.text_models[name], "model") for name in self.encoders]
        if self.latent:
            parts.append(("vae", self.vae, "diffusion_pytorch_model"))
        for sub, model, stem in parts:
            folder = os.path.join(path, sub)
            weights = jax.device_get(params[sub])
            model.save_pretrained(folder, params=weights)
            convert.write_safetensors(os.path.join(folder, f"{stem}.safetensors"), convert.to_pytorch(weights),
                                      metadata={"format": "pt"})
        for i, tok in enumerate(self.tokenizers):
            tok.save_pretrained(os.path.join(path, "tokenizer" if i == 0 else "tokenizer_2"))

    def save_lora(self, path: str, trainable: Params, layout: str) -> None:
        adapters = {k[: -len(lora_lib.LORA)]: v for k, v in trainable.items() if k.endswith(lora_lib.LORA)}
        tensors = lora_lib.to_files(adapters, self.lora, layout, len(self.encoders) == 2)
        meta = {"format": "pt", "rank": str(self.lora.rank), "alpha": str(self.lora.alpha)}
        convert.write_safetensors(path, tensors, metadata=meta)

    def pipeline_index(self, force_zeros_for_empty_prompt: bool) -> dict | None:
        """Stable Diffusion (XL)'s pipeline; a pixel-space model has no diffusers pipeline."""
        if not self.latent:
            return None
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "DDIMScheduler"]}
        if len(self.encoders) == 2:
            index.update({"_class_name": "StableDiffusionXLPipeline",
                          "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                          "tokenizer_2": ["transformers", "CLIPTokenizer"],
                          "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt})
        else:
            index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                          "requires_safety_checker": False})
        return index

    def encoding_key(self) -> dict:
        key = {"clip_skip": self.clip_skip, "dtype": jnp.dtype(self.dtype).name, "text_encoders": list(self.encoders)}
        if self.frozen_dtype != "float32":  # (absent otherwise: caches built before it stay valid)
            key["frozen_dtype"] = self.frozen_dtype
        return key

    def export_manifest(self) -> dict:
        return {"clip_skip": self.clip_skip}

    def single_file_refusal(self) -> str | None:
        if self.latent:
            return None
        return ("the original single-file layout holds a VAE, and this model is pixel-space; "
                "export without --single_file")

    def save_single_file(self, path: str, trainable: Params) -> None:
        """One `.safetensors` in the original SD 1.x / SDXL layout (latent models only)."""
        if not self.latent:
            raise ValueError("a single-file checkpoint holds a VAE (first_stage_model); this model has none")
        params = jax.device_get(lora_lib.merged({**self.frozen, **trainable}, self.lora))
        parts = {sub: convert.to_pytorch(params[sub]) for sub in ["unet", "vae", *self.encoders]}
        configs = {"unet": dict(self.unet.config), "vae": dict(self.vae.config)}
        convert.write_safetensors(path, single_file.from_parts(parts, configs), metadata={"format": "pt"})


def extra_args(model: ml_collections.ConfigDict) -> dict:
    """The LoRA, frozen-weight and scan arguments of `config.model` (absent from older configs)."""
    lora = model.get("lora")
    return {"lora": lora_lib.Spec.from_config(lora) if lora else None,
            "lora_init": lora.init_from if lora else "", "frozen_dtype": model.get("frozen_dtype", "float32"),
            "scan_layers": model.get("scan_layers", False)}


FAMILY = UNetCLIP

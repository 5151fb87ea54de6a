"""A tiny Flux.1 folder with random weights, built locally without torch.

The layout of a real FLUX.1-dev or -schnell checkpoint (`transformer/`, `text_encoder/`
CLIPTextModel, `text_encoder_2/` T5, `vae/` with 16 latent channels and Flux's shift and
scale, the two tokenizers, `scheduler/`, `model_index.json`), every part in PyTorch
safetensors: jaxcond's flux family and diffusers' PyTorch FluxPipeline both load it, so
tests compare the two on the same files. Tokenizers, T5's key layout and the VAE are
sd3_tiny's (the demo captions' words), the VAE's factors set to Flux's.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxcond.models import convert, demo, flux_convert, flux_family, sd3_tiny, t5 as t5_lib
from jaxcond.models.family import DIFFUSERS_VERSION
from jaxcond.models.flux import Flux, FluxConfig
from jaxcond.models.unet_clip import _quiet_deprecations

# Widths unlike each other so that a swapped part or axis cannot go unnoticed.
TINY = {"clip_width": 20, "clip_layers": 2, "clip_heads": 2, "t5_width": 24, "t5_layers": 2, "t5_heads": 4,
        "t5_ff": 40, "layers": 1, "single_layers": 1, "heads": 2, "head_dim": 16, "axes_dims_rope": (4, 6, 6),
        "vae_channels": (32, 32)}
SCALING_FACTOR, SHIFT_FACTOR = 0.3611, 0.1159  # FLUX.1's VAE


def build_tiny(path: str, resolution: int = 16, seed: int = 0, guidance_embeds: bool = True, **sizes) -> None:
    """Writes a randomly initialised tiny Flux folder (dev-like with `guidance_embeds`, else
    schnell-like) for `resolution`-pixel images (a multiple of 2 * 2 ** (len(vae_channels) -
    1)); `sizes` override TINY's."""
    _quiet_deprecations()
    t5_lib.patch_flax_t5()
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxT5EncoderModel, T5Config

    s = sd3_tiny.sizes_of(TINY, sizes)
    vocab = demo._write_tokenizer(os.path.join(path, flux_family.TOKENIZERS[0]), sd3_tiny.CLIP_LENGTH)
    width = s["clip_width"]
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=s["clip_layers"], num_attention_heads=s["clip_heads"],
                         max_position_embeddings=sd3_tiny.CLIP_LENGTH, hidden_act="quick_gelu",  # CLIP-L's
                         bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                         architectures=["CLIPTextModel"])
    clip = FlaxCLIPTextModel(cfg, _do_init=False)
    cfg.save_pretrained(os.path.join(path, flux_family.CLIP))
    sd3_tiny._write_pytorch(os.path.join(path, flux_family.CLIP),
                            convert.to_pytorch(demo._init(clip, seed, clip.input_shape)), "model")

    t5_vocab = sd3_tiny._write_t5_tokenizer(os.path.join(path, flux_family.TOKENIZERS[1]))
    t5_cfg = T5Config(vocab_size=t5_vocab, d_model=s["t5_width"], d_kv=s["t5_width"] // s["t5_heads"],
                      d_ff=s["t5_ff"], num_layers=s["t5_layers"], num_heads=s["t5_heads"],
                      feed_forward_proj="gated-gelu", architectures=["T5EncoderModel"])
    t5 = FlaxT5EncoderModel(t5_cfg, _do_init=False)
    t5_cfg.save_pretrained(os.path.join(path, flux_family.T5))
    sd3_tiny._write_pytorch(os.path.join(path, flux_family.T5),
                            t5_lib.to_pytorch(convert.to_pytorch(demo._init(t5, seed + 1, t5.input_shape))), "model")

    sd3_tiny._write_vae(path, resolution, seed, s["vae_channels"])
    vae_file = os.path.join(path, "vae", "config.json")
    with open(vae_file) as f:
        vae_cfg = json.load(f)
    with open(vae_file, "w") as f:  # SD3's layout, Flux's factors
        json.dump({**vae_cfg, "scaling_factor": SCALING_FACTOR, "shift_factor": SHIFT_FACTOR}, f, indent=2)

    config = FluxConfig(in_channels=4 * vae_cfg["latent_channels"], num_layers=s["layers"],
                        num_single_layers=s["single_layers"], attention_head_dim=s["head_dim"],
                        num_attention_heads=s["heads"], joint_attention_dim=s["t5_width"],
                        pooled_projection_dim=width, guidance_embeds=guidance_embeds,
                        axes_dims_rope=s["axes_dims_rope"])
    write_transformer(path, config, seed + 2)

    os.makedirs(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(flux_family.scheduler_config(guidance_embeds), f, indent=2)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(flux_family.model_index(), f, indent=2)


def write_transformer(path: str, config: FluxConfig, seed: int = 0) -> None:
    """Writes `path`/transformer/: a randomly initialised Flux transformer of `config`
    (replacing one there: e.g. a schnell-like one into a copy of a dev-like folder)."""
    ids = jnp.zeros((1, len(config.axes_dims_rope)))
    args = (jnp.zeros((1, 1, config.in_channels)), jnp.zeros((1, 1, config.joint_attention_dim)),
            jnp.zeros((1, config.pooled_projection_dim)), jnp.zeros((1,)), ids, ids,
            jnp.zeros((1,)) if config.guidance_embeds else None)
    params = jax.jit(Flux(config).init)(jax.random.key(seed), *args)["params"]
    folder = os.path.join(path, "transformer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION}, f, indent=2)
    sd3_tiny._write_pytorch(folder, flux_convert.to_diffusers(jax.device_get(params), config),
                            "diffusion_pytorch_model")

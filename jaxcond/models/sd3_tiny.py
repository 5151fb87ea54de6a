"""A tiny Stable Diffusion 3 folder with random weights, built locally without torch.

The layout of a real SD3/SD3.5 checkpoint (`transformer/`, `text_encoder/` CLIP-L and
`text_encoder_2/` CLIP-G with projections, `text_encoder_3/` T5, `vae/` with 16 latent
channels and SD3's shift and scale, the three tokenizers, `scheduler/`, `model_index.json`),
every part in PyTorch safetensors: jaxcond's sd3 family and diffusers' PyTorch
StableDiffusion3Pipeline both load it, so tests compare the two on the same files. The
CLIP tokenizers are the demo's (a BPE learned from the demo captions' words), the T5 one a
Unigram model over the same words with single-character fallbacks. Without a VAE
(`latent=False`) the folder is a pixel-space SD3, which only jaxcond runs: the CPU demo's
model (jaxcond.models.sd3_demo).
"""

from __future__ import annotations

import json
import os
import string

import jax
import jax.numpy as jnp
import numpy as np

from jaxcond.data import demo as demo_data
from jaxcond.models import convert, demo, mmdit_convert, sd3, t5 as t5_lib
from jaxcond.models.family import DIFFUSERS_VERSION
from jaxcond.models.mmdit import MMDiT, MMDiTConfig
from jaxcond.models.unet_clip import _quiet_deprecations

# Widths chosen unlike each other so that a swapped part or axis cannot go unnoticed; CLIP-L
# + CLIP-G fit in T5's width (as 768 + 1280 <= 4096), their projections make the pooled width.
TINY = {"clip_l_width": 16, "clip_g_width": 32, "clip_layers": 2, "clip_heads": 2, "t5_width": 64, "t5_layers": 2,
        "t5_heads": 4, "t5_ff": 96, "layers": 2, "heads": 2, "head_dim": 16, "pos_embed_max_size": 16,
        "dual_attention_layers": (0,), "qk_norm": "rms_norm", "vae_channels": (32, 32), "patch_size": 2}
CLIP_LENGTH = 77  # what StableDiffusion3Pipeline tokenizes CLIP captions to


def _write_t5_tokenizer(path: str) -> int:
    """A T5TokenizerFast (SentencePiece-style Unigram, `</s>` appended) whose every demo word
    is one token; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted({w for a in demo_data.all_combinations() for w in demo_data.caption(a).split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(ch, -5.0) for ch in string.ascii_lowercase + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, additional_special_tokens=[], model_max_length=512)
    fast.save_pretrained(path)
    return len(pieces)


def _write_pytorch(folder: str, tensors: dict, stem: str) -> None:
    convert.write_safetensors(os.path.join(folder, f"{stem}.safetensors"),
                              {k: np.asarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})


def sizes_of(tiny: dict, overrides: dict) -> dict:
    """A tiny model's sizes: `tiny`'s, with `overrides` (each one of its names)."""
    unknown = set(overrides) - set(tiny)
    if unknown:
        raise ValueError(f"build_tiny: unknown sizes {sorted(unknown)}; known: {sorted(tiny)}")
    return {**tiny, **overrides}


def build_tiny(path: str, resolution: int = 16, seed: int = 0, latent: bool = True, **sizes) -> None:
    """Writes a randomly initialised tiny SD3 folder for `resolution`-pixel images (a
    multiple of patch_size * 2 ** (len(vae_channels) - 1)); `sizes` override TINY's. `latent=False`:
    no vae/, a pixel-space transformer (3 channels in and out): a random VAE is no
    autoencoder, so only pixels let the demo's scorer read what the model draws."""
    _quiet_deprecations()
    t5_lib.patch_flax_t5()
    from transformers import CLIPTextConfig, FlaxCLIPTextModelWithProjection, FlaxT5EncoderModel, T5Config

    s = sizes_of(TINY, sizes)
    vocab = 0
    for i, (name, width) in enumerate(((sd3.CLIPS[0], s["clip_l_width"]), (sd3.CLIPS[1], s["clip_g_width"]))):
        vocab = demo._write_tokenizer(os.path.join(path, sd3.TOKENIZERS[i]), CLIP_LENGTH)
        cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                             num_hidden_layers=s["clip_layers"], num_attention_heads=s["clip_heads"],
                             max_position_embeddings=CLIP_LENGTH, projection_dim=width,
                             hidden_act="quick_gelu" if i == 0 else "gelu",  # as CLIP-L and CLIP-G
                             bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                             architectures=["CLIPTextModelWithProjection"])
        model = FlaxCLIPTextModelWithProjection(cfg, _do_init=False)
        cfg.save_pretrained(os.path.join(path, name))
        _write_pytorch(os.path.join(path, name), convert.to_pytorch(demo._init(model, seed + i, model.input_shape)),
                       "model")

    t5_vocab = _write_t5_tokenizer(os.path.join(path, sd3.TOKENIZERS[2]))
    t5_cfg = T5Config(vocab_size=t5_vocab, d_model=s["t5_width"], d_kv=s["t5_width"] // s["t5_heads"],
                      d_ff=s["t5_ff"], num_layers=s["t5_layers"], num_heads=s["t5_heads"],
                      feed_forward_proj="gated-gelu", architectures=["T5EncoderModel"])
    t5 = FlaxT5EncoderModel(t5_cfg, _do_init=False)
    t5_cfg.save_pretrained(os.path.join(path, sd3.T5))
    _write_pytorch(os.path.join(path, sd3.T5),
                   t5_lib.to_pytorch(convert.to_pytorch(demo._init(t5, seed + 2, t5.input_shape))), "model")

    if latent:
        _write_vae(path, resolution, seed, s["vae_channels"])
    channels, side = (16, resolution // 2 ** (len(s["vae_channels"]) - 1)) if latent else (3, resolution)
    config = MMDiTConfig(sample_size=side, patch_size=s["patch_size"], in_channels=channels, num_layers=s["layers"],
                         attention_head_dim=s["head_dim"], num_attention_heads=s["heads"],
                         joint_attention_dim=s["t5_width"], caption_projection_dim=s["heads"] * s["head_dim"],
                         pooled_projection_dim=s["clip_l_width"] + s["clip_g_width"], out_channels=channels,
                         pos_embed_max_size=s["pos_embed_max_size"], dual_attention_layers=s["dual_attention_layers"],
                         qk_norm=s["qk_norm"])
    args = (jnp.zeros((1, channels, side, side)), jnp.zeros((1, 1, config.joint_attention_dim)),
            jnp.zeros((1, config.pooled_projection_dim)), jnp.zeros((1,)))
    params = jax.jit(MMDiT(config).init)(jax.random.key(seed + 4), *args)["params"]
    os.makedirs(os.path.join(path, "transformer"))
    with open(os.path.join(path, "transformer", "config.json"), "w") as f:
        json.dump({**config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION}, f, indent=2)
    _write_pytorch(os.path.join(path, "transformer"), mmdit_convert.to_diffusers(jax.device_get(params), config),
                   "diffusion_pytorch_model")

    os.makedirs(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sd3.scheduler_config(), f, indent=2)
    if latent:  # the pipeline runs only a folder with a VAE
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump(sd3.model_index(), f, indent=2)


def _write_vae(path: str, resolution: int, seed: int, channels: tuple[int, ...]) -> None:
    """SD3's VAE layout (16 latent channels, no quant convs, shift and scale), random."""
    from diffusers import FlaxAutoencoderKL

    n = len(channels)
    vae_cfg = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
               "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(channels),
               "layers_per_block": 1, "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32,
               "sample_size": resolution}
    vae = FlaxAutoencoderKL(**vae_cfg)
    params = {k: v for k, v in demo._init(vae, seed + 3).items() if k not in ("quant_conv", "post_quant_conv")}
    os.makedirs(os.path.join(path, "vae"))
    with open(os.path.join(path, "vae", "config.json"), "w") as f:
        # SD3's VAE: no 1x1 quant convs, latents shifted then scaled.
        json.dump({"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **vae_cfg,
                   "scaling_factor": 1.5305, "shift_factor": 0.0609, "latents_mean": None, "latents_std": None,
                   "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
                   "mid_block_add_attention": True}, f, indent=2)
    _write_pytorch(os.path.join(path, "vae"), convert.to_pytorch(params), "diffusion_pytorch_model")

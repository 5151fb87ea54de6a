"""The demo's family: a tiny UNet + CLIP whose "pretrained" folder is built locally.

No hub, no download: `model.source = "demo"` builds the folder into
`<workdir>/base_model` from `config.model.demo` (once per run directory); any other
source loads that folder, e.g. an earlier build.

The folder has the diffusers layout (`unet/`, `text_encoder/`, `tokenizer/`, and with two
text encoders SDXL's `text_encoder_2/`, `tokenizer_2/`) and is
then loaded by the same code that loads real Stable Diffusion folders, so the demo
exercises the real loading path. The tokenizer is a genuine CLIP BPE tokenizer whose
vocabulary is learned from the demo's caption words.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from jaxcond import outputs, storage
from jaxcond.checks import ConfigError, check, int_at_least, one_of
from jaxcond.data import demo as demo_data
from jaxcond.models import convert, unet_clip
from jaxcond.models.unet_clip import UNetCLIP, _quiet_deprecations


def _learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair until every word is one symbol.

    Replaying the merges in rank order (what CLIP's tokenizer does) reproduces exactly
    these segmentations, so every demo word becomes a single token.
    """
    # CLIP marks the end of a word on its last character.
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in set(words)}
    merges = []
    while True:
        counts = collections.Counter(p for s in segs.values() for p in zip(s, s[1:]))
        if not counts:
            return merges
        pair = max(sorted(counts), key=counts.__getitem__)
        merges.append(pair)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = tuple(out)


def _write_tokenizer(path: str, max_length: int) -> int:
    """Writes a CLIP tokenizer for the demo words; returns the vocabulary size."""
    from transformers import CLIPTokenizer

    words = sorted({w for a in demo_data.all_combinations() for w in demo_data.caption(a).split()})
    merges = _learn_bpe(words)
    symbols = sorted({c for w in words for c in w} | {c + "</w>" for w in words for c in w})
    symbols += [a + b for a, b in merges]
    vocab = {"<|startoftext|>": 0}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    # CLIP pools at the end-of-text token, found as the highest id in older configs.
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=max_length)
    tok.save_pretrained(path)
    return len(vocab)


def _init(model: Any, seed: int, *shape: tuple[int, ...]) -> Any:
    """A diffusers/transformers Flax model's initial weights, as one compiled program.

    Initialised eagerly, each initializer and layer op compiles on its own (~350 small
    compiles: the demo folder took ~33 s to build on 2 cores, ~15 s this way). The program
    runs once, so XLA need not optimise it (half its compile time); the weights then differ
    from an eager or optimised initialisation by at most a few float32 ulps.
    """
    static = tuple(range(1, 1 + len(shape)))
    return jax.jit(model.init_weights, static_argnums=static,
                   compiler_options={"xla_backend_optimization_level": 0})(jax.random.key(seed), *shape)


def build(path: str, cfg: ml_collections.ConfigDict, resolution: int, seed: int) -> None:
    """Writes a randomly initialised tiny model folder described by `cfg` (config.model.demo)."""
    _quiet_deprecations()
    from diffusers import FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    vocab_size = _write_tokenizer(os.path.join(path, "tokenizer"), cfg.max_length)
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length, projection_dim=cfg.text_width,
        bos_token_id=0, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    clip = FlaxCLIPTextModel(text_cfg, _do_init=False)
    clip.save_pretrained(os.path.join(path, "text_encoder"), params=_init(clip, seed, clip.input_shape))
    if cfg.text_encoders == 2:
        # SDXL's layout: a second encoder with a projection head (its pooled output) and
        # its own tokenizer (the same vocabulary here).
        clip = FlaxCLIPTextModelWithProjection(text_cfg, _do_init=False)
        clip.save_pretrained(os.path.join(path, "text_encoder_2"), params=_init(clip, seed + 1, clip.input_shape))
        _write_tokenizer(os.path.join(path, "tokenizer_2"), cfg.max_length)

    channels, size = 3, resolution
    if cfg.vae_channels:
        # A latent model (Stable Diffusion's layout): the VAE halves the side per extra level.
        from diffusers import FlaxAutoencoderKL

        nv = len(cfg.vae_channels)
        vae = FlaxAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * nv,
                                up_block_types=("UpDecoderBlock2D",) * nv,
                                block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
                                sample_size=resolution)
        vae.save_pretrained(os.path.join(path, "vae"), params=_init(vae, seed))
        channels, size = 4, resolution // 2 ** (nv - 1)
    n, k = len(cfg.unet_channels), cfg.cross_attention_levels
    # Cross-attention on the k lowest resolutions only: attention is what costs on a CPU.
    down = ("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k
    up = ("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k)
    # SDXL-style added embedding: the pooled caption joins the timestep embedding. Without
    # it the UNet is Stable Diffusion 1.x/2.x-style (the caption enters by cross-attention only).
    added = dict(addition_embed_type="text_time", addition_time_embed_dim=cfg.time_embed_dim,
                 projection_class_embeddings_input_dim=cfg.text_width + 6 * cfg.time_embed_dim
                 ) if cfg.pooled else {}
    unet = FlaxUNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_heads,
        cross_attention_dim=cfg.text_width * cfg.text_encoders,  # the encoders' features, concatenated
        **added)
    params = _init(unet, seed)
    unet.save_pretrained(os.path.join(path, "unet"), params=params)
    # Also in PyTorch's layout: diffusers' PyTorch UNet then reads the base of a LoRA file.
    convert.write_safetensors(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"),
                              convert.to_pytorch(jax.device_get(params)), metadata={"format": "pt"})


def built_base(source: str, workdir: str, build_into: Callable[[str], None]) -> str:
    """The local model folder of `config.model.source`: any source but "demo" as it is; for
    "demo" `<workdir>/base_model`, which `build_into(folder)` writes the first time (process
    0 builds, the others wait for it). Every demo family (this one, sd3_demo) builds so."""
    if source != "demo":
        return source
    if not workdir:
        raise ConfigError("config.model.source = 'demo' builds the demo model into the run directory: "
                          "pass --workdir (where the demo model is)")
    path = storage.join(workdir, "base_model")
    # On Cloud Storage a folder is uploaded object by object: a marker object, written
    # last, tells a complete one from an upload a kill cut short.
    done = storage.join(path, ".complete") if storage.is_url(path) else path
    if jax.process_index() == 0 and not storage.exists(done):
        # Built aside and renamed: a kill mid-build must not leave a folder that later
        # starts would load as the model.
        outputs.remove_stale(path)
        with outputs.atomic(path) as tmp:
            build_into(tmp)
        if done != path:
            storage.write_bytes(done, b"")
    if jax.process_count() > 1:  # the others read what process 0 wrote (shared workdir)
        multihost_utils.sync_global_devices("jaxcond: demo model built")
    return storage.local_folder(path) if storage.is_url(path) else path  # the loaders read local files


class Demo(UNetCLIP):
    """The demo model: `UNetCLIP` loaded from the folder `build` writes."""

    @classmethod
    def check_config(cls, model: ml_collections.ConfigDict) -> None:
        super().check_config(model)
        if model.source != "demo":  # an earlier build: its folder describes it
            return
        m = model.demo
        # diffusers' Flax UNet normalises with 32 groups.
        check(all(ch % 32 == 0 for ch in m.unet_channels), "model.demo.unet_channels",
              m.unet_channels, "every width must be a multiple of 32")
        check(1 <= m.cross_attention_levels <= len(m.unet_channels), "model.demo.cross_attention_levels",
              m.cross_attention_levels, f"must be in [1, {len(m.unet_channels)}] (the number of UNet levels)")
        for name in ("layers_per_block", "attention_heads", "time_embed_dim", "text_width", "text_layers",
                     "text_heads", "max_length"):
            int_at_least(f"model.demo.{name}", m[name], 1)
        attended = m.unet_channels[len(m.unet_channels) - m.cross_attention_levels:]
        check(all(ch % m.attention_heads == 0 for ch in attended), "model.demo.attention_heads",
              m.attention_heads, f"must divide the widths of the cross-attention levels {tuple(attended)}")
        one_of("model.demo.text_encoders", m.text_encoders, (1, 2))
        check(m.pooled or m.text_encoders == 1, "model.demo.pooled", m.pooled,
              "two text encoders (SDXL) need the pooled text_time embedding")
        check(m.text_width % m.text_heads == 0, "model.demo.text_width", m.text_width,
              f"must be divisible by config.model.demo.text_heads = {m.text_heads}")
        check(all(ch % 32 == 0 for ch in m.vae_channels), "model.demo.vae_channels",
              m.vae_channels, "every width must be a multiple of 32")

    @classmethod
    def config_size_multiple(cls, model: ml_collections.ConfigDict) -> int | None:
        """The model `build` makes: halved per UNet level and per extra VAE level."""
        if model.source != "demo":
            return None
        m = model.demo
        return 2 ** (len(m.unet_channels) - 1 + max(len(m.vae_channels) - 1, 0))

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                    resolution: int, shapes_only: bool = False) -> UNetCLIP:
        path = built_base(model.source, workdir,
                          lambda tmp: build(tmp, model.demo, resolution, model.demo.init_seed))
        return cls(path, dtype=dtype, clip_skip=model.clip_skip, train_text_encoder=model.train_text_encoder,
                   base=model.base, remat=model.get("remat", "none"), shapes_only=shapes_only,
                   **unet_clip.extra_args(model))


FAMILY = Demo

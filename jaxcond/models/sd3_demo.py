"""The SD3-shaped demo's family: a tiny pixel-space SD3 whose "pretrained" folder is built locally.

`model.source = "demo"` builds it from `config.model.sd3_demo` into `<workdir>/base_model`
once per run directory, exactly as the UNet demo builds its own (`demo.built_base`); any
other source loads that folder, e.g. an earlier build. The folder is `sd3_tiny`'s without
a VAE: random CLIP-L, CLIP-G and T5 encoders (frozen, as SD3 fine-tuning keeps them) and a
random MMDiT on square pixel patches, loaded by the sd3 family's own loading path. Its five
conditioners are SD3's, so each encoder can be dropped on its own (configs/demo_sd3.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jaxcond.checks import ConfigError, check, int_at_least
from jaxcond.models import demo, sd3_tiny
from jaxcond.models.sd3 import SD3

FIELDS = ("patch_size", "layers", "heads", "head_dim", "clip_l_width", "clip_g_width", "t5_width", "text_layers", "text_heads",
          "init_seed")


def tiny_sizes(m: ml_collections.ConfigDict, resolution: int) -> dict:
    """`sd3_tiny.build_tiny`'s sizes from `config.model.sd3_demo`."""
    return {"patch_size": m.patch_size, "layers": m.layers, "heads": m.heads, "head_dim": m.head_dim, "clip_l_width": m.clip_l_width,
            "clip_g_width": m.clip_g_width, "clip_layers": m.text_layers, "clip_heads": m.text_heads,
            "t5_width": m.t5_width, "t5_layers": m.text_layers, "t5_heads": m.text_heads, "t5_ff": 2 * m.t5_width,
            # One position per patch of the training size; no dual attention (MMDiT-X), so
            # every block is SD3's joint block; SD3.5's q/k norms keep the tiny model stable.
            "pos_embed_max_size": resolution // m.patch_size, "dual_attention_layers": (), "qk_norm": "rms_norm"}


class SD3Demo(SD3):
    """`SD3` loaded from the folder `sd3_tiny.build_tiny(latent=False)` writes."""

    @classmethod
    def check_config(cls, model: ml_collections.ConfigDict) -> None:
        super().check_config(model)
        if model.source != "demo":  # an earlier build: its folder describes it
            return
        if "sd3_demo" not in model:
            raise ConfigError("config.model.sd3_demo is missing: the sd3_demo family builds its model from those "
                              "fields; start from configs/demo_sd3.py")
        m = model.sd3_demo
        for name in FIELDS:
            int_at_least(f"model.sd3_demo.{name}", m[name], 0 if name == "init_seed" else 1)
        check(m.heads * m.head_dim % 4 == 0, "model.sd3_demo.head_dim", m.head_dim,
              f"heads * head_dim must be a multiple of 4 (the 2D sin-cos positions); heads = {m.heads}")
        check(m.clip_l_width + m.clip_g_width <= m.t5_width, "model.sd3_demo.t5_width", m.t5_width,
              f"must be >= clip_l_width + clip_g_width = {m.clip_l_width + m.clip_g_width} (SD3 pads the CLIP "
              "features to T5's width)")
        for name in ("clip_l_width", "clip_g_width", "t5_width"):
            check(m[name] % m.text_heads == 0, f"model.sd3_demo.{name}", m[name],
                  f"must be divisible by config.model.sd3_demo.text_heads = {m.text_heads}")

    @classmethod
    def config_size_multiple(cls, model: ml_collections.ConfigDict) -> int | None:
        return model.sd3_demo.patch_size if model.source == "demo" and "sd3_demo" in model else None

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                    resolution: int, shapes_only: bool = False) -> SD3:
        m = model.get("sd3_demo")
        path = demo.built_base(model.source, workdir, lambda tmp: sd3_tiny.build_tiny(
            tmp, resolution, m.init_seed, latent=False, **tiny_sizes(m, resolution)))
        return cls(path, dtype=dtype, clip_skip=model.clip_skip, t5_max_length=model.get("t5_max_length", 256),
                   remat=model.get("remat", "none"), frozen_dtype=model.get("frozen_dtype", "float32"),
                   shapes_only=shapes_only)


FAMILY = SD3Demo

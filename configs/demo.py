"""The built-in demo: a tiny pixel-space text-to-image model on procedural shapes.

Trains a ~1M-parameter diffusers UNet with a tiny CLIP text encoder (both built locally,
no download) on 16x16 images of one coloured shape on a coloured background, captioned
"a red circle on a blue background", with 10% caption dropout and a learned null.
On 2 CPU cores it takes 10-25 minutes (machines differ) and then writes `samples_final.png`: held-out
captions (combinations never seen in training) at guidance 1, 3 and 5, plus the
unconditional branch, and prints how often colours and shapes follow the caption.

Everything not set here is configs/base.py's field (and comment); base.py's training
defaults are this demo's.

    jaxcond train --config configs/demo.py --workdir runs/demo
    jaxcond train --config configs/demo.py --workdir runs/demo --config.train.steps=300
    jaxcond train --config configs/demo.py --workdir runs/shapes --config.train.steps=4000  # shapes follow too
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "base.py"))

    # --- Model -------------------------------------------------------------------------------
    c.model.family = "demo"
    # "demo" builds the tiny model from model.demo below into <workdir>/base_model; a folder
    # path loads an earlier build.
    c.model.source = "demo"
    # The demo family's own fields: the size and layout of the model it builds.
    c.model.demo = ml_collections.ConfigDict()
    c.model.demo.unet_channels = (32, 64)  # One UNet level per entry, widths multiples of 32.
    c.model.demo.cross_attention_levels = 1  # Lowest levels with caption cross-attention.
    c.model.demo.layers_per_block = 1  # ResNet blocks per UNet level.
    c.model.demo.attention_heads = 4  # Cross-attention heads.
    # Pooled caption through SDXL's text_time embedding; False builds a Stable Diffusion
    # 1.x/2.x-style UNet (cross-attention only).
    c.model.demo.pooled = True
    c.model.demo.text_encoders = 1  # 2 builds SDXL's layout (text_encoder_2 with a projection).
    c.model.demo.time_embed_dim = 8  # Width of each SDXL-style micro-conditioning embedding.
    c.model.demo.text_width = 64  # CLIP hidden size (= UNet cross-attention width).
    c.model.demo.text_layers = 2  # CLIP transformer layers.
    c.model.demo.text_heads = 4  # CLIP attention heads.
    c.model.demo.max_length = 12  # Tokens per caption incl. start/end; demo captions need 9.
    c.model.demo.init_seed = 0  # Seed of the random "pretrained" weights.
    # Widths of a VAE (Stable Diffusion's latent layout, 4 latent channels); () = pixel space.
    c.model.demo.vae_channels = ()

    # --- Data --------------------------------------------------------------------------------
    c.data.source = "demo"  # The procedural shapes (jaxcond.data.demo), sized by data.num_records.
    return c

"""The SD3-shaped demo: a tiny pixel-space SD3 with each text encoder dropped on its own.

The SD3/3.5 recipe of configs/sd35_medium.py (rectified flow, one dropout group per text
encoder at 0.464, zeros nulls) on the demo's 16x16 procedural shapes, with a tiny random
MMDiT, CLIP-L, CLIP-G and T5 built locally (jaxcond/models/sd3_demo.py, no download). The
encoders stay frozen and random, as SD3 fine-tuning keeps its encoders. Because every
encoder was dropped alone in training, the model can be sampled without T5 (or without
the CLIPs) as well as with all three:

    jaxcond train --config configs/demo_sd3.py --workdir runs/demo_sd3
    jaxcond sample --run runs/demo_sd3 --prompt "a red circle on a blue background" --without t5
    python benchmarks/sd3_demo.py --workdir runs/sd3_demo_bench  # scores all four ways

On 2 CPU cores shared with other work (load average 2-4) the run took 30 minutes (3000
steps at ~0.58 s; less on an idle machine). What to expect (docs/results.md, "SD3-shaped
demo: sampling without T5"): backgrounds right in all 60 held-out samples at guidance 3 and
shape colours in ~50, shapes barely (as the UNet demo at 2000 steps); without T5 (its zeros
null in both branches) backgrounds stay 60/60 and colours ~41/60, because every encoder was
also trained dropped on its own.

Everything not set here is configs/base.py's field (and comment).
"""

import os

import ml_collections

from jaxcond.config import from_file

def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "base.py"))

    # --- Model -------------------------------------------------------------------------------
    c.model.family = "sd3_demo"  # jaxcond/models/sd3_demo.py: the sd3 family on a folder it builds.
    # "demo" builds the tiny model from model.sd3_demo below into <workdir>/base_model; a folder
    # path loads an earlier build.
    c.model.source = "demo"
    c.model.clip_skip = 1  # The CLIP encoders' penultimate layer, SD3's own.
    c.model.t5_max_length = 16  # T5 tokens per caption; demo captions need at most 9 (CLIP: 77, SD3's).
    # The sd3_demo family's own fields: the size of the model it builds (all integers >= 1).
    c.model.sd3_demo = ml_collections.ConfigDict()
    # Pixels per patch side (SD3: 2 latent pixels, i.e. 16 image pixels); image tokens are
    # (resolution / patch_size) ** 2 and image sides multiples of it.
    c.model.sd3_demo.patch_size = 2
    c.model.sd3_demo.layers = 4  # MMDiT joint blocks.
    c.model.sd3_demo.heads = 4  # Attention heads of the MMDiT.
    c.model.sd3_demo.head_dim = 16  # Width per head; the MMDiT's width is heads * head_dim.
    c.model.sd3_demo.clip_l_width = 32  # CLIP-L's hidden size (and its pooled projection's).
    c.model.sd3_demo.clip_g_width = 48  # CLIP-G's hidden size (and its pooled projection's).
    c.model.sd3_demo.t5_width = 96  # T5's width, >= clip_l_width + clip_g_width (the joint context's).
    c.model.sd3_demo.text_layers = 2  # Transformer layers of each text encoder.
    c.model.sd3_demo.text_heads = 2  # Attention heads of each text encoder; divides every text width.
    c.model.sd3_demo.init_seed = 0  # Seed of the random "pretrained" weights (>= 0).

    # --- Data --------------------------------------------------------------------------------
    c.data.source = "demo"  # The procedural shapes (jaxcond.data.demo), sized by data.num_records.
    c.data.resolution = 16  # 8x8 patches of 2x2 pixels: the image tokens of the joint attention.

    # --- Dropout: SD3.5's own (configs/sd35_medium.py): one group per encoder at 0.464, zeros
    # nulls, what StableDiffusion3Pipeline feeds for a missing encoder.
    c.dropout = from_file(os.path.join(os.path.dirname(__file__), "sd35_medium.py")).dropout

    # --- Objective: rectified flow, as SD3 -----------------------------------------------------
    c.diffusion.objective = "flow"
    # SD3 shifts toward high noise for 1024-pixel images; 32 pixels need no shift.
    c.diffusion.flow_shift = 1.0
    c.diffusion.snr_gamma = 0.0  # Min-SNR is DDPM's weighting; flow's is diffusion.flow_weighting.

    # --- Training: from scratch, base.py's optimizer ------------------------------------------
    c.train.steps = 3000  # ~0.5 s each on 2 CPU cores; at 1500 (or 4x4-pixel patches) colours do not follow yet.
    c.sample.scheduler = "euler"  # Flow matching samples with Euler steps.
    return c

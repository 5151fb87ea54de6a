"""Fine-tune Stable Diffusion 1.5 on your own images with 10% caption dropout.

Everything not set here is configs/base.py's field (and comment). Data: a folder of
images with same-named .txt captions (or set data.source, see base.py). The weights come
from the hub id below when online, or from a local diffusers-format folder
(Flax or PyTorch .safetensors weights).

    jaxcond train --config configs/sd15.py --workdir runs/sd15 --config.data.path=/data/images
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "base.py"))
    c.model.family = "unet_clip"  # diffusers UNet + CLIP text encoder(s): SD 1.x/2.x and SDXL.
    c.model.source = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.model.clip_skip = 1  # 2 for checkpoints trained on the penultimate layer (anime models).

    c.data.source = "folder"
    c.data.path = ""  # Required: --config.data.path=/your/images
    c.data.resolution = 512
    # Aspect-ratio buckets of about 512*512 pixels, sides multiples of 64; one compile each.
    c.data.buckets = ((512, 512), (448, 576), (576, 448), (384, 640), (640, 384))
    c.data.crop = "random"  # Offsets go nowhere for SD 1.x (no time_ids) but vary the crops.

    # The text conditioner alone; its null is the empty prompt, which is what SD 1.x
    # pipelines feed the unconditional branch.
    c.dropout.groups.caption.members = ("text",)
    c.dropout.groups.caption.rate = 0.1
    c.dropout.nulls = ml_collections.ConfigDict({"text": "empty"})

    # Stable Diffusion's own noise schedule and objective.
    c.diffusion.beta_schedule = "scaled_linear"
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction_type = "epsilon"
    c.diffusion.snr_gamma = 5.0

    # Fine-tuning, not training from scratch: small constant lr after warm-up, long EMA.
    c.optim.lr = 1e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 1e-2
    c.optim.ema_decay = 0.9999

    # Memory (jaxcond plan --config configs/sd15.py --topology v5e:2x2): every parameter,
    # moment and EMA split over all devices, each layer gathered where it runs and its
    # activations recomputed in the backward pass. One GPU: the same, nothing to split.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.model.remat = "layers"

    c.train.steps = 10_000
    c.train.global_batch = 32
    c.train.compute_dtype = "bfloat16"  # Params and optimizer state stay float32.
    c.train.log_every = 50
    c.train.sample_every = 1000
    c.checkpoint.every_steps = 1000

    c.sample.num_prompts = 8
    c.sample.per_prompt = 1
    c.sample.guidance = (1.0, 4.0, 7.5)
    c.sample.steps = 30
    return c

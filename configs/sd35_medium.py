"""Fine-tune Stable Diffusion 3.5 Medium with each text encoder dropped on its own.

Everything not set here is configs/base.py's field (and comment). Data: a folder of images
with same-named .txt captions (or set data.source, see base.py). The weights come from the
hub id below when online, or from a local diffusers-format folder of it.

    jaxcond train --config configs/sd35_medium.py --workdir runs/sd35m --config.data.path=/data/images

Conditioners (jaxcond/models/sd3.py): `clip_l`, `pooled_l` (CLIP-L), `clip_g`, `pooled_g`
(CLIP-G) and `t5` (T5-XXL). Like SD3's own training, each encoder is dropped independently,
here at 0.464 = 0.1 ** (1 / 3), so all three are dropped together in 10% of the examples
(the unconditional branch of classifier-free guidance) and the model also learns to work
with any subset of its encoders (e.g. without T5). Nulls are zeros: what
StableDiffusion3Pipeline feeds for a missing encoder.

The joint alternative, one drop of all text as configs/sdxl.py does: a single group with
members ("clip_l", "clip_g", "t5", "pooled_l", "pooled_g") at rate 0.1 in place of the three.
"""

import os

import ml_collections

from jaxcond.config import from_file

# One dropout group per text encoder: its per-token states and its half of the pooled vector.
ENCODER_GROUPS = {"clip_l": ("clip_l", "pooled_l"), "clip_g": ("clip_g", "pooled_g"), "t5": ("t5",)}


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "base.py"))
    c.model.family = "sd3"  # MMDiT + CLIP-L + CLIP-G + T5-XXL: SD3 and SD3.5.
    c.model.source = "stabilityai/stable-diffusion-3.5-medium"
    c.model.clip_skip = 1  # The CLIP encoders' penultimate layer, SD3's own (the pipeline's clip_skip=None).
    # T5 tokens per caption, in [1, 512]; the pipeline's max_sequence_length (its default 256).
    c.model.t5_max_length = 256
    c.model.train_text_encoder = False  # The sd3 family trains the transformer only.
    # Rematerialisation: none | layers (each joint block recomputed in the backward pass, and
    # gathering its FSDP-sharded params there again) | full (the whole transformer recomputed).
    c.model.remat = "layers"
    # Frozen encoders and VAE in bfloat16: T5-XXL alone is 19 GB in float32.
    c.model.frozen_dtype = "bfloat16"

    c.data.source = "folder"
    c.data.path = ""  # Required: --config.data.path=/your/images
    c.data.resolution = 1024
    # Buckets near 1024*1024 pixels, sides multiples of 64 (the model needs 16); one compile each.
    c.data.buckets = ((1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832))
    c.data.crop = "center"  # SD3 has no crop conditioning: keep the subject the caption names.

    groups = ml_collections.ConfigDict()
    for name, members in ENCODER_GROUPS.items():
        groups[name] = ml_collections.ConfigDict(c.dropout.groups.caption.to_dict())
        groups[name].members = members
        groups[name].rate = 0.464  # Independent per encoder; all three at once 0.464 ** 3 = 10%.
    c.dropout.groups = groups
    c.dropout.nulls = ml_collections.ConfigDict({name: "zeros" for name in
                                                 ("clip_l", "clip_g", "t5", "pooled_l", "pooled_g")})

    # Rectified flow, as SD3 was trained: the network predicts noise - x0 at sigma * 1000.
    c.diffusion.objective = "flow"
    c.diffusion.flow_shift = 3.0  # SD3.5's scheduler shift.
    c.diffusion.snr_gamma = 0.0  # Min-SNR is DDPM's weighting; flow's is diffusion.flow_weighting.

    # Fine-tuning, not training from scratch: small constant lr after warm-up, long EMA.
    c.optim.lr = 1e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 1e-2
    c.optim.ema_decay = 0.9999

    # Memory: every parameter, moment and EMA split over all devices; `jaxcond plan --config
    # configs/sd35_medium.py --topology v5e:4x4` gives a 15.2 GiB peak of the 16 per chip (1 example each).
    c.mesh.data = 1
    c.mesh.fsdp = -1

    c.train.steps = 10_000
    c.train.global_batch = 16
    c.train.compute_dtype = "bfloat16"  # Params and optimizer state stay float32.
    c.train.log_every = 50
    c.train.sample_every = 1000
    c.checkpoint.every_steps = 1000

    c.sample.num_prompts = 8
    c.sample.per_prompt = 1
    c.sample.guidance = (1.0, 4.5, 7.0)  # SD3.5 Medium's pipeline default is 4.5.
    c.sample.steps = 28
    c.sample.scheduler = "euler"  # Flow matching samples with Euler steps (FlowMatchEulerDiscreteScheduler).
    return c

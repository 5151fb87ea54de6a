"""Fine-tune FLUX.1-dev with 10% caption dropout over both text encoders.

Everything not set here is configs/base.py's field (and comment). Data: a folder of images
with same-named .txt captions (or set data.source, see base.py). The weights come from the
hub id below when online (a gated repo: accept its licence and log in first), or from a
local diffusers-format folder of it.

    jaxcond train --config configs/flux_dev.py --workdir runs/flux_dev --config.data.path=/data/images

Conditioners (jaxcond/models/flux_family.py): `t5` (T5-XXL's hidden states) and `pooled`
(CLIP-L's pooled output). They are dropped together, at 0.1 (SimpleTuner's
caption_dropout_probability for Flux), and their nulls are `empty`: a dropped example is
given the encodings of "", so the dropped-caption branch trains exactly what FluxPipeline
feeds for negative_prompt="" when it runs true classifier-free guidance (true_cfg_scale >
1). jaxcond's guidance scale g is therefore FluxPipeline's true_cfg_scale = g with
negative_prompt="".

FLUX.1-dev is guidance-distilled: its guidance embedding stands in for CFG (the pipeline's
guidance_scale, 3.5 at inference). Fine-tuning feeds it model.flux_guidance below, in
training and in jaxcond's samples alike, and the export records it as guidance_scale.
Dev is usually sampled without CFG, hence sample.guidance = (1.0,): the conditional
prediction alone.
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "base.py"))
    c.model.family = "flux"  # Flux transformer + CLIP-L (pooled) + T5-XXL: FLUX.1-dev and -schnell.
    c.model.source = "black-forest-labs/FLUX.1-dev"
    c.model.clip_skip = 1  # Must stay 1: Flux reads CLIP's pooled output, which clip_skip does not change.
    # T5 tokens per caption, in [1, 512]; the pipeline's max_sequence_length (dev's default 512).
    c.model.t5_max_length = 512
    # The value fed to dev's guidance embedding (>= 0), in training and sampling; 1.0 is kohya's and
    # SimpleTuner's training default (the pipeline's inference default is 3.5).
    c.model.flux_guidance = 1.0
    c.model.train_text_encoder = False  # The flux family trains the transformer only.
    # Rematerialisation: none | layers (each block recomputed in the backward pass, gathering its
    # FSDP-sharded params there again: what made SD3.5 Medium fit a v5e; Flux not planned yet) | full.
    c.model.remat = "layers"
    # Frozen encoders and VAE in bfloat16: T5-XXL alone is 19 GB in float32.
    c.model.frozen_dtype = "bfloat16"

    c.data.source = "folder"
    c.data.path = ""  # Required: --config.data.path=/your/images
    c.data.resolution = 1024  # Also the side of the sample grids' images.
    # Buckets near 1024*1024 pixels, sides multiples of 64 (the model needs 16); one compile each.
    c.data.buckets = ((1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832))
    c.data.crop = "center"  # Flux has no crop conditioning: keep the subject the caption names.

    groups = ml_collections.ConfigDict()
    groups.caption = ml_collections.ConfigDict(c.dropout.groups.caption.to_dict())
    groups.caption.members = ("t5", "pooled")  # All text together: the usual CFG drop.
    groups.caption.rate = 0.1  # SimpleTuner's caption_dropout_probability for Flux.
    c.dropout.groups = groups
    # The empty prompt's encodings: what FluxPipeline feeds for negative_prompt="".
    c.dropout.nulls = ml_collections.ConfigDict({"t5": "empty", "pooled": "empty"})

    # Rectified flow, as Flux was trained: the network predicts noise - x0 (jaxcond feeds it
    # sigma * 1000, the family divides by 1000 as FluxPipeline does).
    c.diffusion.objective = "flow"
    # Flux's shift: mu from the image's tokens ((H/16) * (W/16)), 0.5 at 256 tokens to 1.15 at
    # 4096 (1024x1024), sigmas shifted by exp(mu); the exported scheduler does the same.
    c.diffusion.flow_shift_mode = "resolution"
    c.diffusion.flow_base_shift = 0.5  # FLUX.1-dev's scheduler base_shift.
    c.diffusion.flow_max_shift = 1.15  # FLUX.1-dev's scheduler max_shift.
    c.diffusion.flow_shift = 3.0  # Unused by the resolution mode; the exported scheduler's `shift`, as dev's.
    c.diffusion.flow_timestep_sampling = "logit_normal"  # SD3's density, before the shift.
    c.diffusion.flow_weighting = "none"  # diffusers' and kohya's Flux default.
    c.diffusion.snr_gamma = 0.0  # Min-SNR is DDPM's weighting; flow's is diffusion.flow_weighting.

    # Fine-tuning, not training from scratch: small constant lr after warm-up, long EMA.
    c.optim.lr = 1e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 1e-2
    c.optim.ema_decay = 0.9999

    # Memory (jaxcond plan --config configs/flux_dev.py --topology v5e:4x4): every parameter,
    # moment and EMA split over all devices; 11.9 B transformer parameters.
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
    # Guidance-distilled dev samples without CFG (1 = conditional only); add e.g. 3.5 to see
    # true CFG against the empty prompt, what the dropped captions trained.
    c.sample.guidance = (1.0,)
    c.sample.steps = 28  # FluxPipeline's default num_inference_steps.
    c.sample.scheduler = "euler"  # Flow matching samples with Euler steps (FlowMatchEulerDiscreteScheduler).
    return c

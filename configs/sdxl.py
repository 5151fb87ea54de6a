"""Fine-tune SDXL base with 10% caption dropout over both text encoders.

configs/sd15.py with SDXL's weights and conditioning. Conditioners: `text` (encoder 1),
`text_2` (encoder 2), `pooled` (encoder 2's projection) and `time_ids` (original size, crop
offsets, target size, from the loader). Their nulls are zeros, what SDXL pipelines feed
the unconditional branch (force_zeros_for_empty_prompt).

    jaxcond train --config configs/sdxl.py --workdir runs/sdxl --config.data.path=/data/images

Independent per-encoder rates instead of the joint drop:
    --config.dropout.groups.caption.members='("text",)' plus a second group for text_2/pooled.
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "sd15.py"))
    c.model.source = "stabilityai/stable-diffusion-xl-base-1.0"
    c.model.clip_skip = 1  # SDXL's convention: both encoders' penultimate layer.
    c.data.resolution = 1024
    # Each spatial transformer's blocks (2 and 10 deep) as one scan: the same step from a
    # program a fifth the size, which `jaxcond plan --topology v5e:4x4` compiles in under 20 GB
    # of host memory (unrolled, it needed more than 24).
    c.model.scan_layers = True
    # SDXL's training buckets near 1024*1024 pixels.
    c.data.buckets = ((1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832))

    groups = ml_collections.ConfigDict()
    groups.caption = ml_collections.ConfigDict(c.dropout.groups.caption.to_dict())
    groups.caption.members = ("text", "text_2", "pooled")  # All text together: the usual CFG drop.
    groups.caption.rate = 0.1
    groups.micro = ml_collections.ConfigDict(c.dropout.groups.caption.to_dict())
    groups.micro.members = ("time_ids",)  # Size/crop conditioning, droppable on its own.
    groups.micro.rate = 0.0  # SDXL itself never dropped it.
    c.dropout.groups = groups
    c.dropout.nulls = ml_collections.ConfigDict(
        {"text": "zeros", "text_2": "zeros", "pooled": "zeros", "time_ids": "zeros"})

    c.train.global_batch = 16
    c.sample.guidance = (1.0, 3.0, 5.0)
    return c

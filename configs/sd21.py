"""Fine-tune Stable Diffusion 2.1 (768 px, v-prediction) with 10% caption dropout.

configs/sd15.py with SD 2.1's weights, resolution and objective.

    jaxcond train --config configs/sd21.py --workdir runs/sd21 --config.data.path=/data/images
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "sd15.py"))
    c.model.source = "stabilityai/stable-diffusion-2-1"
    c.data.resolution = 768
    # About 768*768 pixels each, sides multiples of 64.
    c.data.buckets = ((768, 768), (640, 896), (896, 640), (576, 1024), (1024, 576))
    c.diffusion.prediction_type = "v_prediction"  # SD 2.1 (768) was trained with v-prediction.
    c.train.global_batch = 16
    return c

"""Fine-tune Stable Diffusion 3.5 Large with each text encoder dropped on its own.

configs/sd35_medium.py (its docstring explains the dropout groups, nulls and the joint
alternative) with the 8B-parameter Large transformer.

    jaxcond train --config configs/sd35_large.py --workdir runs/sd35l --config.data.path=/data/images
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "sd35_medium.py"))
    c.model.source = "stabilityai/stable-diffusion-3.5-large"
    # 8B float32 params with AdamW moments and EMA: ~130 GB before activations, split over
    # all devices (mesh.fsdp = -1); check with jaxcond plan --config configs/sd35_large.py.
    c.optim.moment_dtype = "bfloat16"  # Halves AdamW's first moment.
    c.sample.guidance = (1.0, 3.5, 7.0)  # SD3.5 Large's pipeline default is 3.5.
    return c

"""LoRA on the demo: rank-8 adapters of the demo UNet's attention, the base frozen.

configs/demo.py with `model.lora` on; everything else (data, dropout, schedule) as there.
The base is the untrained demo model, built into the run directory (a quick base: the
adapters learn the shapes from scratch). The whole path, from training to loading the file
in diffusers, is in the README's LoRA section:

    jaxcond train --config configs/demo_lora.py --workdir runs/demo_lora
    jaxcond export --workdir runs/demo_lora --out runs/demo_lora_export --lora

The demo is pixel-space, so diffusers has no pipeline for it: load its UNet and the file.

    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained("runs/demo_lora/base_model/unet")
    unet.load_lora_adapter("runs/demo_lora_export/pytorch_lora_weights.safetensors", prefix="unet")
"""

import os

from jaxcond.config import from_file


def get_config():
    c = from_file(os.path.join(os.path.dirname(__file__), "demo.py"))
    c.model.lora.rank = 8
    c.model.lora.alpha = 8.0
    # Attention alone cannot learn the demo from an untrained base: its convolutions too.
    c.model.lora.targets = ("attention", "feed_forward", "resnet_convs")
    return c

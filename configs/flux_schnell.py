"""Fine-tune FLUX.1-schnell with 10% caption dropout over both text encoders.

configs/flux_dev.py with schnell's weights and schedule; everything else (dropout over
{t5, pooled} at 0.1 with `empty` nulls, the optimizer, memory) is dev's and documented
there.

    jaxcond train --config configs/flux_schnell.py --workdir runs/flux_schnell --config.data.path=/data/images

Schnell is timestep-distilled (1-4 sampling steps) and has no guidance embedding, so
model.flux_guidance stays at its default (the family refuses another value). Fine-tuning
with the flow objective trains it toward an ordinary many-step flow model: expect its
few-step samples to degrade before many-step ones improve.
"""

import os

import ml_collections

from jaxcond.config import from_file


def get_config() -> ml_collections.ConfigDict:
    c = from_file(os.path.join(os.path.dirname(__file__), "flux_dev.py"))
    c.model.source = "black-forest-labs/FLUX.1-schnell"
    c.model.t5_max_length = 256  # Schnell's max_sequence_length (FluxPipeline allows up to 512).
    c.model.flux_guidance = 1.0  # Unused: schnell has no guidance embedding; must stay 1.0.

    # Schnell's scheduler shifts nothing (shift 1, no dynamic shifting). The resolution mode with
    # mu = 0 at every size is that same identity shift, and its sampler runs FluxPipeline's own
    # grid, linspace(1, 1/steps) (the fixed mode's is SD3's, which ends at sigma 1/1000).
    c.diffusion.flow_shift_mode = "resolution"
    c.diffusion.flow_base_shift = 0.0  # mu at 256 tokens: exp(0) = no shift.
    c.diffusion.flow_max_shift = 0.0  # mu at 4096 tokens: no shift either.
    c.diffusion.flow_shift = 1.0  # Unused by the resolution mode; the exported scheduler's `shift`, as schnell's.

    c.sample.guidance = (1.0,)  # Distilled: sampled without CFG.
    c.sample.steps = 4  # Schnell's usual step count (its model card).
    return c

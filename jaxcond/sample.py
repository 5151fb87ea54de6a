"""`jaxcond sample`: a PNG grid (prompts x guidance scales) from a trained run.

The same sampler as the validation grids during training (`jaxcond.sampling`), on the
run's EMA (or raw) weights, with the nulls the run trained: no dropout, ever. The
samples are split over every local device (`sampling.local_mesh`), the weights
replicated on each.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import ml_collections
import numpy as np

from jaxcond import grid, rundir, storage
from jaxcond.checks import ConfigError
from jaxcond.models import lora
from jaxcond.outputs import make_output_dir
from jaxcond.sampling import SCHEDULERS, check_drop, sample_grid, warn_overlong


def sample(workdir: str | None, prompts: Sequence[str], guidance: Sequence[float], *, steps: int = 50,
             seed: int = 0, scheduler: str | None = None, negative: str | None = None, weights: str = "ema",
             step: int | None = None, out: str | None = None, model_source: str | None = None,
             lora_scale: float = 1.0, cfg: ml_collections.ConfigDict | None = None,
             without: Sequence[str] = ()) -> str:
    """Writes the grid of `prompts` (rows) x `guidance` (columns) from run `workdir`, or
    without a run from `cfg`'s model as it starts (e.g. a base model with a LoRA file,
    `model.lora.init_from`); returns its path. `lora_scale` scales LoRA adapters (0: the
    base model). `scheduler`: the config's `sample.scheduler` unless given. `without`: dropout
    groups replaced by their nulls in both branches (e.g. SD3's "t5": sampling without T5)."""
    if not prompts:
        raise ConfigError("--prompt: give at least one prompt")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {scheduler!r}: use one of {SCHEDULERS}")
    if steps < 1 or any(g < 0 for g in guidance) or not guidance:
        raise ConfigError(f"--steps {steps} / --guidance {list(guidance)}: need steps >= 1 and scales >= 0")
    if out is not None and not out.lower().endswith(".png"):
        raise ConfigError(f"--out {out}: the grid is written as a PNG; give a path ending in .png")
    if workdir is None and out is None:
        raise ConfigError("sample --config (no --run): give --out FILE.png, where the grid goes")
    with tempfile.TemporaryDirectory() as scratch:  # a base the config builds locally (the demo) goes here
        t = (rundir.load_trained(workdir, step, model_source) if workdir is not None
             else rundir.load_untrained(cfg, scratch))
    scheduler = scheduler or t.cfg.sample.scheduler
    if t.spec.flow is not None and scheduler != "euler":
        raise ConfigError(f"--scheduler {scheduler}: a flow-matching model samples with euler; drop the flag")
    try:
        check_drop(t.spec, without)
    except ValueError as e:
        raise ConfigError(f"--without {','.join(without)}: {e}") from None
    warn_overlong(t.family, prompts, "--prompt")
    if negative is not None:
        warn_overlong(t.family, [negative], "--negative_prompt")
    out = out or storage.join(workdir, "samples", f"step{t.step}-{scheduler}-seed{seed}.png")
    make_output_dir(storage.dirname(out), "--out's folder")  # before sampling
    params = t.params(weights)
    if lora_scale != 1.0:
        if t.family.lora is None:
            raise ConfigError(f"--lora_scale {lora_scale}: this model has no LoRA adapters (config.model.lora)")
        params = {**params, "model": lora.scaled(params["model"], lora_scale)}
    images = sample_grid(t.family, t.spec, params, t.family.frozen, list(prompts), list(guidance),
                         seed, steps, scheduler, negative=None if negative is None else [negative] * len(prompts),
                         drop=tuple(without))
    grid.save_grid(np.concatenate(np.swapaxes(images, 0, 1)), out, nrow=len(guidance),
                   row_labels=list(prompts), col_labels=[f"guidance {g:g}" for g in guidance])
    return out

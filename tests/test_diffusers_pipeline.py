"""What a diffusers user samples from `jaxcond export` is what `jaxcond sample` samples.

Tiny SD 1.x- and SDXL-shaped latent models, trained two steps by jaxcond, exported, loaded
with diffusers' PyTorch `DiffusionPipeline` (torch is in the test extra for this) and
sampled from jaxcond's own starting latents with the same steps, guidance and nulls.
Images are compared in uint8 steps: diffusers' Flax GEGLU uses the tanh approximation of
GELU where its PyTorch twin is exact (UNet outputs ~1e-4 apart, tests/test_export.py), and
a wrong scheduler setting or unconditional branch moves pixels by tens of steps.
"""

import copy
import json
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from jaxcond import export as export_lib, rng, rundir, sampling, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.models import demo as demo_model

PROMPTS = ["a red circle on a blue background", "a white square on a green background"]
STEPS, SEED = 3, 7
MAX_STEP_DIFF = 3  # uint8 steps


def _snippet() -> str:
    text = (ROOT / "docs" / "export.md").read_text()
    return re.search(r"<!-- diffusers-nulls-snippet -->\n```python\n(.*?)```", text, re.S).group(1)


def _train_and_export(tmp_path, text_encoders: int, groups: dict, nulls: dict, lr: float) -> tuple[str, str, str]:
    """A tiny latent model built from `config.model.demo`, trained 2 steps from its folder,
    which then moves, exported (raw weights: no EMA); returns the run, export and model folders."""
    cfg = tiny_config()
    m = cfg.model.demo
    m.vae_channels, m.text_encoders, m.pooled = (32, 32), text_encoders, text_encoders == 2
    base = str(tmp_path / "base")
    demo_model.build(base, m, cfg.data.resolution, m.init_seed)
    cfg.model.family, cfg.model.source = "unet_clip", base
    cfg.dropout.groups = {name: {**cfg.dropout.groups.caption.to_dict(), **g} for name, g in groups.items()}
    cfg.dropout.nulls = nulls
    cfg.diffusion.beta_schedule, cfg.diffusion.prediction_type = "scaled_linear", "epsilon"
    cfg.diffusion.beta_start, cfg.diffusion.beta_end = 0.00085, 0.012
    # A large step moves the learned nulls far from the empty caption's encoding, which
    # diffusers would otherwise use: a test that cannot tell the two apart proves nothing.
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay = lr, 0, 0.0
    cfg.train.steps = 2
    run = str(tmp_path / "run")
    train_lib.train(cfg, run, progress=False)
    moved = str(tmp_path / "moved_base")
    shutil.move(base, moved)
    out = str(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match=r"if it moved, pass --model_source="):
        export_lib.export(run, out, weights="raw")
    export_lib.export(run, out, weights="raw", model_source=moved, single_file=True)
    return run, out, moved


def _jaxcond_samples(run: str, moved: str, guidance: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """`jaxcond sample`'s samples [G, N, H, W, 3] and the latents they start from."""
    t = rundir.load_trained(run, model_source=moved)
    images = sampling.sample_grid(t.family, t.spec, t.params("raw"), t.family.frozen, PROMPTS, guidance,
                                  SEED, STEPS)
    with rng.derivation():  # as `sampling.sample` draws them
        start = jax.random.normal(jax.random.key(SEED), (len(PROMPTS),) + tuple(t.family.sample_shape))
    return images, np.asarray(start)


def _diffusers_samples(pipe, start: np.ndarray, guidance: float, **negative) -> np.ndarray:
    import torch

    out = pipe(PROMPTS, latents=torch.from_numpy(start.copy()), num_inference_steps=STEPS, guidance_scale=guidance,
               output_type="np", **negative).images
    return np.round(out * 255).astype(np.int32)


def _check(images: np.ndarray, want: np.ndarray, what: str) -> None:
    diff = np.abs(images.astype(np.int32) - want)
    assert diff.max() <= MAX_STEP_DIFF, f"{what}: max {diff.max()}, mean {diff.mean():.2f} uint8 steps apart"


def test_sd_export_with_a_learned_null_samples_like_jaxcond(tmp_path):
    run, out, moved = _train_and_export(tmp_path, 1, {"caption": {"members": ("text",), "rate": 0.5}},
                                        {"text": "learned"}, lr=0.2)
    scheduler = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert scheduler["set_alpha_to_one"] is True and scheduler["steps_offset"] == 1
    guidance = [1.0, 4.0]
    images, start = _jaxcond_samples(run, moved, guidance)

    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. diffusers' "outdated scheduler config"
        exec(_snippet().replace('"exported/sd15"', repr(out)), namespace)  # docs/export.md's code, as a user runs it
    pipe, negative = namespace["pipe"], namespace["negative"]
    assert namespace["prompts"] == PROMPTS
    assert type(pipe).__name__ == "StableDiffusionPipeline" and namespace["images"]
    for i, g in enumerate(guidance):
        _check(images[i], _diffusers_samples(pipe, start, g, **negative), f"guidance {g}")
    # The single file, as docs/export.md says diffusers reads it offline: the same pipeline.
    from diffusers import StableDiffusionPipeline

    single = StableDiffusionPipeline.from_single_file(os.path.join(out, "export.safetensors"), config=out,
                                                      local_files_only=True)
    _check(images[1], _diffusers_samples(single, start, 4.0, **negative), "single file, guidance 4")
    # Without the learned null diffusers' default, the empty prompt's encoding, is another
    # unconditional branch: far apart at guidance 4.
    default = _diffusers_samples(pipe, start, 4.0)
    assert np.abs(images[1].astype(np.int32) - default).max() > 4 * MAX_STEP_DIFF


def test_sdxl_export_keeps_size_conditioning_unconditional_like_jaxcond(tmp_path):
    groups = {"caption": {"members": ("text", "text_2", "pooled"), "rate": 0.1},
              "micro": {"members": ("time_ids",), "rate": 0.0}}  # as configs/sdxl.py
    nulls = {"text": "zeros", "text_2": "zeros", "pooled": "zeros", "time_ids": "zeros"}
    run, out, moved = _train_and_export(tmp_path, 2, groups, nulls, lr=1e-3)
    manifest = json.load(open(os.path.join(out, "jaxcond.json")))
    assert manifest["nulls"] == {"pooled": "zeros", "text": "zeros", "text_2": "zeros"}
    assert manifest["kept_in_unconditional"] == ["time_ids"] and manifest["force_zeros_for_empty_prompt"]
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    guidance = [1.0, 4.0]
    images, start = _jaxcond_samples(run, moved, guidance)
    for i, g in enumerate(guidance):
        _check(images[i], _diffusers_samples(pipe, start, g), f"guidance {g}")


def test_buckets_that_ignore_the_resolution_are_refused():
    from configs import sd15
    from jaxcond import config as config_lib

    cfg = sd15.get_config()
    cfg.data.path = str(ROOT)
    config_lib.validate(cfg, None)
    cfg.data.resolution = 64  # the 512 px buckets would upscale every image to about 512 x 512
    with pytest.raises(ConfigError, match=r"config.data.buckets = .* not about 64x64 pixels .*resolution = 64"):
        config_lib.validate(cfg, None)
    cfg.data.buckets = ((64, 64),)
    config_lib.validate(cfg, None)
    small = copy.deepcopy(cfg)
    small.data.buckets = ()
    config_lib.validate(small, None)

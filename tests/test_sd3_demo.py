"""The SD3-shaped CPU demo (configs/demo_sd3.py, jaxcond.models.sd3_demo): its tiny
pixel-space SD3 built once into the run directory and loaded by the sd3 family, training
steps whose three per-encoder dropout groups draw independent masks, and `jaxcond sample
--without t5` from the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import demo_sd3
from jaxcond import dropout, export as export_lib, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.models import registry, sd3
from jaxcond.models.sd3_demo import SD3Demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 16
GROUPS = ("clip_l", "clip_g", "t5")


def small_config():
    """configs/demo_sd3.py shrunk to seconds: same family, groups, nulls and objective."""
    cfg = demo_sd3.get_config()
    m = cfg.model.sd3_demo
    m.layers, m.heads, m.head_dim = 1, 2, 8
    m.clip_l_width, m.clip_g_width, m.t5_width, m.text_layers, m.text_heads = 8, 8, 16, 2, 2
    cfg.model.t5_max_length = 8
    cfg.data.resolution, cfg.data.num_records = RESOLUTION, 256
    cfg.train.steps, cfg.train.global_batch, cfg.train.log_every, cfg.train.sample_every = 3, 32, 1, 0
    cfg.optim.warmup_steps, cfg.checkpoint.every_steps = 1, 3
    cfg.sample.num_prompts, cfg.sample.per_prompt, cfg.sample.steps = 2, 1, 2
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three training steps of the shrunk demo (its model built into the run directory)."""
    cfg = small_config()
    workdir = str(tmp_path_factory.mktemp("sd3_demo") / "run")
    out = train_lib.train(cfg, workdir, progress=False)
    return cfg, workdir, out


def _load(cfg, workdir):
    return registry.from_config(cfg.model, workdir=workdir, dtype=jnp.float32, resolution=RESOLUTION)


def test_demo_model_builds_once_into_the_run_directory_and_loads_pixel_space(tmp_path):
    cfg = small_config()
    assert registry.check_config(cfg.model) is SD3Demo
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    family = _load(cfg, workdir)
    base = os.path.join(workdir, "base_model")
    assert isinstance(family, SD3Demo) and family.path == base
    assert sorted(os.listdir(base)) == sorted([*sd3.PARTS, "scheduler"])  # no vae/: pixel-space
    assert not family.latent and family.sample_shape == (3, RESOLUTION, RESOLUTION)
    assert family.size_multiple == cfg.model.sd3_demo.patch_size == SD3Demo.config_size_multiple(cfg.model)
    assert family.conditioners == {"clip_l": (77, 8), "clip_g": (77, 8), "t5": (8, 16), "pooled_l": (8,),
                                   "pooled_g": (8,)}
    images = np.random.default_rng(0).integers(0, 256, (2, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    x0 = family.draw_x0(family.image_moments(family.frozen, images), jax.random.key(0))
    assert x0.shape == (2, *family.sample_shape) and float(jnp.abs(x0).max()) <= 1.0
    np.testing.assert_array_equal(family.x0_to_images(family.frozen, x0), images)  # pixels, both ways

    weights = os.path.join(base, "transformer", "diffusion_pytorch_model.safetensors")
    stamp = (os.stat(base).st_ino, os.stat(weights).st_mtime_ns)
    again = _load(cfg, workdir)  # a rerun: the folder is reused, not rebuilt
    assert (os.stat(base).st_ino, os.stat(weights).st_mtime_ns) == stamp
    assert not [n for n in os.listdir(workdir) if n.startswith("base_model.tmp-")]
    jax.tree.map(np.testing.assert_array_equal, family.trainable, again.trainable)
    cfg.model.source = base  # an earlier build, loaded by path
    assert _load(cfg, str(tmp_path / "elsewhere")).path == base


@pytest.mark.parametrize("field, value, message", [
    ("t5_width", 12, r"config.model.sd3_demo.t5_width = 12: must be >= clip_l_width \+ clip_g_width = 16"),
    ("head_dim", 3, r"config.model.sd3_demo.head_dim = 3: heads \* head_dim must be a multiple of 4"),
    ("text_heads", 3, r"config.model.sd3_demo.clip_l_width = 8: must be divisible by config.model.sd3_demo"),
    ("layers", 0, r"config.model.sd3_demo.layers = 0: must be an integer >= 1"),
    ("init_seed", -1, r"config.model.sd3_demo.init_seed = -1: must be an integer >= 0"),
])
def test_bad_demo_fields_are_one_line_config_errors(field, value, message):
    cfg = small_config()
    cfg.model.sd3_demo[field] = value
    with pytest.raises(ConfigError, match=message) as e:
        registry.check_config(cfg.model)
    assert "\n" not in str(e.value)
    with cfg.model.unlocked():
        del cfg.model["sd3_demo"]
    with pytest.raises(ConfigError, match=r"config.model.sd3_demo is missing: .* configs/demo_sd3.py"):
        registry.check_config(cfg.model)


def test_three_encoder_groups_train_with_independent_masks(run):
    cfg, workdir, out = run
    assert [h["step"] for h in out["history"]] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in out["history"])
    groups = dropout.groups_from_config(cfg.dropout)
    assert {g.name: (tuple(g.members), g.rate) for g in groups} == {
        "clip_l": (("clip_l", "pooled_l"), 0.464), "clip_g": (("clip_g", "pooled_g"), 0.464), "t5": (("t5",), 0.464)}
    batch, spe = cfg.train.global_batch, cfg.data.num_records // cfg.train.global_batch
    with open(os.path.join(workdir, "masks.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [0, 1, 2]
    for r in logged:  # what the step dropped is jaxcond.dropout.masks of the group's name
        want = jax.device_get(dropout.masks(cfg.seed, r["step"], groups, batch, spe))
        for g in GROUPS:
            assert r["groups"][g]["dropped_positions"] == np.flatnonzero(want[g]).tolist()
        dropped = [tuple(r["groups"][g]["dropped_positions"]) for g in GROUPS]
        assert len(set(dropped)) == 3  # different bits per group

    # Over many steps: each group at its rate, and jointly as independent draws would be
    # (all three together 0.464 ** 3 = 10%: the unconditional examples).
    steps = jax.jit(jax.vmap(lambda s: dropout.masks(cfg.seed, s, groups, batch, spe)))(jnp.arange(300))
    m = np.stack([np.asarray(steps[g]).ravel() for g in GROUPS])  # [3, 300 * batch]
    np.testing.assert_allclose(m.mean(axis=1), 0.464, atol=0.02)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs((m[i] & m[j]).mean() - 0.464 ** 2) < 0.02
    assert abs(m.all(axis=0).mean() - 0.464 ** 3) < 0.015


def test_sample_without_t5_from_the_command_line_and_refusals(run, tmp_path):
    _, workdir, _ = run
    out = tmp_path / "without_t5.png"
    cmd = [sys.executable, "-m", "jaxcond.cli", "sample", "--run", workdir,
           "--prompt", "a red circle on a blue background", "--guidance", "1,3", "--steps", "2"]
    r = subprocess.run(cmd + ["--without", "t5", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    tiles = np.asarray(Image.open(out))
    assert tiles.shape[0] >= RESOLUTION and tiles.shape[1] >= 2 * RESOLUTION  # one row, two guidance columns
    bad = subprocess.run(cmd + ["--without", "nonsense", "--out", str(tmp_path / "bad.png")], cwd=ROOT,
                         capture_output=True, text=True)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert last.startswith("jaxcond sample: --without nonsense: ") and "['nonsense']" in last, last
    assert not (tmp_path / "bad.png").exists()
    # StableDiffusion3Pipeline needs a VAE: the pixel-space model is refused in one line.
    with pytest.raises(ConfigError, match=r"pixel-space SD3 \(no vae/\).* jaxcond sample") as e:
        export_lib.export(workdir, str(tmp_path / "export"))
    assert "\n" not in str(e.value)

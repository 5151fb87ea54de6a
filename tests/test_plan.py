"""`jaxcond plan`: the train step compiled ahead of time for a TPU topology (libtpu's
compiler, no TPU), its memory per device, and the parameter shapes of the shipped
model configs."""

import copy
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcond import plan as plan_lib, program, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.models import load
from jaxcond.models.unet_clip import UNetCLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, counts, conditioners, image_size", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5",
     {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}, {"text": (77, 768)}, 512),
    ("stabilityai/stable-diffusion-2-1",
     {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}, {"text": (77, 1024)}, 768),
    ("stabilityai/stable-diffusion-xl-base-1.0",
     {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
     {"text": (77, 768), "text_2": (77, 1280), "pooled": (1280,), "time_ids": (6,)}, 1024),
])
def test_shipped_configs_give_the_published_parameter_counts_offline(name, counts, conditioners, image_size):
    """The hub ids of the shipped configs build as shapes with no network and no weights,
    with the parameter counts of the published models."""
    family = UNetCLIP(name, shapes_only=True)
    assert family.path.startswith(load.SHIPPED_DIR)
    parts = {**family.frozen, **family.trainable}
    assert {k: _count(v) for k, v in parts.items()} == counts
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(parts))
    assert dict(family.conditioners) == conditioners
    assert family.image_size == image_size and family.max_length == 77


def _plan(cfg, **mesh):
    cfg = copy.deepcopy(cfg)
    for k, v in mesh.items():
        cfg.mesh[k] = v
    return plan_lib.plan(cfg, "v5e:2x2", progress=False)


def test_plan_reports_the_compiled_memory_per_device(config):
    """Stored bytes per device follow the mesh (fsdp splits them), the compiled program's
    inputs hold at least the stored state, and the step fits a v5e chip."""
    replicated = _plan(config, data=4, fsdp=1)
    sharded = _plan(config, data=1, fsdp=4, fsdp_min_size=64)
    assert replicated.devices == 4 and replicated.mesh == {"data": 4, "fsdp": 1}
    assert replicated.per_device_batch == config.train.global_batch / 4
    family = UNetCLIP(config.model.source)
    learned = [k for k, kind in config.dropout.nulls.items() if kind == "learned"]
    params = 4 * (_count(family.trainable) + sum(int(np.prod(family.conditioners[k])) for k in learned))  # float32
    assert replicated.stored["params"] == params
    assert sharded.stored["params"] < 0.3 * replicated.stored["params"]
    for p in (replicated, sharded):
        assert p.memory.arguments >= sum(p.stored.values())
        assert p.memory.peak >= p.memory.arguments
        assert p.fits and p.flops > 0 and p.roofline_s > 0
        text = plan_lib.report(p, config)
        assert "fits: yes" in text and "peak" in text and "to fit" not in text
    # The same step on a mesh of 4 splits the same FLOPs 4 ways, whatever the mesh.
    np.testing.assert_allclose(sharded.flops, replicated.flops, rtol=0.1)


def test_scanned_layers_plan_the_unrolled_steps_flops(config, deep_model_dir):
    """XLA's cost analysis counts a scan's body once: with model.scan_layers the plan adds
    the unrolled step's extra FLOPs (from the lowered programs) and says it is an estimate."""
    cfg = copy.deepcopy(config)
    cfg.model.source, cfg.model.remat = deep_model_dir, "layers"
    unrolled = plan_lib.plan(cfg, "v5e:2x2", progress=False)
    cfg.model.scan_layers = True
    scanned = plan_lib.plan(cfg, "v5e:2x2", progress=False)
    assert scanned.flops_estimated and not unrolled.flops_estimated
    print(f"FLOPs scanned/unrolled {scanned.flops / unrolled.flops:.4f}, "
          f"bytes {scanned.bytes_accessed / unrolled.bytes_accessed:.4f}")
    np.testing.assert_allclose(scanned.flops, unrolled.flops, rtol=0.1)
    assert scanned.bytes_accessed <= unrolled.bytes_accessed  # counted once per loop: a lower bound
    assert "estimate for the scanned layers" in plan_lib.report(scanned, cfg)


def test_a_step_that_does_not_fit_says_what_would(config):
    p = _plan(config, data=4, fsdp=1)
    tight = copy.deepcopy(p)
    tight.chip = plan_lib.hardware.Chip("a small chip", p.memory.peak // 2, 1e12, 1e11)
    text = plan_lib.report(tight, config)
    assert "fits: NO" in text and "to fit, try:" in text
    assert "--config.model.remat=layers" in text and "--config.mesh.fsdp=-1" in text


def test_the_planned_batch_is_the_loaders(config, tmp_path):
    """`program.batch_shapes` (what plan compiles for) matches a batch the loader makes."""
    run = train_lib.build(copy.deepcopy(config), str(tmp_path))
    got = run.put_batch(0)
    want = program.batch_shapes(run.family, {**run.family.frozen, **run.family.trainable},
                                config.train.global_batch, config.data.resolution, config.data.resolution,
                                cached=False)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}


def _cli(*args, **env):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-m", "jaxcond.cli", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_plan_command(tmp_path):
    """The command prints the plan; a rerun of the same step reuses its figures (jax's
    own cache cannot load a program compiled for a TPU it does not have)."""
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}  # (the tests' own cache is shared)
    r = _cli("--config", "configs/demo.py", "--topology", "v5e:2x2", **cache)
    assert r.returncode == 0, r.stderr
    assert "jaxcond plan: v5e:2x2, 4 device(s)" in r.stdout and "fits: yes" in r.stdout
    assert "compiled in" in r.stdout and "of 16.00 GiB on TPU v5e" in r.stdout
    assert "reused" not in r.stdout and "Error reading persistent compilation cache" not in r.stderr
    again = _cli("--config", "configs/demo.py", "--topology", "v5e:2x2", **cache)
    assert again.returncode == 0 and "the same program was planned before" in again.stdout
    assert again.stdout.split("per device:")[1] == r.stdout.split("per device:")[1]
    for topology, why in (("v9x:2x2", "expected a TPU topology such as v5e:2x2"),
                          ("v5e:3x7", "libtpu cannot describe it")):
        r = _cli("--config", "configs/demo.py", "--topology", topology)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert f"jaxcond plan: --topology {topology!r}: {why}" in r.stderr


def test_bad_topology_is_named_in_one_line():
    with pytest.raises(ConfigError, match="expected a TPU topology such as"):
        plan_lib.hardware.topology_devices("h100")


def test_plan_on_this_machines_devices(config):
    """Without --topology the step is compiled for the local devices (a GPU's memory and
    peak FLOP/s come from hardware.py; a CPU has neither, so no fit is claimed)."""
    p = plan_lib.plan(copy.deepcopy(config), None, progress=False)
    assert p.devices == len(jax.devices()) and p.target.endswith("cpu") and p.chip is None
    assert p.memory.peak >= p.memory.arguments > 0 and p.fits is None
    text = plan_lib.report(p, config)
    assert "peak" in text and "fits:" not in text and "roofline" not in text

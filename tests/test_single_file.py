"""Single-file checkpoints in the original SD 1.x / SDXL layout: written and read back
without torch, and checked against diffusers' own converter of that layout."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import ROOT
from jaxcond import config as config_lib
from jaxcond.models import convert, demo as demo_model, single_file
from jaxcond.models.unet_clip import UNetCLIP

LAYOUTS = {"sd1": (1, False), "sdxl": (2, True)}  # text encoders, pooled text_time embedding


@pytest.fixture(scope="module")
def models(config, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Per layout: a tiny diffusers folder and the single file written from it."""
    out = {}
    for name, (encoders, pooled) in LAYOUTS.items():
        c = copy.deepcopy(config.model.demo)
        c.vae_channels, c.text_encoders, c.pooled = (32, 32), encoders, pooled
        c.layers_per_block = 2  # the original layout numbers blocks differently per layer count
        folder = str(tmp_path_factory.mktemp(name))
        demo_model.build(folder, c, 16, 0)
        path = os.path.join(str(tmp_path_factory.mktemp(f"{name}_file")), "model.safetensors")
        family = UNetCLIP(folder)
        family.save_single_file(path, family.trainable)
        out[name] = (folder, path)
    return out


def _same(a, b) -> None:
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_file_round_trip(models, layout):
    folder, path = models[layout]
    keys = set(convert.read_safetensors([path]))
    prefixes = {"sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
                "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                         "conditioner.embedders.1.model.transformer.resblocks.")}[layout]
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    a, b = UNetCLIP(folder), UNetCLIP(path, base=folder)
    _same(a.trainable, b.trainable)
    _same(a.frozen, b.frozen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_agrees_with_diffusers_converter(models, layout):
    """diffusers' converter of the original layout (torch-based, so test-only) turns our
    file into exactly the PyTorch state dicts of the diffusers folder."""
    import torch
    from diffusers.loaders import single_file_utils as ref
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder, path = models[layout]
    ckpt = load_file(path)
    family = UNetCLIP(folder)
    params = {**family.frozen, **family.trainable}

    def check(got, part):
        want = {k: np.asarray(v) for k, v in convert.to_pytorch(params[part]).items()}
        got = {k: v.numpy() for k, v in got.items() if not k.endswith("position_ids")}
        assert sorted(got) == sorted(want), part
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{part}: {k}")

    check(ref.convert_ldm_unet_checkpoint(ckpt, dict(family.unet.config)), "unet")
    check(ref.convert_ldm_vae_checkpoint(ckpt, dict(family.vae.config)), "vae")
    if layout == "sd1":
        check(ref.convert_ldm_clip_checkpoint(ckpt), "text_encoder")
    else:
        check(ref.convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer."),
              "text_encoder")
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder_2")))
        with torch.no_grad():
            check(ref.convert_open_clip_checkpoint(te2, ckpt, prefix="conditioner.embedders.1.model."),
                  "text_encoder_2")


def test_single_file_errors(models, tmp_path):
    folder, path = models["sd1"]
    tensors = dict(convert.read_safetensors([path]))
    tensors["model.diffusion_model.input_blocks.99.0.weight"] = tensors["model.diffusion_model.out.2.bias"]
    tensors["model_ema.decay"] = tensors["model.diffusion_model.out.2.bias"][:1]  # ignored, as in real files
    extra = str(tmp_path / "extra.safetensors")
    convert.write_safetensors(extra, tensors)
    with pytest.raises(convert.WeightsMismatch, match=r"1 tensors that fit no part.*input_blocks.99.0.weight"):
        UNetCLIP(extra, base=folder)
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "train", "--config", "configs/demo.py",
                        "--workdir", str(tmp_path / "run"), f"--config.model.source={extra}",
                        f"--config.model.base={folder}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "fit no part" in r.stderr, r.stderr[-2000:]
    del tensors["model.diffusion_model.input_blocks.99.0.weight"]
    del tensors["first_stage_model.quant_conv.bias"]
    missing = str(tmp_path / "missing.safetensors")
    convert.write_safetensors(missing, tensors)
    with pytest.raises(convert.WeightsMismatch, match=r"(?s)single file.s vae.*missing \(1\):\n  quant_conv.bias"):
        UNetCLIP(missing, base=folder)
    with pytest.raises(FileNotFoundError, match="set config.model.base"):
        UNetCLIP(path)
    sd2 = {"cond_stage_model.model.token_embedding.weight": tensors["model.diffusion_model.out.2.bias"]}
    with pytest.raises(convert.WeightsMismatch, match="Stable Diffusion 2.x"):
        single_file.to_parts(sd2, {"unet": {}, "vae": {}})


def test_single_file_source_needs_a_base_in_the_config(config):
    cfg = copy.deepcopy(config)
    cfg.model.source = "/models/v1-5-pruned.safetensors"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.base = '': a single-file model.source"):
        config_lib.validate(cfg, 1)

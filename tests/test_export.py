"""`jaxcond export`, and parity of the exported (and loaded) weights with diffusers' and
transformers' PyTorch classes (torch is in the test extra for this alone).

Tolerances, float32 on the CPU, outputs of order 1: text encoder and VAE 1e-4 absolute
(differences seen ~1e-6, op order). UNet 1e-3: diffusers' Flax GEGLU uses the tanh
approximation of GELU where its PyTorch twin uses the exact one, which alone moves outputs
by ~1e-4 (seen up to 1.4e-4); a wrong or transposed weight moves them by ~1e-1.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import ROOT
from jaxcond import export as export_lib, rundir
from jaxcond.config import ConfigError
from jaxcond.models import convert, demo as demo_model
from jaxcond.models.unet_clip import UNetCLIP

ATOL = 1e-4
UNET_ATOL = 1e-3


@pytest.fixture(scope="module")
def run_dir(reference_run) -> str:
    """The session's 8-step run (checkpoints at 4 and 8); export only reads it."""
    return str(reference_run.workdir)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export") / "model")
    r = subprocess.run([sys.executable, "-m", "jaxcond.cli", "export", "--run", run_dir, "--out", out],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exported step 8 (ema weights)" in r.stdout
    return out


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten_dict(tree).items()}


def test_export_writes_both_layouts_with_the_ema_weights_and_nulls(run_dir, exported):
    t = rundir.load_trained(run_dir)
    for sub, files in {"unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
                       "text_encoder": ("flax_model.msgpack", "model.safetensors"),
                       "tokenizer": ("vocab.json", "merges.txt"), "scheduler": ("scheduler_config.json",)}.items():
        for f in files:
            assert os.path.isfile(os.path.join(exported, sub, f)), f"{sub}/{f}"
    back = UNetCLIP(exported)
    ema = _flat(t.state["ema"]["model"])
    assert ema.keys() == _flat(back.trainable).keys()
    assert all(np.array_equal(ema[k], v) for k, v in _flat(back.trainable).items())
    assert not all(np.array_equal(ema[k], v) for k, v in _flat(t.state["params"]["model"]).items())
    m = json.load(open(os.path.join(exported, export_lib.MANIFEST)))
    assert m["step"] == 8 and m["weights"] == "ema" and m["nulls"] == {"pooled": "learned", "text": "learned"}
    assert m["force_zeros_for_empty_prompt"] is False and m["learned_nulls_file"] == "nulls.safetensors"
    nulls = convert.read_safetensors([os.path.join(exported, "nulls.safetensors")])
    for k in ("text", "pooled"):
        np.testing.assert_array_equal(np.asarray(nulls[k]), np.asarray(t.state["ema"]["nulls"][k]))
    sched = json.load(open(os.path.join(exported, "scheduler", "scheduler_config.json")))
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
    assert not os.path.exists(os.path.join(exported, "model_index.json"))  # pixel-space: no SD pipeline


def test_export_raw_and_errors(run_dir, tmp_path):
    m = export_lib.export(run_dir, str(tmp_path / "raw"), weights="raw", step=4)
    assert m["step"] == 4 and m["weights"] == "raw"
    back = UNetCLIP(str(tmp_path / "raw"))
    raw = _flat(rundir.load_trained(run_dir, step=4).state["params"]["model"])
    assert raw.keys() == _flat(back.trainable).keys()
    assert all(np.array_equal(raw[k], v) for k, v in _flat(back.trainable).items())
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5; it has steps"):
        export_lib.export(run_dir, str(tmp_path / "x"), step=5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export_lib.export(run_dir, str(tmp_path / "full"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export_lib.export(str(tmp_path), str(tmp_path / "y"))
    with pytest.raises(ConfigError, match="--single_file.*pixel-space"):
        export_lib.export(run_dir, str(tmp_path / "z"), single_file=True)


# --- PyTorch parity ----------------------------------------------------------------------


def _unet_inputs(family, seed=0):
    c, h, w = family.sample_shape
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (2, c, h, w))
    t = jnp.array([10, 900], jnp.int32)
    tokens = jnp.asarray(family.tokenize(["a red circle on a blue background", ""]))
    return x, t, tokens


def _torch_unet_output(folder, x, t, cond):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    net = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(folder, "unet")))
    # strict: every PyTorch parameter must come from the file and every tensor must be used
    net.load_state_dict(load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")), strict=True)
    t_ = {k: torch.from_numpy(np.array(v)) for k, v in cond.items()}
    context = t_["text"] if "text_2" not in t_ else torch.cat([t_["text"], t_["text_2"]], -1)
    added = {"text_embeds": t_["pooled"], "time_ids": t_["time_ids"]} if "pooled" in t_ else None
    with torch.no_grad():
        out = net(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(t)).long(), context,
                  added_cond_kwargs=added).sample
    return out.numpy()


def _torch_text(folder, family, tokens):
    """The conditioners as diffusers' SD / SDXL pipelines compute them with PyTorch CLIP."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    two, out = len(family.encoders) == 2, {}
    for i, name in enumerate(family.encoders):
        te = (CLIPTextModel if i == 0 else CLIPTextModelWithProjection).from_pretrained(os.path.join(folder, name))
        ids = torch.from_numpy(np.array(tokens[:, i] if two else tokens)).long()
        with torch.no_grad():
            o = te(ids, output_hidden_states=True)
            if two:  # SDXL: the penultimate layer (clip_skip 1), un-normalised
                h = o.hidden_states[-(family.clip_skip + 1)]
            else:
                h = o.last_hidden_state if family.clip_skip == 1 else te.text_model.final_layer_norm(
                    o.hidden_states[-family.clip_skip])
        out["text_2" if i else "text"] = h.numpy()
        if i == len(family.encoders) - 1:  # the pooled vector comes from the last encoder
            out["pooled"] = (o.text_embeds if two else o.pooler_output).numpy()
    return out


def _check_parity(folder, family):
    x, t, tokens = _unet_inputs(family)
    cond = family.encode(family.frozen, tokens)
    want_cond = _torch_text(folder, family, tokens)
    for k, v in cond.items():
        np.testing.assert_allclose(np.asarray(v), want_cond[k], atol=ATOL, err_msg=k)
    cond.update({k: jnp.asarray(v) for k, v in family.sampling_conditioners(2).items()})
    want = _torch_unet_output(folder, x, t, cond)
    got = np.asarray(family.denoise(family.trainable, x, t, cond))
    assert np.abs(want).max() > 0.1  # a real output, not an all-zero comparison
    np.testing.assert_allclose(got, want, atol=UNET_ATOL)


def test_text_time_export_matches_pytorch(exported):
    """The trained tiny demo model (pooled caption through SDXL's text_time embedding)."""
    _check_parity(exported, UNetCLIP(exported))


def test_sdxl_two_encoder_export_matches_pytorch(config, tmp_path):
    """SDXL's layout: two encoders (the second with a projection), time ids, a VAE."""
    c = copy.deepcopy(config.model.demo)
    c.vae_channels, c.text_encoders = (32, 32), 2
    demo_model.build(str(tmp_path / "src"), c, 16, 0)
    src = UNetCLIP(str(tmp_path / "src"))
    assert set(src.conditioners) == {"text", "text_2", "pooled", "time_ids"}
    src.save(str(tmp_path / "out"), src.trainable)
    _check_parity(str(tmp_path / "out"), src)


def test_sd_style_export_with_vae_and_clip_skip_matches_pytorch(config, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    c = copy.deepcopy(config.model.demo)
    c.vae_channels, c.pooled = (32, 32), False
    demo_model.build(str(tmp_path / "src"), c, 16, 0)
    src = UNetCLIP(str(tmp_path / "src"), clip_skip=2)
    src.save(str(tmp_path / "out"), src.trainable)
    out = str(tmp_path / "out")
    _check_parity(out, src)
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae"))
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        decoded = vae.decode(dist.mean).sample
    moments = np.asarray(src.image_moments(src.frozen, jnp.asarray(images)))
    np.testing.assert_allclose(moments, np.concatenate([dist.mean.numpy(), dist.std.numpy()], 1), atol=ATOL)
    flax_decoded = src.vae.apply({"params": src.frozen["vae"]}, jnp.asarray(dist.mean.numpy()),
                                 method=src.vae.decode).sample
    np.testing.assert_allclose(np.asarray(flax_decoded), decoded.numpy(), atol=ATOL)


def test_weights_saved_by_pytorch_load_and_match(config, tmp_path):
    """The loading direction: a folder written by diffusers/transformers' PyTorch classes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    c = copy.deepcopy(config.model.demo)
    c.vae_channels = (32, 32)
    flax_dir, pt_dir = str(tmp_path / "flax"), str(tmp_path / "pt")
    demo_model.build(flax_dir, c, 16, 0)
    torch.manual_seed(0)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cls.from_config(cls.load_config(os.path.join(flax_dir, sub))).save_pretrained(os.path.join(pt_dir, sub))
    te = os.path.join(flax_dir, "text_encoder")
    CLIPTextModel(CLIPTextConfig.from_pretrained(te)).save_pretrained(os.path.join(pt_dir, "text_encoder"))
    shutil.copytree(os.path.join(flax_dir, "tokenizer"), os.path.join(pt_dir, "tokenizer"))
    assert os.path.isfile(os.path.join(pt_dir, "unet", "diffusion_pytorch_model.safetensors"))
    family = UNetCLIP(pt_dir)
    _check_parity(pt_dir, family)

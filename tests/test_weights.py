"""Loading model folders: Flax or PyTorch safetensors weights (without torch), hub ids,
clear errors for pickled weights and for weights that do not fit the config."""

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import ROOT
from jaxcond.models import convert, demo as demo_model, load
from jaxcond.models.unet_clip import UNetCLIP

PARTS = (("unet", "diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
         ("vae", "diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
         ("text_encoder", "flax_model.msgpack", "model"), ("text_encoder_2", "flax_model.msgpack", "model"))


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, config) -> str:
    """A tiny Stable Diffusion 1.x-style folder: VAE, no pooled conditioning, Flax weights."""
    c = copy.deepcopy(config.model.demo)
    c.vae_channels, c.pooled = (32, 32), False
    path = str(tmp_path_factory.mktemp("sd_flax"))
    demo_model.build(path, c, 16, 0)
    return path


def as_pytorch_folder(src: str, dst: str) -> None:
    """`src` with every part's Flax weights replaced by PyTorch-layout safetensors."""
    shutil.copytree(src, dst)
    family = UNetCLIP(src)
    trees = {"unet": family.trainable["unet"], **family.frozen}
    for sub, flax_file, stem in PARTS:
        if sub in trees:
            os.remove(os.path.join(dst, sub, flax_file))
            convert.write_safetensors(os.path.join(dst, sub, f"{stem}.safetensors"), convert.to_pytorch(trees[sub]))


def assert_same_tree(a, b) -> None:
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_pytorch_safetensors_load_to_the_same_params(latent_dir, tmp_path):
    pt = str(tmp_path / "pt")
    as_pytorch_folder(latent_dir, pt)
    assert not any(f.endswith(".msgpack") for _, _, fs in os.walk(pt) for f in fs)
    a, b = UNetCLIP(latent_dir), UNetCLIP(pt)
    assert_same_tree(a.trainable, b.trainable)
    assert_same_tree(a.frozen, b.frozen)
    assert b.latent and "pooled" not in b.conditioners


def test_sdxl_layout_loads_from_pytorch_safetensors(config, tmp_path):
    c = copy.deepcopy(config.model.demo)
    c.vae_channels, c.text_encoders = (32, 32), 2
    src, pt = str(tmp_path / "src"), str(tmp_path / "pt")
    demo_model.build(src, c, 16, 0)
    as_pytorch_folder(src, pt)
    a, b = UNetCLIP(src), UNetCLIP(pt)
    assert "text_encoder_2" in b.frozen and not os.path.exists(os.path.join(pt, "text_encoder_2", "flax_model.msgpack"))
    assert_same_tree(a.trainable, b.trainable)
    assert_same_tree(a.frozen, b.frozen)


def test_loading_safetensors_works_without_torch(latent_dir, tmp_path):
    pt = str(tmp_path / "pt")
    as_pytorch_folder(latent_dir, pt)
    # The test venv has torch (parity tests); hide it as if it were not installed.
    code = ("import sys; sys.modules['torch'] = None; "
            "from jaxcond.models.unet_clip import UNetCLIP; UNetCLIP(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, pt], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_fp16_variant_and_sharded_index_are_read(latent_dir, tmp_path):
    pt = str(tmp_path / "pt")
    as_pytorch_folder(latent_dir, pt)
    unet = os.path.join(pt, "unet")
    tensors = convert.read_safetensors([os.path.join(unet, "diffusion_pytorch_model.safetensors")])
    os.remove(os.path.join(unet, "diffusion_pytorch_model.safetensors"))
    names = sorted(tensors)
    half = {k: tensors[k] for k in names[: len(names) // 2]}
    rest = {k: tensors[k] for k in names[len(names) // 2:]}
    convert.write_safetensors(os.path.join(unet, "part-1.safetensors"), half)
    convert.write_safetensors(os.path.join(unet, "part-2.safetensors"), rest)
    weight_map = {**{k: "part-1.safetensors" for k in half}, **{k: "part-2.safetensors" for k in rest}}
    with open(os.path.join(unet, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        import json

        json.dump({"weight_map": weight_map}, f)
    vae = os.path.join(pt, "vae")
    os.rename(os.path.join(vae, "diffusion_pytorch_model.safetensors"),
              os.path.join(vae, "diffusion_pytorch_model.fp16.safetensors"))
    a, b = UNetCLIP(latent_dir), UNetCLIP(pt)
    assert_same_tree(a.trainable, b.trainable)
    assert_same_tree(a.frozen, b.frozen)


def test_weights_that_do_not_fit_list_their_keys(latent_dir, tmp_path):
    pt = str(tmp_path / "pt")
    as_pytorch_folder(latent_dir, pt)
    path = os.path.join(pt, "unet", "diffusion_pytorch_model.safetensors")
    tensors = dict(convert.read_safetensors([path]))
    del tensors["conv_in.weight"]
    tensors["conv_in.extra"] = tensors["conv_in.bias"]
    tensors["conv_out.bias"] = tensors["conv_out.bias"][:2]
    convert.write_safetensors(path, tensors)
    with pytest.raises(convert.WeightsMismatch) as e:
        UNetCLIP(pt)
    msg = str(e.value)
    assert "missing (1):\n  conv_in.weight" in msg
    assert "unexpected (1):\n  conv_in.extra" in msg
    assert "wrong shape (1):\n  conv_out.bias: checkpoint (2,), model wants (4,)" in msg


@pytest.mark.parametrize("file,last", [("text_encoder/flax_model.msgpack", ("final_layer_norm", "scale")),
                                       ("unet/diffusion_flax_model.msgpack", ("conv_out", "bias"))])
def test_flax_weights_missing_or_misshaped_are_refused(latent_dir, tmp_path, file, last):
    """diffusers and transformers would only log a weight missing from a Flax file."""
    from flax import serialization
    from flax.traverse_util import unflatten_dict

    folder = str(tmp_path / "flax")
    shutil.copytree(latent_dir, folder)
    path = os.path.join(folder, file)
    with open(path, "rb") as f:
        params = flatten_dict(serialization.msgpack_restore(f.read()))
    key = next(k for k in params if k[-2:] == last)
    for change, want in ((lambda p: p.pop(key), f"missing (1):\n  {'/'.join(key)}"),
                         (lambda p: p.update({key: np.zeros(3, np.float32)}), "(3,)")):
        edited = dict(params)
        change(edited)
        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(unflatten_dict(edited)))
        with pytest.raises(convert.WeightsMismatch) as e:
            UNetCLIP(folder)
        assert f"{os.path.basename(file)} does not fit" in str(e.value) and want in str(e.value), str(e.value)


def test_pickled_weights_get_the_fix_not_a_traceback(latent_dir, tmp_path):
    pt = str(tmp_path / "pt")
    as_pytorch_folder(latent_dir, pt)
    te = os.path.join(pt, "text_encoder")
    os.rename(os.path.join(te, "model.safetensors"), os.path.join(te, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin is a pickled PyTorch checkpoint.*save_pretrained"):
        UNetCLIP(pt)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a local folder and could not be downloaded.*huggingface-cli"):
        load.resolve("jaxcond-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load.resolve(str(tmp_path / "missing" / "model"))


def test_clip_skip_conditions_on_the_penultimate_layer(model_dir):
    import jax.numpy as jnp

    last, skip = UNetCLIP(model_dir), UNetCLIP(model_dir, clip_skip=2)
    tokens = jnp.asarray(last.tokenize(["a red circle on a blue background"]))
    out = last.text_models["text_encoder"](input_ids=tokens, params=last.frozen["text_encoder"], output_hidden_states=True)
    x = np.asarray(out.hidden_states[-2], np.float64)
    ln = last.frozen["text_encoder"]["text_model"]["final_layer_norm"]
    eps = last.text_models["text_encoder"].config.layer_norm_eps
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * ln["scale"] + ln["bias"]
    np.testing.assert_allclose(np.asarray(skip.encode(skip.frozen, tokens)["text"]), want, atol=1e-5)
    assert not np.allclose(want, np.asarray(last.encode(last.frozen, tokens)["text"]), atol=1e-2)
    with pytest.raises(ValueError, match="clip_skip = 9"):
        UNetCLIP(model_dir, clip_skip=9)

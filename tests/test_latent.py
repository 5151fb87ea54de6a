"""Latent families (a VAE, Stable Diffusion's layout): x0 drawn in the step from the encoder's
distribution, from images or from the cache alike."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_cache, file_config, make_data, tiny_config
from jaxcond import config as config_lib, dropout, export as export_lib, rng, train as train_lib, train_step as ts
from jaxcond.models import demo as demo_model
from jaxcond.models.unet_clip import UNetCLIP


@pytest.fixture(scope="module")
def latent_config(tmp_path_factory):
    c = tiny_config()
    c.model.demo.vae_channels = (32, 32)
    path = str(tmp_path_factory.mktemp("latent_model"))
    demo_model.build(path, c.model.demo, c.data.resolution, c.model.demo.init_seed)
    c.model.source = path
    return c


@pytest.fixture(scope="module")
def latent_family(latent_config):
    return UNetCLIP(latent_config.model.source)


def test_image_sizes_must_be_multiples_of_the_downsampling(latent_config, latent_family, image_folder, tmp_path):
    """Other sizes fail inside the UNet (a concatenate of mismatched skip features); the
    config is refused before anything is built or compiled, for training and the cache."""
    assert latent_family.size_multiple == 4  # the VAE halves the image, then the UNet's 2 levels
    cfg = file_config(latent_config, image_folder)
    cfg.data.buckets = ((16, 16), (16, 22))
    with pytest.raises(config_lib.ConfigError, match=r"config.data.buckets = .*: \[\(16, 22\)\] not multiples of 4"):
        train_lib.build(cfg, str(tmp_path / "run"))
    cfg.data.buckets, cfg.data.resolution = (), 18
    with pytest.raises(config_lib.ConfigError, match=r"config.data.resolution = 18: must be a multiple of 4"):
        train_lib.build(cfg, str(tmp_path / "run"))
    cfg.data.cache, cfg.data.crop, cfg.data.flip = str(tmp_path / "cache"), "center", False
    with pytest.raises(config_lib.ConfigError, match=r"config.data.resolution = 18: must be a multiple of 4"):
        build_cache(cfg, latent_family, cfg.data.cache)
    assert not (tmp_path / "cache").exists()


def test_latent_family_draws_x0_from_the_vae(latent_family):
    fam = latent_family
    assert fam.latent and fam.sample_shape == (4, 8, 8)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)), jnp.uint8)
    m = fam.image_moments(fam.frozen, images)
    assert m.shape == (3, 8, 8, 8) and (m[:, 4:] > 0).all()  # mean and a positive std
    a, b = fam.draw_x0(m, jax.random.key(1)), fam.draw_x0(m, jax.random.key(2))
    assert a.shape == (3, 4, 8, 8) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, fam.draw_x0(m, jax.random.key(1)))
    scale = fam.vae.config.scaling_factor
    np.testing.assert_allclose(fam.images_to_x0(fam.frozen, images), m[:, :4] * scale, rtol=1e-6)
    assert fam.x0_to_images(fam.frozen, a).shape == (3, 16, 16, 3)


def test_latent_model_trains_and_samples(latent_config, tmp_path):
    cfg = copy.deepcopy(latent_config)
    cfg.train.steps = 2
    out = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    assert (tmp_path / "run" / "samples_final.png").exists()
    # Exported as a Stable Diffusion pipeline folder plus one original-layout file.
    m = export_lib.export(str(tmp_path / "run"), str(tmp_path / "sd"), single_file=True)
    assert m["single_file"] == "sd.safetensors"
    index = json.load(open(tmp_path / "sd" / "model_index.json"))
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    back = UNetCLIP(str(tmp_path / "sd" / "sd.safetensors"), base=str(tmp_path / "sd"))
    ema, got = jax.tree.leaves(out["state"]["ema"]["model"]), jax.tree.leaves(back.trainable)
    assert len(ema) == len(got) > 0 and all(np.array_equal(a, b) for a, b in zip(ema, got))


def test_cached_moments_give_the_same_step(latent_config, latent_family, image_folder, tmp_path):
    """The cache stores the VAE's mean/std; x0 is drawn in the step from the same key."""
    fam = latent_family
    cfg = file_config(latent_config, image_folder)
    cfg.data.crop, cfg.data.flip = "center", False
    cfg.data.cache = str(tmp_path / "cache")
    cfg.dropout.groups.caption.rate = 0.5
    build_cache(cfg, fam, cfg.data.cache)
    groups = dropout.groups_from_config(cfg.dropout, fam.conditioners)
    results = []
    for use_cache in (False, True):
        data = make_data(cfg, fam, use_cache=use_cache)
        spec = ts.StepSpec.from_config(cfg, groups, data.steps_per_epoch)
        tx, lr = ts.make_optimizer(cfg)
        state = ts.init_state(fam, spec, tx)
        state["step"] = jnp.int32(3)
        batch = jax.tree.map(jnp.asarray, data.batch(data.ids(3), 3))
        assert ("moments" in batch) == use_cache and ("images" in batch) != use_cache
        _, m = jax.jit(lambda s, b: ts.train_step(fam, spec, tx, lr, s, fam.frozen, b))(state, batch)
        moments = batch["moments"] if use_cache else fam.image_moments(fam.frozen, batch["images"])
        x0 = fam.draw_x0(moments, rng.stream_key(spec.seed, jnp.int32(3), rng.STREAM_LATENT))
        results.append((float(m["loss"]), float(m["drop_frac/caption"]), np.asarray(x0)))
    (loss_f, frac_f, x0_f), (loss_c, frac_c, x0_c) = results
    assert frac_f == frac_c
    np.testing.assert_allclose(x0_f, x0_c, atol=1e-5)
    np.testing.assert_allclose(loss_f, loss_c, rtol=1e-5)

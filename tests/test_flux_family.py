"""The flux family against diffusers' PyTorch FluxPipeline on a tiny FLUX.1-dev-like folder
built locally (jaxcond.models.flux_tiny): caption encodings, the transformer on packed
latents with its guidance embedding, the VAE's shift-and-scale latents, a dropped caption
group left exactly at its empty-prompt nulls, two training steps exported and sampled by
the pipeline as jaxcond samples; the parameter counts of the shipped FLUX.1 configs; bad
folders and fields in one line."""

import copy
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import fsdp_matches, tiny_config
from jaxcond import config as config_lib, dropout, export as export_lib, rng, rundir, sampling, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.config import from_file
from jaxcond.models import flux_family, flux_tiny, registry
from jaxcond.models.flux import FluxConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on a blue background", "a white square"]
T5_LENGTH = 16
RESOLUTION = 16  # the tiny VAE halves it: 8x8 latents, 4x4 image tokens
RTOL_OF_SCALE = 1e-4  # parity bound relative to the output's scale, as tests/test_flux.py's


def assert_close(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    diff = float(np.abs(got - want).max())
    print(f"max |jaxcond - pytorch| = {diff:.3g}, scale {float(np.abs(want).max()):.3g}")
    assert diff <= RTOL_OF_SCALE * max(1.0, float(np.abs(want).max())), (diff, float(np.abs(want).max()))
    return diff


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("flux") / "tiny")
    flux_tiny.build_tiny(path, resolution=RESOLUTION)
    return path


@pytest.fixture(scope="module")
def family(folder) -> flux_family.FluxFamily:
    return flux_family.FluxFamily(folder, t5_max_length=T5_LENGTH, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def pipe(folder):
    return diffusers.FluxPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def schnell_folder(folder, tmp_path_factory) -> str:
    """The tiny folder with a schnell-like transformer: no guidance embedding."""
    path = str(tmp_path_factory.mktemp("flux") / "schnell")
    shutil.copytree(folder, path, ignore=shutil.ignore_patterns("transformer"))
    with open(os.path.join(folder, "transformer", "config.json")) as f:
        dev = FluxConfig.from_diffusers(json.load(f))
    flux_tiny.write_transformer(path, dataclasses.replace(dev, guidance_embeds=False), seed=7)
    return path


def encode(family, prompts=PROMPTS) -> dict:
    return jax.jit(family.encode)({**family.frozen, **family.trainable}, family.tokenize(prompts))


def pipeline_embeds(pipe, prompts=PROMPTS):
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=T5_LENGTH)
    return embeds.numpy(), pooled.numpy()


def transformer_output(pipe_or_transformer, x, t, embeds, pooled, guidance) -> np.ndarray:
    """The pipeline's transformer on x [B, 16, h, w] as FluxPipeline feeds it: packed
    latents, image and text ids, t / 1000, the guidance value; unpacked back."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    b, c, h, w = x.shape
    pipeline = diffusers.FluxPipeline
    with torch.no_grad():
        packed = pipeline._pack_latents(torch.from_numpy(x), b, c, h, w)
        out = transformer(hidden_states=packed, encoder_hidden_states=torch.from_numpy(np.array(embeds)),
                          pooled_projections=torch.from_numpy(np.array(pooled)),
                          timestep=torch.from_numpy(t) / 1000,
                          guidance=None if guidance is None else torch.full((b,), guidance),
                          img_ids=pipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                          txt_ids=torch.zeros(embeds.shape[1], 3)).sample
        return pipeline._unpack_latents(out, h * 2, w * 2, 2).numpy()  # sizes in pixels of a factor-2 VAE


def test_encoding_matches_the_pipelines_encode_prompt(family, pipe):
    assert family.conditioners == {"t5": (T5_LENGTH, 24), "pooled": (20,)}
    cond = encode(family)
    embeds, pooled = pipeline_embeds(pipe)
    assert_close(cond["t5"], embeds)
    assert_close(cond["pooled"], pooled)
    tokens = family.tokenize(PROMPTS)
    assert tokens.shape == (2, 77 + T5_LENGTH) and tokens.dtype == np.int32
    for tokenizer, ids, n in zip((pipe.tokenizer, pipe.tokenizer_2), np.split(tokens, [77], axis=1), (77, T5_LENGTH)):
        want = tokenizer(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ids, want)
    long = " ".join(["red"] * 20)  # 21 T5 tokens with </s>: over T5_LENGTH, within CLIP's 77
    assert family.overlong(["a red circle", long]).tolist() == [False, True]


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_denoise_matches_the_pipelines_transformer_on_packed_latents(family, pipe, guidance):
    """Non-square latents (4 x 6 tokens), sigma * 1000 in, the guidance embedding fed
    model.flux_guidance: what FluxPipeline computes at guidance_scale = that value."""
    fam = copy.copy(family)
    fam.guidance = guidance
    x = np.random.default_rng(0).standard_normal((2, 16, 8, 12)).astype(np.float32)
    t = np.array([999.0, 37.5], np.float32)
    cond = encode(fam)
    got = jax.jit(fam.denoise)({**fam.frozen, **fam.trainable}, jnp.asarray(x), jnp.asarray(t), cond)
    want = transformer_output(pipe, x, t, *pipeline_embeds(pipe), guidance)
    assert_close(got, want)
    if guidance != 1.0:  # the embedding is used: another value, another output
        assert np.abs(want - transformer_output(pipe, x, t, *pipeline_embeds(pipe), 1.0)).max() > 1e-3


def test_schnell_has_no_guidance_embedding_and_its_own_t5_length(schnell_folder):
    """A schnell-like transformer is fed no guidance (as FluxPipeline); its T5 length
    defaults to 256; another flux_guidance than the default is refused, not ignored."""
    default = flux_family.FluxFamily(schnell_folder, resolution=RESOLUTION, shapes_only=True)
    assert default.conditioners["t5"] == (256, 24)
    family = flux_family.FluxFamily(schnell_folder, t5_max_length=T5_LENGTH, resolution=RESOLUTION)
    pipe = diffusers.FluxPipeline.from_pretrained(schnell_folder)
    x = np.random.default_rng(4).standard_normal((2, 16, 8, 8)).astype(np.float32)
    t = np.array([500.0, 3.0], np.float32)
    got = jax.jit(family.denoise)({**family.frozen, **family.trainable}, jnp.asarray(x), jnp.asarray(t),
                                  encode(family))
    assert_close(got, transformer_output(pipe, x, t, *pipeline_embeds(pipe), None))
    assert "guidance_scale" not in family.export_manifest()["pipeline_kwargs"]
    with pytest.raises(ConfigError, match=r"config.model.flux_guidance = 3.5: .* has no guidance embedding "
                                          r"\(FLUX.1-schnell-like\); leave it at 1.0") as e:
        flux_family.FluxFamily(schnell_folder, guidance=3.5)
    assert "\n" not in str(e.value)


def test_latents_follow_fluxs_shift_and_scale(family, pipe):
    vae = pipe.vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    images = np.random.default_rng(1).integers(0, 256, (2, RESOLUTION, RESOLUTION, 3)).astype(np.uint8)
    with torch.no_grad():
        pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        dist = vae.encode(pixels).latent_dist
        want = (dist.mean - vae.config.shift_factor) * vae.config.scaling_factor  # FluxPipeline's img2img
        decoded = vae.decode(want / vae.config.scaling_factor + vae.config.shift_factor).sample  # its decode
    assert_close(family.images_to_x0(family.frozen, jnp.asarray(images)), want.numpy())
    moments = family.image_moments(family.frozen, jnp.asarray(images))
    assert_close(moments[:, 16:], dist.std.numpy())
    want_images = np.clip(np.round((decoded.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5), 0, 255)
    got_images = np.asarray(family.x0_to_images(family.frozen, jnp.asarray(want.numpy())))
    assert got_images.dtype == np.uint8 and np.abs(got_images.astype(int) - want_images.astype(int)).max() <= 1


def test_a_dropped_caption_group_is_exactly_its_empty_prompt_nulls(family, pipe):
    """configs/flux_dev.py's group {t5, pooled} with `empty` nulls: a dropped example gets the
    encodings of "" bit for bit, which are FluxPipeline's for negative_prompt=""."""
    cfg = from_file(os.path.join(ROOT, "configs", "flux_dev.py"))
    groups = [dropout.Group("caption", tuple(cfg.dropout.groups.caption.members), rate=1.0)]
    kinds = dict(cfg.dropout.nulls)
    assert kinds == {"t5": "empty", "pooled": "empty"}
    cond, empty = encode(family), encode(family, [""])
    nulls = dropout.null_values(kinds, empty, {})
    dropped = dropout.apply(cond, nulls, {"caption": jnp.array([True, False])}, groups)
    for name in flux_family.CONDITIONERS:
        np.testing.assert_array_equal(dropped[name][0], empty[name][0])
        np.testing.assert_array_equal(dropped[name][1], cond[name][1])
        assert np.abs(np.asarray(cond[name][0] - empty[name][0])).max() > 1e-3  # there was something to drop
    for got, want in zip((empty["t5"], empty["pooled"]), pipeline_embeds(pipe, [""])):
        assert_close(got, want)


def _flux_dev(cfg: ml_collections.ConfigDict, folder: str) -> ml_collections.ConfigDict:
    """`cfg` with configs/flux_dev.py's model settings, dropout and objective on the tiny model."""
    dev = from_file(os.path.join(ROOT, "configs", "flux_dev.py"))
    cfg.model = dev.model
    cfg.model.source, cfg.model.t5_max_length = folder, T5_LENGTH
    cfg.model.remat, cfg.model.frozen_dtype = "none", "float32"  # the parity below is float32's
    cfg.dropout, cfg.diffusion = dev.dropout, dev.diffusion
    cfg.sample.scheduler = "euler"
    cfg.train.steps, cfg.train.global_batch, cfg.optim.ema_decay = 2, 8, 0.0
    return cfg


def test_trains_with_flow_then_exports_for_the_pipeline_which_samples_as_jaxcond(folder, family, tmp_path):
    """configs/flux_dev.py's dropout and resolution-shifted flow on the tiny model: two steps
    of `jaxcond train`, `jaxcond export`; FluxPipeline's transformer is the trained one, and
    it samples what `jaxcond sample` samples from the same starting latent, jaxcond's
    guidance scale as its true_cfg_scale against negative_prompt="" (the empty nulls)."""
    cfg = _flux_dev(tiny_config(), folder)
    assert cfg.diffusion.flow_shift_mode == "resolution"
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    history = train_lib.train(cfg, run, progress=False)["history"]
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    manifest = export_lib.export(run, out, weights="raw")
    assert manifest["nulls"] == {"t5": "empty", "pooled": "empty"} and not manifest["force_zeros_for_empty_prompt"]
    assert manifest["pipeline_kwargs"] == {"max_sequence_length": T5_LENGTH, "guidance_scale": 1.0}
    assert manifest["cfg_scale_kwarg"] == "true_cfg_scale"
    exported = diffusers.FluxPipeline.from_pretrained(out)
    s = exported.scheduler.config
    assert s.use_dynamic_shifting and (s.base_shift, s.max_shift) == (0.5, 1.15)

    run_t = rundir.load_trained(run)
    trained = run_t.params("raw")["model"]
    x = np.random.default_rng(3).standard_normal((2, *family.sample_shape)).astype(np.float32)
    t = np.array([812.5, 100.0], np.float32)
    embeds, pooled = pipeline_embeds(exported)
    got = jax.jit(family.denoise)({**family.frozen, **trained}, jnp.asarray(x), jnp.asarray(t), encode(family))
    assert_close(got, transformer_output(exported, x, t, embeds, pooled, 1.0))

    guidance, steps = [1.0, 4.0], 4
    images = sampling.sample_grid(run_t.family, run_t.spec, run_t.params("raw"), run_t.family.frozen, PROMPTS,
                                  guidance, 0, steps)
    with rng.derivation():  # as `sampling.sample` draws it
        start = np.asarray(jax.random.normal(jax.random.key(0), (len(PROMPTS),) + tuple(family.sample_shape)))
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(start.copy()), len(PROMPTS), *start.shape[1:])
    for i, g in enumerate(guidance):
        theirs = exported(PROMPTS, latents=packed.clone(), num_inference_steps=steps, negative_prompt="",
                          true_cfg_scale=g, height=images.shape[2], width=images.shape[3], output_type="np",
                          **manifest["pipeline_kwargs"]).images
        diff = np.abs(images[i].astype(np.int32) - np.round(theirs * 255).astype(np.int32))
        print(f"guidance {g}: images max {diff.max()}, mean {diff.mean():.3f} uint8 steps apart")
        assert diff.max() <= 3, f"guidance {g}: max {diff.max()}, mean {diff.mean():.2f} uint8 steps apart"


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# The transformers' totals are the published FLUX.1 sizes (dev "12B": 11.90 B); schnell lacks
# only the guidance embedder (256 * 3072 + 3072 * 3072 weights + 2 * 3072 biases).
@pytest.mark.parametrize("source, transformer", [("black-forest-labs/FLUX.1-dev", 11_901_408_320),
                                                 ("black-forest-labs/FLUX.1-schnell", 11_891_178_560)])
def test_shipped_flux_configs_give_the_published_parameter_counts_offline(source, transformer):
    family = flux_family.FluxFamily(source, shapes_only=True)
    parts = {**family.frozen, **family.trainable}
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(parts))
    assert {k: _count(v) for k, v in parts.items()} == {
        "transformer": transformer, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
        "vae": 83_819_683}
    dev = source.endswith("dev")
    assert family.conditioners == {"t5": (512 if dev else 256, 4096), "pooled": (768,)}
    assert family.sample_shape == (16, 128, 128) and family.size_multiple == 16 and family.patch_size == 2
    np.testing.assert_array_equal(family.tokenize(["a cat"]), np.zeros((1, 77 + (512 if dev else 256)), np.int32))


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell"])
def test_shipped_run_configs_validate_and_drop_all_text_together(name):
    cfg = from_file(os.path.join(ROOT, "configs", f"{name}.py"))
    config_lib.validate(cfg, None, reads_data=False)
    assert registry.check_config(cfg.model) is flux_family.FluxFamily
    assert {g: tuple(cfg.dropout.groups[g].members) for g in cfg.dropout.groups} == {"caption": ("t5", "pooled")}
    assert cfg.dropout.groups.caption.rate == 0.1 and dict(cfg.dropout.nulls) == {"t5": "empty", "pooled": "empty"}
    d = cfg.diffusion
    assert d.objective == "flow" and d.flow_shift_mode == "resolution" and cfg.sample.guidance == (1.0,)
    assert (d.flow_base_shift, d.flow_max_shift) == ((0.5, 1.15) if name == "flux_dev" else (0.0, 0.0))


def _model(**fields) -> ml_collections.ConfigDict:
    model = from_file(os.path.join(ROOT, "configs", "flux_dev.py")).model
    for k, v in fields.items():
        model[k] = v
    return model


@pytest.mark.parametrize("fields, message", [
    ({"t5_max_length": 0}, r"config.model.t5_max_length = 0: must be an integer in \[1, 512\]"),
    ({"t5_max_length": 513}, r"config.model.t5_max_length = 513"),
    ({"flux_guidance": -1.0}, r"config.model.flux_guidance = -1.0: must be a number >= 0"),
    ({"clip_skip": 2}, r"config.model.clip_skip = 2: Flux reads CLIP's pooled output"),
    ({"train_text_encoder": True}, r"config.model.train_text_encoder = True: fine-tuning the text encoders is not"),
    ({"remat": "blocks"}, r"config.model.remat = 'blocks': must be one of \('none', 'layers', 'full'\)"),
    ({"frozen_dtype": "float16"}, r"config.model.frozen_dtype = 'float16'"),
    ({"lora": ml_collections.ConfigDict({"rank": 16})}, r"config.model.lora.rank = 16: LoRA is not implemented"),
    ({"source": "flux1-dev.safetensors"}, r"config.model.source = 'flux1-dev.safetensors': the flux family loads"),
])
def test_bad_fields_are_one_line_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        registry.check_config(_model(**fields))
    assert "\n" not in str(e.value)


def test_bad_folders_and_settings_are_one_line_config_errors(folder, tmp_path):
    def refused(match, *args, **kwargs):
        with pytest.raises(ConfigError, match=match) as e:
            flux_family.FluxFamily(*args, **kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    broken = str(tmp_path / "no_t5")
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    refused(r"has no text_encoder_2/: the flux family loads a diffusers-format Flux folder", broken)
    mismatched = str(tmp_path / "mismatched")
    shutil.copytree(folder, mismatched)
    config_file = os.path.join(mismatched, "transformer", "config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, "joint_attention_dim": 32, "pooled_projection_dim": 40, "in_channels": 32}, f)
    message = refused(r"its parts do not belong together", mismatched)
    assert "T5 gives 24 features but the transformer attends to 32" in message
    assert "CLIP pools 20 features but the transformer's pooled_projection_dim is 40" in message
    assert "the VAE makes 16 channels, 2x2 patches of which are 64, but the transformer takes 32" in message
    refused(r"config.data.resolution = 18: Flux's images have sides that are multiples of 4", folder, resolution=18)


def test_remat_gives_the_same_loss_and_gradients_and_each_block_gathers_its_own_params(folder, family):
    """As tests/test_sd3.py's: `model.remat` layers / full under an 8-way FSDP mesh."""
    cond = encode(family)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32))
    t = jnp.array([999.0, 37.5])

    def loss(fam, p):
        return jnp.mean(fam.denoise({**fam.frozen, "transformer": p}, x, t, cond) ** 2)

    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(family, p)))(family.trainable["transformer"])
    for policy in ("layers", "full"):
        fam = flux_family.FluxFamily(folder, t5_max_length=T5_LENGTH, resolution=RESOLUTION, remat=policy)
        jaxpr = str(fsdp_matches(lambda p, fam=fam: loss(fam, p), fam.trainable["transformer"], want, want_grads))
        blocks = fam.config.num_layers + fam.config.num_single_layers
        if policy == "layers":
            assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= blocks, policy
        assert jaxpr.count("sharding_constraint") >= blocks, policy

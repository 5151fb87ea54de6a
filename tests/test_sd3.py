"""The sd3 family against diffusers' PyTorch StableDiffusion3Pipeline on a tiny SD3 folder
built locally (jaxcond.models.sd3_tiny): caption encodings and the joint context, the
transformer's output, the VAE's shift-and-scale latents, what a dropped encoder leaves in
the joint context, an exported folder loaded back by the pipeline; the parameter counts
of the shipped SD3.5 configs; bad folders and fields in one line."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import fsdp_matches, tiny_config
from jaxcond import dropout, export as export_lib, rng, rundir, sampling, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.config import from_file
from jaxcond.models import registry, sd3, sd3_tiny

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on a blue background", "a white square"]
T5_LENGTH = 16
RTOL_OF_SCALE = 1e-4  # parity bound relative to the output's scale, as tests/test_mmdit.py's


def assert_close(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    diff = float(np.abs(got - want).max())
    assert diff <= RTOL_OF_SCALE * max(1.0, float(np.abs(want).max())), (diff, float(np.abs(want).max()))
    return diff


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sd3") / "tiny")
    sd3_tiny.build_tiny(path, resolution=16)
    return path


@pytest.fixture(scope="module")
def family(folder) -> sd3.SD3:
    return sd3.SD3(folder, t5_max_length=T5_LENGTH)


@pytest.fixture(scope="module")
def pipe(folder):
    return diffusers.StableDiffusion3Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def encoded(family):
    """jaxcond's conditioners of PROMPTS and the joint context built from them."""
    cond = jax.jit(family.encode)({**family.frozen, **family.trainable}, family.tokenize(PROMPTS))
    return cond, family.joint_context(cond)


def pipeline_embeds(pipe, prompts=PROMPTS):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_LENGTH)
    return embeds.numpy(), pooled.numpy()


def latents_and_timesteps(family, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((len(PROMPTS), *family.sample_shape)).astype(np.float32),
            np.array([999.0, 37.5], np.float32))  # sigma * 1000


def transformer_output(transformer, x, t, context, pooled) -> np.ndarray:
    with torch.no_grad():
        return transformer(hidden_states=torch.from_numpy(x),
                           encoder_hidden_states=torch.from_numpy(np.array(context)),
                           pooled_projections=torch.from_numpy(np.array(pooled)),
                           timestep=torch.from_numpy(t)).sample.numpy()


def test_encoding_matches_the_pipelines_encode_prompt(family, pipe, encoded):
    cond, (context, pooled) = encoded
    assert {k: v.shape[1:] for k, v in cond.items()} == dict(family.conditioners)
    assert family.conditioners == {"clip_l": (77, 16), "clip_g": (77, 32), "t5": (T5_LENGTH, 64), "pooled_l": (16,),
                                   "pooled_g": (32,)}
    want_context, want_pooled = pipeline_embeds(pipe)
    assert context.shape == (2, 77 + T5_LENGTH, 64)
    assert_close(context, want_context)
    assert_close(pooled, want_pooled)


def test_tokens_hold_all_three_tokenizers_and_overlong_names_any_cut(family, pipe):
    tokens = family.tokenize(PROMPTS)
    assert tokens.shape == (2, 77 + 77 + T5_LENGTH) and tokens.dtype == np.int32
    for tokenizer, ids, n in zip((pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3),
                                 np.split(tokens, [77, 154], axis=1), (77, 77, T5_LENGTH)):
        want = tokenizer(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ids, want)
    long = " ".join(["red"] * 20)  # 21 T5 tokens with </s>: over T5_LENGTH, within CLIP's 77
    assert family.overlong(["a red circle", long]).tolist() == [False, True]


def test_denoise_matches_the_pipelines_transformer(family, pipe, encoded):
    cond, (context, pooled) = encoded
    x, t = latents_and_timesteps(family)
    got = jax.jit(family.denoise)({**family.frozen, **family.trainable}, jnp.asarray(x), jnp.asarray(t), cond)
    assert_close(got, transformer_output(pipe.transformer, x, t, *pipeline_embeds(pipe)))


def test_latents_follow_the_pipelines_shift_and_scale(family, pipe):
    vae = pipe.vae
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    with torch.no_grad():
        pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        dist = vae.encode(pixels).latent_dist
        want = (dist.mean - vae.config.shift_factor) * vae.config.scaling_factor  # SD3's training scripts
        decoded = vae.decode(want / vae.config.scaling_factor + vae.config.shift_factor).sample  # its pipeline
    x0 = family.images_to_x0(family.frozen, jnp.asarray(images))
    assert_close(x0, want.numpy())
    moments = family.image_moments(family.frozen, jnp.asarray(images))
    assert_close(moments[:, 16:], dist.std.numpy())
    drawn = family.draw_x0(moments, jax.random.key(0))
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    assert_close(drawn, x0 + np.asarray(moments[:, 16:]) * vae.config.scaling_factor * np.asarray(noise))
    want_images = np.clip(np.round((decoded.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5), 0, 255)
    got_images = np.asarray(family.x0_to_images(family.frozen, jnp.asarray(want.numpy())))
    assert got_images.dtype == np.uint8 and got_images.shape == images.shape
    assert np.abs(got_images.astype(int) - want_images.astype(int)).max() <= 1  # uint8 rounding


@pytest.mark.parametrize("encoder, members", [("clip_l", ("clip_l", "pooled_l")), ("clip_g", ("clip_g", "pooled_g")),
                                              ("t5", ("t5",))])
def test_a_dropped_encoder_leaves_exactly_its_null_in_the_joint_context(family, encoded, encoder, members):
    """Dropped by jaxcond's dropout with zeros nulls, one encoder's positions in the joint
    context (its feature columns of the CLIP tokens, or the T5 tokens) and its half of
    the pooled vector are zeros, and nothing else moves."""
    cond, (context, pooled) = encoded
    groups = [dropout.Group(encoder, members, rate=1.0)]
    nulls = dropout.null_values({m: "zeros" for m in members}, {k: v[:1] for k, v in cond.items()}, {})
    dropped = dropout.apply(cond, nulls, {encoder: jnp.array([True, False])}, groups)
    got_context, got_pooled = map(np.asarray, family.joint_context(dropped))
    context, pooled = np.asarray(context), np.asarray(pooled)
    positions = {"clip_l": (slice(0, 77), slice(0, 16)), "clip_g": (slice(0, 77), slice(16, 48)),
                 "t5": (slice(77, None), slice(None))}[encoder]
    pooled_part = {"clip_l": slice(0, 16), "clip_g": slice(16, 48), "t5": slice(0, 0)}[encoder]
    assert np.all(got_context[(0, *positions)] == 0) and np.all(got_pooled[0, pooled_part] == 0)
    assert np.abs(context[(0, *positions)]).max() > 0  # there was something to drop
    kept = np.ones(context.shape[1:], bool)
    kept[positions] = False
    np.testing.assert_array_equal(got_context[0][kept], context[0][kept])
    np.testing.assert_array_equal(np.delete(got_pooled[0], np.arange(48)[pooled_part]),
                                  np.delete(pooled[0], np.arange(48)[pooled_part]))
    np.testing.assert_array_equal(got_context[1], context[1])  # the example that kept its caption
    np.testing.assert_array_equal(got_pooled[1], pooled[1])
    assert np.all(got_context[:, :77, 48:] == 0)  # the padding up to T5's width


def test_exported_folder_loads_in_the_pipeline_and_reproduces_denoise(family, pipe, encoded, tmp_path):
    """`save` + `pipeline_index`: trained weights (here: perturbed ones) in diffusers' layout,
    the frozen parts copied; StableDiffusion3Pipeline loads it and agrees with jaxcond."""
    leaves, tree = jax.tree.flatten(family.trainable)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    trainable = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    out = str(tmp_path / "export")
    family.save(out, trainable)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(family.pipeline_index(force_zeros_for_empty_prompt=True), f)
    exported = diffusers.StableDiffusion3Pipeline.from_pretrained(out)
    assert type(exported.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert exported.scheduler.config.shift == 3.0
    cond, (context, pooled) = encoded
    x, t = latents_and_timesteps(family, seed=2)
    got = jax.jit(family.denoise)({**family.frozen, **trainable}, jnp.asarray(x), jnp.asarray(t), cond)
    want = transformer_output(exported.transformer, x, t, context, pooled)
    assert_close(got, want)
    assert np.abs(want - transformer_output(pipe.transformer, x, t, context, pooled)).max() > 1e-2  # it moved
    for a, b in zip(pipeline_embeds(exported), pipeline_embeds(pipe)):  # encoders and tokenizers as they were
        np.testing.assert_array_equal(a, b)
    assert family.export_manifest()["pipeline_kwargs"] == {"max_sequence_length": T5_LENGTH, "clip_skip": None}


def _sd35(cfg: ml_collections.ConfigDict, folder: str) -> ml_collections.ConfigDict:
    """`cfg` with configs/sd35_medium.py's model settings, dropout and objective on the tiny model."""
    sd35 = from_file(os.path.join(ROOT, "configs", "sd35_medium.py"))
    cfg.model = sd35.model
    cfg.model.source, cfg.model.t5_max_length = folder, T5_LENGTH
    cfg.model.remat, cfg.model.frozen_dtype = "none", "float32"  # the parity below is float32's
    cfg.dropout, cfg.diffusion = sd35.dropout, sd35.diffusion
    cfg.sample.scheduler = "euler"
    cfg.train.steps, cfg.train.global_batch, cfg.optim.ema_decay = 2, 8, 0.0
    return cfg


def test_trains_with_flow_and_per_encoder_dropout_then_exports_for_the_pipeline(folder, family, encoded, tmp_path):
    """configs/sd35_medium.py's dropout and objective on the tiny model: two steps of
    `jaxcond train`, `jaxcond export`, and the pipeline's transformer is the trained one."""
    cfg = _sd35(tiny_config(), folder)
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    history = train_lib.train(cfg, run, progress=False)["history"]
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    manifest = export_lib.export(run, out, weights="raw")
    assert manifest["nulls"] == {c: "zeros" for c in sd3.CONDITIONERS}
    assert manifest["pipeline_kwargs"]["max_sequence_length"] == T5_LENGTH
    exported = diffusers.StableDiffusion3Pipeline.from_pretrained(out)
    assert exported.scheduler.config.shift == cfg.diffusion.flow_shift
    cond, (context, pooled) = encoded
    x, t = latents_and_timesteps(family, seed=3)
    trained = rundir.load_trained(run).params("raw")["model"]
    got = jax.jit(family.denoise)({**family.frozen, **trained}, jnp.asarray(x), jnp.asarray(t), cond)
    assert_close(got, transformer_output(exported.transformer, x, t, context, pooled))
    # And the pipeline samples what `jaxcond sample` samples from the same starting latent,
    # given the zeros nulls as its negative embeddings (its default would encode "").
    import torch

    run_t = rundir.load_trained(run)
    guidance, steps = [1.0, 4.0], 4
    images = sampling.sample_grid(run_t.family, run_t.spec, run_t.params("raw"), run_t.family.frozen, PROMPTS,
                                  guidance, 0, steps)
    with rng.derivation():  # as `sampling.sample` draws it
        start = np.asarray(jax.random.normal(jax.random.key(0), (len(PROMPTS),) + tuple(family.sample_shape)))
    zeros = {"negative_prompt_embeds": torch.zeros(context.shape), "negative_pooled_prompt_embeds": torch.zeros(pooled.shape)}
    for i, g in enumerate(guidance):
        theirs = exported(PROMPTS, latents=torch.from_numpy(start.copy()), num_inference_steps=steps, guidance_scale=g,
                          height=images.shape[2], width=images.shape[3], max_sequence_length=T5_LENGTH,
                          output_type="np", **zeros).images
        diff = np.abs(images[i].astype(np.int32) - np.round(theirs * 255).astype(np.int32))
        assert diff.max() <= 3, f"guidance {g}: max {diff.max()}, mean {diff.mean():.2f} uint8 steps apart"
    # docs/export.md's snippet, as a user runs it, on this export.
    text = open(os.path.join(ROOT, "docs", "export.md")).read()
    snippet = re.search(r"<!-- sd3-nulls-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    snippet = snippet.replace('"exported/sd35/jaxcond.json"', repr(os.path.join(out, "jaxcond.json")))
    exec(snippet.replace('"exported/sd35"', repr(out)), namespace)
    assert namespace["image"].size == (images.shape[3], images.shape[2])


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("source, transformer", [("stabilityai/stable-diffusion-3.5-medium", 2_243_171_520),
                                                 ("stabilityai/stable-diffusion-3.5-large", 8_056_627_520)])
def test_shipped_sd35_configs_give_the_published_parameter_counts_offline(source, transformer):
    family = sd3.SD3(source, shapes_only=True)
    parts = {**family.frozen, **family.trainable}
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(parts))
    assert {k: _count(v) for k, v in parts.items()} == {
        "transformer": transformer, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656, "vae": 83_819_683}
    assert family.conditioners == {"clip_l": (77, 768), "clip_g": (77, 1280), "t5": (256, 4096), "pooled_l": (768,),
                                   "pooled_g": (1280,)}
    assert family.sample_shape == (16, 128, 128) and family.image_size == 1024 and family.size_multiple == 16
    np.testing.assert_array_equal(family.tokenize(["a cat"]), np.zeros((1, 77 + 77 + 256), np.int32))


@pytest.mark.parametrize("name", ["sd35_medium", "sd35_large"])
def test_shipped_run_configs_pick_the_family_and_drop_one_encoder_per_group(name):
    cfg = from_file(os.path.join(ROOT, "configs", f"{name}.py"))
    assert registry.check_config(cfg.model) is sd3.SD3
    groups = {g: tuple(cfg.dropout.groups[g].members) for g in cfg.dropout.groups}
    assert groups == {"clip_l": ("clip_l", "pooled_l"), "clip_g": ("clip_g", "pooled_g"), "t5": ("t5",)}
    assert all(cfg.dropout.groups[g].rate == 0.464 for g in groups)
    assert dict(cfg.dropout.nulls) == {c: "zeros" for c in sd3.CONDITIONERS}
    assert cfg.diffusion.objective == "flow" and cfg.diffusion.flow_shift == 3.0


def _model(**fields) -> ml_collections.ConfigDict:
    model = from_file(os.path.join(ROOT, "configs", "sd35_medium.py")).model
    for k, v in fields.items():
        model[k] = v
    return model


@pytest.mark.parametrize("fields, message", [
    ({"t5_max_length": 0}, r"config.model.t5_max_length = 0: must be an integer in \[1, 512\]"),
    ({"t5_max_length": 513}, r"config.model.t5_max_length = 513"),
    ({"clip_skip": 0}, r"config.model.clip_skip = 0: must be an integer >= 1"),
    ({"train_text_encoder": True}, r"config.model.train_text_encoder = True: fine-tuning the text encoders is not"),
    ({"remat": "blocks"}, r"config.model.remat = 'blocks': must be one of \('none', 'layers', 'full'\)"),
    ({"frozen_dtype": "float16"}, r"config.model.frozen_dtype = 'float16'"),
    ({"lora": ml_collections.ConfigDict({"rank": 16})}, r"config.model.lora.rank = 16: LoRA is not implemented"),
    ({"source": "sd35.safetensors"}, r"config.model.source = 'sd35.safetensors': the sd3 family loads a diffusers"),
])
def test_bad_fields_are_one_line_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        registry.check_config(_model(**fields))
    assert "\n" not in str(e.value)


def test_bad_folders_are_one_line_config_errors(folder, tmp_path):
    broken = str(tmp_path / "no_t5")
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("text_encoder_3"))
    with pytest.raises(ConfigError, match=r"has no text_encoder_3/: the sd3 family loads a diffusers-format SD3"):
        sd3.SD3(broken)
    mismatched = str(tmp_path / "mismatched")
    shutil.copytree(folder, mismatched)
    config_file = os.path.join(mismatched, "transformer", "config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, "joint_attention_dim": 32, "pooled_projection_dim": 40}, f)
    with pytest.raises(ConfigError) as e:
        sd3.SD3(mismatched)
    assert "\n" not in str(e.value)
    assert "T5 gives 64 features but the transformer attends to 32" in str(e.value)
    assert "do not make the transformer's pooled_projection_dim 40" in str(e.value)
    with pytest.raises(ConfigError, match=r"config.model.clip_skip = 2: the CLIP encoders have 2 layers"):
        sd3.SD3(folder, clip_skip=2)


def test_the_three_encoders_cached_train_as_from_files(folder, family, image_folder, tmp_path):
    """`jaxcond cache` stores all five conditioners (and the VAE's moments); training from
    it draws the same masks and gives the same losses as encoding in the step."""
    from conftest import build_cache, file_config

    cfg = _sd35(file_config(tiny_config(), image_folder), folder)
    cfg.data.crop, cfg.data.flip, cfg.data.cache = "center", False, str(tmp_path / "cache")
    manifest = build_cache(cfg, family, cfg.data.cache)
    assert set(manifest["fields"]) == {"moments", "time_ids", *(f"cond.{c}" for c in sd3.CONDITIONERS)}
    plain = ml_collections.ConfigDict(cfg.to_dict())
    plain.data.cache = ""
    runs = {name: train_lib.train(c, str(tmp_path / name), progress=False)["history"]
            for name, c in (("files", plain), ("cache", cfg))}
    np.testing.assert_allclose([h["loss"] for h in runs["cache"]], [h["loss"] for h in runs["files"]], rtol=1e-5)
    masks = [open(tmp_path / name / "masks.jsonl").read() for name in ("files", "cache")]
    assert masks[0] == masks[1] and all(f'"{g}"' in masks[0] for g in ("clip_l", "clip_g", "t5"))


def test_remat_gives_the_same_loss_and_gradients_and_each_block_gathers_its_own_params(folder, family, encoded):
    """`model.remat` layers / full: same loss and gradients to float rounding. Under FSDP
    (`sharding.gathering`) each joint block's params are gathered inside the block, inside
    its recomputed region with `layers`, so the step never holds the whole MMDiT gathered."""
    cond, _ = encoded
    x, t = (jnp.asarray(a) for a in latents_and_timesteps(family, seed=1))

    def loss(fam, p):
        return jnp.mean(fam.denoise({**fam.frozen, "transformer": p}, x, t, cond) ** 2)

    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(family, p)))(family.trainable["transformer"])
    for policy in ("layers", "full"):
        fam = sd3.SD3(folder, t5_max_length=T5_LENGTH, remat=policy)
        jaxpr = str(fsdp_matches(lambda p, fam=fam: loss(fam, p), fam.trainable["transformer"], want, want_grads))
        blocks = fam.config.num_layers
        if policy == "layers":  # one remat region per block, each opening with its own gathers
            assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= blocks, policy
        assert jaxpr.count("sharding_constraint") >= blocks, policy

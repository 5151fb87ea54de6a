"""LoRA: step 0 is the base model, only adapters train, and the exported adapters (diffusers
and kohya layouts) load into diffusers' PyTorch pipelines with the same UNet output."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxcond import config as config_lib, export as export_lib, train as train_lib
from jaxcond.checks import ConfigError
from jaxcond.models import convert, lora
from jaxcond.models.unet_clip import UNetCLIP
from test_export import UNET_ATOL, _unet_inputs

SPEC = lora.Spec(rank=4, alpha=8.0, targets=("attention", "resnet_convs"))


def _trained_adapters(family, seed=1):
    """The family's adapters with random (non-zero) `up` matrices, as after training."""
    def rnd(path, x):
        k = jax.random.fold_in(jax.random.key(seed), hash(jax.tree_util.keystr(path)) % 2**31)
        return 0.3 * jax.random.normal(k, x.shape) if path[-1].key == "up" else x
    family.trainable = {k: jax.tree_util.tree_map_with_path(rnd, v) for k, v in family.trainable.items()}
    return family


def _cond(family, tokens):
    cond = family.encode({**family.frozen, **family.trainable}, tokens)
    cond.update({k: jnp.asarray(v) for k, v in family.sampling_conditioners(2).items()})
    return cond


def test_step_zero_is_the_base_model(stand_ins):
    base, adapted = UNetCLIP(stand_ins["sd"]), UNetCLIP(stand_ins["sd"], lora=SPEC)
    assert set(adapted.trainable) == {"unet_lora"} and "unet" in adapted.frozen
    n = len(flatten_dict(adapted.trainable["unet_lora"])) // 2
    assert n == sum(1 for p in flatten_dict(base.trainable["unet"]) if any(
        __import__("re").fullmatch(lora.TARGETS[t], "/".join(p)) for t in SPEC.targets))
    x, t, tokens = _unet_inputs(base)
    cond = _cond(base, tokens)
    want = base.denoise({**base.frozen, **base.trainable}, x, t, cond)
    got = adapted.denoise({**adapted.frozen, **adapted.trainable}, x, t, cond)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _pipeline(folder):
    """diffusers' PyTorch SD / SDXL pipeline from a tiny model folder's parts."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = {"unet": diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")),
             "vae": diffusers.AutoencoderKL.from_pretrained(os.path.join(folder, "vae")),
             "text_encoder": CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")),
             "tokenizer": CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
             "scheduler": diffusers.DDIMScheduler()}
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2"))
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"))
        return diffusers.StableDiffusionXLPipeline(**parts)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


@pytest.mark.parametrize("model", ["sd", "sdxl"])
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_exported_adapters_load_into_diffusers_with_the_same_output(stand_ins, model, layout, tmp_path):
    """The file goes through the pipeline's own `load_lora_weights` (kohya's layout through
    diffusers' kohya converter), every adapter lands on a layer, and the UNet then gives
    jaxcond's output with the adapters."""
    import torch
    from peft.tuners.lora import LoraLayer

    folder = stand_ins[model]
    family = _trained_adapters(UNetCLIP(folder, lora=SPEC))
    path = str(tmp_path / "lora.safetensors")
    family.save_lora(path, family.trainable, layout)
    pipe = _pipeline(folder)
    pipe.load_lora_weights(path)
    adapted = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == len(flatten_dict(family.trainable["unet_lora"])) // 2  # none missing, none left over
    x, t, tokens = _unet_inputs(family)
    cond = _cond(family, tokens)
    got = np.asarray(family.denoise({**family.frozen, **family.trainable}, x, t, cond))
    base = np.asarray(family.denoise({**family.frozen, **lora.scaled(family.trainable, 0.0)}, x, t, cond))
    t_ = {k: torch.from_numpy(np.array(v)) for k, v in cond.items()}
    context = t_["text"] if "text_2" not in t_ else torch.cat([t_["text"], t_["text_2"]], -1)
    added = {"text_embeds": t_["pooled"], "time_ids": t_["time_ids"]} if "pooled" in t_ else None
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(t)).long(), context,
                         added_cond_kwargs=added).sample.numpy()
    assert np.abs(got - base).max() > 1e-2  # the adapters change the output
    np.testing.assert_allclose(got, want, atol=UNET_ATOL)  # float32 rounding, as for full exports


def test_kohya_and_diffusers_files_read_back_to_the_same_adapters(stand_ins, tmp_path):
    family = _trained_adapters(UNetCLIP(stand_ins["sdxl"], lora=SPEC))
    for layout in ("diffusers", "kohya"):
        path = str(tmp_path / f"{layout}.safetensors")
        family.save_lora(path, family.trainable, layout)
        again = UNetCLIP(stand_ins["sdxl"], lora=SPEC, lora_init=path)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     again.trainable, family.trainable)
    other = lora.Spec(rank=2, alpha=2.0, targets=SPEC.targets)
    with pytest.raises(ConfigError, match="set config.model.lora.rank to the file's rank"):
        UNetCLIP(stand_ins["sdxl"], lora=other, lora_init=path)
    fewer = lora.Spec(rank=4, alpha=8.0, targets=("attention",))
    with pytest.raises(ConfigError, match="weights that fit no layer config.model.lora.targets adapts"):
        UNetCLIP(stand_ins["sdxl"], lora=fewer, lora_init=path)


def test_lora_run_trains_only_adapters_and_exports(config, stand_ins, tmp_path):
    """A LoRA run: optimizer state and checkpoint hold only the adapters (and nulls); the
    masks are those of the full fine-tune; the merged export is base + scale * down @ up."""
    cfg = copy.deepcopy(config)
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.optim.lr = 3, 3, 1e-2
    train_lib.train(copy.deepcopy(cfg), str(tmp_path / "full"), progress=False)
    cfg.model.lora.rank, cfg.model.lora.alpha = 4, 8.0
    out = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    state = out["state"]
    assert set(state["params"]["model"]) == {"unet_lora"}
    n_adapter = sum(x.size for x in jax.tree.leaves(state["params"]["model"]))
    n_nulls = sum(x.size for x in jax.tree.leaves(state["params"]["nulls"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * (n_adapter + n_nulls) + 16
    masks = [open(tmp_path / d / "masks.jsonl").read() for d in ("full", "run")]
    assert masks[0] == masks[1]
    with pytest.raises(ConfigError, match="trained LoRA adapters: export them with --lora"):
        export_lib.export(str(tmp_path / "run"), str(tmp_path / "x"))
    m = export_lib.export(str(tmp_path / "run"), str(tmp_path / "lora"), weights="raw", lora="diffusers")
    assert m["lora"]["rank"] == 4 and os.path.isfile(tmp_path / "lora" / export_lib.LORA_FILE)
    export_lib.export(str(tmp_path / "run"), str(tmp_path / "merged"), weights="raw", merge=True)
    merged = convert.read_safetensors([str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")])
    base = UNetCLIP(cfg.model.source)
    a = state["params"]["model"]["unet_lora"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
    w = base.trainable["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    want = np.asarray(w) + 2.0 * np.asarray(a["down"]) @ np.asarray(a["up"])
    np.testing.assert_allclose(merged["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"], want.T,
                               rtol=1e-5, atol=1e-6)
    unchanged = "mid_block.resnets.0.conv1.weight"  # not a target: exactly the base
    np.testing.assert_array_equal(merged[unchanged], np.transpose(
        np.asarray(base.trainable["unet"]["mid_block"]["resnets_0"]["conv1"]["kernel"]), (3, 2, 0, 1)))
    # The exported file samples, without the run, as the run does (guidance 1: nulls unused).
    from PIL import Image

    from jaxcond.sample import sample

    grids = [sample(str(tmp_path / "run"), ["a red circle"], [1.0], steps=2, weights="raw",
                    out=str(tmp_path / "run.png"))]
    from_file = copy.deepcopy(cfg)
    from_file.model.lora.init_from = str(tmp_path / "lora" / export_lib.LORA_FILE)
    grids.append(sample(None, ["a red circle"], [1.0], steps=2, weights="raw", out=str(tmp_path / "file.png"),
                        cfg=from_file))
    a, b = (np.asarray(Image.open(g), np.int16) for g in grids)
    assert np.abs(a - b).max() <= 1
    # Resuming with another LoRA spec is refused, naming the field.
    cfg2 = copy.deepcopy(cfg)
    cfg2.model.lora.rank, cfg2.train.steps = 8, 4
    with pytest.raises(ConfigError, match=r"config.model.lora.rank: checkpoint has 4, now 8"):
        train_lib.train(cfg2, str(tmp_path / "run"), progress=False)
    assert json.load(open(tmp_path / "lora" / export_lib.MANIFEST))["lora"]["format"] == "diffusers"


def test_bad_lora_config_is_named(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.model.lora.rank, cfg.model.lora.targets = 4, ("attn",)
    with pytest.raises(config_lib.ConfigError, match=r"config.model.lora.targets = \('attn',\): a non-empty tuple"):
        train_lib.build(cfg, str(tmp_path))


def test_demo_lora_config_trains(tmp_path):
    """configs/demo_lora.py as shipped, shrunk to two steps."""
    from configs import demo_lora

    cfg = demo_lora.get_config()
    cfg.train.steps, cfg.train.sample_every, cfg.data.num_records = 2, 0, 64
    out = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    assert set(out["state"]["params"]["model"]) == {"unet_lora"}
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    # The README's way into diffusers: the demo base's UNet (Flax weights) and the file.
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    export_lib.export(str(tmp_path / "run"), str(tmp_path / "export"), lora="diffusers")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "base_model" / "unet"))
    unet.load_lora_adapter(str(tmp_path / "export" / export_lib.LORA_FILE), prefix="unet")
    adapters = flatten_dict(out["state"]["params"]["model"]["unet_lora"])
    assert sum(isinstance(m, LoraLayer) for m in unet.modules()) == len(adapters) // 2


def test_lora_with_fsdp_accumulation_remat_and_text_encoder(config, tmp_path):
    """LoRA composes with the rest of the step: an fsdp mesh, micro-batches, remat and
    text-encoder adapters; the losses match the same run on a data-parallel mesh."""
    cfg = copy.deepcopy(config)
    cfg.train.steps, cfg.train.grad_accum, cfg.model.remat = 2, 2, "layers"
    cfg.model.lora.rank, cfg.model.train_text_encoder = 4, True
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = 2, 4, 64
    out = train_lib.train(copy.deepcopy(cfg), str(tmp_path / "fsdp"), progress=False)
    assert set(out["state"]["params"]["model"]) == {"unet_lora", "text_encoder_lora"}
    cfg.mesh.data, cfg.mesh.fsdp = 8, 1
    want = train_lib.train(cfg, str(tmp_path / "dp"), progress=False)
    np.testing.assert_allclose([h["loss"] for h in out["history"]], [h["loss"] for h in want["history"]],
                               rtol=1e-4)


def test_lora_scale_zero_samples_the_base(config, tmp_path):
    """`--lora_scale 0` samples the base model (its config without LoRA, no run); 1 does not."""
    from PIL import Image

    from jaxcond.sample import sample

    cfg = copy.deepcopy(config)
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.optim.lr = 2, 2, 1e-2
    cfg.model.lora.rank = 4
    train_lib.train(cfg, str(tmp_path / "lora"), progress=False)
    paths = [sample(str(tmp_path / "lora"), ["a red circle"], [1.0], steps=2, weights="raw", lora_scale=s,
                    out=str(tmp_path / f"s{s}.png")) for s in (0.0, 1.0)]
    plain = copy.deepcopy(cfg)
    plain.model.lora.rank = 0
    paths.append(sample(None, ["a red circle"], [1.0], steps=2, weights="raw", out=str(tmp_path / "b.png"),
                        cfg=plain))
    zero, one, want = (np.asarray(Image.open(p), np.int16) for p in paths)
    assert np.abs(zero - want).max() <= 1 and np.abs(one - want).max() > 1

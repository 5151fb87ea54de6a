"""The pretrained-model configs (sd15, sd21, sdxl) with tiny stand-in models of their
families, SDXL's conditioners, and text-encoder fine-tuning."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from jaxcond import config as config_lib, dropout, train as train_lib, train_step as ts
from jaxcond.models.unet_clip import UNetCLIP


def shrunk(name: str, model: str, folder) -> "ml_collections.ConfigDict":  # noqa: F821
    """configs/<name>.py as shipped, with only sizes shrunk to the stand-in model."""
    cfg = config_lib.from_file(str(ROOT / "configs" / f"{name}.py"))
    cfg.model.source, cfg.data.path = model, str(folder)
    cfg.data.resolution, cfg.data.buckets = 16, ((16, 16), (16, 24))
    cfg.train.global_batch, cfg.train.steps = 8, 2
    cfg.optim.warmup_steps = 1
    return cfg


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_shipped_config_builds_and_steps(name, stand_ins, image_folder, tmp_path):
    raw = config_lib.from_file(str(ROOT / "configs" / f"{name}.py"))
    with pytest.raises(config_lib.ConfigError, match=r"config.data.path = '': data.source = 'folder' needs"):
        config_lib.validate(raw, 1)
    # The defaults the issue asks for: 10% text dropout, bf16 compute, AdamW with EMA.
    assert raw.dropout.groups.caption.rate == 0.1 and raw.train.compute_dtype == "bfloat16"
    assert raw.optim.ema_decay > 0 and raw.train.param_dtype == "float32"
    assert raw.diffusion.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")
    cfg = shrunk(name, stand_ins["sdxl" if name == "sdxl" else "sd"], image_folder)
    cfg.data.buckets = ((16, 16),)  # one compiled program per bucket; buckets are tested elsewhere
    run = train_lib.build(cfg, str(tmp_path))
    want = {"text"} if name != "sdxl" else {"text", "text_2", "pooled", "time_ids"}
    assert set(run.family.conditioners) == want
    assert dict(run.spec.nulls) == ({"text": "empty"} if name != "sdxl" else dict.fromkeys(want, "zeros"))
    state = run.initial_state()
    for _, batch in run.batches(0, 2):
        state, m = run.step_fn(state, run.frozen, batch)
        assert np.isfinite(float(m["loss"]))
        assert all(f"drop_frac/{g}" in m for g in cfg.dropout.groups)
    assert int(state["step"]) == 2


def test_sdxl_time_ids_come_from_the_crops(stand_ins, image_folder, tmp_path):
    cfg = shrunk("sdxl", stand_ins["sdxl"], image_folder)
    cfg.data.buckets = ((16, 16), (16, 20))  # 32x48 images resize to 16x24: 4 columns to crop
    run = train_lib.build(cfg, str(tmp_path))
    seen = []
    for step in range(run.data.steps_per_epoch):
        b = run.data.batch(run.data.ids(step), step)
        assert b["time_ids"].shape == (8, 6)
        h, w = b["images"].shape[1:3]
        np.testing.assert_array_equal(b["time_ids"][:, 4:], np.tile([h, w], (8, 1)))
        seen.append(b["time_ids"])
    seen = np.concatenate(seen)
    # Wide 32x48 images land in the 16x20 bucket at original size 32x48; square ones 32x32.
    assert {tuple(r) for r in seen[:, :2]} == {(32.0, 32.0), (32.0, 48.0)}
    wide = seen[seen[:, 1] == 48]
    assert (wide[:, 2] == 0).all() and set(wide[:, 3]) <= set(range(5)) and len(set(wide[:, 3])) > 1
    assert (seen[seen[:, 1] == 32][:, 2:4] == 0).all()


def test_sdxl_conditioners_drop_by_group(stand_ins, config):
    """time_ids in its own group: it drops independently of the text group."""
    from jaxcond import dropout

    fam = UNetCLIP(stand_ins["sdxl"])
    cond = fam.encode(fam.frozen, jnp.asarray(fam.tokenize(["a red circle on a blue background"] * 4)))
    cond["time_ids"] = jnp.ones((4, 6))
    groups = [dropout.Group("caption", ("text", "text_2", "pooled"), 0.5), dropout.Group("micro", ("time_ids",), 0.5)]
    nulls = {k: jnp.zeros(v) for k, v in fam.conditioners.items()}
    masks = {"caption": jnp.array([True, False, True, False]), "micro": jnp.array([False, False, True, True])}
    out = dropout.apply(cond, nulls, masks, groups)
    for k in ("text", "text_2", "pooled"):
        assert np.all(np.asarray(out[k])[[0, 2]] == 0) and np.all(np.asarray(out[k])[[1, 3]] == np.asarray(cond[k])[[1, 3]])
    np.testing.assert_array_equal(np.asarray(out["time_ids"]), [[1] * 6, [1] * 6, [0] * 6, [0] * 6])


def test_fine_tuned_text_encoder_moves_the_empty_null(config, tmp_path):
    """With the encoder trainable, the `empty` null is recomputed from its current params."""
    cfg = copy.deepcopy(config)
    cfg.model.train_text_encoder = True
    cfg.dropout.nulls.text, cfg.dropout.nulls.pooled = "empty", "empty"
    cfg.train.steps, cfg.optim.lr = 3, 1e-2
    run = train_lib.build(cfg, str(tmp_path))
    assert "text_encoder" in run.family.trainable and "text_encoder" not in run.family.frozen
    state = run.initial_state()
    tokens = jnp.asarray(ts.empty_tokens(run.family))
    before = run.family.encode({**run.frozen, **state["params"]["model"]}, tokens)["text"]
    for _, batch in run.batches(0, 3):
        state, _ = run.step_fn(state, run.frozen, batch)
    after = run.family.encode({**run.frozen, **state["params"]["model"]}, tokens)["text"]
    assert float(jnp.abs(after - before).max()) > 1e-3
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert any("text_encoder" in p for p in opt_paths)  # it has optimizer state
    # ...and the step substitutes exactly that: with rate 1 the UNet sees the current empty.
    seen = {}
    family = run.family
    real = family.denoise

    def spy(trainable, x_t, t, cond):
        seen.update(jax.tree.map(lambda a: a, cond))
        return real(trainable, x_t, t, cond)

    cfg1 = copy.deepcopy(cfg)
    cfg1.dropout.groups.caption.rate = 1.0
    spec = ts.StepSpec.from_config(cfg1, dropout.groups_from_config(cfg1.dropout, family.conditioners), 10)
    family.denoise = spy
    try:
        batch = run.put_batch(3)
        ts._loss(family, spec, state["params"], run.frozen,
                 {"tokens": batch["tokens"], "extra": {"time_ids": batch["time_ids"]},
                  "x0": family.images_to_x0(run.frozen, batch["images"]), "noise": jnp.zeros((16, 3, 16, 16)),
                  "t": jnp.zeros((16,), jnp.int32), "masks": {"caption": jnp.ones((16,), bool)}})
    finally:
        family.denoise = real
    np.testing.assert_allclose(np.asarray(seen["text"]), np.broadcast_to(np.asarray(after), seen["text"].shape),
                               atol=1e-6)


def test_text_encoder_training_refuses_a_cache(config):
    cfg = copy.deepcopy(config)
    cfg.model.train_text_encoder, cfg.data.cache = True, "/tmp/somewhere"
    with pytest.raises(config_lib.ConfigError, match="train_text_encoder.*cannot be cached"):
        config_lib.validate(cfg, 1)


def test_time_ids_have_no_empty_null():
    cfg = config_lib.from_file(str(ROOT / "configs" / "sdxl.py"))
    cfg.dropout.nulls.time_ids = "empty"
    with pytest.raises(config_lib.ConfigError, match=r"dropout.nulls.time_ids.*comes from the data.*'zeros'"):
        dropout.groups_from_config(cfg.dropout, ("text", "text_2", "pooled", "time_ids"), ("time_ids",))

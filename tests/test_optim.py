"""Optimizers (AdamW, Lion, Adafactor), their moment dtype and the EMA's storage dtype:
each trains, keeps its state in the dtype asked for, and is part of the resume check."""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from jaxcond import checkpoint, config as config_lib, train as train_lib, train_step as ts


@pytest.mark.parametrize("name,moment_dtype", [("adamw", "float32"), ("adamw", "bfloat16"), ("lion", "bfloat16"),
                                                ("adafactor", "float32")])
def test_each_optimizer_updates_and_keeps_its_moment_dtype(name, moment_dtype):
    cfg = tiny_config()
    cfg.optim.name, cfg.optim.moment_dtype, cfg.optim.warmup_steps = name, moment_dtype, 0
    config_lib.validate(cfg, None)
    tx, _ = ts.make_optimizer(cfg)
    params = {"w": jnp.ones((256, 256)), "b": jnp.zeros((3,))}
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    updates, state = tx.update(grads, state, params)
    assert all(np.isfinite(np.asarray(u)).all() and np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(updates))
    dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim == 2}
    if name == "adafactor":  # factored: per-row and per-column statistics, no full-size moment
        assert all(x.size < 256 * 256 for x in jax.tree.leaves(state))
    else:
        assert jnp.dtype(moment_dtype) in dtypes


def test_lion_with_bfloat16_moments_and_ema_trains(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.optim.name, cfg.optim.moment_dtype, cfg.optim.ema_dtype = "lion", "bfloat16", "bfloat16"
    cfg.optim.b2, cfg.optim.lr, cfg.train.steps = 0.99, 1e-4, 2
    out = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    state = out["state"]
    assert {x.dtype for x in jax.tree.leaves(state["ema"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(state["opt_state"])}


def test_optimizer_choices_are_part_of_the_resume_check():
    saved = checkpoint.config_to_json(tiny_config())
    for field, value in (("name", "adafactor"), ("moment_dtype", "bfloat16"), ("ema_dtype", "bfloat16")):
        now = copy.deepcopy(saved)
        now["optim"][field] = value
        assert config_lib.resume_conflicts(saved, now) == [
            f"config.optim.{field}: checkpoint has {saved['optim'][field]!r}, now {value!r}"]
    older = copy.deepcopy(saved)  # saved before the fields existed: AdamW, float32, EMA as params
    for field in ("name", "moment_dtype", "ema_dtype"):
        del older["optim"][field]
    assert config_lib.resume_conflicts(older, saved) == []
    del older["model"]["family"], older["model"]["remat"]
    config_lib.validate(ml_collections.ConfigDict(older), None)  # what `jaxcond verify` checks of it


def test_bad_optimizer_fields_are_named():
    for field, value in (("name", "sgd"), ("moment_dtype", "float16"), ("ema_dtype", "int8")):
        cfg = tiny_config()
        cfg.optim[field] = value
        with pytest.raises(config_lib.ConfigError, match=rf"config.optim.{field} = '{value}': must be one of"):
            config_lib.validate(cfg, None)

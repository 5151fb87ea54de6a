"""`model.remat`: the UNet's blocks rematerialised give the same loss and gradients to float
rounding, with the same parameters."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcond import config as config_lib, train as train_lib
from jaxcond.models import remat
from jaxcond.models.unet_clip import UNetCLIP


def _loss(family, trainable):
    c, h, w = family.sample_shape
    x = jax.random.normal(jax.random.key(0), (4, c, h, w))
    t = jnp.array([0, 300, 600, 999])
    cond = family.encode(family.frozen, jnp.asarray(family.tokenize(["a red circle on a blue background"] * 4)))
    cond.update({k: jnp.asarray(v) for k, v in family.sampling_conditioners(4).items()})

    return jnp.mean(family.denoise(trainable, x, t, cond) ** 2)


def _loss_and_grads(family):
    return jax.jit(jax.value_and_grad(lambda p: _loss(family, p)))(family.trainable)


def test_remat_policies_give_the_same_loss_and_gradients(model_dir):
    want, want_grads = _loss_and_grads(UNetCLIP(model_dir))
    for policy in set(remat.POLICIES) - {"none"}:
        family = UNetCLIP(model_dir, remat=policy)
        got, grads = _loss_and_grads(family)
        assert "remat" in str(jax.make_jaxpr(lambda p: _loss(family, p))(family.trainable)), policy
        assert jax.tree.structure(family.trainable) == jax.tree.structure(UNetCLIP(model_dir).trainable)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, want_grads)


def test_bad_remat_policy_is_named(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg.model.remat = "everything"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.remat = 'everything': must be one of \('none', "):
        train_lib.build(cfg, str(tmp_path))

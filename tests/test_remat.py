"""`model.remat`: the UNet's blocks rematerialised give the same loss and gradients to float
rounding, with the same parameters."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fsdp_matches
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


@pytest.mark.parametrize("policy", ["none", "layers", "blocks", "layers_keep_matmuls"])
def test_scanned_layers_give_the_same_loss_and_gradients(deep_model_dir, policy):
    """model.scan_layers: each spatial transformer's blocks as one lax.scan, the same loss and
    gradients as the unrolled blocks under each remat policy, the same parameters, and one
    traced block per transformer instead of three."""
    unrolled = UNetCLIP(deep_model_dir, remat=policy)
    scanned = UNetCLIP(deep_model_dir, remat=policy, scan_layers=True)
    assert jax.tree.structure(scanned.trainable) == jax.tree.structure(unrolled.trainable)
    want, want_grads = _loss_and_grads(unrolled)
    got, grads = _loss_and_grads(scanned)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, want_grads)
    def scans(family):
        jaxpr = jax.make_jaxpr(lambda p: _loss(family, p))(family.trainable).jaxpr
        return sum(e.primitive.name == "scan" for e in _equations(jaxpr))

    assert scans(scanned) > 0 and scans(unrolled) == 0


def test_scanned_layers_under_fsdp_gather_per_step(deep_model_dir):
    """On an 8-way FSDP mesh the scan gathers each block's params inside its step: the
    same loss and gradients as one device."""
    family = UNetCLIP(deep_model_dir, remat="layers", scan_layers=True)
    want, want_grads = _loss_and_grads(family)
    jaxpr = fsdp_matches(lambda p: _loss(family, p), family.trainable, want, want_grads)
    scans = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "scan"]
    assert scans and all(any(i.primitive.name == "sharding_constraint" for i in _equations(e.params["jaxpr"].jaxpr))
                         for e in scans), "each scan step gathers its block's params"


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside its equations."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)

"""The conditional-dropout contract (jaxcond/dropout.py): bits, invariances, schedules."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcond import diffusion, dropout, sharding
from jaxcond import train_step as ts
from conftest import ROOT

# Frozen bits: (seed, step, group, rate, dropped positions of a 64-example global batch).
# If one of these fails, masks of existing runs changed: that breaks the contract.
GOLDEN = [
    (0, 0, "caption", 0.1, [6, 22, 23, 25, 28, 35, 36, 40, 56, 61]),
    (0, 1, "caption", 0.1, [0, 7, 27, 44, 55, 63]),
    (0, 7, "caption", 0.5, [0, 4, 5, 6, 8, 9, 11, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 28, 33,
                            38, 39, 40, 43, 46, 49, 52, 55, 56, 57, 58, 59, 61, 62]),
    (1, 0, "caption", 0.1, [7, 33, 47, 58, 62]),
    (12345, 1000, "caption", 0.2, [0, 5, 6, 14, 17, 19, 24, 27, 30, 31, 32, 45, 51, 58, 61]),
    (0, 0, "text_2", 0.1, [8, 11, 23, 24, 44, 48, 50, 58]),
    (7, 123456, "time_ids", 0.3, [0, 1, 10, 12, 18, 21, 24, 26, 30, 33, 34, 36, 37, 39, 40, 43, 48,
                                  59, 61]),
    # SD3's per-encoder groups (configs/sd35_medium.py): independent bits at 0.464 each.
    (0, 0, "clip_l", 0.464, [3, 6, 11, 12, 17, 18, 20, 23, 24, 25, 27, 31, 33, 34, 37, 38, 42, 43, 44, 47, 50,
                             52, 53, 56, 57, 59, 61, 62, 63]),
    (0, 0, "clip_g", 0.464, [1, 2, 3, 4, 5, 7, 9, 11, 13, 14, 17, 18, 19, 21, 22, 23, 24, 25, 34, 36, 39, 40,
                             41, 44, 45, 46, 48, 49, 50, 51, 54, 57, 60, 61, 62]),
    (0, 0, "t5", 0.464, [2, 3, 5, 9, 10, 13, 14, 15, 25, 28, 30, 32, 34, 35, 37, 38, 39, 41, 43, 44, 45, 47, 49,
                         50, 51, 55, 57, 60, 62]),
]


def group(name="caption", rate=0.1, **kw):
    return dropout.Group(name, ("text",), rate, **kw)


def positions(mask):
    return np.flatnonzero(np.asarray(mask)).tolist()


@pytest.mark.parametrize("seed,step,name,rate,want", GOLDEN)
def test_golden_masks(seed, step, name, rate, want):
    assert positions(dropout.group_mask(seed, step, group(name, rate), 64, rate)) == want
    jitted = jax.jit(lambda s: dropout.group_mask(seed, s, group(name, rate), 64, rate))
    assert positions(jitted(step)) == want


def test_group_id_is_crc32_of_name():
    assert dropout.group_id("caption") == zlib.crc32(b"caption") & 0x7FFFFFFF == 1987856741


def test_readme_snippet_reproduces_masks():
    """The plain-JAX derivation in the README is the real one."""
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- mask-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(snippet, ns)  # noqa: S102 - our own README
    for seed, step, name, rate, want in GOLDEN:
        assert positions(ns["jaxcond_mask"](seed, step, name, rate, 64)) == want


def test_independent_of_global_partitionable_setting():
    with jax.threefry_partitionable(False):
        got = positions(dropout.group_mask(0, 0, group(), 64, 0.1))
    assert got == GOLDEN[0][4]


def test_prefix_stable_in_batch_size():
    big = np.asarray(dropout.group_mask(3, 5, group(), 256, 0.3))
    for b in (1, 16, 64, 200):
        np.testing.assert_array_equal(np.asarray(dropout.group_mask(3, 5, group(), b, 0.3)), big[:b])


def test_raising_the_rate_only_adds_drops():
    for seed, step in [(0, 0), (1, 17), (99, 4096)]:
        prev = np.zeros(512, bool)
        for rate in (0.0, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0):
            m = np.asarray(dropout.group_mask(seed, step, group(), 512, rate))
            assert (m >= prev).all(), f"rate {rate} undid a drop"
            prev = m
        assert prev.all()


def test_groups_are_independent():
    a, b = group("text_group", 0.5), group("pooled_group", 0.5)
    ma = np.concatenate([np.asarray(dropout.group_mask(0, s, a, 256, 0.5)) for s in range(40)])
    mb = np.concatenate([np.asarray(dropout.group_mask(0, s, b, 256, 0.5)) for s in range(40)])
    n = ma.size
    both = (ma & mb).sum()
    # Independent: joint drops ~ n/4 with sd sqrt(n * 3/16); 5 sd bound.
    assert abs(both - n / 4) < 5 * np.sqrt(n * 3 / 16)
    # Adding or reordering groups, or changing one's rate, leaves the others' masks alone.
    m1 = dropout.masks(0, 3, (a, b), 64, 100)
    m2 = dropout.masks(0, 3, (group("pooled_group", 0.9), group("other", 0.3), a), 64, 100)
    np.testing.assert_array_equal(m1["text_group"], m2["text_group"])


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_empirical_drop_fraction_within_binomial_bound(rate):
    steps, b = 200, 256
    f = jax.jit(jax.vmap(lambda s: dropout.group_mask(0, s, group(rate=rate), b, rate)))
    drops = int(np.asarray(f(jnp.arange(steps))).sum())
    n = steps * b
    assert abs(drops - n * rate) < 5 * np.sqrt(n * rate * (1 - rate))


def test_schedules_follow_the_step_without_recompiling():
    warm = group(rate=0.2, schedule="linear_warmup", warmup_steps=100)
    every = group(rate=0.1, schedule="every_n_epochs", every_n_epochs=3, epoch_rate=1.0)
    rate = jax.jit(lambda g, s: dropout.group_rate(g, s, 10), static_argnums=0)
    assert [float(rate(warm, s)) for s in (0, 50, 100, 500)] == pytest.approx([0, 0.1, 0.2, 0.2])
    # Epochs of 10 steps; every 3rd epoch (2, 5, ...) drops everything.
    got = [float(rate(every, s)) for s in (0, 19, 20, 29, 30, 50, 59)]
    assert got == pytest.approx([0.1, 0.1, 1.0, 1.0, 0.1, 1.0, 1.0])
    assert rate._cache_size() == 2  # one compile per group, none per step
    m = np.asarray(dropout.masks(0, 25, (every,), 64, 10)["caption"])
    assert m.all()


def test_apply_replaces_members_only_where_dropped():
    g = dropout.Group("caption", ("text", "pooled"), 0.5)
    cond = {"text": jnp.ones((4, 3, 2)), "pooled": jnp.ones((4, 2)), "time_ids": jnp.ones((4, 6))}
    nulls = {"text": jnp.full((3, 2), 7.0), "pooled": jnp.full((2,), 5.0)}
    mask = jnp.array([True, False, True, False])
    out = dropout.apply(cond, nulls, {"caption": mask}, [g])
    np.testing.assert_array_equal(out["text"][:, 0, 0], [7, 1, 7, 1])
    np.testing.assert_array_equal(out["pooled"][:, 0], [5, 1, 5, 1])
    np.testing.assert_array_equal(out["time_ids"], cond["time_ids"])


def test_null_kinds():
    empty = {"a": jnp.full((1, 2), 3.0), "b": jnp.full((1, 2), 3.0), "c": jnp.full((1, 2), 3.0)}
    out = dropout.null_values({"a": "empty", "b": "zeros", "c": "learned"}, empty, {"c": jnp.full((2,), 9.0)})
    assert out["a"].tolist() == [3, 3] and out["b"].tolist() == [0, 0] and out["c"].tolist() == [9, 9]


def _spec(rate=0.3, grad_accum=1, batch=16):
    return ts.StepSpec(seed=5, groups=(group(rate=rate), group("other", 0.5)), nulls=(("text", "zeros"),),
                       global_batch=batch, grad_accum=grad_accum, steps_per_epoch=10,
                       schedule=diffusion.Schedule())


def _randomness_on(mesh_shape, spec, step=3):
    devices = jax.devices()[: mesh_shape["data"] * mesh_shape["fsdp"]]
    mesh = sharding.make_mesh(mesh_shape, devices)
    batch = sharding.batch_sharding(mesh)
    out_sh = {"masks": {g.name: batch for g in spec.groups}, "t": batch,
              "noise": NamedSharding(mesh, P(sharding.AXES))}
    f = jax.jit(lambda s: ts.step_randomness(spec, s, (spec.global_batch, 3, 4, 4)), out_shardings=out_sh)
    out = f(jnp.int32(step))
    assert out["t"].sharding.num_devices == len(devices)
    return jax.device_get(out)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 1}, {"data": 4, "fsdp": 1},
                                        {"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2},
                                        {"data": 2, "fsdp": 4}])
def test_masks_noise_timesteps_identical_on_any_mesh(mesh_shape):
    spec = _spec()
    want = _randomness_on({"data": 1, "fsdp": 1}, spec)
    got = _randomness_on(mesh_shape, spec)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_dropout_rate_changes_no_noise_or_timestep():
    a = jax.device_get(ts.step_randomness(_spec(rate=0.1), jnp.int32(4), (16, 3, 4, 4)))
    b = jax.device_get(ts.step_randomness(_spec(rate=0.7), jnp.int32(4), (16, 3, 4, 4)))
    np.testing.assert_array_equal(a["t"], b["t"])
    np.testing.assert_array_equal(a["noise"], b["noise"])
    assert (b["masks"]["caption"] >= a["masks"]["caption"]).all()


def test_micro_batches_partition_the_global_batch():
    x = jnp.arange(16)
    micro = np.asarray(ts._micro(x, 4))
    assert micro.shape == (4, 4)
    assert sorted(micro.ravel().tolist()) == list(range(16))
    assert (micro % 4 == np.arange(4)[:, None]).all()


def test_the_unconditional_branch_drops_the_caption_at_any_rate_and_size_conditioning_only_if_trained():
    caption0 = dropout.Group("caption", ("text", "pooled"), 0.0)
    micro0, micro = dropout.Group("micro", ("time_ids",), 0.0), dropout.Group("micro", ("time_ids",), 0.1)
    names = lambda groups: [g.name for g in dropout.unconditional_groups(groups, ("time_ids",))]  # noqa: E731
    assert names([caption0, micro0]) == ["caption"]  # rate 0: the untrained null, as pipelines give it
    assert names([caption0, micro]) == ["caption", "micro"]

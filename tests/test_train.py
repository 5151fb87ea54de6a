"""The train step and loop on the tiny demo model: null substitution, sharding,
gradient accumulation, resume, checkpoints, samples."""

import copy
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, make_data
from jaxcond import config as config_lib, dropout, sampling, train as train_lib, xla
from jaxcond import train_step as ts
from jaxcond.data import order
from jaxcond.models.family import Family


def test_eight_devices():
    assert jax.device_count() == 8, "XLA_FLAGS must be set before jax is imported"


class Spy(Family):
    """A real family whose denoiser records the `text` conditioning it is given.

    The UNet is not under test here, and a program with a host callback is never put in
    the compilation cache: a cheap stand-in that uses the conditioning, with one trainable
    scale for the UNet's ~850 arrays (whose optimizer update alone takes most of a step's
    compile), compiles in seconds where the UNet's step takes ~30 s, on every run.
    """

    def __init__(self, inner: Family):
        self.inner, self.seen = inner, []
        self.conditioners, self.sample_shape = inner.conditioners, inner.sample_shape
        self.trainable, self.frozen = {"unet": {"scale": jnp.ones(())}}, inner.frozen
        self.batch_conditioners = inner.batch_conditioners

    def tokenize(self, captions):
        return self.inner.tokenize(captions)

    def overlong(self, captions):
        return self.inner.overlong(captions)

    def encode(self, frozen, tokens):
        return self.inner.encode(frozen, tokens)

    def denoise(self, trainable, x_t, t, cond):
        jax.debug.callback(lambda c: self.seen.append(np.asarray(c)), cond["text"])
        scale = trainable["unet"]["scale"] * jnp.mean(cond["text"], axis=(1, 2))
        return x_t * scale.reshape((-1,) + (1,) * (x_t.ndim - 1))

    def images_to_x0(self, frozen, images):
        return self.inner.images_to_x0(frozen, images)

    def x0_to_images(self, frozen, x0):
        return self.inner.x0_to_images(frozen, x0)

    def save(self, path, trainable):
        return self.inner.save(path, trainable)

    def sampling_conditioners(self, n):
        return self.inner.sampling_conditioners(n)


def _one_step_seen(config, family, rate, grad_accum=1, step=0):
    cfg = copy.deepcopy(config)
    cfg.dropout.groups.caption.rate = rate
    cfg.train.grad_accum = grad_accum
    spy = Spy(family)
    groups = dropout.groups_from_config(cfg.dropout, spy.conditioners)
    spe = order.steps_per_epoch(cfg.data.num_records, cfg.train.global_batch)
    spec = ts.StepSpec.from_config(cfg, groups, spe)
    tx, lr = ts.make_optimizer(cfg)
    state = jax.jit(functools.partial(ts.init_state, spy, spec, tx))()
    state["step"] = jnp.int32(step)
    data = make_data(cfg, spy)
    batch = jax.tree.map(jnp.asarray, data.batch(data.ids(step), step))
    _, metrics = jax.jit(functools.partial(ts.train_step, spy, spec, tx, lr))(state, spy.frozen, batch)
    jax.effects_barrier()
    seen = np.concatenate(spy.seen)  # micro-batch a holds global positions p % grad_accum == a
    positions = np.concatenate([np.arange(a, cfg.train.global_batch, grad_accum) for a in range(grad_accum)])
    text = np.empty_like(seen)
    text[positions] = seen
    null = np.asarray(state["params"]["nulls"]["text"])
    real = np.asarray(family.encode(family.frozen, batch["tokens"])["text"])
    masks = jax.device_get(ts.step_randomness(spec, jnp.int32(step), (cfg.train.global_batch,) + spy.sample_shape))
    return text, null, real, masks["masks"]["caption"], metrics


def test_rate_one_the_unet_sees_only_the_null(config, family):
    text, null, real, mask, metrics = _one_step_seen(config, family, 1.0)
    assert mask.all() and float(metrics["drop_frac/caption"]) == 1.0
    assert (text == null).all()


def test_rate_zero_the_unet_never_sees_the_null(config, family):
    text, null, real, mask, metrics = _one_step_seen(config, family, 0.0)
    assert not mask.any() and float(metrics["drop_frac/caption"]) == 0.0
    np.testing.assert_allclose(text, real, atol=1e-5)
    assert not any(np.allclose(row, null) for row in text)


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_null_lands_exactly_on_masked_positions(config, family, grad_accum):
    text, null, real, mask, _ = _one_step_seen(config, family, 0.5, grad_accum=grad_accum, step=3)
    assert 0 < mask.sum() < mask.size
    is_null = np.array([np.array_equal(row, null) for row in text])
    np.testing.assert_array_equal(is_null, mask)
    np.testing.assert_allclose(text[~mask], real[~mask], atol=1e-5)


def _run_steps(config, tmp_path, devices, n=2, **overrides):
    cfg = copy.deepcopy(config)
    for k, v in overrides.items():
        section, field = k.split("__")
        cfg[section][field] = v
    run = train_lib.build(cfg, str(tmp_path), devices=devices)
    state, out = run.initial_state(), []
    for s in range(n):
        state, m = run.step_fn(state, run.frozen, run.put_batch(s))
        out.append(jax.device_get(m))
    return state, out


def test_sharded_step_matches_one_device(run_config, tmp_path):
    # run_config: its 8-device programs are the shared runs' (compiled once per session).
    _, one = _run_steps(run_config, tmp_path, jax.devices()[:1])
    for devices, mesh in [(jax.devices(), {}), (jax.devices(), {"mesh__data": 2, "mesh__fsdp": 4})]:
        _, many = _run_steps(run_config, tmp_path, devices, **mesh)
        for a, b in zip(one, many):
            assert a["drop_frac/caption"] == b["drop_frac/caption"]
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_grad_accumulation_matches_one_big_batch(run_config, tmp_path):
    # One batch of 16 on the shared runs' 8-device program; four micro-batches of 4 need
    # at most 4 devices (test_sharded_step_matches_one_device: the device count alone
    # stays within these tolerances).
    s1, one = _run_steps(run_config, tmp_path, jax.devices(), train__grad_accum=1)
    s4, four = _run_steps(run_config, tmp_path, jax.devices()[:4], train__grad_accum=4)
    for a, b in zip(one, four):
        assert a["drop_frac/caption"] == b["drop_frac/caption"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    # Adam divides by sqrt(v): near-zero gradients' rounding differences become visible
    # steps, bounded by the learning rate (1e-3 here).
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-4),
                 jax.device_get(s1["params"]), jax.device_get(s4["params"]))


def test_bfloat16_compute_trains(config, tmp_path):
    _, out = _run_steps(config, tmp_path, jax.devices(), n=3, train__compute_dtype="bfloat16")
    assert all(np.isfinite(m["loss"]) for m in out)


def test_resume_continues_the_run_bitwise(run_config, reference_run, interrupted_run, tmp_path):
    ref, first = reference_run.out, interrupted_run.out  # uninterrupted; stopped after step 4
    assert [h["step"] for h in first["history"]] == [1, 2, 3, 4]
    split = interrupted_run.copy_to(tmp_path / "split")
    second = train_lib.train(run_config, str(split), progress=False)
    assert [h["step"] for h in second["history"]] == [5, 6, 7, 8]
    for want, got in zip(ref["history"], first["history"] + second["history"]):
        for k in ("loss", "grad_norm", "drop_frac/caption", "lr"):
            assert want[k] == got[k], (want["step"], k)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref["state"]), jax.device_get(second["state"]))
    steps = sorted(os.listdir(split / "checkpoints"))
    assert "8" in steps and "4" in steps


def test_resume_refuses_a_changed_seed_or_dropout(run_config, interrupted_run, tmp_path, caplog):
    workdir = str(interrupted_run.copy_to(tmp_path / "run"))  # checkpoint at step 4
    changed = copy.deepcopy(run_config)
    changed.seed = 1
    changed.dropout.groups.caption.rate = 0.3
    with pytest.raises(config_lib.ConfigError, match=r"config.seed.*\n.*config.dropout"):
        train_lib.train(changed, workdir, progress=False)
    # Forced, it resumes (stop_at: the checkpoint's step, so no step of the changed config
    # is compiled; training it is what any run does) and warns of each change.
    out = train_lib.train(changed, workdir, progress=False, allow_config_change=True, stop_at=4)
    assert int(out["state"]["step"]) == 4 and out["history"] == []
    warned = [r.getMessage() for r in caplog.records if "resuming despite a changed config" in r.getMessage()]
    assert any("config.seed" in w for w in warned) and any("config.dropout" in w for w in warned), warned


def test_final_samples_and_adherence_are_written(reference_run, run_config):
    workdir, out = reference_run.workdir, reference_run.out
    assert (workdir / "samples_final.png").exists() and (workdir / "adherence.json").exists()
    assert set(out["scores"]) == {"uncond", "cfg1", "cfg3", "cfg5", "chance"}
    smp = run_config.sample  # the scores' samples come back: unconditional + each scale, every caption
    assert out["samples"].shape[:2] == (1 + len(smp.guidance), smp.num_prompts * smp.per_prompt)
    assert out["samples"].dtype == np.uint8
    assert os.listdir(workdir / "tb")


def test_sampling_never_drops_and_uses_the_trained_null(config, family):
    """Guidance pairs each caption's real encoding with the trained null, nothing else."""
    cfg = copy.deepcopy(config)
    cfg.dropout.groups.caption.rate = 1.0  # would drop everything if sampling applied dropout
    spy = Spy(family)
    groups = dropout.groups_from_config(cfg.dropout, spy.conditioners)
    spec = ts.StepSpec.from_config(cfg, groups, 16)
    tx, _ = ts.make_optimizer(cfg)
    params = jax.jit(functools.partial(ts.init_state, spy, spec, tx))()["params"]
    params["nulls"]["text"] = params["nulls"]["text"] + 1.0  # a null that differs from the empty encoding
    captions = ["a red circle on a blue background", "a green square on a white background"]
    images = sampling.sample_grid(spy, spec, params, spy.frozen, captions, [3.0], seed=0, steps=2)
    jax.effects_barrier()
    assert images.shape == (1, 2, 16, 16, 3) and images.dtype == jnp.uint8
    real = np.asarray(family.encode(family.frozen, jnp.asarray(family.tokenize(captions)))["text"])
    assert len(spy.seen) == 2  # the guided branch only, once per denoising step
    for seen in spy.seen:  # one per denoising step: row 2i caption i, row 2i + 1 its unconditional pair
        np.testing.assert_allclose(seen[0:4:2], real, atol=1e-5)  # later rows: padding copies
        assert (seen[1::2] == np.asarray(params["nulls"]["text"])).all()


# How a YNNPACK fusion shows in compiled HLO (the bare name would also match metadata,
# such as this test's own name in a stack frame).
YNN_FUSION = '"kind":"__ynn_fusion"'


def test_ynnpack_off_with_one_cpu_device_only(run_config, tmp_path):
    """`jaxcond.xla` turns XLA:CPU's YNNPACK fusions off in a process with one CPU device
    and keeps jax's defaults with several (this process has 8 simulated devices), for the
    step (`Run.jit_step`) and `xla.jit` (the sampler's and cache encoders' jit). jax's
    defaults make the fusions, so each pair of asserts can fail (e.g. a jax upgrade that
    makes the option a no-op)."""
    assert xla.options("cpu", 1) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    # Two devices too: there the option made XLA:CPU compute wrong rows (jaxcond/xla.py).
    assert xla.options("cpu", 2) == xla.options("cpu", 8) == xla.options("cpu") == xla.options("gpu", 1) == {}
    # run_config on one device: test_sharded_step_matches_one_device's program (compiled once).
    run = train_lib.build(run_config, str(tmp_path), devices=jax.devices()[:1])
    args = (run.initial_state(), run.frozen, run.put_batch(0))
    with_defaults = run.step_fn.lower(*args).compile()
    assert YNN_FUSION in with_defaults.as_text()
    with_option = run.jit_step(run.spec, compiler_options=xla.options("cpu", 1)).lower(*args).compile()
    assert YNN_FUSION not in with_option.as_text()
    # And it computes the same step: on two devices the option gave wrong rows, so the
    # one-device program it ships in is checked by its numbers, not only by its HLO.
    # (Step 0's learning rate is 0 in warm-up: the forward pass shows in the loss, the
    # backward pass in the gradient norm.) The executables above run: no second compile.
    (_, m0), (_, m1) = with_defaults(*args), with_option(run.initial_state(), *args[1:])
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, err_msg=k)
    # A process with one CPU device (jax's own default), end to end through xla.jit.
    code = (f"YNN_FUSION = {YNN_FUSION!r}; "
            "import jax, jax.numpy as jnp; from jaxcond import xla; "
            "f = xla.jit(lambda w, x: jnp.tanh(x @ w)); w = jnp.ones((64, 64)); "
            "print(jax.local_device_count(), YNN_FUSION in f.lower(w, w).compile().as_text())")
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"], out.stdout + out.stderr
    f = xla.jit(lambda w, x: jnp.tanh(x @ w))
    assert YNN_FUSION in f.lower(jnp.ones((64, 64)), jnp.ones((32, 64))).compile().as_text()

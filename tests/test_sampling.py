"""Schedulers (parity with diffusers' PyTorch schedulers on the same timesteps), negative
prompts, and `jaxcond sample`."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxcond import diffusion, dropout, export as export_lib, flow, sampling, sharding
from jaxcond.sample import sample as sample_run
from jaxcond.models.family import Family
from jaxcond.train_step import StepSpec

SCHEDULE = diffusion.Schedule(1000, "squaredcos_cap_v2", prediction_type="v_prediction")


class Toy(Family):
    """A fixed, t-dependent 'network' so the sampler's arithmetic can be checked exactly."""

    conditioners = {"text": (2,)}
    sample_shape = (3, 4, 4)
    trainable, frozen, latent = {"w": jnp.float32(0.7)}, {}, False

    def tokenize(self, captions):
        return np.array([[len(c), 1] for c in captions], np.int32)

    def overlong(self, captions):
        return np.zeros(len(captions), bool)  # tokenize keeps every caption whole

    def encode(self, params, tokens):
        return {"text": tokens.astype(jnp.float32) / 10}

    def denoise(self, trainable, x_t, t, cond):
        tt = (t.astype(jnp.float32) / 1000).reshape(-1, 1, 1, 1)
        return trainable["w"] * jnp.tanh(x_t) * jnp.cos(tt) + cond["text"][:, :1, None, None] * tt

    def images_to_x0(self, frozen, images):
        raise NotImplementedError

    def x0_to_images(self, frozen, x0):
        return x0  # floats, to compare the sampler's output itself

    def save(self, path, trainable):
        raise NotImplementedError


SPEC = StepSpec(seed=0, groups=(), nulls=(), global_batch=2, grad_accum=1, steps_per_epoch=1, schedule=SCHEDULE)


def _ours(scheduler, steps=10, seed=3):
    fam = Toy()
    out = sampling.sample(fam, SPEC, {"model": fam.trainable, "nulls": {}}, {}, fam.tokenize(["ab", "abcd"]),
                          jnp.array([1.0]), jnp.int32(seed), steps=steps, scheduler=scheduler, clip_x0=False)
    return np.asarray(out[0])


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++"])
def test_deterministic_schedulers_match_diffusers(name):
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  timestep_spacing="trailing")
    # DDIM as `jaxcond export` configures it for diffusers' pipelines.
    exported = export_lib.scheduler_config(dataclasses.asdict(SCHEDULE), clip_sample=False)
    sched = {"ddim": lambda: DDIMScheduler.from_config(exported),
             "euler": lambda: EulerDiscreteScheduler(**common, final_sigmas_type="zero"),
             "dpm++": lambda: DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                          final_sigmas_type="zero")}[name]()
    sched.set_timesteps(10)
    np.testing.assert_array_equal(sched.timesteps.numpy(), np.asarray(sampling.trailing_timesteps(1000, 10)))
    fam = Toy()
    cond = fam.encode({}, jnp.asarray(fam.tokenize(["ab", "abcd"])))
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 4))
    # Euler's sample lives in the sigma view (x / sqrt(alpha_bar)); the model sees x itself.
    xt = torch.from_numpy(np.array(x)) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = fam.denoise(fam.trainable, jnp.asarray(sched.scale_model_input(xt, t).numpy()), jnp.full((2,), int(t)),
                          cond)
        xt = sched.step(torch.from_numpy(np.array(out)), t, xt).prev_sample
    if name == "euler":
        # diffusers adds derivative * dt to a sample of size ~2e4 (sigma at t=999) in float32,
        # which loses ~6e-4; the same update over its sigmas in float64 is the reference.
        ref = _euler_float64(fam, cond, np.array(x, np.float64), sched)
        np.testing.assert_allclose(xt.numpy(), ref, atol=1e-3)
        np.testing.assert_allclose(_ours(name), ref, atol=2e-5)
    else:
        np.testing.assert_allclose(_ours(name), xt.numpy(), atol=2e-4)


FLOW_SPEC = dataclasses.replace(SPEC, flow=flow.FlowSpec(shift=3.0))


@pytest.mark.parametrize("mode", ["fixed", "resolution"])
def test_flow_sampler_matches_diffusers_flow_match_euler(mode):
    """A flow model samples as StableDiffusion3Pipeline (fixed shift) or FluxPipeline
    (resolution shift) do with the exported scheduler, CFG included (the Toy's float
    timesteps are sigma * 1000, as SD3's)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {"objective": "flow", "flow_shift": 3.0, "flow_shift_mode": mode, "flow_base_shift": 0.5,
           "flow_max_shift": 1.15}
    sched = FlowMatchEulerDiscreteScheduler.from_config(export_lib.scheduler_config(cfg, clip_sample=False))
    if mode == "fixed":
        sched.set_timesteps(8)
    else:  # FluxPipeline's call, for the Toy's 4 x 4 tokens
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=flow.resolution_mu(16))
    fam, g = Toy(), 4.0
    params = {"model": fam.trainable, "nulls": {}}
    tokens = fam.tokenize(["ab", "abcd"])
    cond = fam.encode({}, jnp.asarray(tokens))
    uncond = {"text": jnp.zeros_like(cond["text"])}  # a `zeros` null
    spec = dataclasses.replace(FLOW_SPEC, groups=(dropout.Group("caption", ("text",), 0.1),), nulls=(("text", "zeros"),),
                               flow=flow.FlowSpec(shift=3.0, shift_mode=mode))
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 4))
    xt = torch.from_numpy(np.array(x))
    for t in sched.timesteps:
        tt = jnp.full((2,), float(t))
        c, u = (np.asarray(fam.denoise(fam.trainable, jnp.asarray(xt.numpy()), tt, k)) for k in (cond, uncond))
        xt = sched.step(torch.from_numpy(u + g * (c - u)), t, xt).prev_sample
    ours = sampling.sample(fam, spec, params, {}, tokens, jnp.array([g]), jnp.int32(3), steps=8, scheduler="euler",
                           clip_x0=False)
    np.testing.assert_allclose(np.asarray(ours[0]), xt.numpy(), atol=2e-5)


def test_flow_sampler_reaches_x0_with_the_true_velocity():
    """Straight paths: with the exact velocity (x - x0) / sigma, Euler lands on x0 at any step count."""
    target = jnp.linspace(-1, 1, 48).reshape(3, 4, 4)

    class Oracle(Toy):
        def denoise(self, trainable, x_t, t, cond):
            return (x_t - target) / (t.astype(jnp.float32) / 1000).reshape(-1, 1, 1, 1)

    fam = Oracle()
    for steps in (1, 3, 20):
        out = sampling.sample(fam, FLOW_SPEC, {"model": fam.trainable, "nulls": {}}, {}, fam.tokenize(["a", "b"]),
                              jnp.array([1.0]), jnp.int32(0), steps=steps, scheduler="euler", clip_x0=False)
        np.testing.assert_allclose(np.asarray(out[0]), np.broadcast_to(target, (2, 3, 4, 4)), atol=1e-5)
    with pytest.raises(ValueError, match="euler"):
        sampling.sample(fam, FLOW_SPEC, {"model": fam.trainable, "nulls": {}}, {}, fam.tokenize(["a"]),
                        jnp.array([1.0]), jnp.int32(0), steps=2, scheduler="ddim")


def _euler_float64(fam, cond, x, sched):
    """EulerDiscreteScheduler.step's v-prediction update, in float64 (the model in float32)."""
    sig = sched.sigmas.double().numpy()
    xv = x * np.sqrt(sig[0] ** 2 + 1)
    for i, t in enumerate(sched.timesteps):
        scale = np.sqrt(sig[i] ** 2 + 1)
        v = np.asarray(fam.denoise(fam.trainable, jnp.asarray(xv / scale, jnp.float32), jnp.full((2,), int(t)), cond))
        x0 = -v * sig[i] / scale + xv / scale**2
        xv = xv + (xv - x0) / sig[i] * (sig[i + 1] - sig[i])
    return xv


def test_euler_is_ddim_written_in_sigma():
    """Same grid, same model: Euler's and DDIM's samples differ by float rounding only."""
    np.testing.assert_allclose(_ours("euler", steps=25), _ours("ddim", steps=25), atol=1e-5)


def test_euler_ancestral_is_seeded_and_lands_on_the_model_x0():
    a, b, c = _ours("euler_a", seed=3), _ours("euler_a", seed=3), _ours("euler_a", seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, _ours("ddim", seed=3))
    # An oracle network that always predicts the same x0 makes every scheduler end on it.
    target = jax.random.uniform(jax.random.key(9), (2, 3, 4, 4), minval=-1, maxval=1)
    acp = jnp.asarray(SCHEDULE.alphas_cumprod)

    class Oracle(Toy):
        def denoise(self, trainable, x_t, t, cond):
            # Each row's x0 is that of its caption ("ab" -> 0, "abcd" -> 1), in either branch
            # and whatever order the sampler batches rows in.
            row = jnp.round(cond["text"][:, 0] * 5).astype(jnp.int32) - 1
            a, x0 = acp[t].reshape(-1, 1, 1, 1), target[row]
            eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
            return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

    fam = Oracle()
    for name in sampling.SCHEDULERS:
        out = sampling.sample(fam, SPEC, {"model": fam.trainable, "nulls": {}}, {}, fam.tokenize(["ab", "abcd"]),
                              jnp.array([1.0]), jnp.int32(0), steps=7, scheduler=name, clip_x0=False)
        np.testing.assert_allclose(np.asarray(out[0]), target, atol=1e-4, err_msg=name)


def _demo_spec_and_params(config, family):
    """The tiny demo model's step spec and initial params, learned nulls pushed far from
    any caption so that the two branches differ visibly."""
    from jaxcond.train_step import StepSpec as Spec, init_state, make_optimizer

    spec = Spec.from_config(config, dropout.groups_from_config(config.dropout, family.conditioners, family.batch_conditioners), 1)
    state = init_state(family, spec, make_optimizer(config)[0])
    return spec, {**state["params"], "nulls": jax.tree.map(lambda x: x + 3.0, state["params"]["nulls"])}


def test_negative_prompt_replaces_the_null_in_the_unconditional_branch(config, family):
    spec, params = _demo_spec_and_params(config, family)
    args = (family, spec, params, family.frozen, ["a red circle on a blue background"], [0.0], 1, 3)
    null, again = np.asarray(sampling.sample_grid(*args)), np.asarray(sampling.sample_grid(*args))
    neg = np.asarray(sampling.sample_grid(*args, negative=["a green square on a white background"]))
    np.testing.assert_array_equal(null, again)
    assert not np.array_equal(null, neg)  # guidance 0 = the unconditional branch alone


def test_scales_zero_and_one_evaluate_one_branch(config, family):
    """Scale 0 is the unconditional branch alone, 1 the conditional one (the sampler then
    skips the other branch): swapping prompt and negative prompt swaps the two exactly."""
    spec, params = _demo_spec_and_params(config, family)
    a, b = ["a red circle on a blue background"], ["a green square on a white background"]
    args = (family, spec, params, family.frozen)
    ab = np.asarray(sampling.sample_grid(*args, a, [0.0, 1.0, 3.0], 1, 3, negative=b))
    ba = np.asarray(sampling.sample_grid(*args, b, [0.0, 1.0, 3.0], 1, 3, negative=a))
    np.testing.assert_array_equal(ab[0], ba[1])
    np.testing.assert_array_equal(ab[1], ba[0])
    assert not np.array_equal(ab[0], ab[1])
    assert not np.array_equal(ab[2], ba[2])


def test_samples_do_not_depend_on_the_device_count(config, family):
    """One device, 8 on the data axis, and 4 x 2 with fsdp-sharded weights (as a training
    mesh would hold them); 3 samples pad to 8 rows. euler_a also draws noise every step."""
    spec, params = _demo_spec_and_params(config, family)
    captions = ["a red circle on a blue background", "a green square on a black background",
                "a white triangle on a red background"]

    def grid(shape, devices, weights=params):
        mesh = sharding.make_mesh(shape, devices)
        return sampling.sample_grid(family, spec, weights, family.frozen, captions, [0.0, 3.0], 7, 3, "euler_a",
                                    mesh=mesh)

    one = grid({"data": 1, "fsdp": 1}, jax.devices()[:1])
    assert one.shape == (2, 3, 16, 16, 3) and one.dtype == np.uint8
    fsdp = sharding.make_mesh({"data": 4, "fsdp": 2})
    for other in (grid({"data": 8, "fsdp": 1}, jax.devices()),
                  grid({"data": 4, "fsdp": 2}, jax.devices(),
                       jax.device_put(params, sharding.param_shardings(fsdp, params, min_size=512)))):
        # Same noise, same arithmetic; only rounding differs (XLA's kernels for another
        # per-device batch, fsdp's split sums), which moves a rare pixel across a uint8 step.
        np.testing.assert_allclose(other.astype(int), one, atol=1)
        assert (other != one).mean() < 0.01


def test_sample_command_writes_a_labelled_grid(reference_run, tmp_path):
    run = reference_run.workdir  # only read: the grids go to tmp_path
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "jaxcond.cli", "sample", "--run", str(run),
           "--prompt", "a red circle on a blue background", "--prompt", "a green square on a black background",
           "--guidance", "1,3", "--steps", "3", "--seed", "5", "--scheduler", "dpm++", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "read only" not in r.stderr  # Orbax's notices about the read-only manager it was asked for
    first = np.asarray(Image.open(out))
    assert first.shape[0] > 2 * 16 * 4 and first.shape[1] > 2 * 16 * 4  # 2x2 tiles at 4x, plus labels
    again = sample_run(str(run), ["a red circle on a blue background", "a green square on a black background"],
                       [1.0, 3.0], steps=3, seed=5, scheduler="dpm++", out=str(tmp_path / "again.png"))
    np.testing.assert_array_equal(first, np.asarray(Image.open(again)))  # deterministic from the seed
    for flag, value, message in (("--scheduler", "heun", "--scheduler 'heun': use one of"),
                                 ("--guidance", "1,a", "--guidance '1,a' must be numbers"),
                                 ("--out", "grid.jpg", "--out grid.jpg: the grid is written as a PNG"),
                                 ("--out", str(out / "x.png"), f"--out's folder '{out}' is a file, not a folder")):
        bad = subprocess.run(cmd[:6] + ["--prompt", "x", flag, value], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


def test_sampling_without_a_group_feeds_its_null_to_both_branches():
    """Without the only group, every guidance scale samples what the unconditional branch
    alone does; a group the run lacks (or never dropped) is refused by name."""
    fam = Toy()
    spec = dataclasses.replace(SPEC, groups=(dropout.Group("caption", ("text",), 0.1), dropout.Group("never", (), 0.0)),
                               nulls=(("text", "zeros"),))
    params, tokens = {"model": fam.trainable, "nulls": {}}, fam.tokenize(["ab", "abcd"])

    def run(g, drop=()):
        return np.asarray(sampling.sample(fam, spec, params, {}, tokens, jnp.array([g]), jnp.int32(3), steps=4,
                                          scheduler="ddim", clip_x0=False, drop=drop))

    np.testing.assert_array_equal(run(3.0, ("caption",)), run(0.0))
    assert not np.array_equal(run(3.0), run(0.0))
    for bad in (("t5",), ("never",)):
        with pytest.raises(ValueError, match="cannot sample without"):
            run(1.0, bad)

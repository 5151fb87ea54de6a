"""The rectified-flow pieces agree with diffusers' SD3 scheduler and training utilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcond import flow


@pytest.mark.parametrize("num_steps,shift", [(1, 3.0), (4, 1.0), (28, 3.0), (50, 3.0), (20, 6.0)])
def test_schedule_matches_diffusers(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    theirs.set_timesteps(num_steps)
    sigmas, timesteps = flow.schedule(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,)
    assert sigmas.dtype == np.float32 and sigmas[-1] == 0.0 and sigmas[0] == 1.0
    np.testing.assert_allclose(sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=1e-4)


def test_euler_loop_matches_diffusers_step_for_step():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32) / 4
    b = rng.standard_normal(16).astype(np.float32)
    x0 = rng.standard_normal((2, 16)).astype(np.float32)

    def velocity(x, t):  # A fixed "model" that uses both the sample and the timestep.
        return x @ w + b * (t / 1000.0)

    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(12)
    sigmas, timesteps = flow.schedule(12, 3.0)
    ours, ref = jnp.asarray(x0), torch.from_numpy(x0)
    for i, t in enumerate(theirs.timesteps):
        assert float(t) == pytest.approx(float(timesteps[i]), rel=1e-6)
        ref = theirs.step(torch.from_numpy(velocity(ref.numpy(), float(t))), t, ref).prev_sample
        ours = flow.euler_step(ours, velocity(np.asarray(ours), timesteps[i]), sigmas[i], sigmas[i + 1])
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_noisy_and_target_match_training_script():
    # examples/dreambooth/train_dreambooth_sd3.py: noisy_model_input = (1 - sigmas) * model_input
    # + sigmas * noise, sigmas broadcast from (batch,); target = noise - model_input.
    import torch

    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    sigmas = np.array([0.1, 0.5, 0.97], np.float32)
    tx, tn, ts = map(torch.from_numpy, (x0, noise, sigmas))
    ts4 = ts.reshape(3, 1, 1, 1)
    np.testing.assert_allclose(flow.noisy(x0, noise, sigmas), ((1.0 - ts4) * tx + ts4 * tn).numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(flow.target(x0, noise), (tn - tx).numpy())
    np.testing.assert_allclose(flow.model_timesteps(sigmas), sigmas * 1000, rtol=1e-6)
    # The end points: data at sigma 0, noise at sigma 1.
    np.testing.assert_allclose(flow.noisy(x0, noise, np.zeros(3, np.float32)), x0)
    np.testing.assert_allclose(flow.noisy(x0, noise, np.ones(3, np.float32)), noise)


@pytest.mark.parametrize("scheme", flow.SAMPLING_SCHEMES)
def test_sample_sigmas_range_and_determinism(scheme):
    key = jax.random.key(7)
    s = flow.sample_sigmas(key, 4096, scheme)
    assert s.shape == (4096,)
    assert float(s.min()) > 0.0 and float(s.max()) <= 1.0
    np.testing.assert_array_equal(s, flow.sample_sigmas(key, 4096, scheme))
    assert not np.array_equal(s, flow.sample_sigmas(jax.random.key(8), 4096, scheme))


def test_sample_sigmas_applies_the_shift_to_the_density():
    key = jax.random.key(3)
    for scheme in flow.SAMPLING_SCHEMES:
        u = flow.sample_sigmas(key, 1000, scheme, shift=1.0)
        np.testing.assert_allclose(flow.sample_sigmas(key, 1000, scheme, shift=3.0), 3 * u / (1 + 2 * u),
                                   rtol=1e-6)
    # And the same shift as the scheduler applies to its training grid.
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas.numpy()
    np.testing.assert_allclose(flow.shift_sigmas(grid, 3.0), FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.7, 0.5), (-1.0, 1.5)])
def test_logit_normal_density(mean, std):
    u = np.asarray(flow.sample_sigmas(jax.random.key(0), 100_000, "logit_normal", mean, std, shift=1.0),
                   np.float64)
    logit = np.log(u) - np.log1p(-u)
    assert abs(logit.mean() - mean) < 0.03 and abs(logit.std() - std) < 0.03


def test_uniform_and_mode_match_diffusers_density():
    # Same laws as compute_density_for_timestep_sampling (compared by quantiles: different bits).
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(0)
    q = np.linspace(0.05, 0.95, 19)
    for scheme in ("uniform", "mode"):
        theirs = compute_density_for_timestep_sampling(scheme, 100_000, 0.0, 1.0, 1.29, generator=g).numpy()
        ours = np.asarray(flow.sample_sigmas(jax.random.key(1), 100_000, scheme, shift=1.0))
        np.testing.assert_allclose(np.quantile(ours, q), np.quantile(theirs, q), atol=0.01)


def test_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="sampling scheme"):
        flow.sample_sigmas(jax.random.key(0), 2, "cosine")
    with pytest.raises(ValueError, match="weighting scheme"):
        flow.loss_weights(jnp.ones(2), "snr")


@pytest.mark.parametrize("scheme", flow.WEIGHTING_SCHEMES)
def test_loss_weights_match_diffusers(scheme):
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = np.array(flow.sample_sigmas(jax.random.key(2), 256, "logit_normal"))
    theirs = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    np.testing.assert_allclose(np.asarray(flow.loss_weights(jnp.asarray(sigmas), scheme)), theirs, rtol=1e-6)


def _spec(**flow_fields):
    from jaxcond import diffusion, dropout, train_step

    group = dropout.Group("caption", ("text",), 0.3)
    return train_step.StepSpec(seed=11, groups=(group,), nulls=(("text", "zeros"),), global_batch=64, grad_accum=1,
                               steps_per_epoch=10, schedule=diffusion.Schedule(1000, "squaredcos_cap_v2"),
                               **flow_fields)


def test_the_flow_objective_changes_timesteps_only():
    """Same masks and noise as a DDPM run of the same seed; sigmas from the timestep sub-stream."""
    from jaxcond import rng, train_step

    spec = flow.FlowSpec(shift=3.0, sampling="logit_normal")
    for step in (0, 7):
        ddpm = train_step.step_randomness(_spec(), jnp.int32(step), (64, 3, 4, 4))
        ours = train_step.step_randomness(_spec(flow=spec), jnp.int32(step), (64, 3, 4, 4))
        np.testing.assert_array_equal(ours["masks"]["caption"], ddpm["masks"]["caption"])
        np.testing.assert_array_equal(ours["noise"], ddpm["noise"])
        with rng.derivation():
            want = flow.sample_sigmas(rng.stream_key(11, jnp.int32(step), rng.STREAM_TIMESTEP), 64, "logit_normal")
        np.testing.assert_array_equal(ours["t"], want)
        assert ours["t"].dtype == jnp.float32 and bool(jnp.all((ours["t"] > 0) & (ours["t"] <= 1)))


def test_a_flow_run_trains_samples_and_exports_a_flow_scheduler(tmp_path):
    """The demo's UNet trained with the flow objective: finite, falling losses; `jaxcond
    sample` integrates the flow; export names FlowMatchEulerDiscreteScheduler."""
    import json

    from conftest import tiny_config
    from jaxcond import config as config_lib, export, train as train_lib
    from jaxcond.sample import sample
    from jaxcond.checks import ConfigError

    cfg = tiny_config()
    cfg.diffusion.objective, cfg.diffusion.snr_gamma, cfg.sample.scheduler = "flow", 0.0, "euler"
    cfg.train.steps, cfg.optim.lr = 24, 3e-3
    config_lib.validate(cfg, None, reads_data=False)
    out = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    grid = sample(str(tmp_path / "run"), ["red circle"], [1.0, 3.0], steps=4, out=str(tmp_path / "g.png"))
    assert grid.endswith("g.png")
    with pytest.raises(ConfigError, match="euler"):
        sample(str(tmp_path / "run"), ["red circle"], [1.0], steps=4, scheduler="ddim", out=str(tmp_path / "h.png"))
    export.export(str(tmp_path / "run"), str(tmp_path / "out"))
    sched = json.load(open(tmp_path / "out" / "scheduler" / "scheduler_config.json"))
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
    assert json.load(open(tmp_path / "out" / "jaxcond.json"))["prediction_type"] == "flow"


@pytest.mark.parametrize("field,value,words", [
    ("objective", "edm", "diffusion.objective"), ("flow_shift", 0.0, "diffusion.flow_shift"),
    ("flow_timestep_sampling", "beta", "diffusion.flow_timestep_sampling"),
    ("flow_weighting", "snr", "diffusion.flow_weighting"), ("snr_gamma", 5.0, "min-SNR"),
])
def test_bad_flow_fields_are_refused_in_one_line(field, value, words):
    from conftest import tiny_config
    from jaxcond import config as config_lib
    from jaxcond.checks import ConfigError

    cfg = tiny_config()
    cfg.diffusion.objective, cfg.diffusion.snr_gamma, cfg.sample.scheduler = "flow", 0.0, "euler"
    cfg.diffusion[field] = value
    with pytest.raises(ConfigError, match=words) as e:
        config_lib.validate(cfg, None, reads_data=False)
    assert "\n" not in str(e.value)
    cfg = tiny_config()
    cfg.diffusion.objective = "flow"  # and the demo's sample.scheduler ddim
    cfg.diffusion.snr_gamma = 0.0
    with pytest.raises(ConfigError, match="sample.scheduler"):
        config_lib.validate(cfg, None, reads_data=False)


@pytest.mark.parametrize("num_steps,tokens", [(1, 256), (4, 1024), (28, 4096), (50, 64 * 64)])
def test_resolution_schedule_matches_flux_pipeline_and_scheduler(num_steps, tokens):
    """Flux: FluxPipeline's linspace(1, 1/n) sigmas and calculate_shift's mu through the
    exported scheduler's exponential time shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from jaxcond import export

    cfg = {"objective": "flow", "flow_shift": 3.0, "flow_shift_mode": "resolution", "flow_base_shift": 0.5,
           "flow_max_shift": 1.15}
    theirs = FlowMatchEulerDiscreteScheduler.from_config(export.scheduler_config(cfg, clip_sample=False))
    assert theirs.config.use_dynamic_shifting
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert flow.resolution_mu(tokens) == pytest.approx(mu, rel=1e-12)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    spec = flow.FlowSpec(shift_mode="resolution")
    sigmas, timesteps = spec.sampling_schedule(num_steps, tokens)
    np.testing.assert_allclose(sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    # Training draws the same curve: u from the density, then the time shift of that many tokens.
    key = jax.random.key(5)
    u = flow.sample_sigmas(key, 512, "logit_normal", shift=1.0)
    want = theirs.time_shift(mu, 1.0, np.asarray(u, np.float64))
    np.testing.assert_allclose(spec.sigmas(key, 512, tokens), want, rtol=1e-5)
    assert float(spec.sigmas(key, 512, 4096).mean()) > float(spec.sigmas(key, 512, 256).mean())  # bigger: noisier

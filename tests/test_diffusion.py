"""The DDPM pieces agree with diffusers' schedulers (so trained models sample correctly there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcond import diffusion


@pytest.mark.parametrize("beta_schedule", diffusion.BETA_SCHEDULES)
def test_alphas_cumprod_match_diffusers(beta_schedule):
    from diffusers import FlaxDDPMScheduler

    sched = diffusion.Schedule(1000, beta_schedule, 0.00085, 0.012)
    theirs = FlaxDDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                               beta_start=0.00085, beta_end=0.012).create_state()
    np.testing.assert_allclose(sched.alphas_cumprod, np.asarray(theirs.common.alphas_cumprod), rtol=2e-5, atol=1e-7)


def test_noise_velocity_and_inversion_match_diffusers():
    from diffusers.schedulers.scheduling_utils_flax import add_noise_common, get_velocity_common, CommonSchedulerState
    from diffusers import FlaxDDPMScheduler

    sched = diffusion.Schedule(1000, "scaled_linear", 0.00085, 0.012)
    common = FlaxDDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012).create_state().common
    assert isinstance(common, CommonSchedulerState)
    acp = jnp.asarray(sched.alphas_cumprod)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0, noise = jax.random.normal(k1, (4, 3, 8, 8)), jax.random.normal(k2, (4, 3, 8, 8))
    t = jnp.array([0, 10, 500, 999])
    x_t = diffusion.add_noise(acp, x0, noise, t)
    np.testing.assert_allclose(x_t, add_noise_common(common, x0, noise, t), atol=1e-5)
    v = diffusion.target("v_prediction", acp, x0, noise, t)
    np.testing.assert_allclose(v, get_velocity_common(common, x0, noise, t), atol=1e-5)
    assert diffusion.target("epsilon", acp, x0, noise, t) is noise
    for kind, out in (("v_prediction", v), ("epsilon", noise)):
        eps, x0_hat = diffusion.to_epsilon_and_x0(kind, acp, x_t, out, t)
        np.testing.assert_allclose(eps[:3], noise[:3], atol=2e-3)
        np.testing.assert_allclose(x0_hat[:3], x0[:3], atol=2e-3)


def test_min_snr_weights():
    acp = jnp.asarray(diffusion.Schedule().alphas_cumprod)
    t = jnp.array([0, 999])
    snr = acp[t] / (1 - acp[t])
    np.testing.assert_allclose(diffusion.min_snr_weight("epsilon", acp, t, 5.0), jnp.minimum(snr, 5) / snr, rtol=1e-6)
    np.testing.assert_allclose(diffusion.min_snr_weight("v_prediction", acp, t, 5.0),
                               jnp.minimum(snr, 5) / (snr + 1), rtol=1e-6)
    assert (diffusion.min_snr_weight("epsilon", acp, t, 0.0) == 1).all()

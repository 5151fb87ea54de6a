"""Rectified flow (flow matching) as Stable Diffusion 3 trains and samples it (pure functions).

The straight path from data to noise, x_sigma = (1 - sigma) x0 + sigma noise for sigma
in [0, 1], and a network that predicts its velocity d x_sigma / d sigma = noise - x0.
Same conventions as diffusers (FlowMatchEulerDiscreteScheduler, the SD3 training
scripts and `diffusers.training_utils`), so a model trained here samples correctly with
their pipelines: the network's timestep input is sigma * 1000, and sampling integrates
from sigma = 1 (pure noise) down to 0 with Euler steps.

Not a `diffusion.py` variant: there is no alphas_cumprod and no integer timestep grid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcond.checks import check, one_of

SAMPLING_SCHEMES = ("logit_normal", "mode", "uniform")
# fixed: SD3's shift; resolution: Flux's, growing with the image's token count (`resolution_mu`).
SHIFT_MODES = ("fixed", "resolution")
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096  # Flux's scheduler: tokens at which mu is base_shift / max_shift
WEIGHTING_SCHEMES = ("sigma_sqrt", "cosmap", "none")
NUM_TRAIN_TIMESTEPS = 1000  # Scales sigma into the timestep input; the scheduler grid's size.
DEFAULT_SHIFT = 3.0  # SD3's scheduler_config.


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """The training objective's settings (part of the compiled step, `StepSpec.flow`)."""

    shift: float = DEFAULT_SHIFT
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    shift_mode: str = "fixed"
    base_shift: float = 0.5
    max_shift: float = 1.15

    @staticmethod
    def from_config(d: ml_collections.ConfigDict) -> FlowSpec | None:
        """`config.diffusion`'s flow fields; None for the DDPM objective."""
        if d.get("objective", "ddpm") != "flow":
            return None
        return FlowSpec(shift=float(d.flow_shift), sampling=d.flow_timestep_sampling,
                        logit_mean=float(d.flow_logit_mean), logit_std=float(d.flow_logit_std),
                        mode_scale=float(d.flow_mode_scale), weighting=d.flow_weighting,
                        # (.get: runs saved before Flux's shift existed used SD3's.)
                        shift_mode=d.get("flow_shift_mode", "fixed"), base_shift=float(d.get("flow_base_shift", 0.5)),
                        max_shift=float(d.get("flow_max_shift", 1.15)))

    def mu(self, tokens: int) -> float | None:
        """The resolution shift's mu for images of `tokens` tokens; None for the fixed shift."""
        return None if self.shift_mode == "fixed" else resolution_mu(tokens, self.base_shift, self.max_shift)

    def sigmas(self, key: jax.Array, batch: int, tokens: int) -> jax.Array:
        """Training sigmas of one batch of images of `tokens` tokens each."""
        u = _density(key, batch, self.sampling, self.logit_mean, self.logit_std, self.mode_scale)
        mu = self.mu(tokens)
        return shift_sigmas(u, self.shift) if mu is None else time_shift(u, mu)

    def sampling_schedule(self, num_steps: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """`schedule` for images of `tokens` tokens."""
        return schedule(num_steps, self.shift, mu=self.mu(tokens))


def validate(d: ml_collections.ConfigDict) -> None:
    """Checks the flow fields of `config.diffusion` (`d`)."""
    check(d.flow_shift > 0, "diffusion.flow_shift", d.flow_shift, "must be > 0 (1 = no shift; SD3 uses 3.0)")
    one_of("diffusion.flow_timestep_sampling", d.flow_timestep_sampling, SAMPLING_SCHEMES)
    check(d.flow_logit_std > 0, "diffusion.flow_logit_std", d.flow_logit_std, "must be > 0")
    # Above ~1.75 the `mode` density is no longer monotone and leaves (0, 1].
    check(0 <= d.flow_mode_scale <= 1.75, "diffusion.flow_mode_scale", d.flow_mode_scale,
          "must be in [0, 1.75] (SD3 uses 1.29)")
    one_of("diffusion.flow_weighting", d.flow_weighting, WEIGHTING_SCHEMES)
    one_of("diffusion.flow_shift_mode", d.flow_shift_mode, SHIFT_MODES)
    check(0 <= d.flow_base_shift <= d.flow_max_shift, "diffusion.flow_base_shift", d.flow_base_shift,
          f"must be in [0, diffusion.flow_max_shift = {d.flow_max_shift}] (Flux: 0.5 and 1.15)")


# Training.

def noisy(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_sigma = (1 - sigma) x0 + sigma noise; `sigma` is per example (or a scalar)."""
    s = _bcast(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity the network learns: d x_sigma / d sigma, the same at every sigma."""
    return noise - x0


def model_timesteps(sigmas: jax.Array, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """The network's timestep input: SD3 pipelines feed sigma * 1000, not an index."""
    return jnp.asarray(sigmas) * num_train_timesteps


def shift_sigmas(sigmas: jax.Array, shift: float) -> jax.Array:
    """SD3's resolution shift: more time at high noise for shift > 1; fixes 0 and 1."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def resolution_mu(tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's mu: linear in the image's token count, base_shift at 256 tokens and
    max_shift at 4096 (FluxPipeline's `calculate_shift`)."""
    m = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return tokens * m + base_shift - m * BASE_SEQ_LEN


def time_shift(sigmas: jax.Array, mu: float) -> jax.Array:
    """Flux's exponential time shift (FlowMatchEulerDiscreteScheduler's use_dynamic_shifting):
    the curve of `shift_sigmas` with shift = exp(mu); fixes 0 and 1."""
    e = float(np.exp(mu))
    return e / (e + (1.0 / sigmas - 1.0))


def _density(key: jax.Array, batch: int, scheme: str, logit_mean: float, logit_std: float,
             mode_scale: float) -> jax.Array:
    """u in (0, 1], drawn as diffusers' `compute_density_for_timestep_sampling` draws it."""
    if scheme == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
    r = jax.random.uniform(key, (batch,))  # [0, 1)
    if scheme == "mode":
        # Decreasing in r for mode_scale < ~1.75 (SD3 uses 1.29), so r in [0, 1) gives u in (0, 1].
        return 1.0 - r - mode_scale * (jnp.cos(jnp.pi * r / 2.0) ** 2 - 1.0 + r)
    if scheme == "uniform":
        return 1.0 - r  # Same law as r, but never 0: sigma = 0 has an infinite sigma_sqrt weight.
    raise ValueError(f"unknown timestep sampling scheme {scheme!r}; use one of {SAMPLING_SCHEMES}")


def sample_sigmas(key: jax.Array, batch: int, scheme: str, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29,
                  shift: float = DEFAULT_SHIFT) -> jax.Array:
    """Per-example training sigmas, shape (batch,), in (0, 1].

    u comes from the SD3 density (`scheme`) and is the unshifted sigma, as in the SD3
    paper (t = sigmoid(N(logit_mean, logit_std)) is the noise level), then gets the
    scheduler's shift. diffusers' SD3 scripts instead look u up on the scheduler's
    descending grid, `scheduler.timesteps[(u * 1000).long()]`, i.e. sigma = shift(1 - k /
    1000) for k = floor(1000 u): quantized to 1/1000 and reversed in u. We use u itself,
    continuously. The uniform and mode densities are symmetric about 1/2 and logit_normal
    is too at logit_mean = 0, so there the two laws agree up to the quantization; at
    logit_mean != 0 ours follows the paper (a positive mean means more noise).
    """
    u = _density(key, batch, scheme, logit_mean, logit_std, mode_scale)
    return shift_sigmas(u, shift)


def loss_weights(sigmas: jax.Array, scheme: str) -> jax.Array:
    """Per-example loss weights, as diffusers' `compute_loss_weighting_for_sd3`."""
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    if scheme == "none":
        return jnp.ones_like(sigmas)
    raise ValueError(f"unknown loss weighting scheme {scheme!r}; use one of {WEIGHTING_SCHEMES}")


# Sampling.

def schedule(num_steps: int, shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
             mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) of an Euler sampler, as FlowMatchEulerDiscreteScheduler's set_timesteps.

    sigmas has num_steps + 1 float32 entries, from 1 down to a final 0; timesteps (the
    network's input at each step) has num_steps, sigma * num_train_timesteps.

    With `mu` (Flux), as FluxPipeline calls it: linspace(1, 1/num_steps) through the
    exponential `time_shift`. Without (SD3), diffusers shifts twice, and we keep that so
    samples match theirs: the end points of the linspace are sigma_max and sigma_min of the
    *shifted* training grid (computed in float32, as their constructor does), and the points
    in between are shifted again.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps!r}: must be >= 1")
    n = num_train_timesteps
    if mu is not None:
        unshifted = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        sigmas = np.asarray(time_shift(unshifted, mu), np.float32)
    else:
        train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        train = np.float32(shift) * train / (np.float32(1) + np.float32(shift - 1) * train)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        ts = np.linspace(sigma_max * n, sigma_min * n, num_steps)  # float64, as theirs
        sigmas = (shift_sigmas(ts / n, shift)).astype(np.float32)
    timesteps = sigmas * np.float32(n)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def euler_step(x: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Euler step of dx/dsigma = velocity from sigma to sigma_next (< sigma)."""
    return x + (sigma_next - sigma) * velocity

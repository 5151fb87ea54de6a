"""DDPM noise schedule and the training objective's pieces (pure functions).

Same conventions as diffusers' schedulers, so a model trained here samples correctly
with their pipelines: `alphas_cumprod[t]` for integer t in [0, num_train_timesteps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcond import flow
from jaxcond.checks import check, int_at_least, one_of

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# ddpm: the noise schedule below (Stable Diffusion 1.x/2.x, SDXL); flow: rectified flow (SD3, `jaxcond.flow`).
OBJECTIVES = ("ddpm", "flow")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Static description of the forward process; `alphas_cumprod` is derived."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"

    @property
    def alphas_cumprod(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        elif self.beta_schedule == "squaredcos_cap_v2":
            f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
            ts = np.arange(n, dtype=np.float64)
            betas = np.minimum(1 - f((ts + 1) / n) / f(ts / n), 0.999)
        else:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; use one of {BETA_SCHEDULES}")
        return np.cumprod(1.0 - betas).astype(np.float32)


def validate(d: ml_collections.ConfigDict) -> None:
    """Checks `config.diffusion` (`d`)."""
    # (.get: runs saved before flow matching existed trained DDPM.)
    one_of("diffusion.objective", d.get("objective", "ddpm"), OBJECTIVES)
    check(d.noise_offset >= 0, "diffusion.noise_offset", d.noise_offset, "must be >= 0")
    if d.get("objective", "ddpm") == "flow":
        flow.validate(d)
        check(d.snr_gamma == 0, "diffusion.snr_gamma", d.snr_gamma,
              "is DDPM's min-SNR weighting: set 0 with objective 'flow' (its weights: diffusion.flow_weighting)")
        return
    int_at_least("diffusion.num_train_timesteps", d.num_train_timesteps, 2)
    one_of("diffusion.beta_schedule", d.beta_schedule, BETA_SCHEDULES)
    one_of("diffusion.prediction_type", d.prediction_type, PREDICTION_TYPES)
    check(d.snr_gamma >= 0, "diffusion.snr_gamma", d.snr_gamma, "must be >= 0 (0 turns it off)")


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def add_noise(acp: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise."""
    a = _bcast(acp[t], x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def target(prediction_type: str, acp: jax.Array, x0: jax.Array, noise: jax.Array,
           t: jax.Array) -> jax.Array:
    """What the network learns to predict."""
    if prediction_type == "epsilon":
        return noise
    a = _bcast(acp[t], x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0  # v = alpha eps - sigma x0


def to_epsilon_and_x0(prediction_type: str, acp: jax.Array, x_t: jax.Array,
                      out: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Converts a network output to (eps, x0) estimates; used by samplers."""
    a = _bcast(acp[t], x_t)
    sa, s1a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x_t - s1a * eps) / sa
    else:
        x0 = sa * x_t - s1a * out
        eps = sa * out + s1a * x_t
    return eps, x0


def min_snr_weight(prediction_type: str, acp: jax.Array, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023); ones when gamma <= 0."""
    snr = acp[t] / (1.0 - acp[t])
    if gamma <= 0:
        return jnp.ones_like(snr)
    clipped = jnp.minimum(snr, gamma)
    # For v-prediction the MSE already carries a factor (snr + 1) relative to epsilon.
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr

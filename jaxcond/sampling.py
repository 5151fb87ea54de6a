"""Sampling with classifier-free guidance; the unconditional branch uses the trained nulls.

Never applies dropout: the conditional branch sees the real caption encodings, the
unconditional branch has every conditioner of every dropout group replaced by its
null, exactly the substitution a dropped training example got.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxcond import diffusion, dropout
from jaxcond.models.family import Family, Params
from jaxcond.train_step import StepSpec, empty_tokens


def unconditional(family: Family, spec: StepSpec, params: Params, frozen: Params,
                  cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`cond` with all dropout groups dropped for every example."""
    empty = family.encode(frozen, jnp.asarray(empty_tokens(family)))
    nulls = dropout.null_values(dict(spec.nulls), empty, params["nulls"])
    b = next(iter(cond.values())).shape[0]
    everything = {g.name: jnp.ones((b,), bool) for g in spec.groups}
    return dropout.apply(cond, nulls, everything, spec.groups)


def ddim_timesteps(num_train: int, steps: int) -> jnp.ndarray:
    """'trailing' spacing: starts at the last training timestep (where v-prediction matters)."""
    return jnp.round(jnp.arange(num_train, 0, -num_train / steps)).astype(jnp.int32) - 1


@functools.partial(jax.jit, static_argnames=("family", "spec", "steps", "clip_x0"))
def sample(family: Family, spec: StepSpec, params: Params, frozen: Params, tokens: jax.Array,
           guidance: jax.Array, seed: jax.Array, steps: int = 50, clip_x0: bool = True) -> jax.Array:
    """DDIM (eta=0) samples as uint8 images, one per row of `tokens`, per guidance scale.

    `guidance` is a float array [G]; returns [G, N, H, W, 3]. Scale 1 is the plain
    conditional model, 0 the unconditional one. Every scale starts from the same noise
    (from `seed`), so columns of a grid differ only by guidance.
    """
    acp = jnp.asarray(spec.schedule.alphas_cumprod)
    cond = family.encode(frozen, tokens)
    uncond = unconditional(family, spec, params, frozen, cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
    n = tokens.shape[0]
    ts = ddim_timesteps(spec.schedule.num_train_timesteps, steps)
    prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])
    x_init = jax.random.normal(jax.random.key(seed), (n,) + tuple(family.sample_shape))

    def one_scale(g):
        def body(x, tt):
            t, t_prev = tt
            out = family.denoise(params["model"], jnp.concatenate([x, x]), jnp.full((2 * n,), t), both)
            out = out[n:] + g * (out[:n] - out[n:])
            eps, x0 = diffusion.to_epsilon_and_x0(spec.schedule.prediction_type, acp, x,
                                                  out, jnp.full((n,), t))
            if clip_x0:
                # Re-derive eps from the clipped x0: keeping the unclipped eps makes the DDIM
                # update inconsistent, and guided samples (whose x0 overshoots) fall apart.
                x0 = jnp.clip(x0, -1.0, 1.0)
                eps = (x - jnp.sqrt(acp[t]) * x0) / jnp.sqrt(1.0 - acp[t])
            a_prev = jnp.where(t_prev >= 0, acp[jnp.maximum(t_prev, 0)], 1.0)
            return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

        x, _ = jax.lax.scan(body, x_init, (ts, prev))
        return family.x0_to_images(frozen, x)

    return jax.lax.map(one_scale, guidance)


def sample_grid(family: Family, spec: StepSpec, params: Params, frozen: Params,
                captions: Sequence[str], guidance: Sequence[float], seed: int,
                steps: int) -> jax.Array:
    """[len(guidance), len(captions), H, W, 3] uint8 samples, the same on every process."""
    # Host (numpy) inputs: in a multi-process run jit treats them as replicated values,
    # where a device array made here would live on this process's devices only.
    out = sample(family, spec, params, frozen, np.asarray(family.tokenize(captions)),
                 np.asarray(guidance, np.float32), np.int32(seed), steps=steps)
    return multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out

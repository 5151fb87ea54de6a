"""Sampling with classifier-free guidance; the unconditional branch uses the trained nulls.

Never applies dropout: the conditional branch sees the real caption encodings, the
unconditional branch has the caption's conditioners replaced by their nulls, exactly the
substitution a dropped training example got (`dropout.unconditional_groups`: a group of
data-supplied conditioners at rate 0, such as SDXL's size and crop conditioning, keeps
its real values, as diffusers' pipelines keep them). With a negative prompt, that
prompt's encoding replaces the nulls, as diffusers' pipelines do.

Schedulers, all on the same 'trailing' grid of training timesteps (the first step at
the last training timestep, where v-prediction matters), deterministic from the seed:
* `ddim`: DDIM with eta = 0 (deterministic, first order);
* `euler`: Euler on the probability-flow ODE (diffusers' EulerDiscreteScheduler). In the
  view below dx/dsigma is the model's epsilon, so on the same grid this is DDIM's update
  written another way: the two differ by float rounding only (kept for users and configs
  that ask for Euler by name);
* `euler_a`: Euler ancestral (stochastic: fresh noise each step, drawn from the seed);
* `dpm++`: DPM-Solver++(2M), second-order multistep, first order on the first and last
  steps (Lu et al. 2022; diffusers' DPMSolverMultistepScheduler with lower_order_final).
The last three work in the variance-exploding view x / sqrt(alpha_bar), sigma =
sqrt((1 - alpha_bar) / alpha_bar), where the probability-flow ODE is dx/dsigma = (x - x0) / sigma.
A flow-matching model (SD3) samples with `euler` only: Euler steps of its velocity on
the shifted sigma grid of diffusers' FlowMatchEulerDiscreteScheduler (`jaxcond.flow`).

Given a mesh, the samples are split over all of its devices (the batch sharding of
training, `jaxcond.sharding.BATCH`), padded to a multiple of the device count; the
noise is drawn for the unpadded global batch before it is split, so the samples are
the same whatever the mesh.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxcond import diffusion, dropout, flow, rng, sharding, xla
from jaxcond.checks import check, int_at_least, one_of
from jaxcond.models.family import Family, Params
from jaxcond.train_step import StepSpec, empty_conditioning

log = logging.getLogger("jaxcond")

SCHEDULERS = ("ddim", "euler", "euler_a", "dpm++")


def validate(s: ml_collections.ConfigDict, objective: str = "ddpm") -> None:
    """Checks `config.sample` (`s`): the validation grids' settings, for a model trained
    with `objective` (config.diffusion.objective)."""
    int_at_least("sample.num_prompts", s.num_prompts, 1)
    int_at_least("sample.per_prompt", s.per_prompt, 1)
    int_at_least("sample.steps", s.steps, 1)
    check(len(s.guidance) > 0 and all(g >= 0 for g in s.guidance), "sample.guidance", s.guidance,
          "one or more scales, each >= 0")
    one_of("sample.scheduler", s.scheduler, SCHEDULERS)
    check(objective != "flow" or s.scheduler == "euler", "sample.scheduler", s.scheduler,
          "a flow-matching model (diffusion.objective 'flow') samples with 'euler' (SD3's flow-matching Euler)")


def with_nulls(family: Family, spec: StepSpec, params: Params, frozen: Params, cond: dict[str, jax.Array],
               names: Sequence[str]) -> dict[str, jax.Array]:
    """`cond` as a training example saw it with the dropout groups `names` dropped."""
    empty = empty_conditioning(family, {**frozen, **params["model"]})
    nulls = dropout.null_values(dict(spec.nulls), empty, params["nulls"])
    b = next(iter(cond.values())).shape[0]
    groups = [g for g in spec.groups if g.name in names]
    return dropout.apply(cond, nulls, {g.name: jnp.ones((b,), bool) for g in groups}, groups)


def unconditional(family: Family, spec: StepSpec, params: Params, frozen: Params,
                  cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`cond` as the unconditional branch sees it (`dropout.unconditional_groups`)."""
    groups = dropout.unconditional_groups(spec.groups, family.batch_conditioners)
    return with_nulls(family, spec, params, frozen, cond, [g.name for g in groups])


def check_drop(spec: StepSpec, drop: Sequence[str]) -> None:
    """A ValueError naming the groups of `drop` that the run does not have or never dropped."""
    known = {g.name: g for g in spec.groups}
    bad = [n for n in drop if n not in known or not known[n].drops]
    if bad:
        raise ValueError(f"cannot sample without dropout group(s) {bad}: the run's groups that trained with their "
                         f"nulls are {[g.name for g in spec.groups if g.drops]}")


def trailing_timesteps(num_train: int, steps: int) -> jnp.ndarray:
    """'trailing' spacing: starts at the last training timestep (where v-prediction matters)."""
    return jnp.round(jnp.arange(num_train, 0, -num_train / steps)).astype(jnp.int32) - 1


def _conditioning(family: Family, parts: Params, tokens: jax.Array) -> dict[str, jax.Array]:
    cond = family.encode(parts, tokens)
    cond.update({k: jnp.asarray(v) for k, v in family.sampling_conditioners(tokens.shape[0]).items()})
    return cond


def _step(scheduler: str, x: jax.Array, x0: jax.Array, a: jax.Array, a_prev: jax.Array,
          carry: dict, noise: jax.Array) -> tuple[jax.Array, dict]:
    """One update from alpha_bar `a` to `a_prev` (1 at the end) given the x0 estimate."""
    if scheduler == "ddim":
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, carry
    sigma, sigma_n = jnp.sqrt((1.0 - a) / a), jnp.sqrt((1.0 - a_prev) / a_prev)
    xv = x / jnp.sqrt(a)
    if scheduler in ("euler", "euler_a"):
        up = (jnp.sqrt(jnp.maximum(sigma_n**2 * (sigma**2 - sigma_n**2) / sigma**2, 0.0))
              if scheduler == "euler_a" else 0.0)  # euler: no fresh noise, down == sigma_n
        down = jnp.sqrt(jnp.maximum(sigma_n**2 - up**2, 0.0))
        # The Euler step xv + (down - sigma) * d with d = (xv - x0) / sigma, rearranged:
        # sigma is ~2e4 at the first step, where the float32 sum would cancel to ~1e-3.
        xv = x0 + down * (xv - x0) / sigma + up * noise
    else:  # dpm++ (2M)
        last = sigma_n == 0
        h = jnp.log(sigma) - jnp.log(jnp.where(last, 1.0, sigma_n))
        r = carry["h"] / h
        second = (carry["h"] > 0) & ~last
        d = jnp.where(second, (1 + 0.5 / r) * x0 - (0.5 / r) * carry["x0"], x0)
        xv = jnp.where(last, x0, jnp.exp(-h) * xv - jnp.expm1(-h) * d)
        carry = {"x0": x0, "h": jnp.where(last, 0.0, h)}
    return xv * jnp.sqrt(a_prev), carry


def _pair(cond: jax.Array, uncond: jax.Array) -> jax.Array:
    """Rows 2i and 2i + 1 are the two branches of sample i: a device that holds sample i
    evaluates both without exchanging rows with other devices."""
    return jnp.stack([cond, uncond], axis=1).reshape((-1,) + cond.shape[1:])


@functools.partial(xla.jit, static_argnames=("family", "spec", "steps", "scheduler", "clip_x0", "mesh", "drop"))
def sample(family: Family, spec: StepSpec, params: Params, frozen: Params, tokens: jax.Array,
           guidance: jax.Array, seed: jax.Array, steps: int = 50, scheduler: str = "ddim",
           clip_x0: bool = True, negative_tokens: jax.Array | None = None,
           mesh: Mesh | None = None, drop: tuple[str, ...] = ()) -> jax.Array:
    """Samples as uint8 images, one per row of `tokens`, per guidance scale.

    `guidance` is a float array [G]; returns [G, N, H, W, 3]. Scale 1 is the plain
    conditional model, 0 the unconditional one. Every scale starts from the same noise
    (and, for euler_a, gets the same per-step noise) from `seed`, so columns of a grid
    differ only by guidance. `negative_tokens` (rows like `tokens`) replace the nulls.
    With `mesh`, the N samples are split over its devices and the result is replicated;
    without, placement is left to jit. `drop` names dropout groups replaced by their nulls
    in both branches: sampling without those conditioners (e.g. SD3 without T5), as
    training taught the model when it dropped them.
    """
    if scheduler not in SCHEDULERS or (spec.flow is not None and scheduler != "euler"):
        raise ValueError(f"scheduler {scheduler!r}: use one of {('euler',) if spec.flow else SCHEDULERS}")
    n = tokens.shape[0]
    rows = n if mesh is None else n + (-n % mesh.size)

    def split(x: jax.Array) -> jax.Array:
        """`x` [N, ...] padded to `rows` rows and split over the mesh."""
        if mesh is None:
            return x
        # Copies of the last sample, not zeros: padding rows must stay valid (finite)
        # inputs. They are dropped at the end.
        x = jnp.pad(x, [(0, rows - n)] + [(0, 0)] * (x.ndim - 1), mode="edge")
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))

    acp = jnp.asarray(spec.schedule.alphas_cumprod)
    parts = {**frozen, **params["model"]}
    check_drop(spec, drop)
    cond = _conditioning(family, parts, split(tokens))
    uncond = (unconditional(family, spec, params, frozen, cond) if negative_tokens is None
              else _conditioning(family, parts, split(negative_tokens)))
    if drop:
        cond, uncond = (with_nulls(family, spec, params, frozen, c, drop) for c in (cond, uncond))
    both = jax.tree.map(_pair, cond, uncond)
    if spec.flow is not None:  # (sigma, next sigma) pairs; the network is fed sigma * 1000
        tokens = int(np.prod(family.sample_shape[1:])) // family.patch_size**2
        sigmas = jnp.asarray(spec.flow.sampling_schedule(steps, tokens)[0])
        ts, prev = sigmas[:-1], sigmas[1:]
    else:
        ts = trailing_timesteps(spec.schedule.num_train_timesteps, steps)
        prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])
    key = jax.random.key(seed)
    shape = (rows,) + tuple(family.sample_shape)

    def noise(k: jax.Array) -> jax.Array:
        # Drawn for the N real samples, then padded: the bits of sample i depend on the
        # seed and N only, never on the device count.
        return split(jax.random.normal(k, (n,) + tuple(family.sample_shape)))

    x_init = noise(key)

    def one_scale(g):
        def model_t(t: jax.Array, r: int) -> jax.Array:
            return jnp.full((r,), flow.model_timesteps(t) if spec.flow is not None else t)

        def guided(x: jax.Array, t: jax.Array) -> jax.Array:
            out = family.denoise(parts, _pair(x, x), model_t(t, 2 * rows), both)
            out = out.reshape((rows, 2) + out.shape[1:])
            return out[:, 1] + g * (out[:, 0] - out[:, 1])

        def branch(c: dict[str, jax.Array]) -> Callable:
            return lambda x, t: family.denoise(parts, x, model_t(t, rows), c)

        # Scale 0 is the unconditional branch alone and 1 the conditional one: each needs
        # half the model evaluations of a guided scale (lax.map runs one switch branch).
        which = jnp.where(g == 0, 0, jnp.where(g == 1, 1, 2))

        def body(carry, inp):
            k, t, t_prev = inp
            x = carry.pop("x")
            out = jax.lax.switch(which, [branch(uncond), branch(cond), guided], x, t)
            if spec.flow is not None:  # out is the guided velocity
                return {**carry, "x": flow.euler_step(x, out, t, t_prev)}, None
            _, x0 = diffusion.to_epsilon_and_x0(spec.schedule.prediction_type, acp, x, out, jnp.full((rows,), t))
            if clip_x0:
                # Each update re-derives its direction from the clipped x0: keeping the
                # unclipped eps is inconsistent, and guided samples (whose x0 overshoots)
                # fall apart.
                x0 = jnp.clip(x0, -1.0, 1.0)
            a_prev = jnp.where(t_prev >= 0, acp[jnp.maximum(t_prev, 0)], 1.0)
            z = noise(jax.random.fold_in(key, k + 1)) if scheduler == "euler_a" else 0.0
            x, carry = _step(scheduler, x, x0, acp[t], a_prev, carry, z)
            return {**carry, "x": x}, None

        init = {"x": x_init, "x0": jnp.zeros(shape), "h": jnp.zeros(())}
        final, _ = jax.lax.scan(body, init, (jnp.arange(steps), ts, prev))
        return family.x0_to_images(frozen, final["x"])

    images = jax.lax.map(one_scale, guidance)[:, :n]
    return images if mesh is None else jax.lax.with_sharding_constraint(images, sharding.replicated(mesh))


def warn_overlong(family: Family, prompts: Sequence[str], what: str) -> None:
    """Logs the prompts the text encoder cuts: their samples follow only the start."""
    cut = [p for p, over in zip(prompts, family.overlong(prompts)) if over]
    if cut:
        log.warning("%s: %d of %d prompts are longer than the text encoder's %d tokens; the model sees "
                    "only their start (first: %r)", what, len(cut), len(prompts), family.max_length, cut[0])


def local_mesh() -> Mesh:
    """Every device of this process on the data axis: what `jaxcond sample` samples on."""
    devices = jax.local_devices()
    return sharding.make_mesh({"data": len(devices), "fsdp": 1}, devices)


def sample_grid(family: Family, spec: StepSpec, params: Params, frozen: Params,
                captions: Sequence[str], guidance: Sequence[float], seed: int, steps: int,
                scheduler: str | None = None, negative: Sequence[str] | None = None, *,
                mesh: Mesh | None = None, drop: Sequence[str] = ()) -> np.ndarray:
    """[len(guidance), len(captions), H, W, 3] uint8 samples, the same on every process.

    The samples are split over `mesh` (default `local_mesh()`). Weights already on the
    mesh's devices keep their sharding (a training run's fsdp split); others are
    replicated onto it. `scheduler`: default ddim, euler for a flow-matching model.
    """
    scheduler = scheduler or ("euler" if spec.flow is not None else "ddim")
    mesh = local_mesh() if mesh is None else mesh
    params, frozen = sharding.on_mesh((params, frozen), mesh)
    # Host (numpy) inputs: in a multi-process run jit treats them as replicated values,
    # where a device array made here would live on this process's devices only.
    negative_tokens = None if negative is None else np.asarray(family.tokenize(negative))
    with rng.derivation():  # the noise bits must not follow a global jax setting
        out = sample(family, spec, params, frozen, np.asarray(family.tokenize(captions)),
                     np.asarray(guidance, np.float32), np.int32(seed), steps=steps, scheduler=scheduler,
                     # Pixels live in [-1, 1]; VAE latents have no such bound.
                     clip_x0=not family.latent, negative_tokens=negative_tokens, mesh=mesh, drop=tuple(drop))
    return np.asarray(out)  # replicated: every process holds all of it

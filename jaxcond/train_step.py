"""The train step: a pure function of (state, frozen params, global batch).

Per step, in this order:
1. all per-example randomness is drawn over the *global* batch from the step key
   (`jaxcond.rng`): latents from the VAE's distribution (latent families), dropout
   masks (`jaxcond.dropout`), timesteps, noise;
2. the batch is split into `grad_accum` micro-batches, micro-batch `a` holding global
   positions p with p % grad_accum == a (so each stays spread over all devices);
3. per micro-batch: encode captions, replace dropped conditioners by their nulls,
   noise the images, predict, weighted MSE; gradients are averaged over micro-batches;
4. one optimizer update, then the EMA, unless the loss or a gradient is not finite:
   then params, optimizer state and EMA stay as they were and `skipped` counts it.
The step counter advances either way, so step s always draws step s's masks, noise,
timesteps and batch: a skipped update loses that batch, it never shifts later ones.
Nothing here reads a clock, a file or a global RNG.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcond import diffusion, dropout, flow, rng, sharding
from jaxcond.checks import check, in_unit_interval, int_at_least, one_of
from jaxcond.models.family import Family, Params

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static the step depends on (hashable; part of the compiled program)."""

    seed: int
    groups: tuple[dropout.Group, ...]
    nulls: tuple[tuple[str, str], ...]  # (conditioner, null kind)
    global_batch: int
    grad_accum: int
    steps_per_epoch: int
    schedule: diffusion.Schedule
    flow: flow.FlowSpec | None = None  # the rectified-flow objective (SD3) instead of `schedule`'s DDPM
    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    ema_decay: float = 0.0
    ema_dtype: str = "params"  # or a DTYPES key
    # Benchmark switches only: the step without any dropout code, to price it; FSDP params
    # gathered as one tree at the top of the step instead of per layer, to price that.
    with_dropout: bool = True
    gather_per_layer: bool = True

    @staticmethod
    def from_config(cfg: ml_collections.ConfigDict, groups: list[dropout.Group],
                    steps_per_epoch: int) -> StepSpec:
        d = cfg.diffusion
        return StepSpec(
            seed=cfg.seed, groups=tuple(groups), nulls=tuple(sorted(cfg.dropout.nulls.items())),
            global_batch=cfg.train.global_batch, grad_accum=cfg.train.grad_accum,
            steps_per_epoch=steps_per_epoch,
            schedule=diffusion.Schedule(d.num_train_timesteps, d.beta_schedule, d.beta_start,
                                        d.beta_end, d.prediction_type),
            flow=flow.FlowSpec.from_config(d), snr_gamma=float(d.snr_gamma), noise_offset=float(d.noise_offset),
            ema_decay=float(cfg.optim.ema_decay), ema_dtype=cfg.optim.get("ema_dtype", "params"))


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("adamw", "lion", "adafactor")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks the fields this module reads: `seed`, `config.train` and `config.optim`."""
    int_at_least("seed", cfg.seed, 0)
    check(cfg.seed < rng.LIMIT, "seed", cfg.seed, "must be < 2**31")
    t = cfg.train
    int_at_least("train.steps", t.steps, 1)
    int_at_least("train.global_batch", t.global_batch, 1)
    int_at_least("train.grad_accum", t.grad_accum, 1)
    one_of("train.param_dtype", t.param_dtype, tuple(DTYPES))
    one_of("train.compute_dtype", t.compute_dtype, tuple(DTYPES))
    int_at_least("train.log_every", t.log_every, 1)
    int_at_least("train.sample_every", t.sample_every, 0)
    int_at_least("train.max_skipped_updates", t.max_skipped_updates, -1)
    check(t.global_batch % t.grad_accum == 0, "train.global_batch", t.global_batch,
          f"must be divisible by config.train.grad_accum = {t.grad_accum}")
    o = cfg.optim
    # (.get: a run saved before these fields existed is verified and resumed as it ran.)
    one_of("optim.name", o.get("name", "adamw"), OPTIMIZERS)
    one_of("optim.moment_dtype", o.get("moment_dtype", "float32"), tuple(DTYPES))
    one_of("optim.ema_dtype", o.get("ema_dtype", "params"), ("params", *DTYPES))
    check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    one_of("optim.schedule", o.schedule, ("cosine", "constant"))
    int_at_least("optim.warmup_steps", o.warmup_steps, 0)
    in_unit_interval("optim.end_lr_fraction", o.end_lr_fraction)
    for name in ("b1", "b2"):
        check(0 <= o[name] < 1, f"optim.{name}", o[name], "must be in [0, 1) (Adam's decay rates)")
    # Adam divides by sqrt(second moment) + eps: with 0, a parameter whose gradient is 0
    # gets 0/0, and every such update would be skipped as non-finite.
    check(o.eps > 0, "optim.eps", o.eps, "must be > 0 (Adam's epsilon, e.g. 1e-8)")
    check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 turns it off)")
    check(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "must be in [0, 1) (0 turns it off)")


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o, steps = cfg.optim, cfg.train.steps
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(steps, o.warmup_steps + 1),
                                                end_value=o.lr * o.end_lr_fraction)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
                                   optax.constant_schedule(o.lr)], [o.warmup_steps])
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    # Configs saved before these fields existed trained AdamW with float32 moments.
    name, mu = o.get("name", "adamw"), DTYPES[o.get("moment_dtype", "float32")]
    if name == "adamw":
        parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mu_dtype=mu))
    elif name == "lion":
        parts.append(optax.lion(lr, b1=o.b1, b2=o.b2, mu_dtype=mu, weight_decay=o.weight_decay))
    else:  # adafactor: factored second moments, no first moment (optax's defaults otherwise)
        parts.append(optax.adafactor(lr, weight_decay_rate=o.weight_decay or None))
    return optax.chain(*parts), lr


def empty_tokens(family: Family) -> np.ndarray:
    return family.tokenize([""])


def empty_conditioning(family: Family, params: Params) -> dict[str, jax.Array]:
    """The empty caption's conditioning, batch of 1: its encodings under `params` (frozen
    and trainable parts together), and zeros for what the data supplies (time_ids).
    It is the `empty` null, and fixes the shapes of the others."""
    empty = family.encode(params, jnp.asarray(empty_tokens(family)))
    empty.update({k: jnp.zeros((1,) + tuple(family.conditioners[k])) for k in family.batch_conditioners})
    return empty


def init_state(family: Family, spec: StepSpec, tx: optax.GradientTransformation,
               param_dtype: jnp.dtype = jnp.float32, trainable: Params = None, frozen: Params = None) -> State:
    """Step 0: pretrained trainable params, learned nulls initialised from the empty caption.
    `trainable` and `frozen`: the family's own unless given (as traced arguments)."""
    trainable = family.trainable if trainable is None else trainable
    frozen = family.frozen if frozen is None else frozen
    empty = empty_conditioning(family, {**frozen, **trainable})
    params = {"model": trainable,
              "nulls": {name: empty[name][0] for name, kind in spec.nulls if kind == "learned"}}
    params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "skipped": jnp.zeros((), jnp.int32)}
    if spec.ema_decay > 0:
        dtype = DTYPES.get(spec.ema_dtype)
        state["ema"] = jax.tree.map(lambda x: jnp.copy(x) if dtype is None else x.astype(dtype), params)
    return state


def abstract_state(family: Family, spec: StepSpec, tx: optax.GradientTransformation, param_dtype: str,
                   shardings: Any) -> State:
    """The train state's shapes and dtypes (traced, nothing computed), each placed where
    `shardings(shapes)` (a tree of shardings) says: what a restore fills in."""
    # The family's params go in as arguments: they may be shapes only (jaxcond plan).
    shapes = jax.eval_shape(functools.partial(init_state, family, spec, tx, DTYPES[param_dtype]),
                            trainable=family.trainable, frozen=family.frozen)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        shardings(shapes))


def step_randomness(spec: StepSpec, step: jax.Array, x_shape: tuple[int, ...],
                    patch_size: int = 1) -> dict[str, Any]:
    """Masks, timesteps and noise of one step, over the global batch. Timesteps `t` are
    DDPM's integer ones, or the flow objective's sigmas in (0, 1] (Flux's resolution shift
    counts a sample's tokens: H * W / patch_size**2)."""
    b = spec.global_batch
    with rng.derivation():
        masks = (dropout.masks(spec.seed, step, spec.groups, b, spec.steps_per_epoch)
                 if spec.with_dropout else {})
        key = rng.stream_key(spec.seed, step, rng.STREAM_TIMESTEP)
        tokens = int(np.prod(x_shape[2:])) // patch_size**2
        t = (spec.flow.sigmas(key, b, tokens) if spec.flow is not None
             else jax.random.randint(key, (b,), 0, spec.schedule.num_train_timesteps))
        noise = jax.random.normal(rng.stream_key(spec.seed, step, rng.STREAM_NOISE), x_shape)
        if spec.noise_offset > 0:
            k = rng.stream_key(spec.seed, step, rng.STREAM_NOISE_OFFSET)
            noise = noise + spec.noise_offset * jax.random.normal(k, x_shape[:2] + (1,) * (len(x_shape) - 2))
    return {"masks": masks, "t": t, "noise": noise}


def _micro(x: jax.Array, a: int) -> jax.Array:
    """[B, ...] -> [a, B // a, ...], micro-batch j holding positions p with p % a == j."""
    return jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1)


def example_losses(family: Family, spec: StepSpec, parts: Params, cond: Mapping[str, jax.Array],
                   x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Per-example weighted MSE [B] of the denoiser (`parts`: frozen and trainable model
    params) on `cond`, at timesteps `t` (DDPM's integers, or the flow's sigmas) and `noise`."""
    if spec.flow is not None:  # t: sigmas; the network is fed sigma * 1000 and predicts the velocity
        pred = family.denoise(parts, flow.noisy(x0, noise, t), flow.model_timesteps(t), cond)
        want, w = flow.target(x0, noise), flow.loss_weights(t, spec.flow.weighting)
    else:
        acp = jnp.asarray(spec.schedule.alphas_cumprod)
        pred = family.denoise(parts, diffusion.add_noise(acp, x0, noise, t), t, cond)
        want = diffusion.target(spec.schedule.prediction_type, acp, x0, noise, t)
        w = diffusion.min_snr_weight(spec.schedule.prediction_type, acp, t, spec.snr_gamma)
    return w * jnp.mean(jnp.square(pred - want), axis=tuple(range(1, pred.ndim)))


def _loss(family: Family, spec: StepSpec, params: Params, frozen: Params,
          mb: Mapping[str, Any]) -> jax.Array:
    parts = {**frozen, **params["model"]}  # text encoders may be trainable (then never cached)
    # Cached encodings (jaxcond.data.cache) stand in for the frozen encoder's output; the
    # dropout below treats both alike.
    cond = dict(mb["cond"]) if "cond" in mb else family.encode(parts, mb["tokens"])
    cond.update(mb["extra"])
    if spec.with_dropout:
        # The `empty` null from the current encoder params: with a fine-tuned text encoder
        # it moves as the encoder trains, never a stale copy.
        empty = empty_conditioning(family, parts)
        nulls = dropout.null_values(dict(spec.nulls), empty, sharding.gather(params["nulls"]))
        cond = dropout.apply(cond, nulls, mb["masks"], spec.groups)
    return jnp.mean(example_losses(family, spec, parts, cond, mb["x0"], mb["noise"], mb["t"]))


def train_step(family: Family, spec: StepSpec, tx: optax.GradientTransformation,
               lr: optax.Schedule, state: State, frozen: Params,
               batch: Mapping[str, jax.Array], *,
               compute_sharding: Any = None) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer update on one global batch: {"images": uint8 [B,H,W,3]} (or cached
    "moments"), either {"tokens": int32 [B,...]} or the cached encodings
    {"cond/<conditioner>": [B, ...]}, and the family's batch_conditioners (e.g. "time_ids").

    `compute_sharding` (e.g. replicated) is where the forward and backward pass use the
    params: with FSDP-sharded params the family gathers each layer's params there as the
    layer runs (`jaxcond.sharding.gathering`), and the gradients are reduce-scattered back;
    left to itself XLA would push the parameter sharding into the activations and
    re-materialise them inside attention. The dropout masks are drawn there too.
    """
    step = state["step"]
    # Cached VAE moments (jaxcond.data.cache) stand in for encoding the images here.
    moments = batch["moments"] if "moments" in batch else family.image_moments(frozen, batch["images"])
    with rng.derivation():
        x0 = family.draw_x0(moments, rng.stream_key(spec.seed, step, rng.STREAM_LATENT))
    r = step_randomness(spec, step, x0.shape, family.patch_size)
    if compute_sharding is not None:
        # Every device draws all B mask bits instead of its slice: they are also returned
        # as a replicated metric, and gathering a few dozen bools costs a collective, on CPU
        # a barrier of all device threads (benchmarks/baseline_pmap.py --devices 8). The bits
        # are the same however they are sharded (threefry partitionable, set in jaxcond.rng).
        r["masks"] = jax.lax.with_sharding_constraint(r["masks"], compute_sharding)
    data = {"x0": x0, "t": r["t"], "noise": r["noise"], "masks": r["masks"],
            "extra": {k: batch[k] for k in family.batch_conditioners}}
    if "tokens" in batch:
        data["tokens"] = batch["tokens"]
    else:
        data["cond"] = {k[len("cond/"):]: v for k, v in batch.items() if k.startswith("cond/")}
    def loss_fn(p: Params, mb: Mapping[str, Any]) -> jax.Array:
        if not spec.gather_per_layer and compute_sharding is not None:
            p = jax.lax.with_sharding_constraint(p, compute_sharding)
        with sharding.gathering(compute_sharding):
            return _loss(family, spec, p, frozen, mb)

    grad_fn = jax.value_and_grad(loss_fn)
    params = state["params"]
    a = spec.grad_accum
    if a == 1:
        loss, grads = grad_fn(params, data)
    else:
        micro = jax.tree.map(lambda x: _micro(x, a), data)

        def body(carry, mb):
            loss_mb, g_mb = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (loss_mb, g_mb)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zero, micro)
        loss, grads = jax.tree.map(lambda x: x / a, (loss, grads))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new_tree: Any, old_tree: Any) -> Any:  # a non-finite step changes nothing
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_tree, old_tree)

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = keep(optax.apply_updates(params, updates), params)
    new = {"step": step + 1, "params": new_params, "opt_state": keep(opt_state, state["opt_state"]),
           "skipped": state["skipped"] + jnp.where(finite, 0, 1).astype(jnp.int32)}
    if "ema" in state:
        # Warm-up (as in diffusers' EMAModel): early averages would otherwise be dominated
        # by the initial weights for thousands of steps.
        n = step.astype(jnp.float32)
        decay = jnp.minimum(spec.ema_decay, (1.0 + n) / (10.0 + n))
        # Averaged in float32 (a bfloat16 EMA is only stored so), as optax.incremental_update.
        ema = optax.incremental_update(new_params, jax.tree.map(lambda e: e.astype(jnp.float32), state["ema"]),
                                       1.0 - decay)
        new["ema"] = keep(jax.tree.map(lambda n, e: n.astype(e.dtype), ema, state["ema"]), state["ema"])
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr(step), "skipped_updates": new["skipped"]}
    for g in spec.groups if spec.with_dropout else ():
        metrics[f"drop_frac/{g.name}"] = jnp.mean(r["masks"][g.name].astype(jnp.float32))
        metrics[f"drop_rate/{g.name}"] = dropout.group_rate(g, step, spec.steps_per_epoch)
        metrics[f"dropped/{g.name}"] = r["masks"][g.name]  # [B] bool, for the run's mask log
    return new, metrics

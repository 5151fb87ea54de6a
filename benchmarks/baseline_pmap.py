"""jaxcond's train step against the diffusers Flax text-to-image example's, side by side.

One tiny Stable-Diffusion-style latent model (VAE 32x32 -> 16x16x4 latents, CLIP text
encoder, UNet; built locally, no download) and one global batch of 32, four variants:

  jaxcond          the step as `jaxcond.train.build()` compiles it: jit with shardings
                   over the mesh, state donated, caption dropout (rate 0.1, learned null),
                   jaxcond's compiler options (`jaxcond.xla`); text encoder and VAE
                   encoder run every step ("images", "tokens");
  jaxcond-jaxopts  the same step compiled with jax's default compiler options, as the
                   baseline is (jax.pmap takes none): what the step's machinery alone gives;
  jaxcond-cached   the same step on the batches of a `jaxcond cache` of the same records:
                   VAE "moments" and "cond/text" encodings instead of images and tokens;
  baseline         written as examples/text_to_image/train_text_to_image_flax.py trains:
                   jax.pmap with axis_name over all devices, a replicated flax TrainState
                   (grad clipping + optax adamw, constant lr), VAE encode and text encoder
                   inside the step, per-device rngs split as the example does, lax.pmean of
                   the grads, no dropout.

All three use the same Flax modules and params (the jaxcond family's), so model cost is
identical. The jaxcond config follows the example's recipe where the example has a knob
(scaled_linear betas, epsilon, no min-SNR, no EMA, constant lr), so what differs is the
step's machinery and the dropout. Timing: benchmarks/timing.py (interleaved rounds, as
step_time.py). Printed: per-step times and throughput ratios vs the baseline.

    .venv/bin/python benchmarks/baseline_pmap.py                # 1 device
    .venv/bin/python benchmarks/baseline_pmap.py --devices 8    # 8 simulated CPU devices

Targets (any device count, both sides use the same devices): jaxcond / baseline >= 1.0
and jaxcond-cached / baseline >= 1.2 (throughput).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ARGS.add_argument("--steps", type=int, default=3, help="consecutive steps timed per round")
    ARGS.add_argument("--repeats", type=int, default=8, help="rounds (each times every variant)")
    ARGS.add_argument("--devices", type=int, default=1, help="devices; > 1 simulates CPU devices")
    args = ARGS.parse_args()
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--devices", args.devices)):
        if value < 1:
            ARGS.error(f"{flag} {value}: must be at least 1")
    # Must be set before jax is imported (here or by jaxcond) to take effect.
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its Flax deprecation notices
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import copy  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import jax_utils  # noqa: E402
from flax.training import train_state  # noqa: E402

from configs import demo  # noqa: E402
from jaxcond import train  # noqa: E402
from jaxcond.data import sources  # noqa: E402
from jaxcond.models.unet_clip import UNetCLIP  # noqa: E402
from timing import Variant, interleave, print_table, ratio  # noqa: E402  (benchmarks/timing.py)

GLOBAL_BATCH = 32
CACHED_TARGET = 1.2  # "a clear gain" from caching, as a throughput ratio


def latent_config() -> ml_collections.ConfigDict:
    """The demo config as a Stable-Diffusion-style latent model, on the example's recipe."""
    c = demo.get_config()
    c.data.resolution = 32
    c.data.num_records = 512  # the cache encodes every record up front
    c.model.demo.vae_channels = (32, 64)  # two levels: 32x32 images -> 16x16 latents
    # SD 1.x-style UNet (cross-attention only): the example passes no pooled embedding.
    c.model.demo.pooled = False
    c.dropout.groups.caption.members = ("text",)
    c.dropout.nulls = ml_collections.ConfigDict({"text": "learned"})
    d = c.diffusion
    d.beta_schedule, d.beta_start, d.beta_end = "scaled_linear", 0.00085, 0.012  # SD's scheduler
    d.prediction_type, d.snr_gamma = "epsilon", 0.0
    c.optim.schedule, c.optim.warmup_steps, c.optim.ema_decay = "constant", 0, 0.0
    c.train.global_batch = GLOBAL_BATCH
    c.train.sample_every = 0
    return c


def make_scheduler(cfg: ml_collections.ConfigDict) -> Any:
    """diffusers' FlaxDDPMScheduler with the config's noise schedule (the example loads
    it from the model folder)."""
    from diffusers import FlaxDDPMScheduler

    d = cfg.diffusion
    return FlaxDDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
                             beta_end=d.beta_end, beta_schedule=d.beta_schedule,
                             prediction_type=d.prediction_type)


def example_objective(family: UNetCLIP, scheduler: Any, sched_state: Any, unet_params: Any,
                      text_encoder_params: Any, latents: jax.Array, noise: jax.Array,
                      timesteps: jax.Array, input_ids: jax.Array) -> jax.Array:
    """The example's loss given its latents, noise and timesteps."""
    noisy_latents = scheduler.add_noise(sched_state, latents, noise, timesteps)
    encoder_hidden_states = family.text_models["text_encoder"](input_ids, params=text_encoder_params,
                                                               train=False)[0]
    model_pred = family.unet.apply({"params": unet_params}, noisy_latents, timesteps,
                                   encoder_hidden_states, train=True).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(sched_state, latents, noise, timesteps)
    return jnp.mean((target - model_pred) ** 2)


def example_loss(family: UNetCLIP, scheduler: Any, sched_state: Any, unet_params: Any,
                 text_encoder_params: Any, vae_params: Any, batch: dict[str, jax.Array],
                 sample_rng: jax.Array) -> jax.Array:
    """The example's compute_loss: latents sampled from the VAE, then noise and timesteps
    from keys split off the same sample_rng."""
    vae = family.vae
    latent_dist = vae.apply({"params": vae_params}, batch["pixel_values"], deterministic=True,
                            method=vae.encode).latent_dist
    latents = jnp.transpose(latent_dist.sample(sample_rng), (0, 3, 1, 2)) * vae.config.scaling_factor
    noise_rng, timestep_rng = jax.random.split(sample_rng)
    noise = jax.random.normal(noise_rng, latents.shape)
    timesteps = jax.random.randint(timestep_rng, (latents.shape[0],), 0, scheduler.config.num_train_timesteps)
    return example_objective(family, scheduler, sched_state, unet_params, text_encoder_params,
                             latents, noise, timesteps, batch["input_ids"])


def example_train_step(family: UNetCLIP, scheduler: Any, devices: list) -> Callable:
    """The example's p_train_step(state, text_encoder_params, vae_params, batch, train_rng)
    -> (state, metrics, train_rng), pmapped over `devices` with the state donated."""
    sched_state = scheduler.create_state()

    def step(state: train_state.TrainState, text_encoder_params: Any, vae_params: Any,
             batch: dict[str, jax.Array], train_rng: jax.Array) -> tuple[Any, dict, jax.Array]:
        sample_rng, new_train_rng = jax.random.split(train_rng)
        loss, grad = jax.value_and_grad(
            lambda p: example_loss(family, scheduler, sched_state, p, text_encoder_params, vae_params,
                                   batch, sample_rng))(state.params)
        grad = jax.lax.pmean(grad, "batch")
        new_state = state.apply_gradients(grads=grad)
        metrics = jax.lax.pmean({"loss": loss}, axis_name="batch")
        return new_state, metrics, new_train_rng

    return jax.pmap(step, "batch", donate_argnums=(0,), devices=devices)


def example_batch(batch: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """A jaxcond batch as the example's collate_fn gives it: pixels in [-1, 1], NCHW."""
    b = jax.device_get(batch)
    pixels = np.transpose(b["images"].astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2))
    return {"pixel_values": pixels, "input_ids": b["tokens"]}


def main(args: argparse.Namespace, workdir: str) -> None:
    if len(jax.devices()) < args.devices:
        sys.exit(f"--devices {args.devices}: only {len(jax.devices())} {jax.devices()[0].platform} "
                 "device(s) here (simulated CPU devices need JAX_PLATFORMS=cpu)")
    if GLOBAL_BATCH % args.devices:
        sys.exit(f"--devices {args.devices}: the global batch of {GLOBAL_BATCH} must split evenly "
                 "over the devices; use a divisor of it (1, 2, 4, 8, 16, 32)")
    devices = jax.devices()[:args.devices]
    cfg = latent_config()
    run = train.build(cfg, workdir, devices=devices)  # writes the demo model into workdir
    cached_cfg = copy.deepcopy(cfg)
    cached_cfg.data.cache = os.path.join(workdir, "cache")
    sources.build_cache(cached_cfg.data, cached_cfg.seed, cached_cfg.train.global_batch, run.family,
                        cached_cfg.data.cache, workers=cached_cfg.loader.workers,
                        train_text_encoder=cached_cfg.model.train_text_encoder)
    cached = train.build(cached_cfg, workdir, devices=devices)

    batches = [run.put_batch(i) for i in range(args.steps)]
    cached_batches = [cached.put_batch(i) for i in range(args.steps)]  # the same records

    fam, n = run.family, len(devices)
    p_train_step = example_train_step(fam, make_scheduler(cfg), devices)
    o = cfg.optim
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(optax.constant_schedule(o.lr), b1=o.b1, b2=o.b2, eps=o.eps,
                                 weight_decay=o.weight_decay))
    state = train_state.TrainState.create(apply_fn=fam.unet.__call__, params=fam.trainable["unet"], tx=tx)
    state = jax_utils.replicate(state, devices)
    text_encoder_params = jax_utils.replicate(fam.frozen["text_encoder"], devices)
    vae_params = jax_utils.replicate(fam.frozen["vae"], devices)
    per_device = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("batch",)),
                                            jax.sharding.PartitionSpec("batch"))

    def shard(tree: Any) -> Any:  # flax's common_utils.shard, put on the devices once, untimed
        return jax.device_put(jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), tree), per_device)

    train_rngs = jax.device_put(jax.random.split(jax.random.PRNGKey(cfg.seed), n), per_device)

    jaxopts_fn = run.jit_step(run.spec, compiler_options={})

    def baseline(carry: tuple, batch: dict) -> tuple[tuple, dict]:
        new_state, metrics, rngs = p_train_step(carry[0], text_encoder_params, vae_params, batch, carry[1])
        return (new_state, rngs), metrics

    variants = {
        "jaxcond": Variant(lambda s, b: run.step_fn(s, run.frozen, b), run.initial_state(), batches),
        "jaxcond-cached": Variant(lambda s, b: cached.step_fn(s, cached.frozen, b), cached.initial_state(),
                                  cached_batches),
        "jaxcond-jaxopts": Variant(lambda s, b: jaxopts_fn(s, run.frozen, b), run.initial_state(), batches),
        "baseline": Variant(baseline, (state, train_rngs), [shard(example_batch(b)) for b in batches]),
    }
    interleave(variants, args.repeats, args.steps)

    m = cfg.model.demo
    print(f"\nlatent demo model: {cfg.data.resolution}x{cfg.data.resolution} images, VAE {tuple(m.vae_channels)}, "
          f"UNet {tuple(m.unet_channels)}, CLIP {m.text_layers}x{m.text_width}; global batch {GLOBAL_BATCH} "
          f"on {n} device(s) (jaxcond mesh {dict(run.mesh.shape)}, baseline pmap over {n}); "
          f"{args.repeats} rounds x {args.steps} steps")
    print(f"batch fields: jaxcond {sorted(batches[0])}, cached {sorted(cached_batches[0])}, "
          f"baseline {sorted(variants['baseline'].batches[0])}")
    print_table(variants)
    base = variants["baseline"].times
    for name, target in (("jaxcond", 1.0), ("jaxcond-cached", CACHED_TARGET)):
        r, text = ratio(base, variants[name].times)  # throughput: baseline time / variant time
        print(f"{name} / baseline throughput: {text}; target >= {target}: {'met' if r >= target else 'MISSED'}")
    print(f"jaxcond-jaxopts / baseline throughput (same compiler options): "
          f"{ratio(base, variants['jaxcond-jaxopts'].times)[1]}")


if __name__ == "__main__":
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/absl info lines would clutter the table
    with tempfile.TemporaryDirectory() as tmp:  # the model folder lives only as long as the run
        main(args, tmp)

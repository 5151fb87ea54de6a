"""Exact validation losses and the caption gap (pure; the loop and `jaxcond eval` call it).

Each validation example is scored at `bands` fixed timesteps, the midpoints of equal
bands over the schedule (DDPM: t = (b + 1/2) T / bands; flow: sigma = (b + 1/2) / bands),
with noise (and, for a latent family, the latent draw) from a validation key keyed by
the run's seed, the example and the band, never by the training step:

    root = fold_in(key(seed), VALIDATION_ROOT)       # 2**31: no training step has it
    key(example, band, stream) = fold_in(fold_in(fold_in(root, example), band), stream)

so two evaluations of the same params give the same numbers, two checkpoints are
compared on the same noise, and evaluating touches no training stream. Per example and
band it computes the training loss (same weighting) twice: with the caption (`loss`)
and with the caption's conditioners replaced by their nulls, exactly what the
unconditional branch of guidance sees (`loss_null`, `dropout.unconditional_groups`).
Their difference, `caption_gap = loss_null - loss`, is how much the model uses its
captions. It is positive for a model trained with caption dropout; a model trained at
rate 1 scores worse with captions it never saw (a negative gap), one trained at rate 0
better with them than with a null it never saw (docs/results.md, "The caption gap").
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxcond import rng, sharding, xla
from jaxcond.checks import int_at_least
from jaxcond.data.pipeline import Data
from jaxcond.models.family import Family, Params
from jaxcond.sampling import unconditional
from jaxcond.train_step import StepSpec, example_losses

VALIDATION_ROOT = rng.LIMIT  # fold_in data is uint32; steps stay below 2**31


def validate(e: ml_collections.ConfigDict) -> None:
    """Checks `config.eval` (`e`)."""
    int_at_least("eval.every", e.every, 0)
    int_at_least("eval.bands", e.bands, 1)
    int_at_least("eval.max_examples", e.max_examples, 1)
    int_at_least("eval.batch", e.batch, 1)


def band_timesteps(spec: StepSpec, bands: int) -> jax.Array:
    """The fixed timestep of each band: DDPM integers or flow sigmas, low noise first."""
    mid = (jnp.arange(bands, dtype=jnp.float32) + 0.5) / bands
    if spec.flow is not None:
        return mid
    return jnp.floor(mid * spec.schedule.num_train_timesteps).astype(jnp.int32)


def _key(seed: int, example: jax.Array, band: int, stream: int) -> jax.Array:
    root = jax.random.fold_in(jax.random.key(seed, impl=rng.PRNG_IMPL), jnp.uint32(VALIDATION_ROOT))
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, example), band), stream)


@functools.partial(xla.jit, static_argnames=("family", "spec", "bands", "mesh"))
def losses(family: Family, spec: StepSpec, bands: int, params: Params, frozen: Params,
           batch: Mapping[str, jax.Array], examples: jax.Array,
           mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """{"loss", "loss_null"}: float32 [B, bands] for the examples `examples` (int32 [B],
    their validation ids, which key the noise) given as a batch like the train step's
    ("images" or "moments", "tokens" or "cond/<name>", batch conditioners). With `mesh`
    the examples are split over its devices (the train step's batch sharding)."""
    if mesh is not None:
        batch, examples = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)), (batch, examples))
    parts = {**frozen, **params["model"]}
    moments = batch["moments"] if "moments" in batch else family.image_moments(frozen, batch["images"])
    cond = ({k[len("cond/"):]: v for k, v in batch.items() if k.startswith("cond/")} if "tokens" not in batch
            else family.encode(parts, batch["tokens"]))
    cond.update({k: batch[k] for k in family.batch_conditioners})
    null = unconditional(family, spec, params, frozen, cond)
    ts = band_timesteps(spec, bands)
    out = {"loss": [], "loss_null": []}
    with rng.derivation():
        for b in range(bands):  # a handful; each band is one forward pass per branch
            draw = jax.vmap(lambda e, m: family.draw_x0(m[None], _key(spec.seed, e, b, rng.STREAM_LATENT))[0])
            x0 = draw(examples, moments)
            noise = jax.vmap(lambda e: jax.random.normal(_key(spec.seed, e, b, rng.STREAM_NOISE), x0.shape[1:]))(
                examples)
            t = jnp.full((x0.shape[0],), ts[b])
            out["loss"].append(example_losses(family, spec, parts, cond, x0, noise, t))
            out["loss_null"].append(example_losses(family, spec, parts, null, x0, noise, t))
    out = {k: jnp.stack(v, axis=1).astype(jnp.float32) for k, v in out.items()}
    # Replicated, so every process can read all of it.
    return out if mesh is None else jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))


def evaluate(family: Family, spec: StepSpec, e: ml_collections.ConfigDict, params: Params, frozen: Params,
             data: Data, ids: np.ndarray, mesh: Mesh) -> dict[str, float]:
    """`summarize`d validation losses of records `ids` of `data` (the first
    `e.max_examples`), bucket by bucket in batches of `e.batch` split over `mesh`; each
    process loads only its rows. Records are read as at step 0 (crops, caption choice)."""
    ids = np.asarray(ids)[:e.max_examples]
    params, frozen = sharding.on_mesh((params, frozen), mesh)
    bucket_of = np.asarray(data.buckets)[ids]
    rows = e.batch + (-e.batch % mesh.size)  # whole rows per device
    per: dict[str, list[np.ndarray]] = {"loss": [], "loss_null": []}
    for bucket in np.unique(bucket_of):
        members = ids[bucket_of == bucket]
        for i in range(0, len(members), rows):
            chunk = members[i:i + rows]
            # Padded with copies of its last record (valid inputs), dropped below.
            padded = np.concatenate([chunk, np.full(rows - len(chunk), chunk[-1])])
            batch = sharding.put_batch(mesh, padded, lambda r: {**data.batch(r, 0), "example": r.astype(np.int32)})
            examples = batch.pop("example")
            out = losses(family, spec, e.bands, params, frozen, batch, examples, mesh=mesh)
            for k in per:
                per[k].append(np.asarray(out[k])[:len(chunk)])
    return summarize({k: np.concatenate(v) for k, v in per.items()})


def summarize(per_example: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Scalars to log from stacked `losses` outputs [N, bands]: the means over examples and
    bands, the caption gap with its standard error over examples (`caption_gap_se`: a gap
    within about two of it is noise), and each band's (`band<b>`, low noise first)."""
    loss, null = np.asarray(per_example["loss"], np.float64), np.asarray(per_example["loss_null"], np.float64)
    gap = (null - loss).mean(axis=1)  # per example
    se = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else float("nan")
    out = {"val/loss": loss.mean(), "val/loss_null": null.mean(), "val/caption_gap": gap.mean(),
           "val/caption_gap_se": se, "val/examples": float(loss.shape[0])}
    for b in range(loss.shape[1]):
        out[f"val/loss/band{b}"] = loss[:, b].mean()
        out[f"val/caption_gap/band{b}"] = (null[:, b] - loss[:, b]).mean()
    return {k: float(v) for k, v in out.items()}

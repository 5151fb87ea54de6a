"""Where every random bit of a training step comes from.

All randomness of step `s` in a run with seed `seed` descends from one key:

    step_key = fold_in(key(seed, impl="threefry2x32"), s)

and each use has its own sub-stream, `fold_in(step_key, STREAM)`, so that changing
one thing (a dropout rate, the number of groups) never changes the bits of another
(the noise, the timesteps). Nothing is split sequentially and nothing is carried from
step to step, which is why a resumed run needs no saved RNG state.

The bits also depend on two settings that jax lets a user change globally: the PRNG
implementation and `jax_threefry_partitionable`. We pin both here, locally, with
`derivation()`, so jaxcond's bits never depend on a default it did not set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

PRNG_IMPL = "threefry2x32"
# Seeds and steps are int32 in the step (its counter) and in the key derivation: both
# lie in [0, LIMIT).
LIMIT = 2**31
THREEFRY_PARTITIONABLE = True  # Bits are then independent of sharding (see README).

# Sub-stream ids. Append new ones; never renumber (that would change old runs' bits).
STREAM_DROPOUT = 0
STREAM_NOISE = 1
STREAM_TIMESTEP = 2
STREAM_NOISE_OFFSET = 3
STREAM_MODEL = 4  # Model-internal randomness (e.g. layer dropout), if a family uses it.
STREAM_LATENT = 5  # Drawing latents from the VAE's distribution (latent families).


@contextlib.contextmanager
def derivation() -> Iterator[None]:
    """Pins the settings the bits depend on while tracing the code inside."""
    with jax.threefry_partitionable(THREEFRY_PARTITIONABLE):
        yield


def step_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The root key of one training step."""
    return jax.random.fold_in(jax.random.key(seed, impl=PRNG_IMPL), step)


def stream_key(seed: int | jax.Array, step: int | jax.Array, stream: int) -> jax.Array:
    """The key of one sub-stream (STREAM_*) of one step."""
    return jax.random.fold_in(step_key(seed, step), stream)

"""Which records form the global batch of each step: a pure function of the step.

Epoch e is a permutation of all records drawn from (seed, e); step s takes batch
s % steps_per_epoch of epoch s // steps_per_epoch. The last `num_records %
global_batch` records of each permutation are left out (a different few each epoch),
so every step has a full batch and an epoch is a whole number of steps. Position i of
the global batch is the i-th id returned here: the position the dropout masks use.

With aspect-ratio buckets (`bucketed_batch`) every global batch comes from one bucket:
epoch e permutes each bucket's records, cuts them into full batches (the remainder of
each bucket waits for another epoch) and then permutes the batches, all from (seed, e).
With a single bucket this is exactly `batch_ids`. Records in bucket -1 (held out for
validation, `jaxcond.data.split`) are in no batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    return num_records // global_batch


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    # A separate numpy stream keyed by (seed, epoch): the order never touches jax's bits.
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def batch_ids(seed: int, step: int, global_batch: int, num_records: int) -> np.ndarray:
    """Record ids of step `step`'s global batch, in batch-position order."""
    spe = steps_per_epoch(num_records, global_batch)
    epoch, b = divmod(step, spe)
    return _permutation(seed, epoch, num_records)[b * global_batch:(b + 1) * global_batch]


def bucketed_epoch(seed: int, epoch: int, global_batch: int,
                   buckets: Sequence[int]) -> tuple[tuple[int, np.ndarray], ...]:
    """All (bucket, record ids) batches of epoch `epoch`, in step order."""
    bucket_of = np.asarray(buckets)
    if (bucket_of == bucket_of[0]).all():
        perm = _permutation(seed, epoch, len(bucket_of))
        n = len(perm) // global_batch
        return tuple((int(bucket_of[0]), perm[i * global_batch:(i + 1) * global_batch]) for i in range(n))
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for b in np.unique(bucket_of[bucket_of >= 0]):
        members = rng.permutation(np.flatnonzero(bucket_of == b))
        batches += [(int(b), members[i:i + global_batch])
                    for i in range(0, len(members) - global_batch + 1, global_batch)]
    return tuple(batches[i] for i in rng.permutation(len(batches)))


def bucketed_steps_per_epoch(global_batch: int, buckets: Sequence[int]) -> int:
    b = np.asarray(buckets)
    return int(sum(c // global_batch for c in np.bincount(b[b >= 0])))


def bucketed_batch(seed: int, step: int, global_batch: int,
                   buckets: Sequence[int]) -> tuple[int, np.ndarray]:
    """(bucket, record ids) of step `step`; `buckets[r]` is record r's bucket index.
    (Computes the whole epoch: the loader keeps epochs, see jaxcond.data.pipeline.)"""
    spe = bucketed_steps_per_epoch(global_batch, buckets)
    if spe == 0:
        raise ValueError(f"no bucket holds a full global batch of {global_batch}")
    epoch, b = divmod(step, spe)
    return bucketed_epoch(seed, epoch, global_batch, buckets)[b]

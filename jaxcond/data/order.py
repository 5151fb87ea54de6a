"""Which records form the global batch of each step: a pure function of the step.

Epoch e is a permutation of all records drawn from (seed, e); step s takes batch
s % steps_per_epoch of epoch s // steps_per_epoch. The last `num_records %
global_batch` records of each permutation are left out (a different few each epoch),
so every step has a full batch and an epoch is a whole number of steps. Position i of
the global batch is the i-th id returned here: the position the dropout masks use.
"""

from __future__ import annotations

import functools

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

"""Which records are held out for validation: a pure function of (seed, record id).

Record r (the data's own numbering: sorted files, metadata rows, shard records, demo
indices) is held out when u_r < validation_fraction, where u_0, u_1, ... are uniform
draws of numpy's PCG64 keyed by (seed, HELD_OUT_KEY). The draws of earlier records do
not depend on how many records follow, so appending data keeps the split of the old
records; every host computes the same split from the same data. Held-out records never
enter a training batch (`jaxcond.data.order` skips them).
"""

from __future__ import annotations

import numpy as np

HELD_OUT_KEY = 0x5A11D  # a stream of its own: the training order's keys are (seed, epoch)


def held_out(seed: int, num_records: int, fraction: float) -> np.ndarray:
    """bool [num_records]: True for the validation records."""
    if fraction <= 0:
        return np.zeros(num_records, bool)
    return np.random.default_rng([seed, HELD_OUT_KEY]).random(num_records) < fraction


def training_buckets(buckets: tuple[int, ...], held: np.ndarray) -> tuple[int, ...]:
    """Each record's bucket, -1 for the held-out ones (the order leaves them out)."""
    return tuple(int(b) if not h else -1 for b, h in zip(buckets, held))

"""Host-side caption augmentation for comma-separated tag captions (booru/kohya style).

Deterministic from (seed, epoch, record id): a resumed run, another host or another
worker process produces the same caption for the same example. Conditional dropout (the
whole caption replaced by the null) is not done here: it happens in the train step.
"""

from __future__ import annotations

import numpy as np

_SALT = 0x6A78  # keeps this stream apart from other host-side uses of the same seed


def augment(caption: str, *, seed: int, epoch: int, record_id: int, shuffle: bool = False,
            keep_tokens: int = 0, tag_dropout: float = 0.0) -> str:
    """Shuffles and/or drops the tags after the first `keep_tokens` (kept in place)."""
    if not shuffle and tag_dropout <= 0.0:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng = np.random.default_rng([_SALT, seed, epoch, record_id])
    if tag_dropout > 0.0:
        tail = [t for t, u in zip(tail, rng.random(len(tail))) if u >= tag_dropout]
    if shuffle:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    return ", ".join(head + tail)

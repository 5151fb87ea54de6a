"""The masks a run uses, re-derived from its config alone (no model, no training)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import ml_collections
import numpy as np

from jaxcond import config as config_lib, dropout
from jaxcond.data import order


def mask_records(cfg: ml_collections.ConfigDict, steps: Iterable[int]) -> Iterator[dict]:
    """One JSON-ready record per step: per group the rate, the dropped batch positions
    and the record ids at those positions (the data order is a function of the step)."""
    groups = config_lib.dropout_groups(cfg)
    batch, n = cfg.train.global_batch, cfg.data.num_records
    spe = order.steps_per_epoch(n, batch)
    derive = jax.jit(functools.partial(dropout.masks, cfg.seed, groups=groups, global_batch=batch,
                                       steps_per_epoch=spe))
    rate = jax.jit(lambda s: {g.name: dropout.group_rate(g, s, spe) for g in groups})
    for step in steps:
        masks, rates = jax.device_get((derive(step), rate(step)))
        ids = order.batch_ids(cfg.seed, step, batch, n)
        out = {}
        for g in groups:
            pos = np.flatnonzero(masks[g.name])
            out[g.name] = {"rate": float(f"{rates[g.name]:.7g}"), "dropped_positions": pos.tolist(),
                           "dropped_records": ids[pos].tolist()}
        yield {"step": step, "epoch": step // spe, "groups": out}

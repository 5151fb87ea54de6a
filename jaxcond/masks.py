"""The masks a run uses, re-derived from its config alone (no model, no training).

Computed on one device: the masks are a function of (seed, step, group, batch
position) alone, so the config's mesh is neither used nor checked here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from jaxcond import config as config_lib, dropout, rng
from jaxcond.checks import ConfigError
from jaxcond.data import order, sources

log = logging.getLogger("jaxcond")


def mask_records(cfg: ml_collections.ConfigDict, steps: Iterable[int]) -> Iterator[dict]:
    """One JSON-ready record per step: per group the rate, the dropped batch positions
    and the record ids at those positions (the data order is a function of the step)."""
    config_lib.validate(cfg, None)  # the masks do not depend on the devices
    if (cfg.mesh.data, cfg.mesh.fsdp) != (-1, 1):
        log.info("config.mesh is not used: the masks do not depend on devices or mesh, and are computed "
                 "here on one device")
    groups = dropout.groups_from_config(cfg.dropout)
    batch = cfg.train.global_batch
    if cfg.data.source == "demo":
        n = cfg.data.num_records
        spe, ids_of = order.steps_per_epoch(n, batch), lambda s: order.batch_ids(cfg.seed, s, batch, n)
    else:  # the order depends on which files are usable: scan them (no model needed)
        data = sources.make_data(cfg.data, cfg.seed, batch, None, workers=cfg.loader.workers,
                                 train_text_encoder=cfg.model.train_text_encoder)
        spe, ids_of = data.steps_per_epoch, data.ids
    derive = jax.jit(functools.partial(dropout.masks, cfg.seed, groups=groups, global_batch=batch,
                                       steps_per_epoch=spe))
    rate = jax.jit(lambda s: {g.name: dropout.group_rate(g, s, spe) for g in groups})
    for step in steps:
        if not 0 <= step < rng.LIMIT:
            raise ConfigError(f"step {step}: steps are integers in [0, 2**31)")
        masks, rates = jax.device_get((derive(step), rate(step)))
        yield to_record(step, spe, rates, masks, ids_of(step))


def to_record(step: int, steps_per_epoch: int, rates: Mapping[str, float],
              masks: Mapping[str, np.ndarray], ids: np.ndarray) -> dict:
    """The JSON record of one step's masks; the trainer logs the same records (masks.jsonl)."""
    groups = {g: {"rate": float(f"{float(rates[g]):.7g}"),
                  "dropped_positions": np.flatnonzero(m).tolist(),
                  "dropped_records": ids[np.flatnonzero(m)].tolist()} for g, m in masks.items()}
    return {"step": step, "epoch": step // steps_per_epoch, "groups": groups}

"""A finished (or running) run directory, loaded for the commands that read one: its saved
config, model and restored checkpoint (`jaxcond export`, `sample`, `verify`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from jaxcond import checkpoint, config as config_lib, dropout, storage, train_step as ts
from jaxcond.checks import ConfigError
from jaxcond.models import registry
from jaxcond.models.family import Family


def load_family(cfg: ml_collections.ConfigDict, workdir: str, shapes_only: bool = False) -> Family:
    """The model of a run's config (`config.model.family`), computing in its compute dtype."""
    return registry.from_config(cfg.model, workdir=workdir, dtype=ts.DTYPES[cfg.train.compute_dtype],
                                resolution=cfg.data.resolution, shapes_only=shapes_only)


@dataclasses.dataclass
class Trained:
    """A run's saved config and restored state, for export and sampling outside training."""

    cfg: ml_collections.ConfigDict
    family: Family
    spec: ts.StepSpec
    state: Any
    step: int

    def params(self, weights: str) -> Any:
        """The trained params to use: "ema" (the averaged ones) or "raw"."""
        if weights not in ("ema", "raw"):
            raise ConfigError(f"--weights {weights!r}: use 'ema' or 'raw'")
        if weights == "ema" and "ema" not in self.state:
            raise ConfigError(
                "--weights ema: this run kept no EMA (config.optim.ema_decay = 0); use --weights raw")
        return self.state["ema" if weights == "ema" else "params"]


def load_trained(workdir: str, step: int | None = None, model_source: str | None = None) -> Trained:
    """The newest checkpoint of run `workdir` (or that of `step`), restored on one device.
    `model_source` replaces the saved config.model.source: the base model moved."""
    # Read-only: a run still training may be writing into the same folder.
    ckpts = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"), every_steps=1, keep=1,
                                   async_save=False, read_only=True)
    steps = ckpts.all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint; is {workdir!r} a run "
                                "directory (the --workdir of jaxcond train)?")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{workdir} has no checkpoint of step {step}; it has steps {sorted(steps)}")
    cfg = ml_collections.ConfigDict(ckpts.saved_config(step))
    if model_source:
        cfg.model.source = model_source
    try:
        family = load_family(cfg, workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (run {workdir} was trained from that base model; if it moved, pass "
                                "--model_source=WHERE_IT_IS_NOW)") from None
    # steps_per_epoch only feeds dropout schedules, which nothing outside training evaluates.
    groups = dropout.groups_from_config(cfg.dropout, family.conditioners, family.batch_conditioners)
    spec = ts.StepSpec.from_config(cfg, groups, 1)
    tx, _ = ts.make_optimizer(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ckpts.restore(step, ts.abstract_state(family, spec, tx, cfg.train.param_dtype,
                                                  lambda shapes: jax.tree.map(lambda _: one, shapes)))
    ckpts.close()
    return Trained(cfg, family, spec, state, step)


def load_untrained(cfg: ml_collections.ConfigDict, workdir: str) -> Trained:
    """A config's model at step 0, no run: its base, with `model.lora.init_from`'s adapters
    if set (to sample a LoRA file without training). `workdir` holds a locally built base."""
    config_lib.validate(cfg, None, reads_data=False)
    family = load_family(cfg, workdir)
    groups = dropout.groups_from_config(cfg.dropout, family.conditioners, family.batch_conditioners)
    spec = ts.StepSpec.from_config(cfg, groups, 1)
    tx, _ = ts.make_optimizer(cfg)
    return Trained(cfg, family, spec, ts.init_state(family, spec, tx, ts.DTYPES[cfg.train.param_dtype]), 0)

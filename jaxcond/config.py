"""The run's config: loading config files, checking every field before anything is
compiled, and the fields a resume must not change.

Each section is checked by the module that owns it (`validate` only dispatches): the
step's `seed`, `train.*`, `optim.*` by `jaxcond.train_step`, `dropout.*` by
`jaxcond.dropout`, `diffusion.*` by `jaxcond.diffusion`, `mesh.*` by `jaxcond.sharding`,
`checkpoint.*` by `jaxcond.checkpoint`, `model.*` by its family (`jaxcond.models.registry`),
`data.*` and `loader.*` by `jaxcond.data.sources`, `sample.*` by `jaxcond.sampling`,
`logging.*` by `jaxcond.wandb_log`.
Every error is a `jaxcond.checks.ConfigError` naming the field as it is overridden on
the command line.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import ml_collections

from jaxcond import checkpoint, diffusion, dropout, sampling, sharding, train_step, validation, wandb_log
from jaxcond.checks import ConfigError
from jaxcond.data import sources
from jaxcond.models import registry


def from_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, for config files built on another one."""
    spec = importlib.util.spec_from_file_location(f"jaxcond_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None, reads_data: bool = True) -> None:
    """Checks every field the run depends on; raises ConfigError on the first bad one.
    `num_devices` None skips what depends on the devices (the mesh), e.g. for the masks,
    which do not; `reads_data` False, that the data is named (`jaxcond plan` reads none)."""
    try:
        _validate(cfg, num_devices, reads_data)
    except AttributeError as e:  # ConfigDict's missing field: AttributeError(KeyError(name))
        if not (e.args and isinstance(e.args[0], KeyError)):
            raise
        raise ConfigError(f"the config has no field {e.args[0].args[0]}: a config file defines every field of "
                          "configs/base.py; build on it with jaxcond.config.from_file('configs/base.py')"
                          ) from None


def _validate(cfg: ml_collections.ConfigDict, num_devices: int | None, reads_data: bool) -> None:
    dropout.groups_from_config(cfg.dropout)
    train_step.validate(cfg)
    t = cfg.train
    sharding.validate(cfg.mesh, num_devices, t.global_batch, t.grad_accum)
    diffusion.validate(cfg.diffusion)
    checkpoint.validate(cfg.checkpoint)
    family = registry.check_config(cfg.model)
    sources.validate(cfg.data, cfg.loader, global_batch=t.global_batch,
                     train_text_encoder=cfg.model.train_text_encoder, reads_data=reads_data)
    multiple = family.config_size_multiple(cfg.model)
    if multiple is not None:  # checked again once loaded
        sources.check_image_sizes(cfg.data, multiple)
    sampling.validate(cfg.sample, cfg.diffusion.get("objective", "ddpm"))
    if "eval" in cfg:  # configs saved before validation losses existed have none
        validation.validate(cfg.eval)
    if "logging" in cfg:  # configs saved before the section existed log to TensorBoard only
        wandb_log.validate(cfg.logging)


# Fields whose change alters which examples, masks or noise a step sees: a resumed run
# with any of them changed would not continue the run it claims to continue.
RESUME_CRITICAL = ("seed", "dropout", "train.global_batch", "train.grad_accum", "data",
                   "diffusion", "model",
                   # These change the train state itself, which a restore would refuse less clearly.
                   "train.param_dtype", "optim.name", "optim.moment_dtype", "optim.ema_dtype")
# Fields added after runs were saved, at the value those runs had.
_ADDED = {"optim.name": "adamw", "optim.moment_dtype": "float32", "optim.ema_dtype": "params",
          "model.frozen_dtype": "float32", "diffusion.objective": "ddpm", "diffusion.flow_shift": 3.0,
          "diffusion.flow_timestep_sampling": "logit_normal", "diffusion.flow_logit_mean": 0.0,
          "diffusion.flow_logit_std": 1.0, "diffusion.flow_mode_scale": 1.29, "diffusion.flow_weighting": "none",
          "diffusion.flow_shift_mode": "fixed", "diffusion.flow_base_shift": 0.5, "diffusion.flow_max_shift": 1.15,
          "data.validation_fraction": 0.0, "data.validation_path": "",
          "model.lora": {"rank": 0, "alpha": 0.0, "targets": ["attention"], "seed": 0, "init_from": ""},
          "data.auto_buckets": {"area": 0, "min_side": 0, "max_side": 0, "step": 0, "max_buckets": 8}}


def _get(d: Mapping, dotted: str) -> object:
    for part in dotted.split("."):
        d = d.get(part, None) if isinstance(d, Mapping) else None
    return d


# Inside those sections, fields that change where batches come from but not what they hold.
RESUME_EXEMPT = ("data.cache", "data.eval_prompts",
                 "model.remat", "model.scan_layers")  # how it is computed, not what


def _without_exempt(d: Mapping, section: str) -> object:
    value = _get(d, section)
    if not isinstance(value, Mapping):
        return value
    return {k: v for k, v in value.items() if f"{section}.{k}" not in RESUME_EXEMPT}


def _as_read(d: Mapping) -> Mapping:
    """`d` with its model section as the family registry reads it, and fields added since
    it was saved at the value it ran with."""
    model = d.get("model")
    d = {**d, "model": registry.as_read(model)} if isinstance(model, Mapping) else dict(d)
    for dotted, value in _ADDED.items():
        section, field = dotted.split(".")
        if isinstance(d.get(section), Mapping) and field not in d[section]:
            d[section] = {**d[section], field: value}
    return d


def _differences(name: str, a: object, b: object) -> list[str]:
    """The leaves in which `a` and `b` differ, each named by its dotted field."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(f"{name}.{k}", a.get(k, "(absent)"), b.get(k, "(absent)"))]
    return [] if a == b else [f"config.{name}: checkpoint has {a!r}, now {b!r}"]


def resume_conflicts(saved: Mapping, current: Mapping) -> list[str]:
    """Human-readable differences in RESUME_CRITICAL fields between two config dicts."""
    saved, current = _as_read(saved), _as_read(current)
    return [d for k in RESUME_CRITICAL
            for d in _differences(k, _without_exempt(saved, k), _without_exempt(current, k))]

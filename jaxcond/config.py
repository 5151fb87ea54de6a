"""Config checks that run before anything is compiled.

Every error names the offending field as it would be overridden on the command line
(`config.dropout.groups.caption.rate`) and says what would be accepted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping

import ml_collections

from jaxcond import diffusion, dropout
from jaxcond.data import demo as demo_data


class ConfigError(ValueError):
    """A config field has a value jaxcond cannot run with."""


def from_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, for config files built on another one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jaxcond_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def make_output_dir(path: str, what: str) -> None:
    """Creates the folder `path` (named by the flag or field `what`) and proves it writable,
    before the work whose result would otherwise be lost at the end."""
    if "://" in path:  # os.makedirs would quietly make a local folder "gs:" instead
        raise ConfigError(f"{what} {path!r} is a URL, which is not supported yet (files are written "
                          "locally): use a path every host sees, e.g. a GCS FUSE mount (/gcs/BUCKET/run) or NFS")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a folder: choose another path")
    probe = os.path.join(path, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path!r} is not writable ({e.strerror or e}): choose another path or "
                          "fix its permissions/space") from None


def _check(ok: bool, field: str, value: object, want: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field} = {value!r}: {want}")


def _one_of(field: str, value: object, options: Iterable[str]) -> None:
    options = tuple(options)
    _check(value in options, field, value, f"must be one of {options}")


def _int_at_least(field: str, value: object, low: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
           field, value, f"must be an integer >= {low}")


def _in_unit_interval(field: str, value: object) -> None:
    _check(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, field, value,
           "must be a number in [0, 1]")


def dropout_groups(cfg: ml_collections.ConfigDict, conditioners: Iterable[str] | None = None,
                   data_conditioners: Iterable[str] = ()) -> list[dropout.Group]:
    """The dropout groups of `cfg.dropout`, checked; conditioner names too when given
    (`data_conditioners`: those the data supplies, which have no `empty` encoding)."""
    groups = []
    owner: dict[str, str] = {}
    for name, g in cfg.dropout.groups.items():
        f = f"dropout.groups.{name}"
        _in_unit_interval(f"{f}.rate", g.rate)
        _one_of(f"{f}.schedule", g.schedule, dropout.SCHEDULES)
        if g.schedule == "linear_warmup":
            _int_at_least(f"{f}.warmup_steps", g.warmup_steps, 1)
        if g.schedule == "every_n_epochs":
            _int_at_least(f"{f}.every_n_epochs", g.every_n_epochs, 1)
            _in_unit_interval(f"{f}.epoch_rate", g.epoch_rate)
        members = tuple(g.members)
        _check(len(members) > 0, f"{f}.members", g.members, "must name at least one conditioner")
        for m in members:
            _check(m not in owner, f"{f}.members", g.members,
                   f"{m!r} is already in group {owner.get(m)!r}; a conditioner belongs to one group")
            owner[m] = name
            _check(m in cfg.dropout.nulls, f"{f}.members", g.members,
                   f"{m!r} has no null: add config.dropout.nulls.{m} = 'empty' | 'zeros' | 'learned'")
        groups.append(dropout.Group(
            name=name, members=members, rate=float(g.rate), schedule=g.schedule,
            warmup_steps=int(g.warmup_steps), every_n_epochs=int(g.every_n_epochs),
            epoch_rate=float(g.epoch_rate)))
    for m, kind in cfg.dropout.nulls.items():
        _one_of(f"dropout.nulls.{m}", kind, dropout.NULL_KINDS)
    if conditioners is not None:
        known = tuple(conditioners)
        for m in owner:
            _check(m in known, f"dropout.groups.{owner[m]}.members", m,
                   f"unknown conditioner; this model has {known}")
        for m in cfg.dropout.nulls:
            _check(m in known, f"dropout.nulls.{m}", cfg.dropout.nulls[m],
                   f"{m!r} is not a conditioner of this model; it has {known}")
            _check(m not in data_conditioners or cfg.dropout.nulls[m] != "empty", f"dropout.nulls.{m}",
                   "empty", f"{m!r} comes from the data, not the caption, so it has no empty-caption "
                   "encoding; use 'zeros' or 'learned'")
    return groups


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 filled in; checked against the device count."""
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}
    free = [k for k, v in sizes.items() if v == -1]
    _check(len(free) <= 1, "mesh", dict(sizes), "at most one axis may be -1")
    for k, v in sizes.items():
        _check(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{k}", v, "must be -1 or >= 1")
    fixed = 1
    for v in sizes.values():
        fixed *= v if v != -1 else 1
    if free:
        _check(num_devices % fixed == 0, f"mesh.{free[0]}", -1,
               f"the other axes use {fixed} devices, which does not divide the {num_devices} available")
        sizes[free[0]] = num_devices // fixed
    total = 1
    for v in sizes.values():
        total *= v
    _check(total == num_devices, "mesh", dict(sizes),
           f"axis sizes multiply to {total} but {num_devices} devices are available")
    return sizes


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None) -> None:
    """Checks every field the run depends on; raises ConfigError on the first bad one.
    `num_devices` None skips what depends on the devices (the mesh), e.g. for the masks,
    which do not."""
    try:
        _validate(cfg, num_devices)
    except AttributeError as e:  # ConfigDict's missing field: AttributeError(KeyError(name))
        if not (e.args and isinstance(e.args[0], KeyError)):
            raise
        raise ConfigError(f"the config has no field {e.args[0].args[0]}: a config file defines every field of "
                          "configs/demo.py; build on it with jaxcond.config.from_file('configs/demo.py')"
                          ) from None


def _validate(cfg: ml_collections.ConfigDict, num_devices: int | None) -> None:
    _int_at_least("seed", cfg.seed, 0)
    _check(cfg.seed < 2**31, "seed", cfg.seed, "must be < 2**31")
    dropout_groups(cfg)
    t = cfg.train
    _int_at_least("train.steps", t.steps, 1)
    _int_at_least("train.global_batch", t.global_batch, 1)
    _int_at_least("train.grad_accum", t.grad_accum, 1)
    _one_of("train.param_dtype", t.param_dtype, ("float32", "bfloat16"))
    _one_of("train.compute_dtype", t.compute_dtype, ("float32", "bfloat16"))
    _int_at_least("train.log_every", t.log_every, 1)
    _int_at_least("train.sample_every", t.sample_every, 0)
    _int_at_least("train.max_skipped_updates", t.max_skipped_updates, -1)
    _int_at_least("mesh.dcn_data", cfg.mesh.dcn_data, 1)
    _int_at_least("mesh.fsdp_min_size", cfg.mesh.fsdp_min_size, 1)
    _check(t.global_batch % t.grad_accum == 0, "train.global_batch", t.global_batch,
           f"must be divisible by config.train.grad_accum = {t.grad_accum}")
    if num_devices is not None:
        sizes = mesh_shape(cfg, num_devices)
        shards = sizes["data"] * sizes["fsdp"]
        _check(sizes["data"] % cfg.mesh.dcn_data == 0, "mesh.dcn_data", cfg.mesh.dcn_data,
               f"must divide the data axis ({sizes['data']}): each slice holds an equal part of it")
        micro = t.global_batch // t.grad_accum
        _check(micro % shards == 0, "train.global_batch", t.global_batch,
               f"each micro-batch ({micro} = global_batch / grad_accum) must split evenly over the "
               f"{shards} devices of the mesh (data x fsdp); use a multiple of {shards * t.grad_accum}")
    d = cfg.diffusion
    _int_at_least("diffusion.num_train_timesteps", d.num_train_timesteps, 2)
    _one_of("diffusion.beta_schedule", d.beta_schedule, diffusion.BETA_SCHEDULES)
    _one_of("diffusion.prediction_type", d.prediction_type, diffusion.PREDICTION_TYPES)
    _check(d.snr_gamma >= 0, "diffusion.snr_gamma", d.snr_gamma, "must be >= 0 (0 turns it off)")
    _check(d.noise_offset >= 0, "diffusion.noise_offset", d.noise_offset, "must be >= 0")
    o = cfg.optim
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _one_of("optim.schedule", o.schedule, ("cosine", "constant"))
    _int_at_least("optim.warmup_steps", o.warmup_steps, 0)
    _in_unit_interval("optim.end_lr_fraction", o.end_lr_fraction)
    for name in ("b1", "b2"):
        _check(0 <= o[name] < 1, f"optim.{name}", o[name], "must be in [0, 1) (Adam's decay rates)")
    # Adam divides by sqrt(second moment) + eps: with 0, a parameter whose gradient is 0
    # gets 0/0, and every such update would be skipped as non-finite.
    _check(o.eps > 0, "optim.eps", o.eps, "must be > 0 (Adam's epsilon, e.g. 1e-8)")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 turns it off)")
    _check(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "must be in [0, 1) (0 turns it off)")
    _int_at_least("checkpoint.every_steps", cfg.checkpoint.every_steps, 1)
    _int_at_least("checkpoint.keep", cfg.checkpoint.keep, 1)
    _int_at_least("model.clip_skip", cfg.model.clip_skip, 1)
    _check(not cfg.model.source.endswith(".safetensors") or bool(cfg.model.base), "model.base",
           cfg.model.base, "a single-file model.source carries no config: name a diffusers folder or hub id "
           "of its family, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
    _check(isinstance(cfg.model.train_text_encoder, bool), "model.train_text_encoder",
           cfg.model.train_text_encoder, "must be True or False")
    if cfg.model.source == "demo":
        m = cfg.model.demo
        # diffusers' Flax UNet normalises with 32 groups.
        _check(all(ch % 32 == 0 for ch in m.unet_channels), "model.demo.unet_channels",
               m.unet_channels, "every width must be a multiple of 32")
        _check(1 <= m.cross_attention_levels <= len(m.unet_channels), "model.demo.cross_attention_levels",
               m.cross_attention_levels, f"must be in [1, {len(m.unet_channels)}] (the number of UNet levels)")
        for name in ("layers_per_block", "attention_heads", "time_embed_dim", "text_width", "text_layers",
                     "text_heads", "max_length"):
            _int_at_least(f"model.demo.{name}", m[name], 1)
        attended = m.unet_channels[len(m.unet_channels) - m.cross_attention_levels:]
        _check(all(ch % m.attention_heads == 0 for ch in attended), "model.demo.attention_heads",
               m.attention_heads, f"must divide the widths of the cross-attention levels {tuple(attended)}")
        _one_of("model.demo.text_encoders", m.text_encoders, (1, 2))
        _check(m.pooled or m.text_encoders == 1, "model.demo.pooled", m.pooled,
               "two text encoders (SDXL) need the pooled text_time embedding")
        _check(m.text_width % m.text_heads == 0, "model.demo.text_width", m.text_width,
               f"must be divisible by config.model.demo.text_heads = {m.text_heads}")
        _check(all(ch % 32 == 0 for ch in m.vae_channels), "model.demo.vae_channels",
               m.vae_channels, "every width must be a multiple of 32")
    d = cfg.data
    _one_of("data.source", d.source, ("demo", "folder", "metadata", "shards", "hf"))
    _int_at_least("data.resolution", d.resolution, 8)
    if d.source == "demo":
        _int_at_least("data.num_records", d.num_records, 1)
        _check(d.num_records >= t.global_batch, "data.num_records", d.num_records,
               f"must be at least one global batch ({t.global_batch})")
        try:
            demo_data.split_combinations(d.heldout_fraction, d.seed)
        except ValueError as e:
            raise ConfigError(f"config.data.heldout_fraction = {d.heldout_fraction!r}: {e}") from None
    else:
        what = {"folder": "folder of images and .txt captions", "metadata": "metadata.jsonl/.csv file or its folder",
                "shards": "folder written by jaxcond shards",
                "hf": "datasets folder (save_to_disk) or hub id"}[d.source]
        _check(bool(d.path), "data.path", d.path, f"data.source = {d.source!r} needs the {what}")
        for b in d.buckets:
            _check(isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, int) and x >= 8 for x in b),
                   "data.buckets", d.buckets, "each bucket is (height, width) in pixels, both integers >= 8; "
                   "one bucket is written ((h, w),)")
        _one_of("data.crop", d.crop, ("center", "random"))
        _check(d.caption_extension.startswith(".") and len(d.caption_extension) > 1
               and os.sep not in d.caption_extension, "data.caption_extension", d.caption_extension,
               "a file extension with its dot, e.g. .txt or .caption")
        _one_of("data.missing_caption", d.missing_caption, ("skip", "empty"))
        _one_of("data.empty_caption", d.empty_caption, ("keep", "skip"))
        _one_of("data.too_small", d.too_small, ("upscale", "skip"))
        _int_at_least("data.keep_tokens", d.keep_tokens, 0)
        _in_unit_interval("data.tag_dropout", d.tag_dropout)
    if cfg.model.source == "demo":  # checked again once loaded; the demo model is built at this size
        m = cfg.model.demo
        check_image_sizes(cfg, 2 ** (len(m.unet_channels) - 1 + max(len(m.vae_channels) - 1, 0)))
    if d.cache:
        from jaxcond.data.cache import check_cacheable

        check_cacheable(cfg)
    _int_at_least("loader.workers", cfg.loader.workers, 1)
    _int_at_least("loader.prefetch", cfg.loader.prefetch, 1)
    _int_at_least("loader.processes", cfg.loader.processes, 0)
    s = cfg.sample
    _int_at_least("sample.num_prompts", s.num_prompts, 1)
    _int_at_least("sample.per_prompt", s.per_prompt, 1)
    _int_at_least("sample.steps", s.steps, 1)
    _check(len(s.guidance) > 0 and all(g >= 0 for g in s.guidance), "sample.guidance", s.guidance,
           "one or more scales, each >= 0")
    from jaxcond.sampling import SCHEDULERS

    _one_of("sample.scheduler", cfg.sample.scheduler, SCHEDULERS)


def check_image_sizes(cfg: ml_collections.ConfigDict, multiple: int) -> None:
    """Raises ConfigError unless every image size the data yields (config.data.buckets, or
    resolution x resolution) is a multiple of `multiple`, a model's Family.size_multiple:
    other sizes fail deep inside the UNet, where down- and up-sampled features meet."""
    d = cfg.data
    why = f"this model downsamples images {multiple}x (VAE and UNet levels)"
    if d.source != "demo" and d.buckets:
        bad = [tuple(b) for b in d.buckets if b[0] % multiple or b[1] % multiple]
        _check(not bad, "data.buckets", d.buckets,
               f"{bad} not multiples of {multiple}: {why}, so heights and widths must be multiples of it")
    else:
        _check(d.resolution % multiple == 0, "data.resolution", d.resolution,
               f"must be a multiple of {multiple}: {why}")


# Fields whose change alters which examples, masks or noise a step sees: a resumed run
# with any of them changed would not continue the run it claims to continue.
RESUME_CRITICAL = ("seed", "dropout", "train.global_batch", "train.grad_accum", "data",
                   "diffusion", "model")


def _get(d: Mapping, dotted: str) -> object:
    for part in dotted.split("."):
        d = d.get(part, None) if isinstance(d, Mapping) else None
    return d


# Inside those sections, fields that change where batches come from but not what they hold.
RESUME_EXEMPT = ("data.cache", "data.eval_prompts")


def _without_exempt(d: Mapping, section: str) -> object:
    value = _get(d, section)
    if not isinstance(value, Mapping):
        return value
    return {k: v for k, v in value.items() if f"{section}.{k}" not in RESUME_EXEMPT}


def resume_conflicts(saved: Mapping, current: Mapping) -> list[str]:
    """Human-readable differences in RESUME_CRITICAL fields between two config dicts."""
    return [f"config.{k}: checkpoint has {_get(saved, k)!r}, now {_get(current, k)!r}"
            for k in RESUME_CRITICAL if _without_exempt(saved, k) != _without_exempt(current, k)]

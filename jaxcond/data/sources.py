"""The one entry point of the data layer: which source `config.data` names, its checks,
and the commands that write a source in another form (`jaxcond cache`, `jaxcond shards`).

A source gets `config.data` plus the run's seed and global batch (and how many threads
may check images), never the whole config, as the train step gets its `StepSpec`.

Sources (`data.source`): `demo` (the procedural shapes, in memory), `folder` (images with
same-named caption files), `metadata` (a metadata.jsonl/.csv), `shards` (ArrayRecord
shards written by `jaxcond shards`), `hf` (a Hugging Face `datasets` table); any of them
read from a cache written by `jaxcond cache` when `data.cache` is set.

`data.path` and `data.cache` may be gs:// URLs (Cloud Storage) for the metadata and
shards sources: small files and images are read through jaxcond.storage, shards by
ArrayRecord itself, each host reading only its own records.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from jaxcond import storage
from jaxcond.checks import ConfigError, check, in_unit_interval, int_at_least, one_of
from jaxcond.data import buckets, cache, demo as demo_data, files, hf, pipeline, shards
from jaxcond.models.family import Family
from jaxcond.outputs import make_output_dir

SOURCES = ("demo", "folder", "metadata", "shards", "hf")
_WHAT = {"folder": "folder of images and .txt captions", "metadata": "metadata.jsonl/.csv file or its folder",
         "shards": "folder written by jaxcond shards", "hf": "datasets folder (save_to_disk) or hub id"}


def validate(d: ml_collections.ConfigDict, loader: ml_collections.ConfigDict, *, global_batch: int,
             train_text_encoder: bool, reads_data: bool = True) -> None:
    """Checks `config.data` (`d`) and `config.loader`; without `reads_data`, not that the
    data is named."""
    one_of("data.source", d.source, SOURCES)
    int_at_least("data.resolution", d.resolution, 8)
    if d.source == "demo":
        int_at_least("data.num_records", d.num_records, 1)
        check(d.num_records >= global_batch, "data.num_records", d.num_records,
              f"must be at least one global batch ({global_batch})")
        try:
            demo_data.split_combinations(d.heldout_fraction, d.seed)
        except ValueError as e:
            check(False, "data.heldout_fraction", d.heldout_fraction, str(e))
    else:
        check(bool(d.path) or not reads_data, "data.path", d.path, f"data.source = {d.source!r} needs the {_WHAT[d.source]}")
        check_location(d)
        _check_buckets(d)
        r = d.resolution
        # With buckets the images are resized to them, not to resolution x resolution: a
        # resolution the buckets do not follow (configs/sd15.py's 512 px buckets with
        # --config.data.resolution=64) would be silently ignored.
        off = [tuple(b) for b in d.buckets if not 0.5 <= b[0] * b[1] / r**2 <= 2] if d.buckets != "auto" else []
        check(not off, "data.buckets", d.buckets,
              f"{off} are not about {r}x{r} pixels (config.data.resolution = {r}), which buckets replace: "
              f"give buckets of about that area (e.g. --config.data.buckets='(({r}, {r}),)') or none "
              "(--config.data.buckets='()' trains resolution x resolution)")
        one_of("data.crop", d.crop, ("center", "random"))
        check(d.caption_extension.startswith(".") and len(d.caption_extension) > 1
              and os.sep not in d.caption_extension, "data.caption_extension", d.caption_extension,
              "a file extension with its dot, e.g. .txt or .caption")
        one_of("data.missing_caption", d.missing_caption, ("skip", "empty"))
        one_of("data.empty_caption", d.empty_caption, ("keep", "skip"))
        one_of("data.too_small", d.too_small, ("upscale", "skip"))
        int_at_least("data.keep_tokens", d.keep_tokens, 0)
        in_unit_interval("data.tag_dropout", d.tag_dropout)
    if d.cache:
        cache.check_cacheable(d, train_text_encoder)
        storage.check_url(d.cache, "config.data.cache")
    _check_validation(d)
    int_at_least("loader.workers", loader.workers, 1)
    int_at_least("loader.prefetch", loader.prefetch, 1)
    int_at_least("loader.processes", loader.processes, 0)


def _check_buckets(d: ml_collections.ConfigDict) -> None:
    """`data.buckets`: (height, width) pairs or "auto" with sane `data.auto_buckets`."""
    if d.buckets != "auto":
        check(isinstance(d.buckets, (tuple, list)), "data.buckets", d.buckets,
              'give (height, width) buckets, e.g. ((32, 32), (24, 40)), or "auto" (chosen from the images)')
        for b in d.buckets:
            check(isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, int) and x >= 8 for x in b),
                  "data.buckets", d.buckets, "each bucket is (height, width) in pixels, both integers >= 8; "
                  "one bucket is written ((h, w),)")
        return
    a = d.auto_buckets
    check(isinstance(a.area, int) and a.area >= 0, "data.auto_buckets.area", a.area,
          "must be a positive area in pixels (height * width, e.g. 262144 for 512x512), or 0 for resolution**2")
    for field in ("min_side", "max_side", "step"):
        check(isinstance(a[field], int) and a[field] >= 0, f"data.auto_buckets.{field}", a[field],
              "must be a side in pixels (an integer > 0), or 0 for its default")
    int_at_least("data.auto_buckets.max_buckets", a.max_buckets, 1)
    check(not (a.min_side and a.max_side and a.min_side > a.max_side), "data.auto_buckets.min_side", a.min_side,
          f"must be at most config.data.auto_buckets.max_side = {a.max_side}: lower it or raise max_side")


def _check_auto_buckets(d: ml_collections.ConfigDict, multiple: int) -> None:
    """"auto" buckets' step and sides on the model's size `multiple`, and at least one bucket."""
    a, why = d.auto_buckets, f"this model downsamples images {multiple}x (VAE and UNet levels)"
    check(a.step % multiple == 0, "data.auto_buckets.step", a.step,
          f"must be a multiple of {multiple} ({why}), or 0 for {multiple}")
    spec = buckets.resolve(d.resolution, a, multiple)
    for field in ("min_side", "max_side"):
        check(a[field] % spec.step == 0, f"data.auto_buckets.{field}", a[field],
              f"must be a multiple of the step {spec.step} (data.auto_buckets.step; {why}), or 0 for its default")
    check(spec.min_side <= spec.max_side, "data.auto_buckets.min_side", a.min_side,
          f"resolves to {spec.min_side}, over max_side {spec.max_side}: set both (min_side <= max_side)")
    check(bool(buckets.candidates(spec)), "data.auto_buckets.area", a.area,
          f"no bucket of about {spec.area} pixels has sides in [{spec.min_side}, {spec.max_side}] on multiples of "
          f"{spec.step}: widen min_side/max_side or change the area")


def _check_validation(d: ml_collections.ConfigDict) -> None:
    """`data.validation_fraction` / `data.validation_path`: one way to name validation records."""
    f, path = d.get("validation_fraction", 0.0), d.get("validation_path", "")
    check(0 <= f < 1, "data.validation_fraction", f, "must be in [0, 1) (0: no split)")
    check(not (f and path), "data.validation_path", path,
          "and data.validation_fraction both name validation records: set one of them")
    check(not path or d.source != "demo", "data.validation_path", path,
          "the demo source has no files: hold records out with data.validation_fraction instead")
    if path:
        storage.check_url(path, "config.data.validation_path")


def validation_set(d: ml_collections.ConfigDict, data: pipeline.Data, family: Family | None, *,
                   workers: int = 1) -> tuple[pipeline.Data, np.ndarray] | None:
    """The validation records, as (data, record ids): `data`'s held-out records, or every
    record of `data.validation_path` (the same source kind and settings, fitted to the
    training buckets so no new shape compiles); None when the config names none."""
    if not d.get("validation_path", ""):
        held = np.flatnonzero(data.held_out)
        return (data, held) if len(held) else None
    v = ml_collections.ConfigDict(d.to_dict())
    v.path, v.validation_path, v.validation_fraction, v.cache = d.validation_path, "", 0.0, ""
    v.buckets = tuple(tuple(b) for b in data.bucket_shapes)
    vdata = make_data(v, data.seed, 1, family, workers=workers, use_cache=False)
    return vdata, np.arange(vdata.num_records)


def check_location(d: ml_collections.ConfigDict) -> None:
    """A ConfigError for a `data.path` URL this source cannot read."""
    storage.check_url(d.path, "config.data.path")
    if storage.is_url(d.path) and d.source not in ("metadata", "shards"):
        raise ConfigError(f"config.data.path = {d.path!r}: data.source = {d.source!r} reads local (or mounted) "
                          "files; on Cloud Storage use data.source=metadata (a metadata.jsonl/.csv naming the "
                          "images) or data.source=shards (written by jaxcond shards)")


def check_image_sizes(d: ml_collections.ConfigDict, multiple: int) -> None:
    """Raises ConfigError unless every image size the data yields (config.data.buckets, or
    resolution x resolution) is a multiple of `multiple`, a model's Family.size_multiple:
    other sizes fail deep inside the UNet, where down- and up-sampled features meet."""
    why = f"this model downsamples images {multiple}x (VAE and UNet levels)"
    if d.source != "demo" and d.buckets == "auto":
        _check_auto_buckets(d, multiple)
    elif d.source != "demo" and d.buckets:
        bad = [tuple(b) for b in d.buckets if b[0] % multiple or b[1] % multiple]
        check(not bad, "data.buckets", d.buckets,
              f"{bad} not multiples of {multiple}: {why}, so heights and widths must be multiples of it")
    else:
        check(d.resolution % multiple == 0, "data.resolution", d.resolution,
              f"must be a multiple of {multiple}: {why}")


def make_data(d: ml_collections.ConfigDict, seed: int, global_batch: int, family: Family | None, *,
              workers: int = 1, train_text_encoder: bool = False, use_cache: bool = True,
              size_multiple: int | None = None) -> pipeline.Data:
    """The training data of `config.data` (`d`) for a run of `seed` and `global_batch`:
    from `d.cache` when set (and `use_cache`). `family` None gives the records and their
    order without tokens (what `jaxcond masks` and `jaxcond shards` need); "auto" buckets
    then need `size_multiple` (the model's) or data.auto_buckets.step."""
    if d.cache and use_cache:
        return cache.CachedData(d, seed, global_batch, family, d.cache, train_text_encoder)
    if d.source == "demo":
        return pipeline.DemoData(d, seed, global_batch, family)
    check_location(d)
    if d.source != "hf" and not storage.exists(d.path):  # hf: maybe a hub id
        raise files.DataError(f"config.data.path = {d.path!r} does not exist" + (
            " (no object or folder there: are the bucket and path right?)" if storage.is_url(d.path) else ""))
    cls = {"shards": shards.ShardData, "hf": hf.HFData}.get(d.source, pipeline.FileData)
    return cls(d, seed, global_batch, family, workers, size_multiple)


def write_shards(d: ml_collections.ConfigDict, seed: int, global_batch: int, out: str, num_shards: int, *,
                 workers: int = 1) -> dict:
    """`jaxcond shards`: the usable records of a file source as ArrayRecord shards in `out`;
    returns the index."""
    if d.source not in shards.SOURCES:
        raise files.DataError(f"shards are written from a folder, metadata or hf source, not {d.source!r}")
    make_output_dir(out, "--shards_out")  # before the scan, which can take hours
    return shards.write(make_data(d, seed, global_batch, None, workers=workers, use_cache=False), out, num_shards)


def build_cache(d: ml_collections.ConfigDict, seed: int, global_batch: int, family: Family, directory: str, *,
                workers: int = 1, train_text_encoder: bool = False) -> dict:
    """`jaxcond cache`: writes (or completes) the cache of `d`'s source in `directory`;
    returns its manifest."""
    cache.check_cacheable(d, train_text_encoder)
    check_image_sizes(d, family.size_multiple)
    make_output_dir(directory, "config.data.cache")
    return cache.build(make_data(d, seed, global_batch, family, workers=workers, use_cache=False), family,
                       directory)

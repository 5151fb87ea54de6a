"""Training data as the loop sees it: per step, this process's rows of the global batch.

The interface (`Data`) and its two base sources: the built-in demo (in memory) and image
files (a folder with .txt captions, or metadata.jsonl/csv); shards, `datasets` tables and
the cache build on them, and `jaxcond.data.sources.make_data` picks one. A source gets
`config.data` plus the run's seed and global batch, nothing else of the config.
Everything a batch holds is a pure function of (config.data, seed, step, record id): the order (`jaxcond.data.order`), the crop and
flip, the caption augmentation. So a resumed run, another host or a worker thread
produces the same batch, and the loader's only state is the step the checkpoint holds.

`decode` fits a checked image (`jaxcond.data.files.load_image`) to its bucket: resized
to cover it, cropped, flipped.

`Prefetcher` runs `Data.batch` for upcoming steps in grain worker threads (or
processes) so decoding overlaps the device step.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grain
import ml_collections
import numpy as np
import tqdm
from PIL import Image

from jaxcond.data import (buckets as buckets_lib, captions as captions_lib, demo as demo_data, demo_score, files,
                          order, split)
from jaxcond.models.family import Family

log = logging.getLogger("jaxcond")


@dataclasses.dataclass(frozen=True)
class Decoded:
    """An image ready for the step: uint8 [height, width, 3], plus what SDXL conditions on."""

    pixels: np.ndarray
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


nearest_bucket = buckets_lib.nearest


def decode(path: str, size: int | tuple[int, int] | list[tuple[int, int]], report: files.Report, *,
           crop: str = "center", flip: bool = False, rng: np.random.Generator | None = None,
           too_small: str = "upscale", max_pixels: int = 64_000_000, data: bytes | None = None) -> Decoded | None:
    """The image at `path` (or its encoded bytes `data`, `path` then only names it; checked
    and converted by `files.load_image`) as RGB uint8 [height, width, 3], resized to cover
    `size` and cropped; or None (counted in `report`). `size` is a side, a (height, width),
    or a list of buckets' (height, width), of which the one nearest the image's aspect ratio
    is used (what training will use). `flip` mirrors it horizontally (the caller draws it,
    like the random crop, from its own rng)."""
    img = files.load_image(path, report, data=data, max_pixels=max_pixels)
    if img is None:
        return None
    w, h = img.size
    if isinstance(size, list):
        size = size[nearest_bucket(size, h, w)]
    th, tw = (size, size) if isinstance(size, int) else size
    problem = buckets_lib.fit_problem(h, w, (th, tw), too_small)  # a sliver of a banner would be a huge resize
    if problem is not None:
        report.add(problem, path)
        if problem.startswith("skipped"):
            return None
    # Scale so the image just covers th x tw, then crop the overhang.
    scale = max(th / h, tw / w)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        top, left = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    pixels = np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.uint8)
    if flip:
        pixels = pixels[:, ::-1].copy()
    return Decoded(pixels, (h, w), (top, left))


class Data(abc.ABC):
    """A training set: its global order by step and the loading of any records."""

    num_records: int
    #: Bucket index of every record (all 0 without aspect-ratio buckets).
    buckets: tuple[int, ...]
    #: (height, width) of each bucket.
    bucket_shapes: tuple[tuple[int, int], ...]

    def __init__(self, d: ml_collections.ConfigDict, seed: int, global_batch: int):
        """`d`: config.data; `seed`: the run's (config.seed), which keys the order."""
        self.cfg_data, self.seed, self.global_batch = d, seed, global_batch
        self._epochs: dict[int, tuple] = {}  # the last epochs' batch lists (loader threads share it)

    @functools.cached_property
    def held_out(self) -> np.ndarray:
        """bool [num_records]: the validation records (`data.validation_fraction`), never trained on."""
        return split.held_out(self.seed, self.num_records, self.cfg_data.get("validation_fraction", 0.0))

    @functools.cached_property
    def training_buckets(self) -> tuple[int, ...]:
        """`buckets` with the held-out records in bucket -1, which the order leaves out."""
        return split.training_buckets(self.buckets, self.held_out) if self.held_out.any() else self.buckets

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        return order.bucketed_steps_per_epoch(self.global_batch, self.training_buckets)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of what decides the order and content of batches: records and buckets."""
        h = hashlib.sha256(np.asarray(self.buckets, np.int64).tobytes())
        h.update(str(self.num_records).encode())
        for part in self._identity():
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")  # names need not be UTF-8
        return h.hexdigest()

    def _identity(self) -> Iterator[str]:
        """Strings naming the records (beyond their count and buckets)."""
        return iter(())

    def state(self, next_step: int) -> dict:
        """The loader's checkpointed state: its position is the step (the order and every
        batch are functions of it), plus the fingerprint a resume checks."""
        return {"next_step": next_step, "num_records": self.num_records, "fingerprint": self.fingerprint}

    def ids(self, step: int) -> np.ndarray:
        """Record ids of the global batch of `step`, in batch-position order
        (`order.bucketed_batch`, with each epoch's plan computed once)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        plan = self._epochs.get(epoch)
        if plan is None:  # two threads may both compute it: same result, no harm
            plan = order.bucketed_epoch(self.seed, epoch, self.global_batch, self.training_buckets)
            self._epochs[epoch] = plan
            for old in [e for e in list(self._epochs) if e < epoch - 1]:
                self._epochs.pop(old, None)
        return plan[b][1]

    @abc.abstractmethod
    def batch(self, ids: np.ndarray, step: int) -> dict[str, np.ndarray]:
        """{"images": uint8 [n, H, W, 3], "tokens": int32 [n, ...], "time_ids": float32 [n, 6]}
        of records `ids` at `step` (`time_ids`: see `micro_conditioning`)."""

    @abc.abstractmethod
    def eval_captions(self, n: int) -> list[str]:
        """Captions for validation samples."""

    def score(self, images: np.ndarray, captions: Sequence[str]) -> dict[str, float] | None:
        """Caption adherence of samples, where the data can measure it."""
        return None

    def chance(self, captions: Sequence[str]) -> dict[str, float] | None:
        """What `score` gives samples that ignore their captions."""
        return None


def micro_conditioning(original: tuple[int, int], crop_top_left: tuple[int, int],
                       target: tuple[int, int]) -> np.ndarray:
    """SDXL's time ids of one image: (height, width) before resizing, (top, left) of the crop
    in the resized image, (height, width) trained at. Models without them ignore them."""
    return np.array([*original, *crop_top_left, *target], np.float32)


class DemoEval:
    """Validation of the demo: held-out captions, scored from pixels (no data needed)."""

    def __init__(self, d: ml_collections.ConfigDict):
        self.train_combos, heldout = demo_data.split_combinations(d.heldout_fraction, d.seed)
        # Held-out combinations test composition; without any, sample seen ones.
        self.pool = heldout or self.train_combos

    def eval_captions(self, n: int) -> list[str]:
        return [demo_data.caption(self.pool[i % len(self.pool)]) for i in range(n)]

    def score(self, images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
        return demo_score.adherence(images, [demo_data.parse_caption(c) for c in captions])

    def chance(self, captions: Sequence[str]) -> dict[str, float]:
        return demo_score.chance_adherence([demo_data.parse_caption(c) for c in captions])


class DemoData(DemoEval, Data):
    """The procedural shapes (jaxcond.data.demo), materialised once in memory."""

    def __init__(self, d: ml_collections.ConfigDict, seed: int, global_batch: int, family: Family | None):
        Data.__init__(self, d, seed, global_batch)
        DemoEval.__init__(self, d)
        self.images, caps = demo_data.DemoDataset(d.num_records, d.resolution, d.seed,
                                                  self.train_combos).materialize()
        self.tokens = family.tokenize(caps) if family is not None else None  # None: order only
        self.num_records = d.num_records
        self.buckets = (0,) * d.num_records
        self.bucket_shapes = ((d.resolution, d.resolution),)

    def batch(self, ids: np.ndarray, step: int) -> dict[str, np.ndarray]:
        r = self.bucket_shapes[0]  # rendered at the training size, uncropped
        time_ids = micro_conditioning(r, (0, 0), r)
        return {"images": self.images[ids], "tokens": self.tokens[ids],
                "time_ids": np.tile(time_ids, (len(ids), 1))}


class FileData(Data):
    """Images and captions from files, checked once at start (see jaxcond.data.files)."""

    #: Identifies an immutable source (shards, a datasets snapshot) as a whole; None for
    #: plain files, which are identified one by one (path, size, mtime).
    source_digest: str | None = None

    def __init__(self, d: ml_collections.ConfigDict, seed: int, global_batch: int, family: Family | None,
                 workers: int = 1, size_multiple: int | None = None):
        """`family` None: records and order only (no tokens); `workers` threads check the
        images at start; `size_multiple`: the model's (else the family's), the step of
        "auto" buckets when data.auto_buckets.step is 0."""
        super().__init__(d, seed, global_batch)
        self.workers = workers
        self.family, self.report = family, files.Report()
        auto = d.buckets == "auto"
        if auto:  # chosen from the sizes `_load` reads: till then images are checked, not fitted
            spec = buckets_lib.auto_spec(d, size_multiple or (family.size_multiple if family is not None else None))
            self.bucket_shapes = ()
        else:
            self.bucket_shapes = tuple(tuple(b) for b in d.buckets) or ((d.resolution, d.resolution),)
        self.records, self.sizes = self._load()
        if auto:
            self.bucket_shapes = buckets_lib.choose(self.sizes, spec, min_images=global_batch)
            self._fit_to_buckets()
        if family is not None:
            self._count_overlong()
        self.buckets = tuple(nearest_bucket(self.bucket_shapes, h, w) for h, w in self.sizes)
        self.num_records = len(self.records)
        counts = np.bincount(np.array(self.buckets, int), minlength=len(self.bucket_shapes))
        log.info("data: %d images from %s\n%s\n  buckets%s (h x w: images, full batches/epoch): %s",
                 self.num_records, d.path, self.report.table(),
                 " (auto, from the images' aspect ratios)" if auto else "",
                 buckets_lib.describe(self.bucket_shapes, counts, self.global_batch))
        if self.num_records < self.global_batch:
            hint = ""
            if self.report.counts["skipped: no caption"] and d.source == "folder":
                hint = (f"; {self.report.counts['skipped: no caption']} images have no "
                        f"<name>{d.caption_extension} caption: set config.data.caption_extension to "
                        "their captions' extension, or config.data.missing_caption=empty")
            raise files.DataError(f"{d.path}: {self.num_records} usable images, fewer than one "
                                  f"global batch ({self.global_batch}); see the table above{hint}")
        if self.steps_per_epoch == 0:
            raise files.DataError(f"no bucket holds a full global batch of {self.global_batch} "
                                  f"(bucket counts {counts.tolist()}); use fewer buckets or a smaller batch")

    def _load(self) -> tuple[list[files.Record], list[tuple[int, int]]]:
        """Scans the source and decodes every image once (so no bad file surfaces mid-epoch);
        returns the usable records, renumbered, and their (height, width)."""
        d = self.cfg_data
        policy = dict(missing_caption=d.missing_caption, empty_caption=d.empty_caption)
        if d.source == "folder":
            records = files.scan_folder(d.path, self.report, caption_extension=d.caption_extension, **policy)
        else:
            records = files.scan_metadata(d.path, self.report, **policy)

        kept, sizes = [], []
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for r, size in tqdm.tqdm(zip(records, pool.map(lambda r: self.check_image(r.path), records)),
                                     total=len(records), desc="checking images", unit="img",
                                     disable=len(records) < 1000):
                if size is not None:
                    kept.append(files.Record(len(kept), r.path, r.caption))
                    sizes.append(size)
        return kept, sizes

    def check_image(self, name: str, data: bytes | None = None) -> tuple[int, int] | None:
        """(height, width) of the usable image `name` (or its bytes `data`), or None (counted
        in the report): readable and, unless the buckets are not chosen yet ("auto"),
        fitting its bucket."""
        if self.bucket_shapes:
            dec = decode(name, list(self.bucket_shapes), self.report, too_small=self.cfg_data.too_small, data=data)
            return None if dec is None else dec.original_size
        img = files.load_image(name, self.report, data=data)
        return None if img is None else (img.size[1], img.size[0])

    def _fit_to_buckets(self) -> None:
        """Drops (and counts) the images not fitting their chosen bucket, as `decode` would."""
        problems = buckets_lib.fit_problems(self.sizes, self.bucket_shapes, self.cfg_data.too_small)
        for r, problem in zip(self.records, problems):
            if problem is not None:
                self.report.add(problem, r.path)
        keep = [i for i, problem in enumerate(problems) if not (problem or "").startswith("skipped")]
        if len(keep) < len(self.sizes):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Only the records at positions `keep`, renumbered."""
        self.records = [files.Record(j, self.records[i].path, self.records[i].caption) for j, i in enumerate(keep)]
        self.sizes = [self.sizes[i] for i in keep]

    def _count_overlong(self) -> None:
        """Counts the captions the text encoder cuts: kept (their start still teaches), but
        what follows the limit never reaches the model, and a user should know."""
        what = f"caption over the text encoder's {self.family.max_length} tokens: kept, end cut"
        with tqdm.tqdm(total=len(self.records), desc="checking captions", unit="caption",
                       disable=len(self.records) < 50_000) as bar:  # ~4,000 a second
            for start in range(0, len(self.records), 4096):
                part = self.records[start:start + 4096]
                flat = [(i, c) for i, r in enumerate(part) for c in captions_lib.as_tuple(r.caption)]
                over = self.family.overlong([c for _, c in flat])
                for i in sorted({i for (i, _), o in zip(flat, over) if o}):  # an image once, whichever caption
                    self.report.add(what, part[i].path)
                bar.update(len(part))

    def _identity(self) -> Iterator[str]:
        if self.cfg_data.buckets == "auto":  # chosen from the data: a resume must choose the same
            yield json.dumps(self.bucket_shapes)
        if self.source_digest:
            yield self.source_digest
        for r in self.records:  # several captions as a JSON list: apart from any one string
            yield f"{r.path}\0{r.caption if isinstance(r.caption, str) else json.dumps(r.caption)}"

    def read(self, i: int) -> tuple[files.Record, bytes | None]:
        """Record `i` and its encoded image (None: read it from record.path)."""
        return self.records[i], None

    def batch(self, ids: np.ndarray, step: int) -> dict[str, np.ndarray]:
        d = self.cfg_data
        epoch = step // self.steps_per_epoch
        shape = self.bucket_shapes[self.buckets[int(ids[0])]]
        images, caps, time_ids = [], [], []
        for i in ids:
            r, data = self.read(int(i))
            # Crop and flip from (seed, epoch, record): the same on any host, after any resume.
            rng = np.random.default_rng([self.seed, epoch, int(i), 1])
            report = files.Report()
            dec = decode(r.path, shape, report, crop=d.crop, data=data,
                         flip=bool(d.flip and rng.random() < 0.5), rng=rng, too_small="upscale")
            if dec is None:  # the file changed since the start-up check
                raise files.DataError(f"{r.path} could not be read any more ({', '.join(report.counts)}); "
                                      "it was readable at start")
            images.append(dec.pixels)
            time_ids.append(micro_conditioning(dec.original_size, dec.crop_top_left, shape))
            caption = captions_lib.choose(r.caption, seed=self.seed, epoch=epoch, record_id=int(i))
            caps.append(captions_lib.augment(caption, seed=self.seed, epoch=epoch, record_id=int(i),
                                             shuffle=d.caption_shuffle, keep_tokens=d.keep_tokens,
                                             tag_dropout=d.tag_dropout))
        return {"images": np.stack(images), "tokens": self.family.tokenize(caps),
                "time_ids": np.stack(time_ids)}

    def eval_captions(self, n: int) -> list[str]:
        prompts = list(self.cfg_data.eval_prompts) or [
            captions_lib.as_tuple(r.caption)[0] for r in self.records[:n]]
        return [prompts[i % len(prompts)] for i in range(n)]


class Prefetcher:
    """This process's rows of the global batches of steps [start, end), loaded ahead.

    grain maps `Data.batch` over the steps with `workers` threads and keeps `prefetch`
    batches ready; with `processes` > 0 the loading runs in that many worker processes.
    """

    def __init__(self, data: Data, rows: np.ndarray, start: int, end: int, *, workers: int,
                 prefetch: int, processes: int = 0):
        def load(step: int) -> tuple[int, dict[str, np.ndarray]]:
            step = int(step)  # grain's range yields numpy integers
            return step, data.batch(data.ids(step)[rows], step)

        ds = grain.MapDataset.range(start, end).map(load)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, workers),
                                                  prefetch_buffer_size=max(1, prefetch)))
        if processes > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use)
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))
        self._it = iter(it)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return self._it

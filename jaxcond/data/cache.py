"""`jaxcond cache`: decoded images and frozen text-encoder outputs, computed once.

Conditional dropout is *not* baked in: the cache holds every caption's real encoding,
and the train step drops and substitutes nulls exactly as it does without a cache
(tests/test_cache.py checks the two agree bit for bit on the masks and the nulls).

For a latent family (with a VAE) the cache holds the encoder's mean and std per image,
not a latent: x0 is drawn from them in the step, so every epoch sees fresh latents as it
would without the cache.

Layout of a cache folder:
  nulls.npz                   the empty caption's encoding per conditioner (the `empty`
                              null; the step recomputes it from the current encoder)
  manifest.json               what it was built from (model and data fingerprints, config
                              fields, records with their bucket and file size/mtime),
                              the arrays' shapes/dtypes and the finished chunks
  <field>-c<chunk>-b<bucket>.npy
                              field `images` (uint8), `moments`, `time_ids` (SDXL's size
                              and crop conditioning) or `cond.<conditioner>`, for the
                              records of one chunk (id range) in one bucket, in id order

Chunks are written to a temporary name and renamed, and the manifest lists only finished
ones, so an interrupted `jaxcond cache` resumes where it stopped. On Cloud Storage
(`data.cache=gs://...`) each file is written locally and uploaded whole, the manifest
after its chunk's arrays; training reads each record's rows by byte range, so a host
fetches only its own records.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxcond import outputs, storage, xla
from jaxcond.checks import ConfigError
from jaxcond.data import hf, paths, pipeline, shards
from jaxcond.models.family import Family
from jaxcond.train_step import empty_tokens

CHUNK = 1024  # records per chunk
NULLS = "nulls.npz"  # the empty caption's encoding per conditioner
VERSION = 3  # 2: per-record time_ids; 3: keyed by the model's encoding settings
# Data fields whose change makes a cache describe other examples.
_DATA_FIELDS = ("source", "path", "resolution", "buckets", "crop", "flip", "caption_extension",
                "missing_caption", "empty_caption", "too_small", "num_records", "heldout_fraction", "seed")


def check_cacheable(d: ml_collections.ConfigDict, train_text_encoder: bool) -> None:
    """A cache of `config.data` (`d`) stores one crop and one caption per image, encoded by
    the frozen text encoders: refuse settings that vary them."""
    if train_text_encoder:
        raise ConfigError("config.data.cache: with config.model.train_text_encoder the captions' "
                          "encodings change every step, so they cannot be cached; train without the cache")
    if d.source == "demo":
        return
    varying = [f for f, on in (("data.crop = 'random'", d.crop == "random"), ("data.flip", d.flip),
                               ("data.caption_shuffle", d.caption_shuffle),
                               ("data.tag_dropout", d.tag_dropout > 0)) if on]
    if varying:
        raise ConfigError(f"config.data.cache: {', '.join(varying)} change the image or caption every "
                          "epoch, which a cache cannot hold; turn them off or train without the cache")


def fingerprint_params(tree: object) -> str:
    """sha256 over the leaves' paths, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def model_key(family: Family) -> dict:
    """What decides the cached encodings besides the data: the frozen weights' fingerprint
    and every setting of the family that changes `encode` or `image_moments`."""
    return {"weights": fingerprint_params(family.frozen), **family.encoding_key()}


def _model_changes(cached: dict, now: dict) -> list[str]:
    return [("other frozen weights (text encoders, VAE)" if k == "weights" else
             f"model setting {k} (cache {cached.get(k)!r}, now {now.get(k)!r})")
            for k in sorted(set(cached) | set(now)) if cached.get(k) != now.get(k)]


def _source_of(d: ml_collections.ConfigDict) -> dict:
    out = {f: d.to_dict().get(f) for f in _DATA_FIELDS}
    if d.get("buckets") == "auto":  # what chose the buckets (the manifest's bucket_shapes)
        out["auto_buckets"] = d.auto_buckets.to_dict()
    return out


def _json_default(x: object) -> object:
    return list(x) if isinstance(x, tuple) else str(x)


def _json(x: object) -> object:
    """`x` as it reads back from the manifest (tuples become lists)."""
    return json.loads(json.dumps(x, default=_json_default))


def _records_of(data: pipeline.Data) -> list[list]:
    """Per record: [bucket, path, caption, size, mtime] for files (so changed files are
    noticed; an object's generation for its mtime), [bucket] for the demo (its records
    are a function of the config)."""
    if getattr(data, "source_digest", None):  # shards, a datasets table: one digest for all
        return [[b, data.source_digest] for b in data.buckets]
    if isinstance(data, pipeline.FileData):
        out, objects = [], paths.Objects()
        for r, b in zip(data.records, data.buckets):
            if storage.is_url(r.path):
                out.append([b, r.path, r.caption, *(objects.stat(r.path) or (None, None))])
                continue
            st = os.stat(r.path)
            out.append([b, r.path, r.caption, st.st_size, st.st_mtime_ns])
        return out
    return [[b] for b in data.buckets]


def _write_json(path: str, obj: dict) -> None:
    with outputs.atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, default=_json_default)


def build(data: pipeline.Data, family: Family, directory: str, batch: int = 64) -> dict:
    """Writes (or completes) the cache of `data` (a source, not a cache) under `directory`,
    a folder made and checked before `data` scanned its source (`jaxcond.data.sources`);
    returns the manifest."""
    several = sum(isinstance(r.caption, tuple) for r in getattr(data, "records", ()))
    if several:
        raise ConfigError(f"config.data.cache: {several} images have several captions, one chosen per epoch, "
                          "which a cache of one encoding per image cannot hold; train without the cache")
    want = {"version": VERSION, "model": _json(model_key(family)), "source": _source_of(data.cfg_data),
            "records": _records_of(data), "bucket_shapes": data.bucket_shapes, "chunk": CHUNK,
            "fingerprint": data.fingerprint}  # what a checkpoint of a run on this data records
    path = storage.join(directory, "manifest.json")
    outputs.clear_stale(directory)  # a build killed mid-write left its temporaries
    manifest = {**want, "fields": {}, "done": []}
    if storage.exists(path):
        old = json.loads(storage.read_bytes(path))
        changed = [k for k in want if _json(want[k]) != old.get(k)]
        if changed:
            what = (_model_changes(old.get("model") or {}, want["model"]) if changed == ["model"]
                    else [f"its {k}" for k in changed])
            raise ConfigError(f"{directory} holds a cache of another model or dataset ({'; '.join(what)}); give "
                              "config.data.cache a new folder (or delete this one)")
        manifest = old
    encode = xla.jit(family.encode)
    moments = xla.jit(family.image_moments)
    # The empty caption's encoding: the `empty` null. The step still computes it from the
    # current encoder (the contract); this copy records it for users and tools, and the
    # model fingerprint checked at load guarantees it is what the step computes.
    empty = jax.device_get(encode(family.frozen, jnp.asarray(empty_tokens(family))))
    with outputs.atomic(storage.join(directory, NULLS)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in empty.items()})
    buckets = np.asarray(data.buckets)
    chunks = range((data.num_records + CHUNK - 1) // CHUNK)
    for c in tqdm.tqdm(chunks, desc="caching", unit="chunk", disable=len(chunks) < 2):
        if c in manifest["done"]:
            continue
        ids = np.arange(c * CHUNK, min((c + 1) * CHUNK, data.num_records))
        for b in np.unique(buckets[ids]):
            part = ids[buckets[ids] == b]
            fields: dict[str, list[np.ndarray]] = {}
            for i in range(0, len(part), batch):
                sub = part[i:i + batch]
                loaded = data.batch(sub, 0)
                tokens = np.zeros((batch,) + loaded["tokens"].shape[1:], loaded["tokens"].dtype)
                tokens[:len(sub)] = loaded["tokens"]  # a fixed shape: one compile
                cond = jax.device_get(encode(family.frozen, jnp.asarray(tokens)))
                if family.latent:  # the VAE's distribution; x0 is still drawn in the step
                    images = np.zeros((batch,) + loaded["images"].shape[1:], np.uint8)
                    images[:len(sub)] = loaded["images"]
                    m = jax.device_get(moments(family.frozen, jnp.asarray(images)))
                    fields.setdefault("moments", []).append(np.asarray(m)[:len(sub)])
                else:
                    fields.setdefault("images", []).append(loaded["images"])
                fields.setdefault("time_ids", []).append(loaded["time_ids"])
                for k, v in cond.items():
                    fields.setdefault(f"cond.{k}", []).append(np.asarray(v)[:len(sub)])
            for name, parts in fields.items():
                arr = np.concatenate(parts)
                manifest["fields"][name] = {"dtype": str(arr.dtype), "shape": list(arr.shape[1:])}
                with outputs.atomic(storage.join(directory, f"{name}-c{c:05d}-b{b}.npy")) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
        manifest["done"].append(c)
        _write_json(path, manifest)
    return manifest


class CachedData(pipeline.Data):
    """The data of `config.data` (`d`) read from its cache: same records, same order, same batches'
    images; encodings instead of tokens."""

    def __init__(self, d: ml_collections.ConfigDict, seed: int, global_batch: int, family: Family | None,
                 directory: str, train_text_encoder: bool = False):
        super().__init__(d, seed, global_batch)
        check_cacheable(d, train_text_encoder)
        path = storage.join(directory, "manifest.json")
        if not storage.exists(path):
            raise ConfigError(f"config.data.cache = {directory!r}: no cache there; build it with "
                              "`jaxcond cache --config ...` first")
        m = json.loads(storage.read_bytes(path))
        problems = []
        if m.get("version") != VERSION:
            problems.append(f"format version {m.get('version')} (this jaxcond reads {VERSION})")
        if family is not None and m.get("version") == VERSION:
            problems += [f"it was built with {c}" for c in _model_changes(m["model"], _json(model_key(family)))]
        if not storage.exists(storage.join(directory, NULLS)):
            problems.append(f"it has no {NULLS}")
        source = _json(_source_of(d))
        changed = [k for k in source if source[k] != m["source"].get(k)]
        if changed:
            problems.append("config.data fields differ: " + ", ".join(
                f"{k} (cache {m['source'].get(k)!r}, now {source[k]!r})" for k in changed))
        n_chunks = (len(m["records"]) + m["chunk"] - 1) // m["chunk"]
        if sorted(m["done"]) != list(range(n_chunks)):
            problems.append(f"it is incomplete ({len(m['done'])} of {n_chunks} chunks); rerun jaxcond cache")
        if problems:
            raise ConfigError(f"cannot train from the cache in {directory}: " + "; ".join(problems))
        objects = paths.Objects()
        stale = [r[1] for r in m["records"] if len(r) > 2 and not _unchanged(r, objects)]
        if d.source in ("shards", "hf") and m["records"] and _digest(d) != m["records"][0][1]:
            stale = [f"the {d.source} source {d.path}"]
        if stale:
            raise ConfigError(f"{len(stale)} cached images changed on disk since the cache was built "
                              f"(e.g. {stale[0]}); rebuild it with `jaxcond cache`")
        self.num_records = len(m["records"])
        self._fingerprint = m["fingerprint"]
        self.buckets = tuple(r[0] for r in m["records"])
        self.bucket_shapes = tuple(tuple(s) for s in m["bucket_shapes"])
        # Validation prompts and scoring come from the source: the demo's held-out
        # combinations, or config.data.eval_prompts / the first captions.
        self._demo = pipeline.DemoEval(d) if d.source == "demo" else None
        self._captions = list(d.eval_prompts) or [r[2] for r in m["records"][:64] if len(r) > 2] or [""]
        self.chunk = m["chunk"]
        self.remote = storage.is_url(directory)
        names = set(storage.listdir(directory)) if self.remote else set()
        self.arrays = {}
        for name in m["fields"]:
            for c in range(n_chunks):
                for b in set(self.buckets[c * self.chunk:(c + 1) * self.chunk]):
                    file = f"{name}-c{c:05d}-b{b}.npy"
                    if self.remote and file not in names:
                        raise ConfigError(f"cannot train from the cache in {directory}: {file} is missing; "
                                          "rebuild it with `jaxcond cache`")
                    self.arrays[name, c, b] = (_ObjectRows(storage.join(directory, file)) if self.remote else
                                               np.load(os.path.join(directory, file), mmap_mode="r"))
        # Row of each record inside its (chunk, bucket) file.
        bucket_of = np.asarray(self.buckets)
        self.row = np.zeros(self.num_records, np.int64)
        for c in range(n_chunks):
            ids = np.arange(c * self.chunk, min((c + 1) * self.chunk, self.num_records))
            for b in np.unique(bucket_of[ids]):
                part = ids[bucket_of[ids] == b]
                self.row[part] = np.arange(len(part))
        self.fields = list(m["fields"])

    @property
    def fingerprint(self) -> str:
        """The source's: a run may switch to (or from) its cache and resume."""
        return self._fingerprint

    def batch(self, ids: np.ndarray, step: int) -> dict[str, np.ndarray]:
        if self.remote:
            return self._fetch(ids)
        out = {}
        for name in self.fields:
            key = "cond/" + name[len("cond."):] if name.startswith("cond.") else name
            out[key] = np.stack([self.arrays[name, int(i) // self.chunk, self.buckets[int(i)]][self.row[i]]
                                 for i in ids])
        return out

    def _fetch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """`batch` from Cloud Storage: the records' rows of every field in one round of
        concurrent range reads."""
        want = [(name, self.arrays[name, int(i) // self.chunk, self.buckets[int(i)]], int(self.row[i]))
                for name in self.fields for i in ids]
        for name, a, _ in want:
            if a.offset is None:  # first use of this file: its header says where rows start
                a.locate(storage.read_ranges([a.url], [0], [_HEAD])[0])
        starts = [a.offset + row * a.row_bytes for _, a, row in want]
        blobs = storage.read_ranges([a.url for _, a, _ in want], starts,
                                    [s + a.row_bytes for s, (_, a, _) in zip(starts, want)])
        out = {}
        for k, name in enumerate(self.fields):
            part = zip(want[k * len(ids):(k + 1) * len(ids)], blobs[k * len(ids):(k + 1) * len(ids)])
            rows = [np.frombuffer(blob, a.dtype).reshape(a.shape) for (_, a, _), blob in part]
            out["cond/" + name[len("cond."):] if name.startswith("cond.") else name] = np.stack(rows)
        return out

    def eval_captions(self, n: int) -> list[str]:
        if self._demo is not None:
            return self._demo.eval_captions(n)
        return [self._captions[i % len(self._captions)] for i in range(n)]

    def score(self, images: np.ndarray, captions: Sequence[str]) -> dict[str, float] | None:
        return self._demo.score(images, captions) if self._demo is not None else None

    def chance(self, captions: Sequence[str]) -> dict[str, float] | None:
        return self._demo.chance(captions) if self._demo is not None else None


def _digest(d: ml_collections.ConfigDict) -> str:
    return shards.index_digest(d.path) if d.source == "shards" else hf.open_dataset(d)._fingerprint


_HEAD = 4096  # bytes read for a .npy header (np.save writes 128 for these arrays)


class _ObjectRows:
    """Where the rows of a .npy object on Cloud Storage lie, from its header."""

    def __init__(self, url: str):
        self.url, self.offset = url, None

    def locate(self, head: bytes) -> None:
        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, self.dtype = read(f)  # C order: np.save of a concatenation
        self.shape = shape[1:]
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        self.offset = f.tell()


def _unchanged(record: list, objects: paths.Objects) -> bool:
    _, path, _, size, mtime = record
    if storage.is_url(path):
        return objects.stat(path) == (size, mtime)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_size, st.st_mtime_ns) == (size, mtime)

"""Sharded storage for large image sets: ArrayRecord files with an index.

`jaxcond shards --config ... --shards_out DIR` checks a folder/metadata source once (the
usual report) and writes its usable images, as their original encoded bytes, with their
captions into DIR/shard-00000-of-00008.array_record ..., plus DIR/index.json with every
record's size, so training (`data.source=shards`, `data.path=DIR`) assigns buckets
without reading the images and reads any record by id (random access: the global order
and per-host loading work as for files).

A record is `<caption JSON>\\n<image bytes>`: {"caption": ..., "name": original path}; an
image's several captions are a JSON list.

DIR may be a gs:// URL: each shard is written locally and uploaded when complete, the
index last, so a folder with an index holds every shard it lists. Training reads the
shards from Cloud Storage through ArrayRecord itself, record by record.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import tqdm

from jaxcond import outputs, storage
from jaxcond.data import captions, files, pipeline

INDEX = "index.json"


SOURCES = ("folder", "metadata", "hf")  # what shards are written from


def write(data: pipeline.FileData, out: str, num_shards: int) -> dict:
    """Writes the shards and index of a file source's usable records into `out`, a folder
    made and checked before `data` scanned its source (`jaxcond.data.sources`); returns
    the index."""
    from array_record.python.array_record_module import ArrayRecordWriter

    names = [f"shard-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
    bounds = np.linspace(0, data.num_records, num_shards + 1).astype(int)
    for k, name in enumerate(tqdm.tqdm(names, desc="writing shards", unit="shard")):
        with outputs.atomic(storage.join(out, name)) as tmp:
            writer = ArrayRecordWriter(tmp, "group_size:1")
            for i in range(bounds[k], bounds[k + 1]):
                r, image = data.read(i)
                if image is None:
                    image = storage.read_bytes(r.path)
                writer.write(json.dumps({"caption": r.caption, "name": r.path}).encode() + b"\n" + image)
            writer.close()
    index = {"shards": names, "sizes": [list(s) for s in data.sizes], "source": data.cfg_data.path,
             "report": dict(data.report.counts)}
    with outputs.atomic(storage.join(out, INDEX)) as tmp, open(tmp, "w") as f:  # written last: shards done
        json.dump(index, f)
    return index


def index_digest(directory: str) -> str:
    """sha256 of a shards folder's index (the shards are written once, never edited)."""
    return hashlib.sha256(storage.read_bytes(storage.join(directory, INDEX))).hexdigest()


class ShardData(pipeline.FileData):
    """FileData read from shards: same buckets, crops, flips and captions per record id."""

    def _load(self) -> tuple[list[files.Record], list[tuple[int, int]]]:
        import grain

        d = self.cfg_data
        path = storage.join(d.path, INDEX)
        if not storage.exists(path):
            raise files.DataError(f"config.data.path = {d.path!r} has no {INDEX}; write shards "
                                  "with `jaxcond shards --config ... --shards_out DIR` first")
        raw = storage.read_bytes(path)
        index = json.loads(raw)
        self.source_digest = hashlib.sha256(raw).hexdigest()  # index_digest's, without reading it again
        self.source = grain.sources.ArrayRecordDataSource(  # gs:// URLs are read by ArrayRecord itself
            [storage.join(d.path, s) for s in index["shards"]])
        if len(self.source) != len(index["sizes"]):
            raise files.DataError(f"{d.path}: the shards hold {len(self.source)} records but "
                                  f"{INDEX} lists {len(index['sizes'])}; rewrite them")
        for what, n in index["report"].items():  # the checks ran when the shards were written
            self.report.counts[what] = n
            self.report.examples.setdefault(what, [])
        records = [files.Record(i, f"{d.path}#{i}", "") for i in range(len(self.source))]
        self.rows = list(range(len(records)))  # record id -> shard record ("auto" buckets may drop some)
        return records, [tuple(s) for s in index["sizes"]]

    def _keep(self, keep: list[int]) -> None:
        super()._keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _count_overlong(self) -> None:
        """Not done: the captions live in the shards beside their images, so counting them
        at start would read the whole dataset. Training once from the source (folder,
        metadata or hf) reports the count; the shards hold the same captions."""

    def read(self, i: int) -> tuple[files.Record, bytes]:
        header, image = self.source[self.rows[i]].split(b"\n", 1)
        meta = json.loads(header)
        caption = meta["caption"] if isinstance(meta["caption"], str) else tuple(meta["caption"])
        return files.Record(i, meta["name"], caption), image

    def eval_captions(self, n: int) -> list[str]:
        prompts = list(self.cfg_data.eval_prompts) or [
            captions.as_tuple(self.read(i)[0].caption)[0] for i in range(min(n, self.num_records))]
        return [prompts[i % len(prompts)] for i in range(n)]

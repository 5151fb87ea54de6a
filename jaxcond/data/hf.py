"""A Hugging Face `datasets` dataset as a training source (`data.source=hf`).

`data.path` is a folder written by `Dataset.save_to_disk` or, when online, a hub id
(split `data.hf_split`). Images are read as their encoded bytes (`Image(decode=False)`)
and go through the same checks, buckets, crops and captions as image files
(jaxcond.data.files); rows are records in dataset order. Needs the `hf` extra.
"""

from __future__ import annotations

import os

import ml_collections

from jaxcond.data import files, pipeline


def open_dataset(d: ml_collections.ConfigDict):
    """The `datasets` table of `config.data` (`d`), images as encoded bytes."""
    try:
        import datasets
    except ImportError:
        raise files.DataError("data.source=hf needs the datasets package: "
                              "pip install 'jaxcond[hf]' (or JAXCOND_EXTRA=hf)") from None
    if os.path.isdir(d.path):
        ds = datasets.load_from_disk(d.path)
        if isinstance(ds, datasets.DatasetDict):
            if d.hf_split not in ds:
                raise files.DataError(f"{d.path} has splits {sorted(ds)}, not config.data.hf_split = {d.hf_split!r}")
            ds = ds[d.hf_split]
    else:
        ds = datasets.load_dataset(d.path, split=d.hf_split)
    for col in (d.image_column, d.caption_column):
        if col not in ds.column_names:
            raise files.DataError(f"{d.path}: no column {col!r} (columns: {ds.column_names}); set "
                                  "config.data.image_column / config.data.caption_column")
    return ds.cast_column(d.image_column, datasets.Image(decode=False))


class HFData(pipeline.FileData):
    """FileData whose records are the rows of a `datasets` dataset."""

    def _load(self) -> tuple[list[files.Record], list[tuple[int, int]]]:
        d = self.cfg_data
        self.dataset = open_dataset(d)
        self.source_digest = self.dataset._fingerprint  # datasets' content hash of this table
        kept, sizes, self.rows = [], [], []
        for row_id, row in enumerate(self.dataset):
            name = f"{d.path}[{row_id}]"
            text = row[d.caption_column]
            caption = files.caption_policy(None if text is None else str(text).strip(), name,
                                           self.report, d.missing_caption, d.empty_caption)
            if caption is None:
                continue
            image = row[d.image_column] or {}
            dec = files.decode(name, list(self.bucket_shapes), self.report, too_small=d.too_small,
                               data=image.get("bytes") or b"")
            if dec is not None:
                kept.append(files.Record(len(kept), name, caption))
                sizes.append(dec.original_size)
                self.rows.append(row_id)
        return kept, sizes

    def read(self, i: int) -> tuple[files.Record, bytes]:
        row = self.dataset[self.rows[i]]
        return self.records[i], row[self.cfg_data.image_column]["bytes"]


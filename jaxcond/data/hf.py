"""A Hugging Face `datasets` dataset as a training source (`data.source=hf`).

`data.path` is a folder written by `Dataset.save_to_disk` or, when online, a hub id
(split `data.hf_split`). Images are read as their encoded bytes (`Image(decode=False)`)
and go through the same checks, buckets, crops and captions as image files
(jaxcond.data.files); rows are records in dataset order. A caption that is a list of
strings is several captions (one per epoch); other types, and rows without an image, are
skipped and counted. Needs the `hf` extra.
"""

from __future__ import annotations

import os

import ml_collections

from jaxcond.data import captions, files, pipeline


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
            try:
                caption = captions.parse_caption(row[d.caption_column])
            except TypeError:
                self.report.add("skipped: dataset caption is not a string or list of strings", name)
                continue
            caption = captions.caption_policy(caption, name, self.report, d.missing_caption, d.empty_caption)
            if caption is None:
                continue
            data, problem = _image_bytes(row[d.image_column])
            if problem is not None:
                self.report.add(f"skipped: {problem}", name)
                continue
            size = self.check_image(name, data)
            if size is not None:
                kept.append(files.Record(len(kept), name, caption))
                sizes.append(size)
                self.rows.append(row_id)
        return kept, sizes

    def _keep(self, keep: list[int]) -> None:
        super()._keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def read(self, i: int) -> tuple[files.Record, bytes | None]:
        return self.records[i], _image_bytes(self.dataset[self.rows[i]][self.cfg_data.image_column])[0]


def _image_bytes(cell) -> tuple[bytes | None, str | None]:
    """A row's encoded image, or (None, why not): `datasets` holds the bytes, or only the
    path of a local file (a table built from files without embedding them)."""
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return cell["bytes"], None
    if isinstance(cell, dict) and cell.get("path"):
        return files.read_bytes(cell["path"])
    return None, "no image in the row"


"""Image-caption records from files: a folder with same-named .txt captions, or a
metadata.jsonl / metadata.csv with `file_name` and `text` (Hugging Face imagefolder).

Every file a user brings gets one documented treatment, counted in a `Report` that is
printed before training; nothing is dropped silently and nothing crashes mid-epoch:

| input | treatment |
|---|---|
| zero-byte file, not an image, truncated/corrupt image | skipped (counted) |
| image without a caption file / metadata row | skipped, or kept with "" if `missing_caption="empty"` |
| empty caption | kept as "" (an unconditional example), or skipped with `empty_caption="skip"` |
| caption not in UTF-8 | decoded as UTF-16 (with BOM) or cp1252, counted |
| CMYK, palette, grayscale, 16-bit | converted to 8-bit RGB, counted |
| RGBA / transparency | composited on white, counted |
| EXIF orientation | applied (rotated upright), counted |
| smaller than the training size | upscaled (counted), or skipped with `too_small="skip"` |
| more than `max_pixels` pixels | skipped (counted): likely a decompression bomb or a mistake |
| aspect ratio over 8x off the bucket's (a banner, a 1-pixel line) | skipped (counted): the crop would keep under 1/8 of it |
| metadata row naming a file that does not exist | skipped (counted) |
| metadata file not in UTF-8, or a JSON line that is not an object | refused, naming the line |
| caption longer than the text encoder's tokens | kept whole, counted (`pipeline.FileData`, with the model's tokenizer) |
"""

from __future__ import annotations

import collections
import csv
import io
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

#: Images whose cover-resize would be over this many times the training size (its aspect
#: ratio that far from the bucket's) are skipped: the crop would keep under 1/8 of them.
MAX_OVERHANG = 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example before decoding; `id` is its stable position in the source."""

    id: int
    path: str
    caption: str


@dataclasses.dataclass
class Report:
    """Counts of every treatment, with a few example paths each."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, what: str, path: str) -> None:
        self.counts[what] += 1
        self.examples.setdefault(what, [])
        if len(self.examples[what]) < 3:
            self.examples[what].append(path)

    def table(self) -> str:
        rows = [f"{'treatment':<66} {'files':>7}  examples"]
        for what, n in sorted(self.counts.items()):
            rows.append(f"{what:<66} {n:>7}  {', '.join(os.path.basename(p) for p in self.examples[what])}")
        return "\n".join(rows)


class DataError(ValueError):
    """The dataset as a whole cannot be used (e.g. nothing left to train on)."""


def read_caption(path: str, report: Report) -> str:
    """A caption file's text, stripped; non-UTF-8 files are decoded and counted, not lost."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        report.add("caption decoded as UTF-16", path)
        return raw.decode("utf-16").strip()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        report.add("caption decoded as cp1252 (not UTF-8)", path)
        return raw.decode("cp1252", errors="replace").strip()


def caption_policy(caption: str | None, path: str, report: Report, missing: str,
                    empty: str) -> str | None:
    if caption is None:
        if missing == "skip":
            report.add("skipped: no caption", path)
            return None
        report.add("kept with empty caption: no caption", path)
        return ""
    if not caption:
        if empty == "skip":
            report.add("skipped: empty caption", path)
            return None
        report.add("kept: empty caption (unconditional)", path)
    return caption


def scan_folder(root: str, report: Report, *, missing_caption: str = "skip",
                empty_caption: str = "keep", caption_extension: str = ".txt") -> list[Record]:
    """Images under `root` (recursive, sorted) with their same-stem captions
    (`<stem><caption_extension>`).

    A sub-folder named like kohya's `<N>_<name>` repeats its images N times.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    records: list[Record] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        repeats = _repeats(os.path.relpath(dirpath, root))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            txt = os.path.join(dirpath, stem + caption_extension)
            caption = read_caption(txt, report) if os.path.exists(txt) else None
            caption = caption_policy(caption, path, report, missing_caption, empty_caption)
            if caption is not None:
                records += [Record(len(records) + i, path, caption) for i in range(repeats)]
    return records


def _repeats(relative_dir: str) -> int:
    """kohya's convention: the first path component `10_cats` means 10 repeats."""
    head = relative_dir.split(os.sep)[0]
    prefix = head.split("_", 1)[0]
    return int(prefix) if "_" in head and prefix.isdigit() and int(prefix) > 0 else 1


def scan_metadata(path: str, report: Report, *, missing_caption: str = "skip",
                  empty_caption: str = "keep") -> list[Record]:
    """Rows of a metadata.jsonl or .csv with `file_name` (relative to its folder) and `text`;
    `path` may also be the folder holding it (Hugging Face imagefolder's layout)."""
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("metadata.jsonl", "metadata.csv")
                 if os.path.isfile(os.path.join(path, n))]
        if len(found) != 1:
            raise DataError(f"{path!r} is a folder with {'both' if found else 'neither'} metadata.jsonl "
                            f"{'and' if found else 'nor'} metadata.csv; pass the metadata file itself (or "
                            "data.source=folder for images with .txt captions)")
        path = found[0]
    base = os.path.dirname(path)
    rows = list(_metadata_rows(path))
    records = []
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: a JSON {type(row).__name__}, not an object; each line "
                            'needs one object like {"file_name": "a.png", "text": "a caption"}')
        if "file_name" not in row:
            raise DataError(f"{path}:{line}: no 'file_name' column/key (found {sorted(row)}); "
                            "each row needs file_name and text")
        image = os.path.join(base, row["file_name"])
        if not os.path.isfile(image):
            report.add("skipped: listed in the metadata, no such file", image)
            continue
        text = row.get("text")
        caption = caption_policy(None if text is None else str(text).strip(), image, report,
                                  missing_caption, empty_caption)
        if caption is not None:
            records.append(Record(len(records), image, caption))
    return records


def _metadata_rows(path: str) -> Iterator[tuple[int, Any]]:
    if not path.endswith((".jsonl", ".csv")):
        raise DataError(f"{path!r}: metadata must be a .jsonl or .csv file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheet programs often start with a BOM
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8, "
                        "or the captions would be read wrong") from None
    if path.endswith(".jsonl"):
        for i, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); one object per line") from None
    else:
        yield from enumerate(csv.DictReader(io.StringIO(text, newline="")), 2)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """An image ready for the step: uint8 [height, width, 3], plus what SDXL conditions on."""

    pixels: np.ndarray
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def nearest_bucket(shapes: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """The bucket whose aspect ratio is nearest (in log ratio) the image's."""
    return int(np.argmin(np.abs(np.log([h / w for h, w in shapes]) - np.log(height / width))))


def decode(path: str, size: int | tuple[int, int] | list[tuple[int, int]], report: Report, *,
           crop: str = "center", flip: bool = False, rng: np.random.Generator | None = None,
           too_small: str = "upscale", max_pixels: int = 64_000_000, data: bytes | None = None) -> Decoded | None:
    """The image at `path` (or its encoded bytes `data`, `path` then only names it) as RGB
    uint8 [height, width, 3], resized to cover `size` and cropped; or None (counted in
    `report`). `size` is a side, a (height, width), or a list of buckets' (height, width),
    of which the one nearest the image's aspect ratio is used (what training will use).
    `flip` mirrors it horizontally (the caller draws it, like the random crop, from its own rng)."""
    if (len(data) if data is not None else os.path.getsize(path)) == 0:
        report.add("skipped: zero-byte file", path)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
            w, h = img.size
            if w * h > max_pixels:
                report.add(f"skipped: over {max_pixels} pixels", path)
                return None
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        report.add(f"skipped: over {max_pixels} pixels", path)
        return None
    except (OSError, SyntaxError, ValueError):  # PIL's ways of saying "not a (whole) image"
        report.add("skipped: not a readable image (corrupt, truncated or not an image)", path)
        return None
    img = _to_rgb(img, path, report)
    w, h = img.size
    if isinstance(size, list):
        size = size[nearest_bucket(size, h, w)]
    th, tw = (size, size) if isinstance(size, int) else size
    # Scale so the image just covers th x tw, then crop the overhang.
    scale = max(th / h, tw / w)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if rw * rh > MAX_OVERHANG * tw * th:  # a banner or a 1-pixel line: the crop would be a sliver of it,
        report.add(f"skipped: aspect ratio over {MAX_OVERHANG}x off that of {th}x{tw}", path)  # the resize huge
        return None
    if h < th or w < tw:
        if too_small == "skip":
            report.add(f"skipped: smaller than {th}x{tw}", path)
            return None
        report.add(f"upscaled: smaller than {th}x{tw}", path)
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


def _to_rgb(img: Image.Image, path: str, report: Report) -> Image.Image:
    """8-bit RGB from any mode PIL opens, upright per EXIF; each conversion counted."""
    if img.getexif().get(0x0112, 1) != 1:  # Orientation tag: the camera held sideways
        report.add("rotated upright (EXIF orientation)", path)
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        report.add(f"converted: {mode} (16/32-bit) to 8-bit RGB", path)
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA") or img.mode == "RGBA":
        report.add("composited on white: transparency", path)
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    report.add(f"converted: {mode} to RGB", path)
    return img.convert("RGB")

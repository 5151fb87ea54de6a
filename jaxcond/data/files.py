"""Image-caption records from files: a folder with same-named .txt captions, or a
metadata.jsonl / metadata.csv with `file_name` and `text` (Hugging Face imagefolder).

Every file a user brings gets one documented treatment, counted in a `Report` printed
before training: nothing is dropped silently, no one bad file stops a run, nothing crashes
mid-epoch. Paths are checked with os.stat before anything is opened (a named pipe would block):

| input | treatment |
|---|---|
| zero-byte file, not an image, truncated/corrupt image, over `max_pixels` pixels | skipped |
| symlink loop, broken symlink, folder, named pipe/socket/device named like an image | skipped, saying which |
| file that cannot be opened, folder that cannot be listed | skipped, with the system's reason |
| hidden folder (`.git`, `.ipynb_checkpoints`), folder symlink; hidden image (`._x.png`) | not scanned; skipped |
| no caption file / metadata caption | skipped, or kept with "" if `missing_caption="empty"` |
| caption file that is a folder, a broken link, unreadable... | its image skipped, saying why |
| empty caption | kept as "" (unconditional), or skipped with `empty_caption="skip"` |
| caption not in UTF-8 | decoded as UTF-16 (with BOM) or cp1252 |
| EXIF orientation | applied (unreadable EXIF: not applied, counted) |
| smaller than the training size | upscaled, or skipped with `too_small="skip"` |
| aspect ratio over 8x off the bucket's (a banner, a 1-pixel line) | skipped: the crop would keep under 1/8 |
| caption longer than the text encoder's tokens | kept whole (`pipeline.FileData` counts it) |

| Pillow colour mode (no format Pillow reads yields RGBX, RGBa, HSV) | to 8-bit RGB |
|---|---|
| RGB (16-bit RGB PNG and TIFF too: Pillow keeps the high byte) | as is, not counted |
| 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV | Pillow's conversion (CMYK naive, LAB by littlecms) |
| RGBA, LA, PA, La, RGBa; P/L/RGB with a transparent colour | composited on white (16-bit RGBA too) |
| I;16, I;16B, I;16L (16-bit grey) | scaled from 0..65535 |
| I (32-bit integer grey) | values over 255: scaled from 0..65535; else taken as 0..255 |
| F (32-bit float grey) | all in [0, 1]: scaled from 0..1; else taken as 0..255, clipped; NaN/inf: skipped |
| any other | skipped: unsupported colour mode |

| metadata row (and `hf` source row) | treatment |
|---|---|
| file that does not exist | skipped |
| `file_name` a number, null, list, object or empty | skipped, naming the line |
| `file_name` outside the metadata's folder (`../x.png`, absolute) / listed again | kept, counted |
| `file_name` a gs:// URL, or relative to a metadata file on gs:// | read through jaxcond.storage |
| `text` a list of strings | several captions: one per epoch, from (seed, epoch, record) |
| `text` an empty list / a number, object, list holding non-strings | no caption / skipped, naming the line |
| CSV row with more fields than the header (an unquoted comma) | kept with the header's fields, counted |
| unreadable, not UTF-8, a JSON line not an object, no `file_name` anywhere | the file refused (naming the line) |
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from jaxcond import storage
from jaxcond.data import paths
from jaxcond.data.captions import Caption, caption_policy, decode_caption, parse_caption
from jaxcond.data.paths import os_problem, path_problem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example before decoding; `id` is its stable position in the source.
    `caption` is a tuple when the image has several (one is trained per epoch)."""

    id: int
    path: str
    caption: Caption


@dataclasses.dataclass
class Report:
    """Counts of every treatment, with a few example paths each."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, what: str, path: str) -> None:
        self.counts[what] += 1
        examples = self.examples.setdefault(what, [])
        if len(examples) < 3:
            examples.append(path)

    def table(self) -> str:
        rows = [f"{'treatment':<66} {'files':>7}  examples"]
        for what, n in sorted(self.counts.items()):
            rows.append(f"{what:<66} {n:>7}  {', '.join(os.path.basename(p) for p in self.examples[what])}")
        return "\n".join(rows)


class DataError(ValueError):
    """The dataset as a whole cannot be used (e.g. nothing left to train on)."""


def read_bytes(path: str) -> tuple[bytes | None, str | None]:
    """(the file's or object's bytes, None), or (None, why it cannot be read)."""
    if storage.is_url(path):
        return paths.read_object(path)
    problem = path_problem(path, empty_ok=True)
    if problem is None:
        try:
            with open(path, "rb") as f:
                return f.read(), None
        except OSError as e:
            problem = os_problem(e, path)
    return None, problem


def scan_folder(root: str, report: Report, *, missing_caption: str = "skip",
                empty_caption: str = "keep", caption_extension: str = ".txt") -> list[Record]:
    """Images under `root` (recursive, sorted) with their same-stem captions
    (`<stem><caption_extension>`).

    A sub-folder named like kohya's `<N>_<name>` repeats its images N times.
    """
    if not os.path.isdir(root):
        if not os.path.exists(root):
            raise DataError(f"data folder {root!r} does not exist")
        hint = "use data.source=metadata for a metadata file" if root.endswith((".jsonl", ".csv")) else \
            "set data.path to the folder of images"
        raise DataError(f"data.path {root!r} is a file, not a folder; {hint}")
    records: list[Record] = []
    walk = os.walk(root, onerror=lambda e: report.add(f"skipped: folder {os_problem(e)}", e.filename or root))
    for dirpath, dirnames, filenames in walk:
        dirnames[:] = _folders_to_scan(dirpath, dirnames, report)
        repeats = _repeats(os.path.relpath(dirpath, root))
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path = os.path.join(dirpath, name)
                caption = _folder_caption(path, caption_extension, report, missing_caption, empty_caption)
                if caption is not None:
                    records += [Record(len(records) + i, path, caption) for i in range(repeats)]
    return records


def _folders_to_scan(dirpath: str, dirnames: list[str], report: Report) -> list[str]:
    """The sub-folders to descend into, sorted; hidden ones (.git, .ipynb_checkpoints:
    copies, not training data) and symlinks (they may loop) are counted instead."""
    keep = []
    for name in sorted(dirnames):
        if name.startswith("."):
            report.add("skipped: hidden folder (not scanned)", os.path.join(dirpath, name))
        elif os.path.islink(os.path.join(dirpath, name)):
            report.add("skipped: symlink to a folder (not followed)", os.path.join(dirpath, name))
        else:
            keep.append(name)
    return keep


def _folder_caption(path: str, extension: str, report: Report, missing: str, empty: str) -> Caption | None:
    """The caption of the image at `path` in a folder, or None: the image is skipped (counted)."""
    problem = "hidden file" if os.path.basename(path).startswith(".") else path_problem(path)
    if problem is not None:
        report.add(f"skipped: {problem}", path)
        return None
    txt, caption = os.path.splitext(path)[0] + extension, None
    if os.path.lexists(txt):
        raw, problem = read_bytes(txt)
        if problem is not None:  # a caption that exists but cannot be read is not "no caption"
            report.add(f"skipped: caption file: {problem}", txt)
            return None
        caption = decode_caption(raw, txt, report)
    return caption_policy(caption, path, report, missing, empty)


def _repeats(relative_dir: str) -> int:
    """kohya's convention: the first path component `10_cats` means 10 repeats."""
    head = relative_dir.split(os.sep)[0]
    prefix = head.split("_", 1)[0]
    return int(prefix) if "_" in head and prefix.isdigit() and int(prefix) > 0 else 1


def scan_metadata(path: str, report: Report, *, missing_caption: str = "skip",
                  empty_caption: str = "keep") -> list[Record]:
    """Rows of a metadata.jsonl or .csv with `file_name` (relative to its folder, or a gs://
    URL) and `text`; `path` may also be the folder holding it (Hugging Face imagefolder's
    layout), on a local disk or Cloud Storage."""
    path = _metadata_file(path)
    rows, base = _metadata_rows(path), paths.dirname(path)
    seen, records, objects = set(), [], paths.Objects()
    for line, row in rows:
        where = f"{path}:{line}"  # the table shows "metadata.jsonl:7"
        image = _row_image(row.get("file_name"), base, where, report, objects)
        if image is None:
            continue
        try:
            text = parse_caption(row.get("text"))
        except TypeError:
            report.add("skipped: metadata text is not a string or list of strings", where)
            continue
        caption = caption_policy(text, image, report, missing_caption, empty_caption)
        if caption is None:
            continue
        key, outside = paths.relative(image, base)
        if outside:
            report.add("kept: file_name outside the metadata's folder", where)
        if key in seen:
            report.add("kept: duplicate row (the file is listed again)", where)
        if None in row:  # csv.DictReader's key for fields past the header's
            report.add("kept: CSV row has extra fields (ignored; quote commas in captions)", where)
        seen.add(key)
        records.append(Record(len(records), image, caption))
    return records


def _metadata_file(path: str) -> str:
    """The metadata file `data.path` names: itself, or the one in that folder."""
    if not storage.isdir(path):
        return path
    found = [storage.join(path, n) for n in ("metadata.jsonl", "metadata.csv")
             if paths.isfile(storage.join(path, n))]
    if len(found) != 1:
        raise DataError(f"{path!r} is a folder with {'both' if found else 'neither'} metadata.jsonl "
                        f"{'and' if found else 'nor'} metadata.csv; pass the metadata file itself (or "
                        "data.source=folder for images with .txt captions)")
    return found[0]


#: What a metadata value that is not a path is, as a user would name it.
_KINDS = {type(None): "missing or null", bool: "true/false", int: "number", float: "number", list: "list",
          dict: "object"}


def _row_image(file_name: Any, base: str, where: str, report: Report, objects: paths.Objects) -> str | None:
    """The image path or URL a metadata row names; None if the row is skipped (counted)."""
    if isinstance(file_name, str):
        kind = "empty string" if not file_name.strip() else "NUL character" if "\0" in file_name else \
            "a URL other than gs://" if storage.is_url(file_name) and not file_name.startswith("gs://") else None
    else:
        kind = _KINDS.get(type(file_name), type(file_name).__name__)
    if kind is not None:
        report.add(f"skipped: metadata file_name is not a path ({kind})", where)
        return None
    image = paths.join(base, file_name)
    problem = objects.problem(image) if storage.is_url(image) else path_problem(image)
    if problem is not None:
        report.add("skipped: listed in the metadata, no such file" if problem == "no such file"
                   else f"skipped: {problem}", image)
        return None
    return image


def _metadata_rows(path: str) -> list[tuple[int, dict]]:
    """(line, row) of every row; refuses a file that cannot be read right as a whole."""
    if not path.endswith((".jsonl", ".csv")):
        raise DataError(f"{path!r}: metadata must be a .jsonl or .csv file")
    raw, problem = read_bytes(path)
    if problem is not None:
        raise DataError(f"metadata file {path!r}: {problem}")
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheet programs often start with a BOM
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8, "
                        "or the captions would be read wrong") from None
    if path.endswith(".jsonl"):
        rows = list(_json_lines(path, text))
    else:
        rows = list(enumerate(csv.DictReader(io.StringIO(text, newline="")), 2))
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: a JSON {type(row).__name__}, not an object; each line "
                            'needs one object like {"file_name": "a.png", "text": "a caption"}')
    if rows and not any("file_name" in row for _, row in rows):  # a wrong column name, not one bad row
        found = sorted(k for k in rows[0][1] if isinstance(k, str))  # csv: None keys extra fields
        raise DataError(f"{path}:{rows[0][0]}: no 'file_name' column/key (found {found}); "
                        "each row needs file_name and text")
    return rows


def _json_lines(path: str, text: str) -> Iterator[tuple[int, Any]]:
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); one object per line") from None


def load_image(path: str, report: Report, *, data: bytes | None = None,
               max_pixels: int = 64_000_000) -> Image.Image | None:
    """The image at `path` (or its encoded bytes `data`, `path` then only names it) as 8-bit
    RGB, upright; or None (counted in `report`). The file is checked before it is opened,
    and failing to open it (the system's reason) is told apart from failing to decode it."""
    img, problem = None, None
    if data is None and storage.is_url(path):  # an object is fetched whole, then decoded from memory
        data, problem = read_bytes(path)
    if data is not None:
        f, problem = io.BytesIO(data), None if data else "zero-byte file"
    elif problem is None and (problem := path_problem(path)) is None:
        try:
            f = open(path, "rb")
        except OSError as e:
            problem = os_problem(e, path)
    if problem is None:
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(f)
                if img.size[0] * img.size[1] > max_pixels:  # checked before decoding any pixel
                    raise Image.DecompressionBombError
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                img, problem = None, f"over {max_pixels} pixels"
            except Exception:  # Pillow's plugins fail on malformed files with many exception types
                img, problem = None, "not a readable image (corrupt, truncated or not an image)"
    if img is None:
        report.add(f"skipped: {problem}", path)
        return None
    return _to_rgb(img, path, report)


_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")
_CONVERTED = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")


def _to_rgb(img: Image.Image, path: str, report: Report) -> Image.Image | None:
    """8-bit RGB from any mode PIL opens, upright per EXIF; each conversion counted (the
    table in this module's docstring); None (counted) for modes it cannot convert."""
    img = _upright(img, path, report)
    mode = img.mode
    if mode in ("F", "I") or mode.startswith("I;16"):
        return _grey_to_rgb(img, path, report)
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        report.add("composited on white: transparency", path)
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")  # Pillow has no La -> RGBA
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        rgb = img.convert("RGB") if mode in _CONVERTED else None
    except (ValueError, ImportError):  # LAB without Pillow's littlecms
        rgb = None
    if rgb is None:
        report.add(f"skipped: unsupported colour mode ({mode})", path)
    else:
        report.add(f"converted: {mode} to RGB", path)
    return rgb


def _upright(img: Image.Image, path: str, report: Report) -> Image.Image:
    """`img` rotated as its EXIF orientation says (the camera held sideways)."""
    try:
        if img.getexif().get(0x0112, 1) in range(2, 9):
            rotated = ImageOps.exif_transpose(img)
            report.add("rotated upright (EXIF orientation)", path)
            return rotated
    except Exception:  # a malformed EXIF block: the pixels are still good
        report.add("kept: EXIF unreadable (orientation not applied)", path)
    return img


def _grey_to_rgb(img: Image.Image, path: str, report: Report) -> Image.Image | None:
    """16/32-bit integer and 32-bit float grey as 8-bit RGB, scaled from the range their
    values say they use (this module's docstring), or None for NaN/infinite pixels."""
    mode, arr = img.mode, np.asarray(img, dtype=np.float64)
    if mode == "F":
        if not np.isfinite(arr).all():
            report.add("skipped: non-finite pixel values (NaN or infinity)", path)
            return None
        top = 1.0 if arr.min() >= 0 and arr.max() <= 1 else 255.0
        how = f"32-bit float, read as 0..{top:g}"
    elif mode == "I":
        top = 65535.0 if arr.max() > 255 else 255.0
        how = f"32-bit integer, read as 0..{top:g}"
    else:
        top, how = 65535.0, "16-bit"
    report.add(f"converted: {mode} ({how}) to 8-bit RGB", path)
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")

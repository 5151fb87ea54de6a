"""Captions: read from caption files and metadata values, kept or skipped by the
`missing_caption`/`empty_caption` policies, and varied per epoch on the host.

An image may have several captions (a metadata `text` list): one is trained per epoch,
and tags of comma-separated captions (booru/kohya style) may be shuffled and dropped.
Both are deterministic from (seed, epoch, record id): a resumed run, another host or
another worker process produces the same caption for the same example. Conditional
dropout (the whole caption replaced by the null) is not done here: it happens in the
train step.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

#: One caption, or several (one trained per epoch, chosen by `choose`).
Caption = str | tuple[str, ...]

_SALT = 0x6A78  # keeps this stream apart from other host-side uses of the same seed


class _Report(Protocol):  # jaxcond.data.files.Report, which imports this module
    def add(self, what: str, path: str) -> None: ...


def decode_caption(raw: bytes, path: str, report: _Report) -> str:
    """A caption file's text, stripped; non-UTF-8 files are decoded and counted, not lost."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        report.add("caption decoded as UTF-16", path)
        return raw.decode("utf-16").strip()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        report.add("caption decoded as cp1252 (not UTF-8)", path)
        return raw.decode("cp1252", errors="replace").strip()


def parse_caption(value: Any) -> Caption | None:
    """A metadata or dataset caption value: a string (stripped), a list of strings (several
    captions; empty ones dropped, a single one is a plain string), or None for no caption
    (None or an empty list). Raises TypeError for anything else: a number or a dict is
    more likely a wrong column than a caption."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"not a caption: {type(value).__name__}")
    if not value:
        return None
    several = tuple(c for c in (v.strip() for v in value) if c)
    if len(several) == 1:
        return several[0]
    return several or ""  # only empty strings: an empty caption


def caption_policy(caption: Caption | None, path: str, report: _Report, missing: str,
                   empty: str) -> Caption | None:
    """The caption to train `path` with, or None to skip it, as config.data's
    `missing_caption` and `empty_caption` say; each case counted."""
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
    if isinstance(caption, tuple):
        report.add("kept: several captions (one per epoch)", path)
    return caption


def choose(caption: Caption, *, seed: int, epoch: int, record_id: int) -> str:
    """The caption trained in `epoch`: one of several, from its own stream ([..., 2]: the
    crop and flip draw from [seed, epoch, record_id, 1])."""
    if isinstance(caption, str):
        return caption
    return caption[int(np.random.default_rng([seed, epoch, record_id, 2]).integers(len(caption)))]


def as_tuple(caption: Caption) -> tuple[str, ...]:
    """All of a record's captions (validation prompts use the first)."""
    return (caption,) if isinstance(caption, str) else caption


def augment(caption: str, *, seed: int, epoch: int, record_id: int, shuffle: bool = False,
            keep_tokens: int = 0, tag_dropout: float = 0.0) -> str:
    """Shuffles and/or drops the tags after the first `keep_tokens` (kept in place)."""
    if not shuffle and tag_dropout <= 0.0:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng = np.random.default_rng([_SALT, seed, epoch, record_id])
    if tag_dropout > 0.0:
        tail = [t for t, u in zip(tail, rng.random(len(tail))) if u >= tag_dropout]
    if shuffle:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    return ", ".join(head + tail)

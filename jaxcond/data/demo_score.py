"""The demo's caption-adherence scorer: reads shape, colour and background back from pixels.

Pure numpy (no jax, no learned model): :func:`classify` reads each image's attributes with
the palette and the shape geometry of ``jaxcond.data.demo``, and :func:`adherence` scores
generated samples against the captions they were generated from.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from jaxcond.data.demo import COLOR_NAMES, PALETTE_RGB, SHAPES, Attrs, all_combinations
from jaxcond.grid import check_images as _check_images

__all__ = ["classify", "adherence", "misses", "chance_adherence"]

_TEMPLATE_SUBSAMPLE = 4  # classify() evaluates shape templates on a 4x sub-pixel grid
# A pixel is foreground when it is further from the background colour than this fraction of
# the distance from the background to its nearest other palette colour (~0.45*196 ≈ 88/255).
# Gaussian noise with sigma 20 exceeds that in only ~0.05% of pixels.
_FG_FRACTION = 0.45
_MIN_FG_PIXELS = 4  # fewer foreground pixels than this means "no shape"


def _nearest(colors: np.ndarray, exclude: int | None = None) -> np.ndarray:
    """Index of the nearest palette colour for each row of ``colors`` [..., 3]."""
    d = np.linalg.norm(colors[..., None, :] - PALETTE_RGB, axis=-1)
    if exclude is not None:
        d[..., exclude] = np.inf
    return np.argmin(d, axis=-1)


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """Number of 8-neighbours set, for each pixel of a 2-D boolean mask."""
    p = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    return sum(
        p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    )


def _templates(h: int, w: int, cx: float, cy: float, area: float) -> np.ndarray:
    """Coverage maps [3, h, w] of a circle/square/triangle with the given centroid and area,
    in the same order as SHAPES and with render()'s geometry."""
    k = _TEMPLATE_SUBSAMPLE
    ys = ((np.arange(h * k) + 0.5) / k)[:, None]
    xs = ((np.arange(w * k) + 0.5) / k)[None, :]
    r = math.sqrt(area / math.pi)
    circle = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    half = math.sqrt(area) / 2
    square = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    tw = math.sqrt(2 * area)  # isosceles, height == width == tw, centroid 2/3 below the apex
    apex = cy - 2 * tw / 3
    t = ys - apex
    triangle = (t >= 0) & (t <= tw) & (np.abs(xs - cx) <= t / 2)
    masks = np.stack([circle, square, triangle]).astype(np.float32)
    return masks.reshape(3, h, k, w, k).mean(axis=(2, 4))


def _classify_one(img: np.ndarray) -> Attrs:
    f = img.astype(np.float32)
    h, w, _ = f.shape
    border = np.concatenate([f[0], f[-1], f[1:-1, 0], f[1:-1, -1]])
    bg_i = int(_nearest(np.median(border, axis=0)))
    bg_name, bgc = COLOR_NAMES[bg_i], PALETTE_RGB[bg_i]

    dist = np.linalg.norm(f - bgc, axis=-1)
    others = np.delete(PALETTE_RGB, bg_i, axis=0)
    thresh = _FG_FRACTION * float(np.min(np.linalg.norm(others - bgc, axis=-1)))
    cand = dist > thresh
    cand &= _neighbour_count(cand) > 0  # isolated pixels are noise, not a shape
    # The smallest rendered shape (16x16 triangle) has ~10 such pixels; a few are noise.
    if cand.sum() < _MIN_FG_PIXELS:
        return Attrs(shape="", color="", background=bg_name)

    # Colour from the "core" of the foreground: anti-aliased edge pixels are blends towards the
    # background, and the median of a blend could land nearer a third palette colour.
    d = dist[cand]
    core = cand & (dist >= 0.75 * np.quantile(d, 0.9))
    fg_i = int(_nearest(np.median(f[core], axis=0), exclude=bg_i))
    fgc = PALETTE_RGB[fg_i]

    # Soft coverage alpha = position of each pixel on the segment bg -> fg. Box-filtered edges
    # make alpha the true sub-pixel coverage, so centroid and area are accurate even at 16x16.
    # Restrict to the (dilated) foreground so background noise does not add area.
    v = fgc - bgc
    alpha = np.clip((f - bgc) @ v / float(v @ v), 0.0, 1.0)
    alpha *= cand | (_neighbour_count(cand) > 0)
    area = float(alpha.sum())
    if area < 1.0:
        shape = ""
    else:
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        cx = float((alpha * xx).sum() / area)
        cy = float((alpha * yy).sum() / area)
        # Nearest template (L2) among shapes with the same centroid and area.
        err = ((_templates(h, w, cx, cy, area) - alpha) ** 2).sum(axis=(1, 2))
        shape = SHAPES[int(np.argmin(err))]
    return Attrs(shape=shape, color=COLOR_NAMES[fg_i], background=bg_name)


def classify(images: np.ndarray) -> list[Attrs]:
    """Read attributes back from uint8 ``[N, H, W, 3]`` images (deterministic, pixel based).

    background: nearest palette colour to the median border pixel. Foreground: pixels far from
    the background colour (isolated pixels ignored). color: nearest palette colour (other than
    the background) to the median of the foreground core. shape: nearest of the three shape
    templates matched to the foreground's sub-pixel coverage (same centroid and area).

    Convention: never returns None; if no foreground is found, ``color`` and ``shape`` are ``""``
    (and ``shape`` alone is ``""`` if the foreground is under one pixel of area), which never
    equals a target, so such images count as wrong in :func:`adherence`.
    """
    images = _check_images(images)
    return [_classify_one(img) for img in images]


def _read_against(images: np.ndarray, targets: Sequence[Attrs]) -> list[Attrs]:
    """:func:`classify` of images that each have a target."""
    images = _check_images(images)
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    return classify(images)


def adherence(images: np.ndarray, targets: Sequence[Attrs]) -> dict[str, float]:
    """Fractions of images whose classified background/color/shape (and all three) match."""
    read = _read_against(images, targets)
    if len(targets) == 0:
        raise ValueError("adherence of zero images is undefined")
    hits = np.array(
        [
            (p.background == t.background, p.color == t.color, p.shape == t.shape)
            for p, t in zip(read, targets)
        ],
        dtype=bool,
    )
    acc = hits.mean(axis=0)
    return {
        "background": float(acc[0]),
        "color": float(acc[1]),
        "shape": float(acc[2]),
        "all": float(hits.all(axis=1).mean()),
    }


def misses(images: np.ndarray, targets: Sequence[Attrs], keys: Sequence[str]) -> list[tuple[int, Attrs]]:
    """``(index, what was read)`` of each image whose classified ``keys`` (fields of
    :class:`Attrs`) differ from its target's: the samples behind an adherence below 1."""
    for k in keys:
        if k not in ("shape", "color", "background"):
            raise ValueError(f"unknown attribute {k!r}; expected shape, color or background")
    return [(i, p) for i, (p, t) in enumerate(zip(_read_against(images, targets), targets))
            if any(getattr(p, k) != getattr(t, k) for k in keys)]


def chance_adherence(targets: Sequence[Attrs]) -> dict[str, float]:
    """Expected :func:`adherence` of a uniform guess over :func:`all_combinations`.

    For valid targets this is 1/6 background, 1/6 color, 1/3 shape, 1/90 all — the level that
    samples ignoring the caption (e.g. unconditional ones) should stay at.
    """
    if len(targets) == 0:
        raise ValueError("chance_adherence of zero targets is undefined")
    combos = all_combinations()
    n = len(combos)
    by_bg = Counter(c.background for c in combos)
    by_color = Counter(c.color for c in combos)
    by_shape = Counter(c.shape for c in combos)
    valid = set(combos)
    m = len(targets)
    return {
        "background": sum(by_bg[t.background] for t in targets) / (n * m),
        "color": sum(by_color[t.color] for t in targets) / (n * m),
        "shape": sum(by_shape[t.shape] for t in targets) / (n * m),
        "all": sum(t in valid for t in targets) / (n * m),
    }

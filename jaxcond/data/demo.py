"""Built-in demo dataset: one coloured shape on a coloured background, with a caption.

Everything here is pure numpy + pillow (no jax) so that data generation and scoring can run
anywhere, including inside data-loader workers and evaluation scripts.

Images are procedurally generated and deterministic: record ``i`` of a :class:`DemoDataset` is a
pure function of ``(seed, i, combos, size)``. :func:`classify` reads the attributes back from
pixels, so adherence of *generated* samples to their caption can be measured without a learned
model.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

__all__ = [
    "PALETTE",
    "SHAPES",
    "Attrs",
    "caption",
    "parse_caption",
    "all_combinations",
    "split_combinations",
    "render",
    "DemoDataset",
    "classify",
    "adherence",
    "misses",
    "chance_adherence",
    "grid_array",
    "save_grid",
]

# Six colours far apart in RGB (smallest pairwise distance ~196, green/black), so that both a
# diffusion model and the nearest-colour reader in `classify` have a wide margin. Not fully
# saturated (20..240) so edge blends and small model errors do not clip at 0/255.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 190, 20),
    "blue": (20, 40, 220),
    "yellow": (240, 220, 20),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

_COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
_PAL = np.array([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)  # [P, 3]

_SUPERSAMPLE = 4  # render() draws at 4x and box-filters down, for anti-aliased edges
_MIN_FRAC, _MAX_FRAC = 0.3, 0.6  # shape width as a fraction of the image width
_TEMPLATE_SUBSAMPLE = 4  # classify() evaluates shape templates on a 4x sub-pixel grid
# A pixel is foreground when it is further from the background colour than this fraction of
# the distance from the background to its nearest other palette colour (~0.45*196 ≈ 88/255).
# Gaussian noise with sigma 20 exceeds that in only ~0.05% of pixels.
_FG_FRACTION = 0.45
_MIN_FG_PIXELS = 4  # fewer foreground pixels than this means "no shape"
_GRID_GAP = 2
_GAP_COLOR = (128, 128, 128)  # mid-grey so tiles with white or black backgrounds stay separated
_LABEL_BG = (255, 255, 255)
_LABEL_FG = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class Attrs:
    """Attributes of one demo image. ``color`` is the shape colour; always != ``background``.

    :func:`classify` may return ``shape == ""`` / ``color == ""`` when it finds no shape.
    """

    shape: str
    color: str
    background: str


def _check_attrs(a: Attrs) -> None:
    # Render/caption only valid attributes; a typo should fail loudly, not draw a wrong image.
    if a.shape not in SHAPES:
        raise ValueError(f"unknown shape {a.shape!r}; expected one of {SHAPES}")
    for field, value in (("color", a.color), ("background", a.background)):
        if value not in PALETTE:
            raise ValueError(f"unknown {field} {value!r}; expected one of {_COLOR_NAMES}")
    if a.color == a.background:
        raise ValueError(f"shape colour equals background colour in {a}")


def caption(a: Attrs) -> str:
    """``Attrs("circle", "red", "blue")`` -> ``"a red circle on a blue background"``."""
    _check_attrs(a)
    return f"a {a.color} {a.shape} on a {a.background} background"


def parse_caption(text: str) -> Attrs:
    """Inverse of :func:`caption`; raises ValueError naming ``text`` for anything else."""
    words = text.split(" ") if isinstance(text, str) else []
    if (
        len(words) == 7
        and words[0] == "a"
        and words[3:5] == ["on", "a"]
        and words[6] == "background"
    ):
        a = Attrs(shape=words[2], color=words[1], background=words[5])
        try:
            _check_attrs(a)
        except ValueError as e:
            raise ValueError(f"not a demo caption: {text!r} ({e})") from None
        return a
    raise ValueError(
        f"not a demo caption: {text!r}; expected 'a <color> <shape> on a <color> background'"
    )


def all_combinations() -> list[Attrs]:
    """All valid (shape, color, background) triples, sorted by (shape, color, background)."""
    return [
        Attrs(shape, color, bg)
        for shape in sorted(SHAPES)
        for color in sorted(PALETTE)
        for bg in sorted(PALETTE)
        if color != bg
    ]


def split_combinations(heldout_fraction: float, seed: int) -> tuple[list[Attrs], list[Attrs]]:
    """Deterministically split :func:`all_combinations` into ``(train, heldout)``.

    ``heldout`` has ``round(heldout_fraction * N)`` combos. Every colour still appears as a shape
    colour and as a background in ``train``, and every shape appears in ``train``, so held-out
    captions are new *combinations* of seen words. Both lists keep the sorted order.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    combos = all_combinations()
    k = round(heldout_fraction * len(combos))
    # Greedy over a seeded permutation: hold a combo out only if every word it uses stays
    # covered by the remaining train combos. Coverage only shrinks as more are held out, so a
    # combo rejected once can never become admissible later; one pass suffices.
    counts: Counter[tuple[str, str]] = Counter()
    for c in combos:
        counts["shape", c.shape] += 1
        counts["color", c.color] += 1
        counts["background", c.background] += 1
    held: set[int] = set()
    for j in np.random.default_rng(seed).permutation(len(combos)):
        if len(held) == k:
            break
        c = combos[int(j)]
        keys = [("shape", c.shape), ("color", c.color), ("background", c.background)]
        if all(counts[key] > 1 for key in keys):
            for key in keys:
                counts[key] -= 1
            held.add(int(j))
    if len(held) < k:
        raise ValueError(
            f"heldout_fraction={heldout_fraction} too large: could hold out only {len(held)} of "
            f"{len(combos)} combos (asked {k}) while keeping every word in train"
        )
    train = [c for j, c in enumerate(combos) if j not in held]
    heldout = [c for j, c in enumerate(combos) if j in held]
    return train, heldout


def render(a: Attrs, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw ``a`` at a random position/scale: uint8 ``[size, size, 3]``.

    The shape's bounding box is a square of width 30-60% of ``size``, fully inside the image.
    Triangles are upright isosceles with height == width (same bounding box as the others).
    """
    _check_attrs(a)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    w = rng.uniform(_MIN_FRAC, _MAX_FRAC) * size
    cx = rng.uniform(w / 2, size - w / 2)
    cy = rng.uniform(w / 2, size - w / 2)
    s = _SUPERSAMPLE
    big = Image.new("RGB", (size * s, size * s), PALETTE[a.background])
    draw = ImageDraw.Draw(big)
    fill = PALETTE[a.color]
    # Continuous coordinates (pixel j spans [j, j+1)) scaled to the supersampled canvas.
    x0, x1 = (cx - w / 2) * s, (cx + w / 2) * s
    y0, y1 = (cy - w / 2) * s, (cy + w / 2) * s
    if a.shape == "square":
        # PIL rectangles are inclusive of both ends: fill pixels whose centres lie inside.
        draw.rectangle(
            (math.ceil(x0 - 0.5), math.ceil(y0 - 0.5), math.floor(x1 - 0.5), math.floor(y1 - 0.5)),
            fill=fill,
        )
    elif a.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        # PIL polygon vertices live at pixel centres (hence -0.5), and the fill includes the
        # outline, which would add ~5% area; shrink about the incentre by 0.4 sub-pixel.
        r = w * s / (1 + math.sqrt(5))  # inradius of the isosceles triangle (height == width)
        k = (r - 0.4) / r
        ix, iy = cx * s, y1 - r
        verts = [(cx * s, y0), (x1, y1), (x0, y1)]
        draw.polygon(
            [(ix + k * (x - ix) - 0.5, iy + k * (y - iy) - 0.5) for x, y in verts], fill=fill
        )
    return np.asarray(big.reduce(s))  # Image.reduce == box filter


class DemoDataset:
    """Lazily generated demo records; record ``i`` depends only on ``(seed, i, combos, size)``."""

    def __init__(self, num_records: int, size: int, seed: int, combos: Sequence[Attrs]):
        if num_records < 0:
            raise ValueError(f"num_records must be >= 0, got {num_records}")
        if not combos:
            raise ValueError("combos must be non-empty")
        for c in combos:
            _check_attrs(c)
        self.num_records = int(num_records)
        self.size = int(size)
        self.seed = int(seed)
        self.combos: tuple[Attrs, ...] = tuple(combos)

    def __len__(self) -> int:
        return self.num_records

    def _rng(self, i: int) -> tuple[int, np.random.Generator]:
        i = operator.index(i)
        if not 0 <= i < self.num_records:
            raise IndexError(f"record {i} out of range for {self.num_records} records")
        # Seeding per record (not one stream) makes records independent of access order,
        # sharding and worker count.
        return i, np.random.default_rng([self.seed, i])

    def attrs(self, i: int) -> Attrs:
        _, rng = self._rng(i)
        return self.combos[int(rng.integers(len(self.combos)))]

    def __getitem__(self, i: int) -> dict:
        i, rng = self._rng(i)
        a = self.combos[int(rng.integers(len(self.combos)))]
        return {"image": render(a, rng, self.size), "caption": caption(a), "id": i}

    def materialize(self) -> tuple[np.ndarray, list[str]]:
        """All images ``[N, size, size, 3]`` uint8 and their captions."""
        images = np.empty((self.num_records, self.size, self.size, 3), np.uint8)
        captions: list[str] = []
        # Progress bar only when generation takes noticeable time (~0.25 s per 10k at 16x16).
        for i in tqdm(range(self.num_records), desc="demo data", disable=self.num_records < 10000):
            rec = self[i]
            images[i] = rec["image"]
            captions.append(rec["caption"])
        return images, captions


# ----------------------------------------------------------------------------- scoring


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        # Refuse floats: silently reading [-1, 1] model output as 0..255 would score ~0.
        raise TypeError(f"expected uint8 images, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 3:
        raise ValueError(f"expected images [N, H, W, 3] with H, W >= 3, got {images.shape}")
    return images


def _nearest(colors: np.ndarray, exclude: int | None = None) -> np.ndarray:
    """Index of the nearest palette colour for each row of ``colors`` [..., 3]."""
    d = np.linalg.norm(colors[..., None, :] - _PAL, axis=-1)
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
    bg_name, bgc = _COLOR_NAMES[bg_i], _PAL[bg_i]

    dist = np.linalg.norm(f - bgc, axis=-1)
    others = np.delete(_PAL, bg_i, axis=0)
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
    fgc = _PAL[fg_i]

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
    return Attrs(shape=shape, color=_COLOR_NAMES[fg_i], background=bg_name)


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


# ----------------------------------------------------------------------------- grids


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (single over-long words are kept whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def grid_array(
    images: np.ndarray,
    nrow: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 4,
) -> np.ndarray:
    """The uint8 ``[H, W, 3]`` grid that :func:`save_grid` writes.

    ``nrow`` is the number of images per row (as in torchvision's ``make_grid``); rows are
    filled left to right. Tiles are upscaled ``scale`` x with nearest neighbour and separated
    (and surrounded) by 2 px grey gaps. Optional labels go left of each row / above each column
    (column labels are word-wrapped to the tile width).
    """
    images = _check_images(images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    n, h, w, _ = images.shape
    ncol = min(nrow, max(n, 1))
    nrows = max(1, -(-n // ncol))
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row_labels for {nrows} rows")
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"{len(col_labels)} col_labels for {ncol} columns")
    th, tw, g = h * scale, w * scale, _GRID_GAP

    font = ImageFont.load_default()
    line_h = 0
    left = top = 0
    wrapped: list[list[str]] = []
    if row_labels is not None or col_labels is not None:
        asc, desc = font.getmetrics()
        line_h = asc + desc + 1
    if row_labels is not None:
        left = int(max((font.getlength(t) for t in row_labels), default=0)) + 2 * g + 2
    if col_labels is not None:
        wrapped = [_wrap(t, font, tw) for t in col_labels]
        top = max(len(ls) for ls in wrapped) * line_h + 2 * g

    gh, gw = nrows * (th + g) + g, ncol * (tw + g) + g
    canvas = np.empty((top + gh, left + gw, 3), np.uint8)
    canvas[:] = _LABEL_BG
    canvas[top:, left:] = _GAP_COLOR
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for k in range(n):
        r, c = divmod(k, ncol)
        y, x = top + g + r * (th + g), left + g + c * (tw + g)
        canvas[y : y + th, x : x + tw] = tiles[k]

    if row_labels is None and col_labels is None:
        return canvas
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    for r, text in enumerate(row_labels or []):
        y = top + g + r * (th + g) + (th - line_h) // 2
        draw.text((g, y), text, fill=_LABEL_FG, font=font)
    for c, lines in enumerate(wrapped):
        x = left + g + c * (tw + g)
        for j, line in enumerate(lines):
            draw.text((x, g + j * line_h), line, fill=_LABEL_FG, font=font)
    return np.asarray(pil)


def save_grid(
    images: np.ndarray,
    path: str,
    nrow: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 4,
) -> None:
    """Write :func:`grid_array` as a PNG at ``path``, creating parent directories."""
    arr = grid_array(images, nrow, row_labels=row_labels, col_labels=col_labels, scale=scale)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")

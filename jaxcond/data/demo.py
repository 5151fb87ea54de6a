"""Built-in demo dataset: one coloured shape on a coloured background, with a caption.

Everything here is pure numpy + pillow (no jax) so that data generation can run anywhere,
including inside data-loader workers and evaluation scripts.

Images are procedurally generated and deterministic: record ``i`` of a :class:`DemoDataset` is a
pure function of ``(seed, i, combos, size)``. ``jaxcond.data.demo_score`` reads the attributes
back from pixels, so adherence of *generated* samples to their caption can be measured without
a learned model.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
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
]

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

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[c] for c in COLOR_NAMES], dtype=np.float32)  # [P, 3]

_SUPERSAMPLE = 4  # render() draws at 4x and box-filters down, for anti-aliased edges
_MIN_FRAC, _MAX_FRAC = 0.3, 0.6  # shape width as a fraction of the image width


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
            raise ValueError(f"unknown {field} {value!r}; expected one of {COLOR_NAMES}")
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

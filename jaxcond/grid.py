"""PNG grids of images with row and column labels (sample grids, validation grids)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxcond import outputs, storage

_GRID_GAP = 2
_GAP_COLOR = (128, 128, 128)  # mid-grey so tiles with white or black backgrounds stay separated
_LABEL_BG = (255, 255, 255)
_LABEL_FG = (0, 0, 0)


def check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        # Refuse floats: silently reading [-1, 1] model output as 0..255 would score ~0.
        raise TypeError(f"expected uint8 images, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 3:
        raise ValueError(f"expected images [N, H, W, 3] with H, W >= 3, got {images.shape}")
    return images


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
    images = check_images(images)
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
    if not storage.is_url(path):  # a bucket has no folders to make
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with outputs.atomic(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")

"""Automatic aspect-ratio buckets (`data.buckets = "auto"`), chosen from the data's own
image sizes, as kohya and OneTrainer make them.

The rule, all pure functions of the config and the multiset of (height, width) sizes (not
their order, the files' order or the number of hosts, so every host and every resumed run
chooses the same buckets from the same data):

1. Candidates (kohya's grid): for every side s, a multiple of `step` in [min_side,
   max_side], the other side is the largest multiple of `step` keeping the area <= `area`
   (both orientations). Kept when the other side is in [min_side, max_side] too and the
   area is within AREA_TOLERANCE below the target: `(1 - AREA_TOLERANCE) * area <= h * w
   <= area`. Of candidates with the same aspect ratio the larger stays.
2. Choice: the at most `max_buckets` candidates that minimise the summed distance, in log
   aspect ratio, of every image to its nearest chosen bucket (exact: dynamic programming
   over the candidates sorted by ratio, with log ratios as integers in millionths so every
   machine sums the same; ties go to the taller candidates). Of the
   bucket counts k <= max_buckets the largest whose every bucket gets at least
   `min_images` images is used (a bucket that cannot fill a global batch would never
   train); one bucket if none.
3. The chosen shapes, tall to wide. Images then go to the nearest (`nearest`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from jaxcond.checks import ConfigError

#: A bucket's area is at most the target and at least (1 - this) times it.
AREA_TOLERANCE = 0.2
_SCALE = 1_000_000  # log ratios in millionths: integer sums, the same on every machine


@dataclasses.dataclass(frozen=True)
class Spec:
    """Resolved `data.auto_buckets`: every field a number (`resolve` fills the defaults)."""

    area: int
    min_side: int
    max_side: int
    step: int
    max_buckets: int


def auto_spec(d, size_multiple: int | None) -> Spec:
    """`config.data.auto_buckets` of `config.data` (`d`) resolved; a ConfigError when its
    step is the model's size multiple (0) and that is not known (a command loading no model)."""
    if not d.auto_buckets.step and not size_multiple:
        raise ConfigError("config.data.auto_buckets.step = 0 (the model's size multiple) is not known without "
                          "loading the model: set it, e.g. --config.data.auto_buckets.step=64")
    return resolve(d.resolution, d.auto_buckets, size_multiple or d.auto_buckets.step)


def resolve(resolution: int, auto, size_multiple: int) -> Spec:
    """`config.data.auto_buckets` (`auto`) with its 0 defaults filled: area resolution**2,
    sides from resolution/2 up to 2 * resolution (kohya's 256..1024 at 512) on the step,
    step the model's `size_multiple`."""
    step = auto.step or size_multiple
    half_up = -(-(resolution // 2) // step) * step  # resolution / 2 rounded up to the step
    return Spec(area=auto.area or resolution ** 2,
                min_side=auto.min_side or max(step, half_up),
                max_side=auto.max_side or max(step, 2 * resolution // step * step),
                step=step, max_buckets=auto.max_buckets)


def candidates(spec: Spec) -> list[tuple[int, int]]:
    """The grid of rule 1, sorted tall to wide."""
    s, low = spec.step, (1 - AREA_TOLERANCE) * spec.area
    best: dict[int, tuple[int, int]] = {}  # by log ratio
    for side in range(-(-spec.min_side // s) * s, spec.max_side + 1, s):
        other = min(spec.max_side, spec.area // side // s * s)
        if other < spec.min_side or other * side < low:
            continue
        for h, w in ((side, other), (other, side)):
            key = _log_ratio(h, w)
            if key not in best or h * w > best[key][0] * best[key][1]:
                best[key] = (h, w)
    return [best[k] for k in sorted(best)]


def nearest(shapes: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """The bucket whose aspect ratio is nearest (in log ratio) the image's."""
    return int(np.argmin(np.abs(np.log([h / w for h, w in shapes]) - np.log(height / width))))


#: Images whose cover-resize would be over this many times the training size (its aspect
#: ratio that far from the bucket's) are skipped: the crop would keep under 1/8 of them.
MAX_OVERHANG = 8


def fit_problem(height: int, width: int, size: tuple[int, int], too_small: str) -> str | None:
    """What the data report counts for an image of `height` x `width` fitted to `size`: a
    "skipped: ..." (unusable), an "upscaled: ..." (usable) or None."""
    th, tw = size
    scale = max(th / height, tw / width)
    if max(tw, round(width * scale)) * max(th, round(height * scale)) > MAX_OVERHANG * tw * th:
        return f"skipped: aspect ratio over {MAX_OVERHANG}x off that of {th}x{tw}"  # a banner, a 1-pixel line
    if height < th or width < tw:
        return f"skipped: smaller than {th}x{tw}" if too_small == "skip" else f"upscaled: smaller than {th}x{tw}"
    return None


def fit_problems(sizes: Sequence[tuple[int, int]], shapes: Sequence[tuple[int, int]],
                 too_small: str) -> list[str | None]:
    """`fit_problem` of every image of `sizes` in its nearest bucket of `shapes`."""
    return [fit_problem(h, w, shapes[nearest(shapes, h, w)], too_small) for h, w in sizes]


def _log_ratio(h: int, w: int) -> int:
    return round(math.log(w / h) * _SCALE)  # grows tall to wide, as `candidates` are sorted


def choose(sizes: Iterable[tuple[int, int]], spec: Spec, min_images: int = 1) -> tuple[tuple[int, int], ...]:
    """The buckets of images of `sizes` ((height, width) each) by rules 2 and 3."""
    cands = candidates(spec)
    counts = collections.Counter((int(h), int(w)) for h, w in sizes)
    if not cands:
        return ()
    if not counts:  # nothing to fit: the squarest
        return (cands[nearest(cands, 1, 1)],)
    ratios: dict[int, int] = collections.Counter()
    for (h, w), n in counts.items():
        ratios[_log_ratio(h, w)] += n
    v = np.array(sorted(ratios), np.int64)
    n = np.array([ratios[x] for x in v.tolist()], np.int64)
    c = np.array([_log_ratio(h, w) for h, w in cands], np.int64)
    for chosen in _best_sets(v, n, c, min(spec.max_buckets, len(cands))):
        shapes = [cands[j] for j in chosen]
        per = np.zeros(len(shapes), np.int64)
        for (h, w), k in sorted(counts.items()):
            per[nearest(shapes, h, w)] += k
        if per.min() >= max(1, min_images) or len(shapes) == 1:
            return tuple(shapes)
    raise AssertionError("unreachable: one bucket is always accepted")


def _best_sets(v: np.ndarray, n: np.ndarray, c: np.ndarray, k_max: int) -> list[list[int]]:
    """Per bucket count k = k_max .. 1, the candidate indices (into the sorted `c`) whose
    nearest-centre cost over image log ratios `v` (sorted, with multiplicities `n`) is least."""
    W = np.concatenate([[0], np.cumsum(n)])  # weight of images below position i
    S = np.concatenate([[0], np.cumsum(n * v)])  # their summed log ratios

    def below(x: np.ndarray, twice: bool = False) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(2 * v if twice else v, x, "left")
        return W[i], S[i]

    wc, sc = below(c)
    first = c * wc - sc  # all images left of a first centre go to it
    last = (S[-1] - sc) - c * (W[-1] - wc)  # all images right of a last centre go to it
    a, b = np.meshgrid(np.arange(len(c)), np.arange(len(c)), indexing="ij")
    wm, sm = below(c[a] + c[b], twice=True)  # images below the midpoint of centres a < b
    pair = (sm - sc[a] - c[a] * (wm - wc[a])) + (c[b] * (wc[b] - wm) - (sc[b] - sm))
    inf = np.iinfo(np.int64).max // 4
    pair = np.where(a < b, pair, inf)
    cost, back = [first], []  # cost[k-1][j]: least cost of images below c[j] with k centres, the last j
    for _ in range(1, k_max):
        total = cost[-1][:, None] + pair  # [previous centre, this centre]
        back.append(np.argmin(total, axis=0))  # first minimum: ties to the taller candidate
        cost.append(np.minimum(np.min(total, axis=0), inf))
    out = []
    for k in range(k_max, 0, -1):
        end = cost[k - 1] + last
        j = int(np.argmin(end))
        if end[j] >= inf:
            continue  # fewer candidates than k
        chosen = [j]
        for t in range(k - 1, 0, -1):
            j = int(back[t - 1][j])
            chosen.append(j)
        out.append(sorted(chosen))
    return out


def describe(shapes: Sequence[tuple[int, int]], counts: Sequence[int], global_batch: int) -> str:
    """The data report's line: each bucket with its images and full batches per epoch."""
    return ", ".join(f"{h}x{w}: {c}, {c // global_batch}" for (h, w), c in zip(shapes, counts))

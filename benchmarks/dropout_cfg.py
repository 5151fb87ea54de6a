"""Caption dropout 0.1 vs 0: does classifier-free guidance need a trained null?

Trains configs/demo.py twice with the same seed: as shipped (caption dropout 0.1, learned
null) and with every dropout group's rate set to 0, so the null is never trained. Masks,
noise, timesteps and data order come from separate RNG sub-streams of the seed
(jaxcond/rng.py), so both runs see the same examples, noise and timesteps; only the masks
differ. For each run it reports

* caption adherence of the 60 held-out samples (12 captions of combinations never trained
  on, 5 samples each) unconditionally and at guidance 1, 3, 5: the fractions the run's own
  final evaluation returns (`train(...)["scores"]`, read from pixels by
  `jaxcond.data.demo_score.adherence`);
* the quality of 256 unconditional samples (guidance 0, the null alone) against training
  images, two simple deterministic statistics:
  - valid: the fraction the pixel reader (`jaxcond.data.demo_score.classify`) reads as a shape on
    a background with at least 90% of pixels within 48/255 (RGB distance) of the line from
    the read background colour to the read shape colour (a training image is clean colours
    and anti-aliased blends between them);
  - colour TV: the total-variation distance between the palette histograms (each pixel
    binned to the nearest palette colour, or to "other" when none is within 48) of the
    samples and of 2048 training images: 0 = the same mix of colours, 1 = disjoint.
  The same two statistics of 256 other training images are the floor.

The classifier-free guidance literature expects adherence to rise with guidance at 0.1,
and guidance not to help (or to hurt) at 0, whose unconditional branch is an input the
network never trained on. Writes a grid (per rate, guidance 0/1/3/5 x the first sample of
each of the 12 held-out captions the final evaluation scored: 9 distinct captions, three
repeated with other noise) and the numbers (<workdir>/results.json), and prints markdown
tables, the total wall time and the load average.

The two runs are independent, so they train side by side in two processes, each pinned to
half of the CPU cores: on 2 cores XLA ran one training only ~1.4x faster on both cores
than on one (README), so two at once should finish ~1.4x sooner than one after the other. Each run's
numbers depend on its core count (the order of float reductions), not on the other run.

    python benchmarks/dropout_cfg.py [--workdir runs/dropout_cfg] [--out docs/dropout_cfg.png] \\
        [--config.field=value ...]
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from concurrent import futures
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from demo_adherence import demo_flags

RATES = (0.1, 0.0)
GUIDANCE = (1.0, 3.0, 5.0)
COLUMNS = ("uncond",) + tuple(f"cfg{g:g}" for g in GUIDANCE)
KEYS = ("background", "color", "shape", "all")
UNCOND_SAMPLES = 256
REFERENCE_IMAGES = 2048
NEAR = 48.0  # RGB distance (of 255) that still counts as a palette colour or a blend of two
ON_LINE = 0.9  # share of a valid image's pixels that must be near its colour line

flags.DEFINE_string("out", "docs/dropout_cfg.png", "Where the comparison grid goes.")


def with_rate(cfg: ml_collections.ConfigDict, rate: float) -> ml_collections.ConfigDict:
    """`cfg` with every dropout group at a constant `rate` and only the final evaluation."""
    cfg = copy.deepcopy(cfg)
    for name, group in cfg.dropout.groups.items():
        if group.schedule == "every_n_epochs":  # its epoch_rate would still drop captions
            raise ValueError(f"dropout.groups.{name}: every_n_epochs is not a single rate to compare")
        group.rate = rate
    cfg.sample.guidance = GUIDANCE
    cfg.train.sample_every = 0  # the intermediate grid changes no weights; it only costs time
    return cfg


def valid_fraction(images: np.ndarray) -> float:
    """Share of uint8 [N, H, W, 3] images that read as a shape on a background (see module doc)."""
    from jaxcond.data import demo as demo_data, demo_score

    valid = []
    for img, a in zip(images, demo_score.classify(images)):
        if not a.shape:
            valid.append(False)
            continue
        bg = np.asarray(demo_data.PALETTE[a.background], np.float64)
        line = np.asarray(demo_data.PALETTE[a.color], np.float64) - bg
        f = img.astype(np.float64) - bg
        along = np.clip(f @ line / (line @ line), 0.0, 1.0)
        off = np.linalg.norm(f - along[..., None] * line, axis=-1)
        valid.append(float((off <= NEAR).mean()) >= ON_LINE)
    return float(np.mean(valid))


def colour_histogram(images: np.ndarray) -> np.ndarray:
    """Share of pixels nearest each palette colour (within NEAR), then of all others."""
    from jaxcond.data import demo as demo_data

    palette = np.asarray(list(demo_data.PALETTE.values()), np.float64)
    d = np.linalg.norm(images.reshape(-1, 1, 3).astype(np.float64) - palette, axis=-1)
    bins = np.where(d.min(axis=1) <= NEAR, d.argmin(axis=1), len(palette))
    return np.bincount(bins, minlength=len(palette) + 1) / len(bins)


def quality(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    tv = 0.5 * float(np.abs(colour_histogram(images) - reference).sum())
    return {"valid": valid_fraction(images), "colour_tv": tv}


def _pin(cores: set[int]) -> None:
    """Start of a run's process, before jax loads: XLA sizes its thread pools to these cores."""
    os.sched_setaffinity(0, cores)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # two runs on one GPU share it


def train_and_sample(cfg: ml_collections.ConfigDict, workdir: str, prompts: list[str],
                     progress: bool) -> dict[str, Any]:
    """Trains one run; its held-out scores, grid samples [4, P, H, W, 3] and unconditional samples."""
    from jaxcond import xla
    from jaxcond.sampling import sample_grid
    from jaxcond.rundir import load_trained
    from jaxcond.train import train

    xla.cpu_runtime()  # as `jaxcond train` runs
    out = train(cfg, workdir, progress=progress)
    t = load_trained(workdir)
    params = t.params("ema" if cfg.sample.use_ema and "ema" in t.state else "raw")
    s = cfg.sample

    def draw(captions: list[str], guidance: tuple[float, ...], seed: int) -> np.ndarray:
        return sample_grid(t.family, t.spec, params, t.family.frozen, captions, guidance, seed, s.steps, s.scheduler)

    # The grid: the final evaluation's first sample per caption (as in samples_final.png).
    # Guidance 0 ignores the caption; another seed than the evaluation's, so other noise.
    return {"scores": out["scores"], "grid": out["samples"][:, ::s.per_prompt],
            "uncond": draw(prompts[:1] * UNCOND_SAMPLES, (0.0,), s.seed + 1)[0]}


def tables(results: dict[str, Any], n: int) -> str:
    """Markdown: adherence per rate and guidance, then unconditional-sample quality."""
    lines = ["| caption dropout | guidance | background | shape colour | shape | all three |",
             "|---|---|---|---|---|---|"]
    for rate in RATES:
        scores = results[f"{rate:g}"]["scores"]
        for col in COLUMNS:
            cells = " | ".join(f"{round(scores[col][k] * n)}/{n}" for k in KEYS)
            lines.append(f"| {rate:g} | {col.removeprefix('cfg')} | {cells} |")
    chance = results[f"{RATES[0]:g}"]["scores"]["chance"]
    lines.append("| chance | | " + " | ".join(f"{chance[k] * n:.1f}/{n}" for k in KEYS) + " |")
    lines += ["", f"| {UNCOND_SAMPLES} images | valid | colour TV vs {REFERENCE_IMAGES} training images |",
              "|---|---|---|"]
    for name, q in [(f"unconditional samples, caption dropout {r:g}", results[f"{r:g}"]["quality"])
                    for r in RATES] + [("other training images (floor)", results["training"])]:
        lines.append(f"| {name} | {q['valid']:.3f} | {q['colour_tv']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    start, load_before = time.perf_counter(), os.getloadavg()
    base, workdir = demo_flags("runs/dropout_cfg", "Parent of one new run directory per rate.")
    from jaxcond import grid
    from jaxcond.data import demo as demo_data, pipeline

    runs = {f"{rate:g}": os.path.join(workdir, f"rate{rate:g}") for rate in RATES}
    for d in runs.values():
        if os.path.exists(os.path.join(d, "checkpoints")):  # a resume would skip the evaluation
            raise SystemExit(f"{d} already holds a run; use a new --workdir")
    prompts = list(pipeline.DemoEval(base.data).eval_captions(base.sample.num_prompts))  # evaluate()'s rows
    train_combos, _ = demo_data.split_combinations(base.data.heldout_fraction, base.data.seed)
    records, _ = demo_data.DemoDataset(REFERENCE_IMAGES + UNCOND_SAMPLES, base.data.resolution, base.data.seed,
                                       train_combos).materialize()
    reference = colour_histogram(records[:REFERENCE_IMAGES])

    results: dict[str, Any] = {"training": quality(records[REFERENCE_IMAGES:], reference)}
    cores = sorted(os.sched_getaffinity(0))
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: jax is not fork-safe
    pools = [futures.ProcessPoolExecutor(1, mp_context=spawn, initializer=_pin,
                                         initargs=(set(cores[i::len(RATES)] or cores),))
             for i in range(len(RATES))]
    jobs = [pool.submit(train_and_sample, with_rate(base, rate), runs[f"{rate:g}"], prompts, i == 0)
            for i, (pool, rate) in enumerate(zip(pools, RATES))]  # one progress bar: the first run's
    samples = []
    for rate, job, pool in zip(RATES, jobs, pools):
        out = job.result()
        pool.shutdown()
        results[f"{rate:g}"] = {"scores": out["scores"], "quality": quality(out["uncond"], reference)}
        samples.append(np.swapaxes(out["grid"], 0, 1))  # [P, 4, H, W, 3]

    tiles = np.concatenate(samples, axis=1)  # per caption: every column of the first rate, then the next
    grid.save_grid(tiles.reshape((-1,) + tiles.shape[2:]), flags.FLAGS.out, nrow=tiles.shape[1],
                   row_labels=prompts, col_labels=[f"p={r:g} {c}" for r in RATES for c in COLUMNS])
    n = base.sample.num_prompts * base.sample.per_prompt
    results["wall_s"] = time.perf_counter() - start
    results["load_before"], results["load_after"] = load_before, os.getloadavg()
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(tables(results, n))
    print(f"grid: {flags.FLAGS.out}")
    print(f"total wall time {results['wall_s'] / 60:.1f} min; load average (1/5/15 min) before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

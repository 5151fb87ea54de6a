"""SD3-shaped demo: does per-encoder dropout teach the model to work without T5 (or the CLIPs)?

Trains configs/demo_sd3.py (a tiny pixel-space SD3: CLIP-L, CLIP-G and T5, each dropped on
its own at 0.464 with zeros nulls, rectified flow), then samples the held-out captions the
run's final evaluation samples (`train.eval_layout`: sample.num_prompts combinations never
trained on, sample.per_prompt samples each, the same seed) four ways and scores them with
the demo's pixel reader (jaxcond.data.demo_score):

* every encoder (the final evaluation's own scores, guidance sample.guidance),
* without T5 (`sample_grid(..., drop=("t5",))`: T5's conditioner is its null in both
  branches, as StableDiffusion3Pipeline runs without text_encoder_3),
* without both CLIPs (`drop=("clip_l", "clip_g")`: T5 alone),
* unconditional (guidance 0: every encoder's null).

The same starting noise in every variant (one seed, `sampling.sample` draws it per sample),
so the variants differ only in what conditions them. Prints a markdown table (background,
shape colour, shape, all three right, of the N samples), writes <workdir>/results.json and
a grid of the first sample per caption (<workdir>/variants.png), and prints the wall time.

    python benchmarks/sd3_demo.py [--workdir runs/sd3_demo_bench] [--config.field=value ...]
"""

from __future__ import annotations

import json
import os
import sys
import time

VARIANTS = {"all encoders": (), "without T5": ("t5",), "without CLIP-L and CLIP-G": ("clip_l", "clip_g")}
KEYS = ("background", "color", "shape", "all")


def table(results: dict, n: int) -> str:
    lines = ["| encoders | guidance | background | shape colour | shape | all three |", "|---|---|---|---|---|---|"]
    for name, scores in results["variants"].items():
        for g, s in scores.items():
            lines.append(f"| {name} | {g} | " + " | ".join(f"{round(s[k] * n)}/{n}" for k in KEYS) + " |")
    u = results["unconditional"]
    lines.append("| none (unconditional) | 0 | " + " | ".join(f"{round(u[k] * n)}/{n}" for k in KEYS) + " |")
    c = results["chance"]
    lines.append("| chance | | " + " | ".join(f"{c[k] * n:.1f}/{n}" for k in KEYS) + " |")
    return "\n".join(lines)


def main() -> None:
    start, load_before = time.perf_counter(), os.getloadavg()
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/demo_sd3.py", "The SD3-shaped demo config.")
    flags.DEFINE_string("workdir", "runs/sd3_demo_bench", "A new run directory.")
    flags.FLAGS(sys.argv)
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if os.path.exists(os.path.join(workdir, "checkpoints")):  # a resume would skip the evaluation
        raise SystemExit(f"{workdir} already holds a run; use a new --workdir")

    import numpy as np

    from jaxcond import grid, xla
    from jaxcond.data import pipeline
    from jaxcond.rundir import load_trained
    from jaxcond.sampling import sample_grid
    from jaxcond.train import eval_layout, train

    xla.cpu_runtime()  # as `jaxcond train` runs
    out = train(cfg, workdir)
    trained = time.perf_counter()
    s = cfg.sample
    data = pipeline.DemoEval(cfg.data)
    _, captions = eval_layout(cfg, data)
    t = load_trained(workdir)
    params = t.params("ema" if s.use_ema and "ema" in t.state else "raw")
    results = {"variants": {"all encoders": {f"{g:g}": out["scores"][f"cfg{g:g}"] for g in s.guidance}},
               "unconditional": out["scores"]["uncond"], "chance": out["scores"]["chance"]}
    firsts = [out["samples"][1:, ::s.per_prompt]]  # [guidance, prompts, H, W, 3]
    for name, drop in list(VARIANTS.items())[1:]:
        images = sample_grid(t.family, t.spec, params, t.family.frozen, captions, s.guidance, s.seed, s.steps,
                             s.scheduler, drop=drop)
        results["variants"][name] = {f"{g:g}": data.score(images[i], captions) for i, g in enumerate(s.guidance)}
        firsts.append(images[:, ::s.per_prompt])
    tiles = np.concatenate([np.swapaxes(f, 0, 1) for f in firsts], axis=1)  # per caption: variant by variant
    grid.save_grid(tiles.reshape((-1,) + tiles.shape[2:]), os.path.join(workdir, "variants.png"),
                   nrow=tiles.shape[1], row_labels=captions[::s.per_prompt],
                   col_labels=[f"{v} g{g:g}" for v in ("all", "no T5", "no CLIPs") for g in s.guidance])

    n = len(captions)
    results.update(samples=n, train_s=trained - start, wall_s=time.perf_counter() - start,
                   load_before=load_before, load_after=os.getloadavg(), steps=cfg.train.steps)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results, n))
    print(f"grid: {os.path.join(workdir, 'variants.png')}")
    print(f"total wall time {results['wall_s'] / 60:.1f} min (training {results['train_s'] / 60:.1f}); load "
          f"average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

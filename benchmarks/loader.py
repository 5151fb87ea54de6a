"""Can the loader keep the step fed? Loader throughput vs the step's consumption, side by side.

Writes a folder of --images JPEGs (--size pixels, captioned demo shapes), builds its cache,
then measures in one run, at the demo config's global batch and 16x16 training size:

  step     examples/s the compiled train step consumes (batches preloaded, 1 device)
  files    examples/s the Prefetcher delivers decoding the files (loader.workers threads)
  cache    examples/s the Prefetcher delivers from the cache

and prints files/step and cache/step (target: cache/step >= 5).

    .venv/bin/python benchmarks/loader.py [--images 2048] [--size 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--images", type=int, default=2048)
ARGS.add_argument("--size", type=int, default=256, help="side of the JPEGs on disk")
ARGS.add_argument("--steps", type=int, default=30, help="batches timed per measurement")
ARGS.add_argument("--workers", type=int, default=2, help="loader threads")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_folder(root: str, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    from jaxcond.data import demo as demo_data

    rng, combos = np.random.default_rng(0), demo_data.all_combinations()
    for i in range(n):
        a = combos[i % len(combos)]
        img = Image.fromarray(demo_data.render(a, rng, 32)).resize((size, size), Image.Resampling.BICUBIC)
        img.save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
        with open(os.path.join(root, f"{i:05d}.txt"), "w") as f:
            f.write(demo_data.caption(a))


def main(args: argparse.Namespace, tmp: str) -> None:
    import jax

    from configs import demo
    from jaxcond import sharding, train
    from jaxcond.data import pipeline, sources

    folder = os.path.join(tmp, "images")
    os.makedirs(folder)
    write_folder(folder, args.images, args.size)
    cfg = demo.get_config()
    cfg.data.source, cfg.data.path, cfg.loader.workers = "folder", folder, args.workers
    run = train.build(cfg, os.path.join(tmp, "run"), devices=jax.devices()[:1])
    b = cfg.train.global_batch
    rows = sharding.local_rows(run.mesh, b)

    def loader_rate(data: pipeline.Data) -> float:
        it = iter(pipeline.Prefetcher(data, rows, 0, args.steps + 2, workers=args.workers,
                                      prefetch=cfg.loader.prefetch))
        next(it)  # start-up (thread pool, first decode) is not throughput
        t0 = time.perf_counter()
        for _ in it:
            pass
        return b * (args.steps + 1) / (time.perf_counter() - t0)

    batches = [run.put_batch(i) for i in range(4)]
    state = run.initial_state()
    for i in range(2):  # compile, warm up
        state, m = run.step_fn(state, run.frozen, batches[i])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = run.step_fn(state, run.frozen, batches[i % 4])
    jax.block_until_ready((state, m))
    step = b * args.steps / (time.perf_counter() - t0)

    files = loader_rate(run.data)
    cfg.data.cache = os.path.join(tmp, "cache")
    sources.build_cache(cfg.data, cfg.seed, b, run.family, cfg.data.cache, workers=cfg.loader.workers,
                        train_text_encoder=cfg.model.train_text_encoder)
    cached = loader_rate(sources.make_data(cfg.data, cfg.seed, b, run.family, workers=cfg.loader.workers,
                                           train_text_encoder=cfg.model.train_text_encoder))
    print(f"\n{args.images} JPEGs of {args.size}x{args.size} -> 16x16, global batch {b}, "
          f"{args.workers} loader threads, {args.steps} batches each")
    print(f"  step consumes  {step:9.0f} examples/s")
    print(f"  files deliver  {files:9.0f} examples/s   files/step {files / step:6.2f}")
    print(f"  cache delivers {cached:9.0f} examples/s   cache/step {cached / step:6.2f} "
          f"(target >= 5: {'met' if cached / step >= 5 else 'MISSED'})")


if __name__ == "__main__":
    a = ARGS.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        main(a, tmp)

"""Step-time overheads of the compiled train step, as ratios measured side by side.

Four variants of the same `jaxcond.train_step.train_step`, on the demo config at its
real size (16x16 images, global batch 32, UNet (32, 64)):

  sharded  the step exactly as `train.build()` compiles it: jax.jit with in/out
           shardings over the mesh, the state donated, jaxcond's compiler options
           (`jaxcond.xla`);
  plain    jax.jit(partial(train_step, ...)) with no shardings and no donation, every
           input a plain array on device 0, the same compiler options;
  nodrop   `sharded` with StepSpec(with_dropout=False): no dropout code compiled at all;
  jaxopts  `sharded` compiled with jax's default compiler options instead of jaxcond's.

Each variant is compiled and warmed up first; then rounds time `--steps` consecutive
steps per variant (ended by jax.block_until_ready), interleaved (the first variant
rotating each round) so a busy machine slows all of them alike (benchmarks/timing.py).
All variants use the same pre-put batches and each has its own state (the step donates
it); the process runs them as `jaxcond train` does (`jaxcond.xla.cpu_runtime()`).
Printed: per-step medians over rounds, ratios of medians, and the median/min/max of the
per-round ratios (the per-round median is the robust one when the machine's load changes
mid-run).

    .venv/bin/python benchmarks/step_time.py                 # 1 device (targets apply)
    .venv/bin/python benchmarks/step_time.py --devices 8     # 8 simulated CPU devices

Targets (1 device): sharded / plain <= 1.05 and sharded / nodrop <= 1.02; jaxopts /
sharded is what jaxcond's compiler options buy (> 1 means faster with them).
With --devices D > 1 the script sets XLA_FLAGS=--xla_force_host_platform_device_count=D
itself and compares `sharded` on D simulated devices with `plain` on one device at
equal global batch: report only, a CPU simulation has no target.
"""

from __future__ import annotations

import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--steps", type=int, default=5, help="consecutive steps timed per round")
ARGS.add_argument("--repeats", type=int, default=15, help="rounds (each times every variant)")
ARGS.add_argument("--devices", type=int, default=1, help="mesh size; > 1 simulates CPU devices")
args = ARGS.parse_args()
# Must be set before jax is imported (here or by jaxcond) to take effect.
if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its Flax deprecation notice, per scheduler
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from configs import demo  # noqa: E402
from jaxcond import train, train_step as ts, xla  # noqa: E402
from timing import Variant, interleave, print_table, ratio  # noqa: E402  (benchmarks/timing.py)

logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/absl info lines would clutter the table


def main(workdir: str) -> None:
    xla.cpu_runtime()  # in this process as in `jaxcond train`, before jax's backends exist
    cfg = demo.get_config()
    cfg.train.sample_every = 0
    devices = jax.devices()[:args.devices]
    run = train.build(cfg, workdir, devices=devices)  # writes the demo model into workdir
    dev0 = jax.devices()[0]
    sharded_batches = [run.put_batch(i) for i in range(args.steps)]  # as the train loop puts them
    plain_batches = [jax.device_put(jax.device_get(b), dev0) for b in sharded_batches]
    plain_fn = jax.jit(functools.partial(ts.train_step, run.family, run.spec, run.tx, run.lr),
                       compiler_options=xla.options(dev0.platform))
    frozen0 = jax.device_put(run.frozen, dev0)
    nodrop_fn = run.jit_step(dataclasses.replace(run.spec, with_dropout=False))
    jaxopts_fn = run.jit_step(run.spec, compiler_options={})
    variants = {
        "sharded": Variant(lambda s, b: run.step_fn(s, run.frozen, b), run.initial_state(), sharded_batches),
        "plain": Variant(lambda s, b: plain_fn(s, frozen0, b), jax.device_put(run.initial_state(), dev0),
                         plain_batches),
        "nodrop": Variant(lambda s, b: nodrop_fn(s, run.frozen, b), run.initial_state(), sharded_batches),
        "jaxopts": Variant(lambda s, b: jaxopts_fn(s, run.frozen, b), run.initial_state(), sharded_batches),
    }
    interleave(variants, args.repeats, args.steps)

    print(f"\ndemo config: {cfg.data.resolution}x{cfg.data.resolution}, batch {cfg.train.global_batch}, "
          f"UNet {tuple(cfg.model.demo.unet_channels)}; sharded/nodrop on {len(devices)} device(s) "
          f"mesh {dict(run.mesh.shape)}, plain on 1; {args.repeats} rounds x {args.steps} steps")
    print_table(variants)
    for a, b, target in (("sharded", "plain", 1.05), ("sharded", "nodrop", 1.02)):
        r, text = ratio(variants[a].times, variants[b].times)
        goal = f"target <= {target}: {'met' if r <= target else 'MISSED'}" if args.devices == 1 else "report only"
        print(f"{a}/{b}: {text}; {goal}")
    print(f"jaxopts/sharded: {ratio(variants['jaxopts'].times, variants['sharded'].times)[1]} "
          f"(jaxcond's compiler options on {dev0.platform}: {xla.options(dev0.platform)})")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:  # the model folder lives only as long as the run
        main(tmp)

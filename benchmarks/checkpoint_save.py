"""Checkpoint save and restore time: jaxcond's single-process host copy vs Orbax's device arrays.

Saves the demo's full train state (params, Adam state, EMA; ~850 arrays) replicated over
`--devices` simulated CPU devices through `jaxcond.checkpoint.Checkpoints` (synchronous,
so each save is timed to the end of its write), once as a single-process run saves
(`host_copy`: the state fetched to the host in one transfer, written as numpy arrays) and
once as Orbax writes the device arrays by default (replica-parallel: each replicated array
cut into one slice per replica), as multi-host runs do. Each checkpoint is then restored
onto the state's shardings the same way (host copy: numpy arrays placed in one device_put;
Orbax: device arrays read shard by shard). Rounds alternate the order.
Printed: median seconds per save and per restore, and their ratios.

    .venv/bin/python benchmarks/checkpoint_save.py [--devices 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--devices", type=int, default=8, help="simulated CPU devices the state is replicated on")
ARGS.add_argument("--repeats", type=int, default=5, help="saves per handler")
args = ARGS.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={args.devices}").strip()
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging  # noqa: E402

import jax  # noqa: E402

from configs import demo  # noqa: E402
from jaxcond import checkpoint, train  # noqa: E402

logging.getLogger("absl").setLevel(logging.WARNING)


def main(tmp: str) -> None:
    cfg = demo.get_config()
    run = train.build(cfg, os.path.join(tmp, "run"), devices=jax.devices()[:args.devices])
    state = run.initial_state()
    data = run.data.state(0)
    modes = {"jaxcond": None, "orbax-default": False}  # host_copy
    times = {(name, op): [] for name in modes for op in ("save", "restore")}
    for r in range(args.repeats + 1):  # round 0 warms up (first-use compiles) and is dropped
        for name in (list(modes) if r % 2 else list(modes)[::-1]):
            ckpts = checkpoint.Checkpoints(os.path.join(tmp, f"{name}-{r}"), every_steps=1, keep=1,
                                           async_save=False, host_copy=modes[name])
            t0 = time.perf_counter()
            ckpts.save(1, state, cfg, data)
            ckpts.wait()
            t1 = time.perf_counter()
            jax.block_until_ready(ckpts.restore(1, state))
            if r:
                times[name, "save"].append(t1 - t0)
                times[name, "restore"].append(time.perf_counter() - t1)
            ckpts.close()
    arrays = len(jax.tree.leaves(state))
    print(f"\ndemo state: {arrays} arrays replicated on {args.devices} devices; {args.repeats} rounds")
    for (name, op), t in times.items():
        print(f"{name:>14} {op:>7}: median {statistics.median(t):.2f} s (min {min(t):.2f}, max {max(t):.2f})")
    for op in ("save", "restore"):
        ratio = statistics.median(times["jaxcond", op]) / statistics.median(times["orbax-default", op])
        print(f"{op}: jaxcond / orbax-default: {ratio:.3f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(tmp)

"""A short demo run of `jaxcond train` without and with a warm persistent compilation cache.

What a rerun, a resume or a second experiment on the same machine gains from
`--compilation_cache` (on by default): each round starts two fresh `jaxcond train`
processes on new run directories, in alternating order, one with `--compilation_cache=`
(off: every program compiled, as on a fresh machine) and one with a cache directory that a
first, untimed run filled. Each run builds the demo model, trains `--steps` steps and
ends with the demo's evaluation (so the sampler is compiled or loaded too). Printed: the
wall time of each run, per-arm medians, their ratio (`timing.ratio`, paired by round), the
seconds saved per run, and whether every run logged the same losses and masks (a cached
program must compute what a fresh compile does).

    .venv/bin/python benchmarks/compile_cache.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("no cache", "warm cache")


def train(workdir: str, cache: str, steps: int) -> float:
    """Seconds `jaxcond train` of the demo took, start-up and evaluation included."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jaxcond.cli", "train", "--config", "configs/demo.py",
                          "--workdir", workdir, f"--compilation_cache={cache}",
                          f"--config.train.steps={steps}", "--config.train.sample_every=0",
                          f"--config.train.log_every={min(steps, 10)}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"jaxcond train failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def logged(workdir: str) -> tuple[list[str], list[float]]:
    """The run's mask log and its logged losses."""
    with open(os.path.join(workdir, "masks.jsonl")) as f:
        masks = f.read().splitlines()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    return masks, losses


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--rounds", type=int, default=3, help="rounds (each runs both arms)")
    args.add_argument("--steps", type=int, default=20, help="train steps per run")
    a = args.parse_args()
    for flag, value in (("--rounds", a.rounds), ("--steps", a.steps)):
        if value < 1:
            args.error(f"{flag} {value}: must be at least 1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import ratio  # benchmarks/timing.py

    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax_cache")
        print(f"untimed first run filling {cache}: {train(os.path.join(tmp, 'fill'), cache, a.steps):.1f} s",
              flush=True)
        reference = logged(os.path.join(tmp, "fill"))
        for r in range(a.rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                workdir = os.path.join(tmp, f"run{r}_{arm.split()[0]}")
                times[arm].append(train(workdir, cache if arm == "warm cache" else "", a.steps))
                same &= logged(workdir) == reference
                print(f"round {r} {arm:<10} {times[arm][-1]:6.1f} s", flush=True)
    print(f"\n`jaxcond train --config configs/demo.py --config.train.steps={a.steps}` in fresh processes, "
          f"{a.rounds} rounds")
    for arm in ARMS:
        print(f"{arm:<10} median {statistics.median(times[arm]):6.1f} s")
    saved = statistics.median(off - on for off, on in zip(times["no cache"], times["warm cache"]))
    print(f"run throughput, warm cache / no cache: {ratio(times['no cache'], times['warm cache'])[1]}; "
          f"saved per run: {saved:.1f} s (median of the rounds)")
    print(f"losses and masks identical in every run: {same}")


if __name__ == "__main__":
    main()

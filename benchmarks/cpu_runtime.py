"""The demo's train step on one CPU device, with and without `jaxcond.xla.cpu_runtime()`.

`cpu_runtime()` changes process-wide settings that take effect before jax creates its CPU
client (inline dispatch, glibc's malloc), so the two arms cannot share a process: each
round starts one worker process per arm, in alternating order, and each worker builds the
demo run (`train.build`, as `jaxcond train` does), warms the step up and times `--steps`
consecutive steps. Both arms compile the same program (a persistent compilation cache in a
temporary folder spares the later workers the compile). Printed: per-arm medians over the
rounds of the time per step, the page faults and the system CPU time per step, and the
throughput ratio of the two (`timing.ratio`, paired by round).

    .venv/bin/python benchmarks/cpu_runtime.py [--rounds 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ARMS = ("jax-defaults", "cpu_runtime")


def worker(arm: str, steps: int, workdir: str) -> dict[str, float]:
    import resource
    import time

    import jax

    from configs import demo
    from jaxcond import train, xla

    applied = xla.cpu_runtime() if arm == "cpu_runtime" else False
    cfg = demo.get_config()
    cfg.train.sample_every = 0
    run = train.build(cfg, workdir)
    if len(run.mesh.devices.flat) != 1 or run.mesh.devices.flat[0].platform != "cpu":
        raise SystemExit(f"needs one CPU device, found {run.mesh.devices.flat}")
    batches = [run.put_batch(i) for i in range(steps)]
    state = run.initial_state()
    for b in batches[:2]:  # compile and warm up
        state, _ = run.step_fn(state, run.frozen, b)
    jax.block_until_ready(state)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for b in batches:
        state, m = run.step_fn(state, run.frozen, b)
    jax.block_until_ready((state, m))
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"step_s": seconds / steps, "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "sys_s": (after.ru_stime - before.ru_stime) / steps, "applied": applied}


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--rounds", type=int, default=6, help="worker pairs, alternating order")
    args.add_argument("--steps", type=int, default=10, help="steps timed per worker")
    args.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args.add_argument("--workdir", help=argparse.SUPPRESS)
    a = args.parse_args()
    for flag, value in (("--rounds", a.rounds), ("--steps", a.steps)):
        if value < 1:
            args.error(f"{flag} {value}: must be at least 1")
    here = os.path.dirname(os.path.abspath(__file__))
    if a.worker:
        sys.path.insert(0, os.path.dirname(here))
        print(json.dumps(worker(a.worker, a.steps, a.workdir)))
        return

    from timing import ratio  # benchmarks/timing.py

    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JAX_PLATFORMS="cpu", DIFFUSERS_VERBOSITY="error",
                   JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        env.pop("XLA_FLAGS", None)  # one CPU device, whatever the caller's shell simulates
        for r in range(a.rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", arm,
                                      "--steps", str(a.steps), "--workdir", os.path.join(tmp, "run")],
                                     env=env, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"worker {arm} failed:\n{out.stderr[-3000:]}")
                results[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r} {arm:<13} {results[arm][-1]}", flush=True)

    def median(arm: str, key: str) -> float:
        return statistics.median(x[key] for x in results[arm])

    print(f"\ndemo train step, 1 CPU device, {a.rounds} rounds x {a.steps} steps per arm")
    print(f"{'arm':<13} {'ms/step':>8} {'faults/step':>12} {'sys ms/step':>12} applied")
    for arm in ARMS:
        print(f"{arm:<13} {1e3 * median(arm, 'step_s'):>8.1f} {median(arm, 'faults'):>12.0f} "
              f"{1e3 * median(arm, 'sys_s'):>12.1f} {results[arm][0]['applied']}")
    _, text = ratio([x["step_s"] for x in results["jax-defaults"]], [x["step_s"] for x in results["cpu_runtime"]])
    print(f"throughput cpu_runtime / jax-defaults: {text}")


if __name__ == "__main__":
    main()

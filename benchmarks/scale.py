"""Scale-out measurements on simulated CPU devices, each printed as a side-by-side ratio.

1. Step time of the demo step (global batch 32) on a 1-device mesh, on 8 devices with
   data=8, and on 8 devices with fsdp=8; rounds interleaved so machine load hits all
   alike. Report only: 8 simulated devices share the same 2 cores, so this prices the
   partitioning overhead, not a speed-up.
2. Bytes per device of params + optimizer state + EMA + frozen weights, fsdp=1 vs fsdp=8,
   read off the actual array shards.
3. Compile time of the step with a cold vs a warm persistent compilation cache: two fresh
   processes sharing one new cache directory (the second finds the first's executables).

    .venv/bin/python benchmarks/scale.py [--rounds 10] [--steps 3]
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
ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--rounds", type=int, default=10, help="timing rounds (each times every mesh)")
ARGS.add_argument("--steps", type=int, default=3, help="consecutive steps per round and mesh")
ARGS.add_argument("--compile-only", metavar="WORKDIR", help=argparse.SUPPRESS)  # child process mode


def _setup(devices: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    sys.path.insert(0, ROOT)


def _build(workdir: str, devices: list, data: int, fsdp: int):
    from configs import demo
    from jaxcond import train

    cfg = demo.get_config()
    cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
    return train.build(cfg, workdir, devices=devices)


def compile_seconds(workdir: str) -> None:
    """Child process: prints the seconds to lower and compile the 8-device fsdp step."""
    _setup(8)
    import jax

    run = _build(workdir, jax.devices(), 4, 2)
    state, batch = jax.eval_shape(run.initial_state), run.put_batch(0)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, run.state_shardings)
    t0 = time.perf_counter()
    run.step_fn.lower(state, run.frozen, batch).compile()
    print(json.dumps({"compile_s": time.perf_counter() - t0}))


def main(args: argparse.Namespace, workdir: str) -> None:
    _setup(8)
    import jax

    from jaxcond import sharding

    meshes = {"1 device": (jax.devices()[:1], 1, 1), "8 dev data=8": (jax.devices(), 8, 1),
              "8 dev fsdp=8": (jax.devices(), 1, 8)}
    runs, states, times = {}, {}, {k: [] for k in meshes}
    for name, (devices, data, fsdp) in meshes.items():
        runs[name] = _build(workdir, devices, data, fsdp)
        states[name] = runs[name].initial_state()
    batches = {k: [r.put_batch(i) for i in range(args.steps)] for k, r in runs.items()}

    def timed(name: str) -> float:
        r, t0 = runs[name], time.perf_counter()
        for b in batches[name]:
            states[name], m = r.step_fn(states[name], r.frozen, b)
        jax.block_until_ready((states[name], m))
        return (time.perf_counter() - t0) / args.steps

    for name in meshes:  # compile and warm up, untimed
        timed(name)
    names = list(meshes)
    for i in range(args.rounds):
        for name in names[i % 3:] + names[:i % 3]:
            times[name].append(timed(name))

    print(f"\n1. step time, demo config, global batch {runs[names[0]].cfg.train.global_batch}, "
          f"{args.rounds} rounds x {args.steps} steps (report only)")
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        print(f"   {name:<14} {1e3 * med:8.1f} ms/step   x{med / base:.2f} vs 1 device")

    print("\n2. bytes per device (params + optimizer state + EMA + frozen)")
    per = {}
    for name in names[1:]:
        r = runs[name]
        per[name] = sharding.bytes_per_device(states[name]) + sharding.bytes_per_device(r.frozen)
        total = sharding.bytes_total(states[name]) + sharding.bytes_total(r.frozen)
        print(f"   {name:<14} {per[name] / 2**20:8.2f} MiB of {total / 2**20:.2f} MiB "
              f"(x{per[name] / (total / 8):.2f} of total/8)")
    print(f"   fsdp=8 / data=8: {per[names[2]] / per[names[1]]:.3f}")

    print("\n3. compile time of the step (8 devices, data=4 x fsdp=2), fresh processes")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    secs = []
    for label in ("cold cache", "warm cache"):
        out = subprocess.run([sys.executable, __file__, "--compile-only", workdir], env=env,
                             check=True, capture_output=True, text=True).stdout
        secs.append(json.loads(out.strip().splitlines()[-1])["compile_s"])
        print(f"   {label:<14} {secs[-1]:8.2f} s")
    print(f"   warm / cold: {secs[1] / secs[0]:.3f}")


if __name__ == "__main__":
    a = ARGS.parse_args()
    if a.compile_only:
        compile_seconds(a.compile_only)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(a, tmp)

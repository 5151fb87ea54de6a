"""The SD 1.5 train step on one GPU: step time, examples/s, MFU, peak memory against
`jaxcond plan`'s prediction, and the dropout-on vs dropout-off step ratio.

An SD 1.5-sized model from the shipped configs (configs/sd15.py's family; random
weights, no download, no data: random images and token ids), 512 px, bf16 compute, the
config's optimizer, EMA, remat and mesh. Both variants (with and without the dropout
code) are compiled and warmed up, then timed in interleaved rounds (benchmarks/timing.py)
with enough steps per round to separate 2%. One short run, for a lent GPU:

    python benchmarks/gpu_step.py [--batch 8] [--rounds 8] [--steps 20] [--remat layers]
    python benchmarks/gpu_step.py --tiny      # the same script on the tiny demo model (CPU check)

MFU = the compiled step's FLOPs (XLA's cost analysis, recomputation included, so it
over-counts by what remat recomputes) / step time / the GPU's peak dense bf16 FLOP/s
(jaxcond/hardware.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--batch", type=int, default=8, help="global batch (one GPU: per device)")
ARGS.add_argument("--rounds", type=int, default=8)
ARGS.add_argument("--steps", type=int, default=20, help="consecutive steps per round and variant")
ARGS.add_argument("--remat", default=None, help="model.remat (default: the config's)")
ARGS.add_argument("--tiny", action="store_true", help="the tiny demo-sized model instead (a CPU check)")


def _random_like(tree, key):
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = [jax.jit(lambda k, s=s: (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))(k)
           for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


def main() -> None:
    args = ARGS.parse_args()
    import dataclasses

    import jax
    import numpy as np

    import timing
    from jaxcond import config, dropout, hardware, program, sharding, train_step as ts
    from jaxcond.rundir import load_family

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.tiny:
        sys.path.insert(0, os.path.join(root, "tests"))
        from conftest import tiny_config

        cfg = tiny_config()
    else:
        cfg = config.from_file(os.path.join(root, "configs/sd15.py"))
        cfg.data.buckets = ()
    cfg.train.global_batch = args.batch
    if args.remat:
        cfg.model.remat = args.remat
    devices = jax.devices()[:1]
    config.validate(cfg, 1, reads_data=False)
    mesh = sharding.make_mesh(sharding.mesh_shape(cfg.mesh, 1), devices)
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        family = load_family(cfg, workdir, shapes_only=True)
    key = jax.random.key(0)
    family.trainable = _random_like(family.trainable, jax.random.fold_in(key, 1))
    family.frozen = _random_like(family.frozen, jax.random.fold_in(key, 2))
    groups = dropout.groups_from_config(cfg.dropout, family.conditioners, family.batch_conditioners)
    spec = ts.StepSpec.from_config(cfg, groups, steps_per_epoch=1000)
    tx, lr = ts.make_optimizer(cfg)
    state_sh = jax.tree.map(lambda s: sharding.replicated(mesh),
                            jax.eval_shape(lambda: ts.init_state(family, spec, tx, ts.DTYPES[cfg.train.param_dtype])))
    frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), family.frozen)
    r = cfg.data.resolution
    shapes = program.batch_shapes(family, {**family.frozen, **family.trainable}, args.batch, r, r, cached=False)
    rng = np.random.default_rng(0)
    batches = [{k: jax.device_put(rng.integers(0, 255, s.shape).astype(s.dtype) if k == "images"
                                  else np.zeros(s.shape, s.dtype), sharding.batch_sharding(mesh))
                for k, s in shapes.items()} for _ in range(2)]

    variants, compiled = {}, {}
    for name, with_dropout in (("dropout", True), ("nodrop", False)):
        step = program.jit_step(family, dataclasses.replace(spec, with_dropout=with_dropout), tx, lr, mesh,
                                state_sh, frozen_sh)
        state = jax.jit(lambda: ts.init_state(family, spec, tx, ts.DTYPES[cfg.train.param_dtype]),
                        out_shardings=state_sh)()
        t0 = time.perf_counter()
        compiled[name] = step.lower(state, family.frozen, batches[0]).compile()
        print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        fn = compiled[name]
        variants[name] = timing.Variant(lambda s, b, fn=fn: fn(s, family.frozen, b), state, batches)
    timing.interleave(variants, args.rounds, args.steps)
    timing.print_table(variants)

    device = devices[0]
    chip = hardware.local_chip(device)
    step_s = float(np.median(variants["dropout"].times))
    flops = program.flops(compiled["dropout"])
    memory = program.Memory.of(compiled["dropout"])
    stats = device.memory_stats() or {}
    out = {"device": device.device_kind, "jax": jax.__version__, "batch": args.batch, "resolution": r,
           "remat": cfg.model.remat, "step_ms": 1e3 * step_s, "examples_per_s": args.batch / step_s,
           "flops_per_step": flops,
           "mfu": flops / step_s / chip.peak_bf16_flops if flops and chip else None,
           "planned_peak_gib": memory.peak / 2**30 if memory else None,
           "measured_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
           "device_memory_gib": chip.hbm_bytes / 2**30 if chip else None}
    _, text = timing.ratio(variants["dropout"].times, variants["nodrop"].times)
    out["dropout_vs_nodrop"] = text
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

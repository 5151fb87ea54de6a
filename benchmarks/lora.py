"""LoRA against a full fine-tune, side by side.

1. Bytes of the trainable state (params, AdamW moments, EMA) per device on one device,
   LoRA rank 16 (attention) vs the full UNet, for SD 1.5 and SDXL shapes (the shipped
   configs; shapes only, nothing compiled or loaded).
2. Step time of the demo-sized model on this CPU, LoRA rank 8 / full fine-tune, in
   interleaved rounds (benchmarks/timing.py).

    .venv/bin/python benchmarks/lora.py [--rounds 10] [--steps 3]

Whether SDXL LoRA fits one 16 GiB chip: `benchmarks/plan_table.py --cases sdxl_lora_v5e1`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--rounds", type=int, default=10)
ARGS.add_argument("--steps", type=int, default=3)


def trainable_bytes(cfg) -> int:
    import jax

    from jaxcond import dropout, train_step as ts
    from jaxcond.rundir import load_family

    with tempfile.TemporaryDirectory() as workdir:
        family = load_family(cfg, workdir, shapes_only=True)
    groups = dropout.groups_from_config(cfg.dropout, family.conditioners, family.batch_conditioners)
    spec = ts.StepSpec.from_config(cfg, groups, 1)
    tx, _ = ts.make_optimizer(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ts.abstract_state(family, spec, tx, cfg.train.param_dtype, lambda s: jax.tree.map(lambda _: one, s))
    return sum(x.size * x.dtype.itemsize for k in ("params", "opt_state", "ema") for x in jax.tree.leaves(state.get(k)))


def main() -> None:
    args = ARGS.parse_args()
    import timing
    from jaxcond import config, train as train_lib

    print("| model | full fine-tune | LoRA rank 16 | ratio |\n|---|---|---|---|")
    for name in ("sd15", "sdxl"):
        cfg = config.from_file(os.path.join(ROOT, "configs", f"{name}.py"))
        full = trainable_bytes(cfg)
        cfg.model.lora.rank = 16
        lora = trainable_bytes(cfg)
        print(f"| {name} | {full / 2**30:.2f} GiB | {lora / 2**20:.1f} MiB | {lora / full:.4f} |", flush=True)

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import tiny_config

    cfg = tiny_config()
    cfg.data.num_records = 64
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rank in (("lora", 8), ("full", 0)):
            c = copy.deepcopy(cfg)
            c.model.lora.rank = rank
            run = train_lib.build(c, os.path.join(tmp, name))
            batches = [run.put_batch(s) for s in range(4)]
            variants[name] = timing.Variant(lambda s, b, r=run: r.step_fn(s, r.frozen, b), run.initial_state(), batches)
        timing.interleave(variants, args.rounds, args.steps)
    timing.print_table(variants)
    print("step time, LoRA / full:", timing.ratio(variants["lora"].times, variants["full"].times)[1])


if __name__ == "__main__":
    main()

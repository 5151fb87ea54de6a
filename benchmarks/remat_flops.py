"""What each `model.remat` policy costs and saves: compiled FLOPs and temporaries per
device of one train step, every policy against `none`, by `jaxcond plan` for a TPU topology.

The model is the demo's UNet and CLIP widened (2 levels of 64 channels, cross-attention
on both) at 32x32 px, small enough to compile each policy in about a minute on 2 cores; the SD-sized step's `layers` figures are in benchmarks/plan_table.py's
table. FLOPs come from the compiled program's cost analysis (recomputation included).

    .venv/bin/python benchmarks/remat_flops.py [--topology v5e:2x2]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--topology", default="v5e:2x2")


def widened_config():
    """The tests' tiny demo config with a wider, deeper UNet, fully sharded."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import tiny_config

    cfg = tiny_config()
    d = cfg.model.demo
    d.unet_channels, d.cross_attention_levels = (64, 64), 2
    d.text_width, d.attention_heads = 32, 4
    cfg.data.resolution, cfg.train.global_batch = 32, 16
    cfg.mesh.data, cfg.mesh.fsdp = 1, -1
    return cfg


def main() -> None:
    args = ARGS.parse_args()
    from jaxcond import plan
    from jaxcond.models import remat

    cfg = widened_config()
    rows = {}
    for policy in remat.POLICIES:
        cfg.model.remat = policy
        p = plan.plan(cfg, args.topology, progress=False)
        rows[policy] = (p.flops, p.memory.temporaries)
        print(f"{policy}: {p.flops:.3e} FLOPs, temporaries {p.memory.temporaries / 2**20:.1f} MiB", flush=True)
    base_flops, base_temp = rows["none"]
    print("\n| policy | FLOPs / step / device | vs none | temporaries | vs none |\n|---|---|---|---|---|")
    for policy, (f, t) in rows.items():
        print(f"| `{policy}` | {f:.3e} | {f / base_flops:.3f} | {t / 2**20:.1f} MiB | {t / base_temp:.3f} |")


if __name__ == "__main__":
    main()

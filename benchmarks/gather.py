"""FSDP params gathered per layer (what the step does) vs as one tree at the top of the
step (`StepSpec.gather_per_layer=False`), side by side: compiled peak, temporaries and
FLOPs per device from `jaxcond plan` for a TPU topology, with and without remat.

The model is benchmarks/remat_flops.py's widened demo UNet (the SD-sized step's figures
are in benchmarks/plan_table.py's table, case sd15_gather_whole).

    .venv/bin/python benchmarks/gather.py [--topology v5e:2x2]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--topology", default="v5e:2x2")


def main() -> None:
    args = ARGS.parse_args()
    from jaxcond import plan
    from remat_flops import widened_config

    cfg = widened_config()
    print("| remat | gather | peak | temporaries | FLOPs / step / device |\n|---|---|---|---|---|")
    for policy in ("layers", "none"):
        cfg.model.remat = policy
        for per_layer in (True, False):
            p = plan.plan(cfg, args.topology, progress=False, step_options={"gather_per_layer": per_layer})
            print(f"| `{policy}` | {'per layer' if per_layer else 'whole tree'} | {p.memory.peak / 2**20:.1f} MiB "
                  f"| {p.memory.temporaries / 2**20:.1f} MiB | {p.flops:.3e} |", flush=True)


if __name__ == "__main__":
    main()

"""`jaxcond plan` for the shipped configs on Cloud TPU topologies: the table in
benchmarks/README.md. Each case compiles the exact train step ahead of time for the
topology on this machine (libtpu's compiler, no TPU) in its own process and appends one
JSON line to --out; --table prints the markdown table of a results file.

    .venv/bin/python benchmarks/plan_table.py [--cases sd15,sdxl_v5e,...] [--out FILE]
    .venv/bin/python benchmarks/plan_table.py --table FILE

Compiling SD 1.5's step for 4 chips takes ~20 min and ~13 GB of RAM on 2 cores, SDXL LoRA's for one
chip ~15 min; the full SDXL step for 16 chips needed more than a 24 GB machine has. A rerun of a planned step takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config, topology, overrides); the shipped configs as they are unless overridden.
CASES = {
    "sd15": ("configs/sd15.py", "v5e:2x2", {}),
    "sdxl_v5e": ("configs/sdxl.py", "v5e:4x4", {}),
    "sdxl_v5p": ("configs/sdxl.py", "v5p:2x2x1", {}),
    # v5p's 95 GiB hold SDXL's whole training state on each chip: plain data parallelism,
    # no per-layer gathers to partition.
    "sdxl_v5p_data_parallel": ("configs/sdxl.py", "v5p:2x2x1", {"mesh.fsdp": 1, "mesh.data": -1,
                                                                "model.scan_layers": False}),
    "sd15_remat_none": ("configs/sd15.py", "v5e:2x2", {"model.remat": "none"}),
    "sd15_remat_layers_keep_matmuls": ("configs/sd15.py", "v5e:2x2", {"model.remat": "layers_keep_matmuls"}),
    "sd15_remat_blocks": ("configs/sd15.py", "v5e:2x2", {"model.remat": "blocks"}),
    "sd15_remat_full": ("configs/sd15.py", "v5e:2x2", {"model.remat": "full"}),
    "sd15_data_parallel": ("configs/sd15.py", "v5e:2x2", {"mesh.fsdp": 1, "mesh.data": -1}),
    # The params gathered as one tree at the top of the step (StepSpec.gather_per_layer).
    "sd15_gather_whole": ("configs/sd15.py", "v5e:2x2", {"step.gather_per_layer": False}),
    "sd21": ("configs/sd21.py", "v5e:2x2", {}),
    "sd35m_v5e": ("configs/sd35_medium.py", "v5e:4x4", {}),
    "sd35m_v5e_remat_full": ("configs/sd35_medium.py", "v5e:4x4", {"model.remat": "full"}),
    # LoRA rank 16 of SDXL on one 16 GiB chip, the stand-in for a 24 GB GPU.
    "sdxl_lora_v5e1": ("configs/sdxl.py", "v5e:1x1", {"model.lora.rank": 16, "train.global_batch": 1,
                                                      "model.frozen_dtype": "bfloat16"}),
}
ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--cases", default="sd15,sdxl_v5e,sdxl_v5p", help=f"comma-separated, of {', '.join(CASES)}")
ARGS.add_argument("--out", default="plan_results.jsonl", help="JSON lines, appended")
ARGS.add_argument("--table", metavar="FILE", help="print the markdown table of a results file and exit")
ARGS.add_argument("--case", help=argparse.SUPPRESS)  # child process mode


def run_case(name: str) -> dict:
    from jaxcond import config, plan

    path, topology, overrides = CASES[name]
    cfg = config.from_file(os.path.join(ROOT, path))
    step = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("step.")}
    for dotted, value in ((k, v) for k, v in overrides.items() if not k.startswith("step.")):
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    p = plan.plan(cfg, topology, progress=False, step_options=step)
    m = p.memory
    print(plan.report(p, cfg), file=sys.stderr)
    return {"case": name, "config": path, "topology": topology, "overrides": overrides,
            "remat": cfg.model.remat, "optimizer": cfg.optim.name, "moments": cfg.optim.moment_dtype,
            "ema": cfg.optim.ema_decay > 0, "mesh": p.mesh, "per_device_batch": p.per_device_batch,
            "image": list(p.image_size), "stored": p.stored, "arguments": m.arguments,
            "temporaries": m.temporaries, "peak": m.peak, "hbm": p.chip.hbm_bytes, "fits": p.fits,
            "flops": p.flops, "roofline_s": p.roofline_s, "compile_s": round(p.compile_s, 1)}


def table(path: str) -> str:
    gib = 2**30
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = ["| case | topology | per chip | remat | mesh | stored state | temporaries | peak / HBM | fits "
           "| FLOPs/step/chip | roofline step | compile |", "|" + "---|" * 12]
    for r in rows:
        out.append(f"| {r['case']} | {r['topology']} | {r['per_device_batch']:g} x {r['image'][0]}px | {r['remat']} "
                   f"| data {r['mesh']['data']}, fsdp {r['mesh']['fsdp']} | {sum(r['stored'].values()) / gib:.2f} GiB "
                   f"| {r['temporaries'] / gib:.2f} GiB | {r['peak'] / gib:.2f} / {r['hbm'] / gib:.0f} GiB "
                   f"| {'yes' if r['fits'] else '**no**'} | {r['flops']:.3g} | {r['roofline_s'] * 1e3:.0f} ms "
                   f"| {r['compile_s']:.0f} s |")
    return "\n".join(out)


def main() -> None:
    args = ARGS.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in args.cases.split(","):
        if name not in CASES:
            sys.exit(f"--cases: unknown case {name!r}; the cases are {', '.join(CASES)}")
        print(f"{name}: compiling ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--case", name], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            print(f"{name}: failed (exit {proc.returncode})", flush=True)
            continue
        line = proc.stdout.strip().splitlines()[-1]
        with open(args.out, "a") as f:
            f.write(line + "\n")
        r = json.loads(line)
        print(f"{name}: peak {r['peak'] / 2**30:.2f} GiB of {r['hbm'] / 2**30:.0f}, fits {r['fits']}, "
              f"compiled in {r['compile_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

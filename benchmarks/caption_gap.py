"""Does the caption gap (jaxcond/validation.py) tell what the demo's adherence scorer tells?

Trains configs/demo.py (2000 steps) three times with the same seed, holding out 2% of the
records for validation (data.validation_fraction = 0.02, the first 256 scored at 4 fixed
timesteps each every 250 steps): caption dropout 0.1 (as shipped), 0 (the null never
trained) and 1 (the captions never seen). Prints, per run, the validation loss, the caption
gap with its standard error over examples, the gap relative to the loss and the per-band
gaps at each evaluation, then the final caption adherence of the held-out-combination samples (the scorer's numbers)
beside the final gap, as markdown tables; writes them to <workdir>/results.json (a rerun with
that file prints the tables again; a rate whose run finished is not trained again).

    python benchmarks/caption_gap.py [--workdir runs/caption_gap] [--config.field=value ...]
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from demo_adherence import demo_flags  # noqa: E402

RATES = (0.1, 0.0, 1.0)


def render(results: dict, seconds: float | None) -> str:
    """The markdown tables of `results` ({rate: {"evals": [...], "scores": {...}}})."""
    took = f", {seconds:.0f} s in all" if seconds else ""
    out = [f"## caption gap during training (configs/demo.py{took})\n"]
    bands = sorted(k for k in next(iter(results.values()))["evals"][0] if k.startswith("val/caption_gap/band"))
    out.append("| rate | step | val loss | caption gap (± s.e.) | gap / loss | "
               + " | ".join(b.rsplit("/", 1)[1] for b in bands) + " |")
    out.append("|---" * (5 + len(bands)) + "|")
    for rate, r in results.items():
        for e in r["evals"]:
            out.append(f"| {rate} | {e['step']} | {e['val/loss']:.4f} | {e['val/caption_gap']:+.5f} "
                       f"± {e['val/caption_gap_se']:.5f} | {e['val/caption_gap'] / e['val/loss']:+.1%} | "
                       + " | ".join(f"{e[b]:+.5f}" for b in bands) + " |")
    out.append("\n## final: caption gap against the adherence scorer (held-out combinations, fraction right)\n")
    out.append("| rate | caption gap | uncond colour | cfg1 colour | cfg3 colour | cfg3 shape |")
    out.append("|---|---|---|---|---|---|")
    for rate, r in results.items():
        s, e = r["scores"], r["evals"][-1]
        out.append(f"| {rate} | {e['val/caption_gap']:+.5f} ± {e['val/caption_gap_se']:.5f} | "
                   f"{s['uncond']['color']:.2f} | {s['cfg1']['color']:.2f} | {s['cfg3']['color']:.2f} | "
                   f"{s['cfg3']['shape']:.2f} |")
    return "\n".join(out)


def main() -> int:
    cfg, workdir = demo_flags("runs/caption_gap", "Folder of the three runs (each resumed if it exists).")
    saved = os.path.join(workdir, "results.json")
    if os.path.exists(saved):  # a finished benchmark: its tables again
        print(render(json.load(open(saved)), None))
        return 0
    from jaxcond import xla
    from jaxcond.train import train

    xla.cpu_runtime()
    cfg.data.validation_fraction, cfg.eval.every = 0.02, 250
    results, t0 = {}, time.time()
    for rate in RATES:
        c = copy.deepcopy(cfg)
        for g in c.dropout.groups.values():
            g.rate = rate
        run = os.path.join(workdir, f"rate{rate:g}")
        done = os.path.join(run, "caption_gap.json")  # a finished rate is not trained again
        if not os.path.exists(done):
            out = train(c, run, progress=False)
            evals = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "val/loss" in r]
            with open(done, "w") as f:
                json.dump({"evals": evals, "scores": out["scores"]}, f)
        results[f"{rate:g}"] = json.load(open(done))
    with open(saved, "w") as f:
        json.dump(results, f, indent=2)
    print(render(results, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())

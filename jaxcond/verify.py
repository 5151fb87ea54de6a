"""`jaxcond verify --run DIR`: is what the run logged what its config says, and does it restore?

Checks, reading only the run directory (and the model/data sources its config names):
1. the checkpoints: which are complete, which were left partial by a killed process;
2. masks.jsonl: every step before the newest checkpoint has one record, and each record
   equals the masks (and record ids) re-derived from the saved config by `jaxcond.masks`,
   the same function `jaxcond masks` prints;
3. the newest checkpoint restores, holds that step, finite numbers, and a loader
   position that continues at that step.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from jaxcond import checkpoint, masks as masks_lib, rundir, storage


def _logged_masks(path: str) -> tuple[dict[int, dict], int]:
    """{step: record} of masks.jsonl and the number of unreadable lines (a torn last write)."""
    records, torn = {}, 0
    if storage.exists(path):
        with storage.open_file(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    records[rec["step"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    torn += 1
    return records, torn


def _ranges(steps: list[int]) -> str:
    out, i = [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(out)


def verify(workdir: str, report: Callable[[str], None] = print, model_source: str | None = None) -> list[str]:
    """Runs the checks, reporting each result line; returns the problems found (none: all good)."""
    problems: list[str] = []
    directory = storage.join(workdir, "checkpoints")
    ckpts = checkpoint.Checkpoints(directory, every_steps=1, keep=1, read_only=True)
    steps = ckpts.complete_steps()
    if ckpts.partial:
        report(f"partial checkpoints (a process died while writing; ignored on resume): {', '.join(ckpts.partial)}")
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint; is {workdir!r} the --workdir "
                                "of a jaxcond train run?")
    latest = steps[-1]
    report(f"checkpoints: steps {_ranges(steps)}; newest {latest}")
    cfg = ml_collections.ConfigDict(ckpts.saved_config(latest))
    saved_data = ckpts.saved_data(latest)

    logged, torn = _logged_masks(storage.join(workdir, "masks.jsonl"))
    if torn:
        report(f"masks.jsonl: {torn} unreadable line(s) (a write cut off by a kill; the next start drops them)")
    missing = [s for s in range(latest) if s not in logged]
    if missing:
        problems.append(f"masks.jsonl has no record of steps {_ranges(missing)} (before checkpoint {latest})")
    checked = sorted(logged)
    wrong = [rec["step"] for rec in masks_lib.mask_records(cfg, checked) if rec != logged[rec["step"]]]
    if wrong:
        problems.append(f"masks of steps {_ranges(wrong)} differ from those re-derived from the saved config "
                        "(seed, dropout spec or data changed mid-run, e.g. a resume with --allow_config_change)")
    report(f"masks: {len(checked) - len(wrong)} of {len(checked)} logged steps equal the re-derived ones")

    run = rundir.load_trained(workdir, latest, model_source)
    got = int(run.state["step"])
    finite = all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(run.state)
                 if np.issubdtype(np.asarray(x).dtype, np.floating))
    if got != latest:
        problems.append(f"checkpoint {latest} holds step {got}")
    if not finite:
        problems.append(f"checkpoint {latest} holds non-finite numbers")
    if saved_data.get("next_step", latest) != latest:
        problems.append(f"checkpoint {latest}'s loader position is step {saved_data['next_step']}")
    report(f"checkpoint {latest}: restores, step {got}, "
           f"{'all finite' if finite else 'NON-FINITE values'}, {int(run.state['skipped'])} skipped updates")
    return problems

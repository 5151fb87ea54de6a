"""`jaxcond eval --run DIR [--step N]`: the validation losses and caption gap of a
checkpoint (`jaxcond.validation`), the numbers training logs at `eval.every`."""

from __future__ import annotations

import json

import ml_collections

from jaxcond import outputs, rundir, storage, validation
from jaxcond.checks import ConfigError
from jaxcond.data import sources
from jaxcond.sampling import local_mesh


def eval_run(workdir: str, step: int | None = None, weights: str | None = None,
             model_source: str | None = None, validation_path: str | None = None) -> dict[str, float]:
    """The `validation.summarize` scalars of run `workdir`'s checkpoint (newest, or `step`),
    also written to `<workdir>/eval/step<N>.json`. `weights`: "ema" or "raw" (default: the
    EMA when the run keeps one). `validation_path` names validation records for a run
    trained without any (a second path of its source kind)."""
    t = rundir.load_trained(workdir, step, model_source)
    cfg = t.cfg
    if validation_path:
        cfg.data.validation_path, cfg.data.validation_fraction = validation_path, 0.0
    # A run saved before validation losses existed: configs/base.py's defaults.
    e = cfg.get("eval") or ml_collections.ConfigDict({"every": 0, "bands": 4, "max_examples": 256, "batch": 16})
    data = sources.make_data(cfg.data, cfg.seed, cfg.train.global_batch, t.family, workers=cfg.loader.workers)
    held = sources.validation_set(cfg.data, data, t.family, workers=cfg.loader.workers)
    if held is None:
        raise ConfigError(f"run {workdir} holds no validation records (its data.validation_fraction is 0): pass "
                          "--validation_path=DATA (images it never trained on, same source kind)")
    weights = weights or ("ema" if "ema" in t.state else "raw")
    scores = validation.evaluate(t.family, t.spec, e, t.params(weights), t.family.frozen, *held, local_mesh())
    scores = {"step": t.step, "weights": weights, **scores}
    outputs.make_output_dir(storage.join(workdir, "eval"), "the run's eval folder")
    with outputs.atomic(storage.join(workdir, "eval", f"step{t.step}.json")) as tmp, open(tmp, "w") as f:
        json.dump(scores, f, indent=2)
    return scores

"""Process 0's record of a run: TensorBoard scalars and images, metrics.jsonl, masks.jsonl,
sample PNGs, the adherence summary and, with config.logging.wandb, the same scalars and
grids in W&B (jaxcond.wandb_log). Other processes log nothing.

A run directory on Cloud Storage cannot be appended to in place: there the logs are
written in a local folder and appended to their objects at each checkpoint (`sync`,
storage.Mirror), so a kill loses only lines of steps that the resume runs again."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from jaxcond import checkpoint, distributed, masks as masks_lib, outputs, storage, wandb_log
from jaxcond.data.pipeline import Data
from jaxcond.train_step import StepSpec


def format_scores(scores: dict[str, dict[str, float]]) -> str:
    keys = ("background", "color", "shape", "all")
    lines = [f"{'':>8} " + " ".join(f"{k:>10}" for k in keys)]
    lines += [f"{n:>8} " + " ".join(f"{v[k]:>10.2f}" for k in keys) for n, v in scores.items()]
    return "\n".join(lines)


def truncate_jsonl(path: str, keep: Any) -> bool:
    """Keeps the records `keep` accepts; a torn last line (killed mid-write) goes too.
    False if there is no such file."""
    if not os.path.exists(path):
        return False
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if keep(json.loads(line)):
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                pass
    with outputs.atomic(path) as tmp, open(tmp, "w") as f:  # a kill mid-rewrite keeps the old lines
        f.writelines(kept)
    return True


class RunLog:
    """Process 0's record of the run: TensorBoard, metrics.jsonl, masks.jsonl, images.

    The masks of every step are kept on device and fetched in bulk at log time, so logging
    them costs no per-step host synchronisation. Other processes get a RunLog that writes
    nothing.
    """

    def __init__(self, workdir: str, start: int, spec: StepSpec, data: Data,
                 cfg: ml_collections.ConfigDict | None = None):
        """Logs the run in `workdir` from step `start` on: `spec` names its groups and batch,
        `data` the record ids of each step's batch, `cfg` (the run's config) whether and where
        W&B logs too (None: it does not)."""
        self.spec, self.data, self.workdir, self.active = spec, data, workdir, distributed.is_main_process()
        self.pending: list[tuple[int, dict[str, jax.Array], dict[str, jax.Array]]] = []
        self.last_t, self.last_step = time.perf_counter(), start
        # Where the logs are written: the run directory, or a local stand-in for one on Cloud Storage.
        self.mirror = storage.Mirror(workdir) if self.active and storage.is_url(workdir) else None
        self.dir = self.mirror.local if self.mirror else workdir
        self.writer = SummaryWriter(os.path.join(self.dir, "tb")) if self.active else None
        if self.active:
            # Steps after the restored checkpoint will run again: drop their old lines.
            for name, keep in (("masks.jsonl", lambda r: r["step"] < start),
                               ("metrics.jsonl", lambda r: r["step"] <= start)):
                if self.mirror:
                    self.mirror.fetch(name)
                if truncate_jsonl(os.path.join(self.dir, name), keep) and self.mirror:
                    self.mirror.replace(name)
        self.cfg = cfg
        self.wandb = (wandb_log.WandbRun(cfg, workdir, checkpoint.config_to_json(cfg))
                      if self.active and cfg is not None and wandb_log.enabled(cfg) else None)

    def step(self, step: int, metrics: dict[str, jax.Array]) -> None:
        groups = [g.name for g in self.spec.groups if f"dropped/{g.name}" in metrics]
        self.pending.append((step, {g: metrics[f"dropped/{g}"] for g in groups},
                             {g: metrics[f"drop_rate/{g}"] for g in groups}))

    def flush(self, done: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
        """Writes the scalars of step `done` and the masks of every step since the last flush."""
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if not k.startswith("dropped/")}
        now = time.perf_counter()
        scalars["step_time"] = (now - self.last_t) / (done - self.last_step)
        scalars["examples_per_s"] = self.spec.global_batch / scalars["step_time"]
        self.last_t, self.last_step = now, done
        self._write_masks()
        self._emit(done, scalars)
        return scalars

    def validation(self, done: int, scalars: dict[str, float]) -> None:
        """The validation losses after step `done` (jaxcond.validation), a line of their own in
        metrics.jsonl (its lines with "val/loss"), TensorBoard and W&B."""
        self._emit(done, scalars)

    def _emit(self, done: int, scalars: dict[str, float]) -> None:
        """A line of metrics.jsonl, TensorBoard scalars and W&B, from process 0."""
        if not self.active:
            return
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": done, **scalars}) + "\n")
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, done)
        if self.wandb:
            self.wandb.scalars(done, scalars)

    def _write_masks(self) -> None:
        pending, self.pending = jax.device_get(self.pending), []
        if self.active:
            spe = self.spec.steps_per_epoch
            with open(os.path.join(self.dir, "masks.jsonl"), "a") as f:
                for step, masks, rates in pending:
                    record = masks_lib.to_record(step, spe, rates, masks, self.data.ids(step))
                    f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Writes the masks of every step so far and, on Cloud Storage, appends all new log
        lines and events to their objects. Called before each checkpoint, so the logs hold
        every step before the newest complete checkpoint. Every process calls it: one that
        failed to write stops them all (distributed.any_process)."""
        error = None
        try:
            self._write_masks()
            if self.mirror:
                self.writer.flush()
                self.mirror.sync()
        except OSError as e:  # storage.StorageError included
            error = e
        if distributed.any_process(error is not None) and error is None:
            raise storage.StorageError("process 0 could not write the run's logs (its message says why); "
                                       "stopping with it")
        if error is not None:
            raise error

    def samples(self, done: int, final: bool, grid: np.ndarray, scores: dict) -> None:
        if not self.active:
            return
        self.writer.add_image("samples", grid, done, dataformats="HWC")
        adherence = {f"adherence/{col}/{k}": v for col, s in scores.items() for k, v in s.items()}
        for k, v in adherence.items():
            self.writer.add_scalar(k, v, done)
        if self.wandb:
            self.wandb.image(done, "samples", grid, self._grid_caption())
            if adherence:
                self.wandb.scalars(done, adherence)
        name = "samples_final.png" if final else f"samples_{done:06d}.png"
        with outputs.atomic(storage.join(self.workdir, name)) as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")

    def _grid_caption(self) -> str:
        """What the grid shows: its columns (guidance) and rows (captions), as train.eval_layout lays them out."""
        s = self.cfg.sample
        columns = ", ".join(["unconditional"] + [f"guidance {g:g}" for g in s.guidance])
        return f"columns: {columns}; rows: " + " | ".join(self.data.eval_captions(s.num_prompts))

    def close(self, scores: dict) -> None:
        if not self.active:
            return
        self.writer.close()
        if self.wandb:
            self.wandb.close()
        if self.mirror:
            self.mirror.sync()
            self.mirror.close()
        if scores:
            with outputs.atomic(storage.join(self.workdir, "adherence.json")) as tmp, open(tmp, "w") as f:
                json.dump(scores, f, indent=2)
            print("caption adherence of held-out samples (fraction right):\n" + format_scores(scores))
            print(f"samples: {storage.join(self.workdir, 'samples_final.png')}")

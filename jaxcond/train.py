"""The training loop: everything with side effects (files, logs, progress) lives here.

`train(cfg, workdir)` builds the model, data and mesh, resumes from the newest
checkpoint in `workdir/checkpoints` if there is one, runs the compiled step and writes
TensorBoard scalars, sample grids and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from PIL import Image

from jaxcond import checkpoint, config as config_lib, sharding
from jaxcond import train_step as ts
from jaxcond.data import demo as demo_data, order
from jaxcond.models import demo as demo_model
from jaxcond.models.family import Family
from jaxcond.models.unet_clip import UNetCLIP
from jaxcond.sampling import sample_grid

log = logging.getLogger("jaxcond")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_family(cfg: ml_collections.ConfigDict, workdir: str) -> Family:
    """The model named by config.model.source; "demo" builds the tiny one once per workdir."""
    path = cfg.model.source
    if path == "demo":
        path = os.path.join(workdir, "base_model")
        if not os.path.isdir(os.path.join(path, "unet")):
            demo_model.build(path, cfg.model.demo, cfg.data.resolution, cfg.model.demo.init_seed)
    elif not os.path.isdir(path):
        raise config_lib.ConfigError(
            f"config.model.source = {path!r}: not a folder; give a diffusers-format model folder or 'demo'")
    return UNetCLIP(path, dtype=DTYPES[cfg.train.compute_dtype])


@dataclasses.dataclass
class Data:
    """The training set as host arrays, plus the prompts used for validation samples."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    tokens: np.ndarray  # int32 [N, T]
    eval_targets: list[demo_data.Attrs]

    def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"images": self.images[ids], "tokens": self.tokens[ids]}


def load_data(cfg: ml_collections.ConfigDict, family: Family) -> Data:
    d = cfg.data
    train_combos, heldout = demo_data.split_combinations(d.heldout_fraction, d.seed)
    ds = demo_data.DemoDataset(d.num_records, d.resolution, d.seed, train_combos)
    images, captions = ds.materialize()
    # Held-out combinations test composition; without any, sample seen ones.
    pool = heldout or train_combos
    targets = [pool[i % len(pool)] for i in range(cfg.sample.num_prompts)]
    return Data(images, family.tokenize(captions), targets)


@dataclasses.dataclass
class Run:
    """Everything built from a config before the first step."""

    cfg: ml_collections.ConfigDict
    family: Family
    spec: ts.StepSpec
    tx: optax.GradientTransformation
    lr: optax.Schedule
    mesh: jax.sharding.Mesh
    data: Data
    frozen: Any
    state_shardings: Any
    step_fn: Any = None  # the jitted train step of `spec`

    def jit_step(self, spec: ts.StepSpec) -> Any:
        """The train step of `spec` compiled for the mesh, state donated."""
        batch_sh = sharding.batch_sharding(self.mesh)
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        return jax.jit(functools.partial(ts.train_step, self.family, spec, self.tx, self.lr),
                       in_shardings=(self.state_shardings, frozen_sh, {"images": batch_sh, "tokens": batch_sh}),
                       out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                       donate_argnums=(0,))

    def initial_state(self) -> Any:
        init = functools.partial(ts.init_state, self.family, self.spec, self.tx,
                                 DTYPES[self.cfg.train.param_dtype])
        return jax.jit(init, out_shardings=self.state_shardings)()

    def put_batch(self, step: int) -> dict[str, jax.Array]:
        ids = order.batch_ids(self.cfg.seed, step, self.spec.global_batch, len(self.data.images))
        return sharding.put_batch(self.mesh, self.data.batch(ids))


def build(cfg: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> Run:
    """Validates the config and builds model, data, mesh and the compiled step."""
    devices = jax.devices() if devices is None else devices
    config_lib.validate(cfg, len(devices))
    mesh = sharding.make_mesh(config_lib.mesh_shape(cfg, len(devices)), devices)
    family = load_family(cfg, workdir)
    groups = config_lib.dropout_groups(cfg, family.conditioners)
    spe = order.steps_per_epoch(cfg.data.num_records, cfg.train.global_batch)
    spec = ts.StepSpec.from_config(cfg, groups, spe)
    tx, lr = ts.make_optimizer(cfg)
    data = load_data(cfg, family)
    abstract = jax.eval_shape(functools.partial(ts.init_state, family, spec, tx,
                                                DTYPES[cfg.train.param_dtype]))
    state_sh = sharding.state_shardings(mesh, abstract)
    frozen = jax.device_put(family.frozen, sharding.replicated(mesh))
    run = Run(cfg, family, spec, tx, lr, mesh, data, frozen, state_sh)
    run.step_fn = run.jit_step(spec)
    return run


def restore_or_init(run: Run, ckpts: checkpoint.Checkpoints, allow_config_change: bool) -> Any:
    """The newest checkpoint's state, or a fresh one; refuses resumes that break the run."""
    step = ckpts.latest_step()
    if step is None:
        return run.initial_state()
    conflicts = config_lib.resume_conflicts(ckpts.saved_config(step),
                                            checkpoint.config_to_json(run.cfg))
    if conflicts and not allow_config_change:
        raise config_lib.ConfigError(
            f"cannot resume from {ckpts.directory} step {step}: the config changed in ways that "
            "would change which examples, masks or noise later steps see:\n  " + "\n  ".join(conflicts)
            + "\nUse a new --workdir, or pass --allow_config_change to resume anyway.")
    for c in conflicts:
        log.warning("resuming despite a changed config: %s", c)
    target = jax.eval_shape(run.initial_state)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          target, run.state_shardings)
    log.info("resuming from step %d", step)
    return ckpts.restore(step, target)


def evaluate(run: Run, state: Any) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Samples the validation prompts; returns the grid and caption adherence per column.

    Columns: unconditional (the trained null alone), then each guidance scale.
    """
    s = run.cfg.sample
    params = state["ema"] if s.use_ema and "ema" in state else state["params"]
    targets = [t for t in run.data.eval_targets for _ in range(s.per_prompt)]
    scales = (0.0,) + tuple(s.guidance)
    images = np.asarray(sample_grid(run.family, run.spec, params, run.frozen,
                                    [demo_data.caption(t) for t in targets], scales, s.seed, s.steps))
    names = ["uncond"] + [f"cfg{g:g}" for g in s.guidance]
    scores = {n: demo_data.adherence(images[i], targets) for i, n in enumerate(names)}
    scores["chance"] = demo_data.chance_adherence(targets)
    first = images[:, ::s.per_prompt]  # one sample per prompt for the picture
    grid = demo_data.grid_array(np.concatenate(np.swapaxes(first, 0, 1)), nrow=len(scales),
                                row_labels=[demo_data.caption(t) for t in run.data.eval_targets],
                                col_labels=names)
    return grid, scores


def _format_scores(scores: dict[str, dict[str, float]]) -> str:
    keys = ("background", "color", "shape", "all")
    lines = [f"{'':>8} " + " ".join(f"{k:>10}" for k in keys)]
    lines += [f"{n:>8} " + " ".join(f"{v[k]:>10.2f}" for k in keys) for n, v in scores.items()]
    return "\n".join(lines)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
          progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) training to cfg.train.steps.

    Returns the logged metrics of every `log_every`-th step (`history`), the last
    adherence scores and the final state. `stop_at` ends the process after that step
    with a checkpoint, as an interruption would (the run itself still aims at
    cfg.train.steps: schedules are unchanged, and a later call continues it).
    """
    from tensorboardX import SummaryWriter

    os.makedirs(workdir, exist_ok=True)
    run = build(cfg, workdir)
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                   every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save)
    state = restore_or_init(run, ckpts, allow_config_change)
    start = int(state["step"])
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(checkpoint.config_to_json(cfg), f, indent=2)
    writer = SummaryWriter(os.path.join(workdir, "tb"))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log.info("mesh %s, %d trainable params, global batch %d, steps %d -> %d",
             dict(run.mesh.shape), n_params, cfg.train.global_batch, start, cfg.train.steps)

    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    bar = tqdm.tqdm(total=cfg.train.steps, initial=start, disable=not progress, unit="step",
                    dynamic_ncols=True)
    history, metrics, scores = [], {}, {}
    last_t, last_step = time.perf_counter(), start
    batch = run.put_batch(start) if start < end else None
    for step in range(start, end):
        state, m = run.step_fn(state, run.frozen, batch)
        # Prepare the next batch while the device works on this one.
        batch = run.put_batch(step + 1) if step + 1 < end else None
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end:
            metrics = {k: float(v) for k, v in jax.device_get(m).items()}
            now = time.perf_counter()
            metrics["step_time"] = (now - last_t) / (done - last_step)
            metrics["examples_per_s"] = cfg.train.global_batch / metrics["step_time"]
            last_t, last_step = now, done
            for k, v in metrics.items():
                writer.add_scalar(k, v, done)
            history.append({"step": done, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            ex_s=f"{metrics['examples_per_s']:.0f}", refresh=False)
        bar.update(1)
        if done % cfg.checkpoint.every_steps == 0 or done == end:
            ckpts.save(done, state, cfg, force=True)
        every = cfg.train.sample_every
        if done == cfg.train.steps or (every and done % every == 0):
            grid, scores = evaluate(run, state)
            writer.add_image("samples", grid, done, dataformats="HWC")
            for col, s in scores.items():
                for k, v in s.items():
                    writer.add_scalar(f"adherence/{col}/{k}", v, done)
            name = "samples_final.png" if done == cfg.train.steps else f"samples_{done:06d}.png"
            Image.fromarray(grid).save(os.path.join(workdir, name))
    bar.close()
    ckpts.close()
    writer.close()
    if scores:
        with open(os.path.join(workdir, "adherence.json"), "w") as f:
            json.dump(scores, f, indent=2)
        print("caption adherence of held-out samples (fraction right):\n" + _format_scores(scores))
        print(f"samples: {os.path.join(workdir, 'samples_final.png')}")
    return {"history": history, "scores": scores, "state": state}

"""The training loop: everything with side effects (files, logs, progress) lives here.

`train(cfg, workdir)` builds the model, data and mesh, resumes from the newest
checkpoint in `workdir/checkpoints` if there is one, runs the compiled step and writes
TensorBoard scalars, sample grids and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from orbax.checkpoint import multihost as ocp_multihost

from jaxcond import checkpoint, config as config_lib, dropout, grid, hardware, preemption, program, sharding
from jaxcond import train_step as ts
from jaxcond.checks import ConfigError
from jaxcond.data import pipeline, sources
from jaxcond.distributed import is_main_process
from jaxcond.models.family import Family
from jaxcond import outputs, storage, validation, wandb_log
from jaxcond.outputs import make_output_dir
from jaxcond.rundir import load_family
from jaxcond.runlog import RunLog
from jaxcond.sampling import sample_grid, warn_overlong

log = logging.getLogger("jaxcond")
COMPILE_WAIT_MS = 30 * 60 * 1000  # how long hosts wait for the slowest one's step compile
# A barrier id serves once; every process passes the same barriers in the same order.
_BARRIER_IDS = itertools.count()


@dataclasses.dataclass
class Run:
    """Everything built from a config before the first step."""

    cfg: ml_collections.ConfigDict
    family: Family
    spec: ts.StepSpec
    tx: optax.GradientTransformation
    lr: optax.Schedule
    mesh: jax.sharding.Mesh
    data: pipeline.Data
    frozen: Any
    abstract_state: Any  # the train state's shapes, dtypes and shardings (jax.ShapeDtypeStruct)
    step_fn: Any = None  # the jitted train step of `spec`
    compiled: dict = dataclasses.field(default_factory=dict)  # batch shapes -> `step`'s compiled program
    validation: tuple[pipeline.Data, np.ndarray] | None = None  # (data, record ids) of validation records

    @property
    def state_shardings(self) -> Any:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

    def jit_step(self, spec: ts.StepSpec, compiler_options: dict[str, Any] | None = None) -> Any:
        """The train step of `spec` compiled for the mesh (`jaxcond.program.jit_step`)."""
        return program.jit_step(self.family, spec, self.tx, self.lr, self.mesh, self.state_shardings,
                                jax.tree.map(lambda x: x.sharding, self.frozen), compiler_options)

    def step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """One train step. Each new batch shape (bucket) is compiled ahead first: the first
        one's memory is logged (the planned peak, `jaxcond plan`'s figure), and with several
        processes they wait for each other at a barrier of the coordination service:
        otherwise a host that compiles faster waits for the slower one inside the step's
        first collectives, whose set-up times out after 30 s on the CPU (gloo)."""
        shapes = tuple(sorted((k, v.shape) for k, v in batch.items()))
        compiled = self.compiled.get(shapes)
        if compiled is None:
            compiled = self.compiled[shapes] = self.step_fn.lower(state, self.frozen, batch).compile()
            if len(self.compiled) == 1 and is_main_process():
                log.info("%s", planned_peak(compiled, self.mesh))
            if jax.process_count() > 1:
                ocp_multihost.get_barrier_sync_fn()(key=f"jaxcond_step_compiled_{next(_BARRIER_IDS)}",
                                                    timeout_ms=COMPILE_WAIT_MS)
        return compiled(state, self.frozen, batch)

    def initial_state(self) -> Any:
        init = functools.partial(ts.init_state, self.family, self.spec, self.tx,
                                 ts.DTYPES[self.cfg.train.param_dtype])
        return jax.jit(init, out_shardings=self.state_shardings)()

    def put_batch(self, step: int) -> dict[str, jax.Array]:
        """The global batch of `step`, loaded now (the loop prefetches instead)."""
        return sharding.put_batch(self.mesh, self.data.ids(step), lambda ids: self.data.batch(ids, step))

    def batches(self, start: int, end: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """(step, global batch) for steps [start, end), this process's rows loaded ahead."""
        rows = sharding.local_rows(self.mesh, self.spec.global_batch)
        o = self.cfg.loader
        for step, local in pipeline.Prefetcher(self.data, rows, start, end, workers=o.workers,
                                               prefetch=o.prefetch, processes=o.processes):
            yield int(step), sharding.assemble(self.mesh, self.spec.global_batch, rows, local)


def planned_peak(compiled: Any, mesh: jax.sharding.Mesh) -> str:
    """The compiled step's memory per device against the device's, as `jaxcond plan` says."""
    m = program.Memory.of(compiled)
    if m is None:
        return "planned peak per device: not reported by this backend"
    chip = hardware.local_chip(mesh.local_devices[0])  # (memory_stats: this process's devices only)
    of = f" of {chip.hbm_bytes / 2**30:.2f} GiB ({chip.name})" if chip else ""
    return (f"planned peak per device {m.peak / 2**30:.2f} GiB{of}: inputs {m.arguments / 2**30:.2f} GiB, "
            f"temporaries {m.temporaries / 2**30:.2f} GiB")


def build(cfg: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> Run:
    """Validates the config and builds model, data, mesh and the compiled step."""
    devices = jax.devices() if devices is None else devices
    config_lib.validate(cfg, len(devices))
    wandb_log.require(cfg)
    sharding.check_slices(cfg.mesh.dcn_data, devices)
    mesh = sharding.make_mesh(sharding.mesh_shape(cfg.mesh, len(devices)), devices, cfg.mesh.dcn_data)
    family = load_family(cfg, workdir)
    sources.check_image_sizes(cfg.data, family.size_multiple)
    groups = dropout.groups_from_config(cfg.dropout, family.conditioners, family.batch_conditioners)
    data = sources.make_data(cfg.data, cfg.seed, cfg.train.global_batch, family, workers=cfg.loader.workers,
                             train_text_encoder=cfg.model.train_text_encoder)
    if cfg.data.eval_prompts:  # the default ones are training captions, counted with the data
        warn_overlong(family, list(cfg.data.eval_prompts), "config.data.eval_prompts")
    spec = ts.StepSpec.from_config(cfg, groups, data.steps_per_epoch)
    tx, lr = ts.make_optimizer(cfg)
    abstract = ts.abstract_state(family, spec, tx, cfg.train.param_dtype,
                              lambda shapes: sharding.param_shardings(mesh, shapes, cfg.mesh.fsdp_min_size))
    frozen = jax.device_put(family.frozen,
                            sharding.param_shardings(mesh, family.frozen, cfg.mesh.fsdp_min_size))
    # (Held-out records stay out of training whether or not they are evaluated.)
    held = sources.validation_set(cfg.data, data, family, workers=cfg.loader.workers) if cfg.eval.every else None
    if held is not None:
        log.info("validation: %d records (%s), losses every %d steps", len(held[1]),
                 "data.validation_path" if cfg.data.validation_path else "held out of the training data",
                 cfg.eval.every)
    run = Run(cfg, family, spec, tx, lr, mesh, data, frozen, abstract, validation=held)
    run.step_fn = run.jit_step(spec)
    return run


def restore_or_init(run: Run, ckpts: checkpoint.Checkpoints, allow_config_change: bool) -> Any:
    """The newest checkpoint's state, or a fresh one; refuses resumes that break the run."""
    step = ckpts.latest_step()
    if step is None:
        return run.initial_state()
    conflicts = config_lib.resume_conflicts(ckpts.saved_config(step),
                                            checkpoint.config_to_json(run.cfg))
    saved = ckpts.saved_data(step)
    if saved["fingerprint"] != run.data.fingerprint:
        conflicts.append(f"the training data changed: {saved['num_records']} records at the checkpoint, "
                         f"{run.data.num_records} now (or other files/captions/buckets)")
    if conflicts and not allow_config_change:
        raise ConfigError(
            f"cannot resume from {ckpts.directory} step {step}: the config changed in ways that "
            "would change which examples, masks or noise later steps see:\n  " + "\n  ".join(conflicts)
            + "\nUse a new --workdir, or pass --allow_config_change to resume anyway.")
    for c in conflicts:
        log.warning("resuming despite a changed config: %s", c)
    log.info("resuming from step %d", step)
    return ckpts.restore(step, run.abstract_state)


def eval_layout(cfg: ml_collections.ConfigDict, data: Any) -> tuple[list[str], list[str]]:
    """The axes of `evaluate`'s samples: column names (unconditional, the trained null
    alone, then cfg<g> per guidance scale) and each row's caption (`per_prompt` rows for
    each of `data.eval_captions`)."""
    s = cfg.sample
    names = ["uncond"] + [f"cfg{g:g}" for g in s.guidance]
    return names, [c for c in data.eval_captions(s.num_prompts) for _ in range(s.per_prompt)]


def evaluate(run: Run, state: Any) -> tuple[np.ndarray, dict[str, dict[str, float]], np.ndarray]:
    """Samples the validation prompts; returns the grid, caption adherence per column and
    the samples [columns, prompts x per_prompt, H, W, 3] (`eval_layout`)."""
    s = run.cfg.sample
    params = state["ema"] if s.use_ema and "ema" in state else state["params"]
    names, captions = eval_layout(run.cfg, run.data)
    scales = (0.0,) + tuple(s.guidance)
    images = sample_grid(run.family, run.spec, params, run.frozen, captions, scales,
                         s.seed, s.steps, s.scheduler, mesh=run.mesh)
    scores = {n: run.data.score(images[i], captions) for i, n in enumerate(names)}
    scores = {n: v for n, v in scores.items() if v is not None}
    if scores:
        scores["chance"] = run.data.chance(captions)
    first = images[:, ::s.per_prompt]  # one sample per prompt for the picture
    picture = grid.grid_array(np.concatenate(np.swapaxes(first, 0, 1)), nrow=len(scales),
                              row_labels=captions[::s.per_prompt], col_labels=names)
    return picture, scores, images


def validate_run(run: Run, state: Any) -> dict[str, float]:
    """Validation losses of the current params (the EMA when sampling uses it), on the mesh."""
    params = state["ema"] if run.cfg.sample.use_ema and "ema" in state else state["params"]
    return validation.evaluate(run.family, run.spec, run.cfg.eval, params, run.frozen, *run.validation, run.mesh)


class NonFiniteError(RuntimeError):
    """Too many updates had a non-finite loss or gradient; the last good state is saved."""


def check_free_space(workdir: str, state: Any) -> None:
    """Refuses to start when the disk cannot hold even one checkpoint of `state` (a bucket
    has no such limit to read)."""
    if storage.is_url(workdir):
        return
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise checkpoint.CheckpointError(
            f"{workdir!r} has {free / 2**20:.0f} MiB free but one checkpoint of this run takes about "
            f"{need / 2**20:.0f} MiB (config.checkpoint.keep = n keeps n of them): free space or "
            "choose another --workdir")


def train(cfg: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
          progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) training to cfg.train.steps.

    Returns the logged metrics of every `log_every`-th step (`history`), the last
    adherence scores and the samples they were read from (`evaluate`; None if this call
    evaluated nothing), the final state and `stopped`: None, or the signal (SIGTERM,
    SIGINT) that ended the run early with a checkpoint. `stop_at` ends the process after
    that step with a checkpoint, as an interruption would (the run itself still aims at
    cfg.train.steps: schedules are unchanged, and a later call continues it).
    Raises NonFiniteError, after checkpointing, once more than
    cfg.train.max_skipped_updates updates were skipped for non-finite numbers.
    Every process of a multi-host run calls this with the same arguments.
    """
    make_output_dir(workdir, "--workdir")  # before anything expensive starts
    with preemption.StopRequests() as stop:  # from here on, SIGTERM/Ctrl-C end the run cleanly
        run = build(cfg, workdir)
        ckpts = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"),
                                       every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
                                       async_save=cfg.checkpoint.async_save,
                                       storage_retries=cfg.checkpoint.storage_retries)
        state = restore_or_init(run, ckpts, allow_config_change)
        check_free_space(workdir, state)
        start = int(state["step"])
        if is_main_process():
            outputs.clear_stale(workdir)  # what a killed run left half-written; only this process writes here
            with outputs.atomic(storage.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
                json.dump(checkpoint.config_to_json(cfg), f, indent=2)
            log.info("%s\n  steps %d -> %d, %d trainable params", sharding.summary(
                run.mesh, state, run.frozen, cfg.train.global_batch, cfg.train.grad_accum), start,
                cfg.train.steps, sum(x.size for x in jax.tree.leaves(state["params"])))
        runlog = RunLog(workdir, start, run.spec, run.data, cfg)
        # A stop requested while compiling or restoring: nothing new to save (one process;
        # several agree on a step inside the loop).
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        end = start if jax.process_count() == 1 and stop.signal_name else end
        history, scores, samples = [], {}, None
        limit, skipped = cfg.train.max_skipped_updates, 0
        # Both closed also when an error ends the loop, before the message: the progress
        # line ended, and the checkpoint being written finished (see Checkpoints.__exit__).
        with ckpts, tqdm.tqdm(total=cfg.train.steps, initial=start,
                              disable=not (progress and is_main_process()), unit="step",
                              dynamic_ncols=True) as bar:
            for step, batch in run.batches(start, end):
                state, m = run.step(state, batch)
                runlog.step(step, m)
                done = step + 1
                interrupted = stop.should_stop(done)
                if done % cfg.train.log_every == 0 or done == end or interrupted:
                    scalars = runlog.flush(done, m)
                    history.append({"step": done, **scalars})
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                                    ex_s=f"{scalars['examples_per_s']:.0f}", refresh=False)
                    # Checked at log steps only: reading the counter every step would stall the device.
                    skipped = int(scalars["skipped_updates"])
                    interrupted |= 0 <= limit < skipped
                bar.update(1)
                if done % cfg.checkpoint.every_steps == 0 or done == end or interrupted:
                    runlog.sync()  # the logs first: they then hold every step before the checkpoint
                    ckpts.save(done, state, cfg, run.data.state(done), force=True)
                if interrupted:
                    break
                every = cfg.eval.every if "eval" in cfg else 0
                if run.validation is not None and every and (done % every == 0 or done == cfg.train.steps):
                    runlog.validation(done, validate_run(run, state))
                every = cfg.train.sample_every
                if done == cfg.train.steps or (every and done % every == 0):
                    picture, scores, samples = evaluate(run, state)
                    runlog.samples(done, done == cfg.train.steps, picture, scores)
        runlog.close(scores)
    if 0 <= limit < skipped:
        raise NonFiniteError(
            f"{skipped} updates had a non-finite loss or gradient (config.train.max_skipped_updates "
            f"= {limit}); none of them changed the params. Stopped at step {int(state['step'])} with "
            "a checkpoint of the last good params. Lower config.optim.lr, check the data or use "
            "float32 compute; to go on anyway, rerun with a higher config.train.max_skipped_updates.")
    if stop.signal_name and is_main_process():
        saved = (f"with a checkpoint in {ckpts.directory}" if int(state["step"]) > start
                 else "before its first step (nothing new to save)")
        print(f"jaxcond: stopped by {stop.signal_name} at step {int(state['step'])} {saved}; run the "
              "same command again to resume.", flush=True)
    return {"history": history, "scores": scores, "samples": samples, "state": state,
            "stopped": stop.signal_name}

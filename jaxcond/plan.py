"""`jaxcond plan`: the memory and FLOPs of a config's train step before paying for a run.

Builds the exact step `jaxcond train` would run (same family, StepSpec, mesh, shardings,
remat, optimizer and batch; `jaxcond.program`) with parameter *shapes* only, compiles it
ahead of time for a TPU topology (`--topology v5e:4x4`, no TPU needed) or for this
machine's devices (a GPU), and reports per device what the compiler says it needs.
Nothing is read but the model's configs: no weights, no data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from jaxcond import config as config_lib, dropout, hardware, outputs, program, sharding, train_step as ts
from jaxcond.data import buckets
from jaxcond.rundir import load_family

GiB = hardware.GiB


@dataclasses.dataclass
class Plan:
    """What one compile of the step says, per device (bytes, FLOPs, seconds)."""

    target: str  # the topology or local device kind
    devices: int
    mesh: dict[str, int]
    per_device_batch: float
    image_size: tuple[int, int]
    stored: dict[str, int]  # params, optimizer state, ema, frozen
    memory: program.Memory | None
    flops: float | None
    bytes_accessed: float | None
    chip: hardware.Chip | None
    compile_s: float
    # With scanned layers: FLOPs estimated for the unrolled step (XLA's cost analysis counts
    # a loop body once, whatever its trip count), bytes accessed as counted (a lower bound).
    flops_estimated: bool = False

    @property
    def fits(self) -> bool | None:
        if self.memory is None or self.chip is None:
            return None
        return self.memory.peak <= self.chip.hbm_bytes

    @property
    def roofline_s(self) -> float | None:
        """The step's time if it ran at the chip's peak FLOP/s or bandwidth, whichever binds."""
        if self.chip is None or self.flops is None:
            return None
        return max(self.flops / self.chip.peak_bf16_flops, (self.bytes_accessed or 0) / self.chip.hbm_bytes_per_s)


def _devices(topology: str | None) -> tuple[list, hardware.Chip | None, str]:
    if topology:
        devices, chip = hardware.topology_devices(topology)
        return devices, chip, topology
    devices = jax.devices()
    return devices, hardware.local_chip(devices[0]), f"{len(devices)} x {devices[0].device_kind}"


def _largest_image(d: ml_collections.ConfigDict, size_multiple: int) -> tuple[int, int]:
    """The biggest images the data yields: the step's memory is planned for them ("auto"
    buckets: the biggest they could be, not knowing the data)."""
    if d.source != "demo" and d.buckets == "auto":
        return max(buckets.candidates(buckets.auto_spec(d, size_multiple)), key=lambda b: (b[0] * b[1], b))
    if d.source != "demo" and d.buckets:
        return tuple(max((tuple(b) for b in d.buckets), key=lambda b: b[0] * b[1]))
    return d.resolution, d.resolution


def plan(cfg: ml_collections.ConfigDict, topology: str | None = None, progress: bool = True,
         step_options: dict[str, Any] | None = None) -> Plan:
    """Compiles `cfg`'s train step for `topology` (or the local devices) and measures it.
    `step_options`: StepSpec fields to change (the benchmarks' switches)."""
    devices, chip, target = _devices(topology)
    config_lib.validate(cfg, len(devices), reads_data=False)
    mesh = sharding.make_mesh(sharding.mesh_shape(cfg.mesh, len(devices)), devices, cfg.mesh.dcn_data)
    with tempfile.TemporaryDirectory() as workdir:  # a family built locally (the demo) goes here
        family = load_family(cfg, workdir, shapes_only=True)
    groups = dropout.groups_from_config(cfg.dropout, family.conditioners, family.batch_conditioners)
    # steps_per_epoch only moves per-epoch dropout schedules, never a shape: any value compiles alike.
    spec = dataclasses.replace(ts.StepSpec.from_config(cfg, groups, steps_per_epoch=1), **(step_options or {}))
    tx, lr = ts.make_optimizer(cfg)
    min_size = cfg.mesh.fsdp_min_size
    state = ts.abstract_state(family, spec, tx, cfg.train.param_dtype,
                              lambda shapes: sharding.param_shardings(mesh, shapes, min_size))
    frozen = program.with_shardings(family.frozen, sharding.param_shardings(mesh, family.frozen, min_size))
    h, w = _largest_image(cfg.data, family.size_multiple)
    batch = program.with_shardings(
        program.batch_shapes(family, {**family.frozen, **family.trainable}, cfg.train.global_batch, h, w,
                             cached=bool(cfg.data.cache)), sharding.batch_sharding(mesh))

    def lower() -> Any:
        return program.jit_step(family, spec, tx, lr, mesh, jax.tree.map(lambda x: x.sharding, state),
                                jax.tree.map(lambda x: x.sharding, frozen)).lower(state, frozen, batch)

    start = time.perf_counter()
    lowered = lower()
    measured = _cached(lowered, target)
    if measured is None:
        with _Ticker(f"compiling the train step for {target}", progress), _no_program_cache(topology):
            compiled = lowered.compile()
        measured = {"memory": dataclasses.asdict(program.Memory.of(compiled) or {}) or None,
                    "flops": program.flops(compiled), "bytes_accessed": program.bytes_accessed(compiled),
                    "compile_s": time.perf_counter() - start}
        if getattr(family, "scan_layers", False):
            unrolled = _lowered_unrolled(family, lower)
            scanned, whole = program.lowered_cost(lowered), program.lowered_cost(unrolled)
            if measured["flops"] and scanned.get("flops") and whole.get("flops"):
                # The loops' missing iterations are model layers, whose work the batch splits
                # evenly over the devices. (Bytes accessed stay as counted: a lower bound.)
                measured["flops"] += (whole["flops"] - scanned["flops"]) / len(devices)
        _store(lowered, target, measured)
    elif progress:
        print(f"the same program was planned before (compiled in {measured['compile_s']:.0f} s): "
              f"its figures are reused from {_CACHE_DIR}", flush=True)
    stored = {"params": state["params"], "optimizer state": state["opt_state"], "ema": state.get("ema", {}),
              "frozen weights": frozen}
    return Plan(target, len(devices), dict(mesh.shape), cfg.train.global_batch / len(devices), (h, w),
                {k: sharding.bytes_per_device(v) for k, v in stored.items()},
                program.Memory(**measured["memory"]) if measured["memory"] else None, measured["flops"],
                measured["bytes_accessed"], chip, measured["compile_s"], getattr(family, "scan_layers", False))


def _lowered_unrolled(family: Any, lower: Any) -> Any:
    """The step lowered (traced, not compiled) with the family's layers unrolled: XLA's cost
    analysis counts a scan's body once, so the compiled scanned step's FLOPs get what the
    unrolled one costs more before compiling, per device (tests/test_plan.py: then within
    10% of the unrolled step's compiled FLOPs)."""
    family.scan_layers = False
    try:
        return lower()
    finally:
        family.scan_layers = True


_CACHE_DIR = "jaxcond-plans"  # inside the compilation cache folder (--compilation_cache)
_FIGURES = 4  # how plan derives its figures from a compile; a change makes earlier entries stale


def _cache_file(lowered: Any, target: str) -> str | None:
    """Where the figures of this program (its HLO, the target, jax's version, `_FIGURES`) are kept:
    jax's own cache cannot load a program compiled for a topology without its TPU, so
    plan keeps what it measured instead."""
    root = jax.config.jax_compilation_cache_dir
    if not root:
        return None
    text = "\n".join([lowered.as_text(), target, jax.__version__, str(_FIGURES)])
    key = hashlib.sha256(text.encode()).hexdigest()
    return os.path.join(root, _CACHE_DIR, key[:40] + ".json")


def _cached(lowered: Any, target: str) -> dict | None:
    path = _cache_file(lowered, target)
    try:
        with open(path) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):  # no cache, no entry, a cut-off entry
        return None


def _store(lowered: Any, target: str, measured: dict) -> None:
    path = _cache_file(lowered, target)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with outputs.atomic(path) as tmp, open(tmp, "w") as f:
            json.dump(measured, f)
    except OSError:  # a read-only cache only costs the next plan a compile
        pass


@contextlib.contextmanager
def _no_program_cache(topology: str | None) -> Iterator[None]:
    """jax's program cache off while compiling for a topology: the entry it would write
    cannot be read back without that TPU (it only warns, and stores hundreds of MB)."""
    if not topology:
        yield
        return
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)


class _Ticker:
    """Elapsed time on one line while a long call (a compile) runs."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled, self.done = what, enabled, threading.Event()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self.done.wait(10.0):
            print(f"\r{self.what}: {time.perf_counter() - start:.0f} s", end="", flush=True)

    def __enter__(self) -> _Ticker:
        if self.enabled:
            print(f"{self.what} ...", flush=True)
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.enabled:
            print(flush=True)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def suggestions(p: Plan, cfg: ml_collections.ConfigDict) -> list[str]:
    """What would make a step that does not fit fit, estimated from this compile (stored
    state shrinks with the fsdp axis, temporaries with the per-device batch)."""
    if p.fits is not False:
        return []
    out, hbm, m = [], p.chip.hbm_bytes, p.memory
    if cfg.model.get("remat", "none") in ("none", "blocks_keep_matmuls", "layers_keep_matmuls"):
        out.append("--config.model.remat=layers (or full): recompute activations in the backward pass")
    state = sum(p.stored.values())
    if p.mesh["fsdp"] < p.devices:
        sharded = state * p.mesh["fsdp"] / p.devices  # the stored state split over every device
        out.append(f"--config.mesh.fsdp=-1 --config.mesh.data=1: stored state {_gib(state)} -> "
                   f"{_gib(sharded)} per device (peak about {_gib(m.peak - state + sharded)})")
    if p.per_device_batch > 1 and m.temporaries > 0:
        free = hbm - (m.peak - m.temporaries)
        per_example = m.temporaries / p.per_device_batch
        fit = int(free // per_example) if free > 0 else 0
        if fit >= 1:
            out.append(f"about {fit} examples per device: --config.train.global_batch={fit * p.devices} "
                       f"(or keep it and --config.train.grad_accum={-(-int(p.per_device_batch) // fit)})")
    if cfg.optim.get("moment_dtype", "float32") == "float32" and cfg.optim.get("name", "adamw") != "adafactor":
        out.append("--config.optim.moment_dtype=bfloat16 (or --config.optim.name=adafactor): halves the moments")
    if cfg.optim.ema_decay > 0 and cfg.optim.get("ema_dtype", "params") != "bfloat16":
        out.append("--config.optim.ema_dtype=bfloat16, or --config.optim.ema_decay=0 (no EMA)")
    out.append("(estimates from this compile: rerun jaxcond plan with the change to know)")
    return out


def report(p: Plan, cfg: ml_collections.ConfigDict) -> str:
    """The plan as the command prints it."""
    lines = [f"jaxcond plan: {p.target}, {p.devices} device(s), mesh {p.mesh}, "
             f"{p.per_device_batch:g} example(s) per device at {p.image_size[0]}x{p.image_size[1]} px, "
             f"remat {cfg.model.get('remat', 'none')}, optimizer {cfg.optim.get('name', 'adamw')} "
             f"(moments {cfg.optim.get('moment_dtype', 'float32')}), params {cfg.train.param_dtype}, "
             f"compute {cfg.train.compute_dtype}",
             f"compiled in {p.compile_s:.0f} s", "per device:"]
    for name, n in p.stored.items():
        lines.append(f"  {name:<22} {_gib(n):>12}")
    m = p.memory
    if m is None:
        lines.append("  (this backend reports no memory analysis)")
    else:
        lines += [f"  {'inputs (all)':<22} {_gib(m.arguments):>12}  state, frozen weights, batch",
                  f"  {'temporaries':<22} {_gib(m.temporaries):>12}  activations, gathered params, gradients",
                  f"  {'peak':<22} {_gib(m.peak):>12}" + (f"  of {_gib(p.chip.hbm_bytes)} on {p.chip.name}"
                                                           if p.chip else "")]
    if p.fits is not None:
        margin = p.chip.hbm_bytes - m.peak
        lines.append(f"fits: {'yes' if p.fits else 'NO'} (margin {_gib(margin)}, "
                     f"{100 * margin / p.chip.hbm_bytes:.0f}% of the chip)")
    if p.flops:
        lines.append(f"FLOPs per step per device: {p.flops:.3e} (compiled, recomputation included"
                     + ("; estimate for the scanned layers, from the step unrolled and lowered"
                        if p.flops_estimated else "") + ")")
    if p.roofline_s:
        lines.append(f"estimate, roofline: >= {p.roofline_s * 1e3:.0f} ms per step, "
                     f"{cfg.train.global_batch / p.roofline_s:.1f} examples/s at best "
                     f"({p.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {p.chip.hbm_bytes_per_s / 1e9:.0f} GB/s "
                     "per chip; real steps are slower: MFU = this time / the measured one)")
    tips = suggestions(p, cfg)
    if tips:
        lines.append("to fit, try:")
        lines += [f"  {t}" for t in tips]
    return "\n".join(lines)

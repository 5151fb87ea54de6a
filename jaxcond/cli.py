"""The `jaxcond` command: `jaxcond COMMAND --config FILE [--config.a.b=value ...]` (see USAGE)."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

import ml_collections
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

COMMANDS = ("train", "plan", "masks", "cache", "shards", "export", "sample", "verify", "eval")
USAGE = """usage: jaxcond COMMAND --config configs/FILE.py [--config.section.field=value ...]

commands:
  train   train (or resume) in --workdir
  plan    compile the train step ahead of time for --topology (a TPU slice, no TPU needed) or this
          machine's devices, and print its memory per device against the chip's, FLOPs and fit
  masks   print the dropout masks of --steps A:B as JSON lines, without training (on one device:
          masks do not depend on the mesh, so config.mesh is not used)
  cache   precompute decoded images and text-encoder outputs into config.data.cache
  shards  write a folder/metadata source as ArrayRecord shards into --shards_out
  export  write run --workdir as a diffusers-format folder (Flax + PyTorch) into --out (a folder
          or gs://BUCKET/path)
  sample  a PNG grid of --prompt x --guidance from run --workdir (or --run)
  verify  check run --run's logged masks against its config and that its checkpoint restores
  eval    validation losses and caption gap of run --run's checkpoint, on its held-out records

examples:
  jaxcond train --config configs/demo.py --workdir runs/demo
  jaxcond plan --config configs/sdxl.py --topology v5e:4x4
  jaxcond masks --config configs/demo.py --steps 0:3
  jaxcond cache --config configs/demo.py --workdir runs/demo --config.data.cache=runs/demo_cache
  jaxcond export --workdir runs/demo --out runs/demo_export [--weights ema|raw] [--step N] [--single_file]
      [--model_source DIR] [--lora [--lora_format diffusers|kohya] | --merge]   (the last two: LoRA runs)
  jaxcond sample --run runs/demo --prompt "a red circle on a blue background" --guidance 1,3,7 \\
      --steps 50 --seed 0 [--scheduler ddim|euler|euler_a|dpm++] [--negative_prompt TEXT] [--out grid.png]
      [--without GROUP,...]   (groups replaced by their nulls, e.g. --without t5 for SD3 without T5)
  jaxcond sample --config configs/sd15.py --config.model.lora.rank=16 \
      --config.model.lora.init_from=lora.safetensors --prompt "..." --out grid.png   (a LoRA file, no run)
  jaxcond verify --run runs/demo
  jaxcond eval --run runs/demo [--step N] [--weights ema|raw] [--validation_path DATA]
"""

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (Python, get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
flags.DEFINE_alias("run", "workdir")
_ALLOW = flags.DEFINE_bool("allow_config_change", False,
                           "Resume even if the seed, dropout spec, data or batch changed.")
_STEPS = flags.DEFINE_string("steps", None, "masks: half-open step range A:B, 0 <= A < B <= 2**31 (default 0:1); "
                             "sample: sampling steps (default 50).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "plan: a TPU topology to compile for, e.g. v5e:2x2, v5e:4x4, "
                                "v5p:2x2x1 (needs the tpu extra); default: this machine's devices.")
_SHARDS_OUT = flags.DEFINE_string("shards_out", None, "shards: output folder.")
_OUT = flags.DEFINE_string("out", None, "export: output folder or gs://BUCKET/path; sample: output PNG.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "export/sample: EMA or raw trainable weights.")
_STEP = flags.DEFINE_integer("step", None, "export/sample: checkpoint step (default: the newest).")
_MODEL_SOURCE = flags.DEFINE_string("model_source", None,
                                    "export/sample/verify: where the run's base model (its config.model.source) "
                                    "is now, if it moved since training.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample: a prompt (repeat the flag for more rows).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None,
                                "sample: its encoding replaces the trained nulls in the unconditional branch.")
_GUIDANCE = flags.DEFINE_list("guidance", ["1", "3", "7"], "sample: classifier-free guidance scales (columns).")
_SEED = flags.DEFINE_integer("seed", 0, "sample: noise seed.")
_SCHEDULER = flags.DEFINE_string("scheduler", None, "sample: ddim | euler | euler_a | dpm++ (default: the "
                                 "config's sample.scheduler; a flow-matching model: euler only).")
_WITHOUT = flags.DEFINE_list("without", [], "sample: dropout groups replaced by their nulls in both branches, "
                             "e.g. --without t5 (SD3 sampled without T5, as training dropped it).")
_SINGLE = flags.DEFINE_bool("single_file", False,
                            "export: also one .safetensors in the original SD layout (latent models).")
_LORA = flags.DEFINE_bool("lora", False, "export: a LoRA run's adapters alone, as one .safetensors.")
_LORA_FORMAT = flags.DEFINE_enum("lora_format", "diffusers", ["diffusers", "kohya"],
                                 "export --lora: diffusers (load_lora_weights) or kohya (ComfyUI, AUTOMATIC1111).")
_MERGE = flags.DEFINE_bool("merge", False, "export: a LoRA run's base model with its adapters merged in.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "sample: strength of a LoRA run's adapters (0: the base).")
_VALIDATION_PATH = flags.DEFINE_string("validation_path", None,
                                       "eval: validation data for a run trained without a split (same source kind).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "shards: number of shard files.", lower_bound=1)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Join JAX's multi-process runtime: auto = when the environment (SLURM, Open MPI, TPU "
    "slice, JAX_COORDINATOR_ADDRESS) announces several processes; on = always (JAX detects "
    "Cloud TPU, GKE, SLURM); off = never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for clusters JAX cannot detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address: 0..N-1.")
# Per user, not per run: a rerun, a resume after preemption or `jaxcond sample` after
# training loads the programs an earlier process compiled on this machine.
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxcond/jax",
    "JAX's persistent compilation cache, a folder or gs://BUCKET/path: compiled programs are kept "
    "here and reused by later runs (reruns, resumes, sampling); empty turns it off. "
    "JAX_COMPILATION_CACHE_DIR, when set, wins.")


# Each command imports what it runs when it runs: `jaxcond` alone, or with a command that
# fails its flag checks, answers without loading jax, flax and diffusers' model code.
def _train() -> None:
    from jaxcond import distributed, xla
    from jaxcond.train import train

    if not _WORKDIR.value:
        raise app.UsageError("train needs --workdir DIR (where checkpoints, logs and samples go)")
    try:
        distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    xla.cpu_runtime()  # after joining the processes, before jax's backends exist
    train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value)


def _plan() -> None:
    from jaxcond import plan

    cfg = _CONFIG.value
    print(plan.report(plan.plan(cfg, _TOPOLOGY.value), cfg))


def _masks() -> None:
    from jaxcond.masks import mask_records

    try:
        a, b = (int(x) for x in (_STEPS.value or "0:1").split(":"))
    except ValueError:
        raise app.UsageError(f"--steps {_STEPS.value!r}: expected A:B, e.g. --steps 0:10") from None
    if not 0 <= a < b <= 2**31:
        raise app.UsageError(f"--steps {_STEPS.value!r}: expected 0 <= A < B <= 2**31 (steps A to B-1; "
                             "a step is an integer below 2**31), e.g. --steps 0:10")
    try:
        for rec in mask_records(_CONFIG.value, range(a, b)):
            print(json.dumps(rec), flush=True)
    except BrokenPipeError:  # the reader stopped early (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet


def _cache() -> None:
    from jaxcond import xla
    from jaxcond.data import sources
    from jaxcond.rundir import load_family

    cfg = _CONFIG.value
    if not cfg.data.cache:
        raise app.UsageError("cache needs --config.data.cache=DIR (where the cache goes)")
    xla.cpu_runtime()
    m = sources.build_cache(cfg.data, cfg.seed, cfg.train.global_batch, load_family(cfg, _WORKDIR.value or ""),
                            cfg.data.cache, workers=cfg.loader.workers,
                            train_text_encoder=cfg.model.train_text_encoder)
    print(f"cache of {len(m['records'])} records in {cfg.data.cache}: {', '.join(m['fields'])}")


def _shards() -> None:
    from jaxcond.data import sources

    if not _SHARDS_OUT.value:
        raise app.UsageError("shards needs --shards_out DIR (where the shards go)")
    cfg = _CONFIG.value
    index = sources.write_shards(cfg.data, cfg.seed, cfg.train.global_batch, _SHARDS_OUT.value, _NUM_SHARDS.value,
                                 workers=cfg.loader.workers)
    print(f"{len(index['sizes'])} records in {len(index['shards'])} shards in {_SHARDS_OUT.value}; "
          f"train with --config.data.source=shards --config.data.path={_SHARDS_OUT.value}")


def _export() -> None:
    from jaxcond.export import export

    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("export needs --workdir RUN (a trained run) and --out DIR or gs://BUCKET/path")
    m = export(_WORKDIR.value, _OUT.value, _WEIGHTS.value, _STEP.value, _SINGLE.value, _MODEL_SOURCE.value,
               lora=_LORA_FORMAT.value if _LORA.value else None, merge=_MERGE.value)
    what = f" the LoRA adapters ({m['lora']['format']} layout, {m['lora']['file']}) of" if "lora" in m else ""
    print(f"exported{what} step {m['step']} ({m['weights']} weights) of {_WORKDIR.value} to {_OUT.value}; "
          f"nulls {m['nulls']}")


def _sample() -> None:
    from jaxcond import xla
    from jaxcond.sample import sample

    if not _WORKDIR.value and _CONFIG.value is None:
        raise app.UsageError("sample needs --run DIR (a trained run), or --config FILE and --out FILE.png (the "
                             "model as configured, e.g. a base with --config.model.lora.init_from=LORA_FILE)")
    try:
        steps = int(_STEPS.value or 50)
    except ValueError:
        raise app.UsageError(f"sample: --steps {_STEPS.value!r} must be an integer, e.g. --steps 50") from None
    try:
        guidance = [float(g) for g in _GUIDANCE.value]
    except ValueError:
        raise app.UsageError(f"sample: --guidance {','.join(_GUIDANCE.value)!r} must be numbers, "
                             "e.g. --guidance 1,3,7") from None
    xla.cpu_runtime()
    path = sample(_WORKDIR.value, _PROMPT.value, guidance, steps=steps, seed=_SEED.value,
                    scheduler=_SCHEDULER.value, negative=_NEGATIVE.value, weights=_WEIGHTS.value,
                    step=_STEP.value, out=_OUT.value, model_source=_MODEL_SOURCE.value,
                    lora_scale=_LORA_SCALE.value, cfg=None if _WORKDIR.value else _CONFIG.value,
                    without=_WITHOUT.value)
    print(f"samples: {path}")


def _verify() -> None:
    from jaxcond.verify import verify

    if not _WORKDIR.value:
        raise app.UsageError("verify needs --run DIR (a run directory)")
    problems = verify(_WORKDIR.value, model_source=_MODEL_SOURCE.value)
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        sys.exit(1)
    print(f"verify: {_WORKDIR.value} is consistent")


def _eval() -> None:
    from jaxcond.eval_run import eval_run

    if not _WORKDIR.value:
        raise app.UsageError("eval needs --run DIR (a run directory)")
    weights = _WEIGHTS.value if flags.FLAGS["weights"].present else None  # default: the EMA if the run has one
    from jaxcond import xla

    xla.cpu_runtime()
    scores = eval_run(_WORKDIR.value, _STEP.value, weights, _MODEL_SOURCE.value, _VALIDATION_PATH.value)
    print(json.dumps(scores))


def _main(argv: list[str], command: str) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None and command not in ("export", "sample", "verify", "eval"):  # these read the run's config
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    # Orbax and absl log every checkpoint step at INFO; users need only jaxcond's own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("jaxcond: %(message)s"))
    log = logging.getLogger("jaxcond")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from jaxcond.checkpoint import CheckpointError
    from jaxcond.checks import ConfigError
    from jaxcond.data.files import DataError
    from jaxcond.models.convert import WeightsMismatch
    from jaxcond.storage import StorageError
    from jaxcond.train import NonFiniteError
    from jaxcond.xla import compilation_cache

    try:
        compilation_cache(_COMPILATION_CACHE.value)
    except ValueError as e:  # a file or another scheme: the flag's value, in one line
        sys.exit(f"jaxcond {command}: {e}")
    try:
        {"train": _train, "plan": _plan, "masks": _masks, "cache": _cache, "shards": _shards, "export": _export,
         "sample": _sample, "verify": _verify, "eval": _eval}[command]()
    except (ConfigError, DataError, FileNotFoundError, NotImplementedError, WeightsMismatch,
            CheckpointError, NonFiniteError, StorageError) as e:
        # Bad configs, model folders, weights and storage faults are the user's to fix: the message,
        # not a traceback.
        sys.exit(f"jaxcond {command}: {e}")


def _parse_flags(argv: list[str], command: str) -> list[str]:
    """absl's flag parser, with a config file that cannot be read or run, or an override
    naming no field of it, reported in one line (ml_collections raises them as tracebacks)."""
    try:
        rest = app.parse_flags_with_usage(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.keys()  # a file that failed to load raises only once used, mid-run
    except Exception as e:
        sys.exit(f"jaxcond {command}: {_flag_error(e, argv)}")
    if _CONFIG.value is not None and not isinstance(_CONFIG.value, ml_collections.ConfigDict):
        sys.exit(f"jaxcond {command}: --config {_config_arg(argv)}: get_config() returned a "
                 f"{type(_CONFIG.value).__name__}, not an ml_collections.ConfigDict")
    return rest


def _config_arg(argv: list[str]) -> str:
    """The --config file as given (the flag knows it only once the file has loaded)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _flag_error(e: Exception, argv: list[str]) -> str:
    """The one line saying which flag or config-file line `e`, raised parsing them, is
    about; anything else is re-raised as it is."""
    path = _config_arg(argv)
    if path:
        where = os.path.abspath(path)
        if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == where:
            return f"--config {path}: line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
        if isinstance(e, AttributeError) and "has no attribute 'get_config'" in str(e):
            return (f"--config {path}: defines no get_config(); a config file returns its "
                    "ml_collections.ConfigDict from get_config() (see configs/demo.py)")
        inside = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == where]
        if inside:  # the config file's own code raised
            return f"--config {path}: line {inside[-1].lineno} ({inside[-1].line}): {type(e).__name__}: {e}"
    if isinstance(e, OSError):  # the file is missing or unreadable
        reason = str(e).strip().splitlines()[-1].strip()
        return (f"--config {path}: cannot read it ({reason}); pass a config file, "
                "e.g. --config configs/demo.py")
    if isinstance(e, (AttributeError, KeyError)):  # an override's path names no field
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        detail = str(e.args[0] if e.args else e).replace("\n", "; ")
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if o.removeprefix("--config.") in detail
                 or any(f"'{part}'" in detail for part in o.split(".")[1:])]
        return (f"{', '.join(named or overrides) or '--config'}: no such config field ({detail}); "
                "the fields are listed in the config file")
    raise e


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.stderr.write(USAGE)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    command = sys.argv.pop(1)
    # jaxcond reads PyTorch weights without torch and never calls it, but where torch is
    # installed diffusers and transformers import it and their PyTorch models anyway (~5 s
    # and hundreds of MB per process, on every host). USE_TORCH=1 lets them.
    if os.environ.setdefault("USE_TORCH", "0") == "0":
        sys.modules.setdefault("torch", None)  # `import torch` then fails as if not installed
    app.run(lambda argv: _main(argv, command), flags_parser=lambda argv: _parse_flags(argv, command))


if __name__ == "__main__":
    main()

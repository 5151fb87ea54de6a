"""Weights & Biases beside TensorBoard (`config.logging.*`, checked here): process 0's
scalars, sample grids and the config in one W&B run per run directory.

The run's W&B id is kept in <workdir>/wandb_id.txt, so a resumed run continues the same
W&B run. `wandb` is an optional dependency (the wandb extra), imported only when used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

import ml_collections
import numpy as np

from jaxcond import outputs, storage
from jaxcond.checks import ConfigError, check, one_of

ID_FILE = "wandb_id.txt"
MODES = ("online", "offline")
# The x axis of every chart. W&B drops a log whose `step=` is below one it has seen, but a
# resume reruns the steps after the newest checkpoint: so the training step is a metric of
# its own and W&B's internal step only counts log calls. A rerun step then appears twice
# (for an exactly resumed run, with the same numbers) instead of being lost.
STEP = "train/step"


def enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run logs to W&B (configs saved before `logging` existed do not)."""
    return "logging" in cfg and cfg.logging.wandb is True


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks `config.logging` (`c`)."""
    check(isinstance(c.wandb, bool), "logging.wandb", c.wandb, "must be True or False")
    check(isinstance(c.wandb_project, str) and c.wandb_project.strip() != "", "logging.wandb_project",
          c.wandb_project, "must name a W&B project")
    check(isinstance(c.wandb_name, str), "logging.wandb_name", c.wandb_name,
          "must be a string ('' = the workdir's name)")
    check(isinstance(c.wandb_entity, str), "logging.wandb_entity", c.wandb_entity,
          "must be a string ('' = your W&B default entity)")
    one_of("logging.wandb_mode", c.wandb_mode, MODES)


def require(cfg: ml_collections.ConfigDict) -> None:
    """A ConfigError, before anything compiles, when the run logs to W&B without wandb installed."""
    if not enabled(cfg):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("config.logging.wandb = True needs the wandb package: pip install 'jaxcond[wandb]' "
                          "(or set --config.logging.wandb=False)") from None


def _run_id(workdir: str) -> str:
    """The W&B id stored in the run directory, made and stored on the first start."""
    path = storage.join(workdir, ID_FILE)
    if storage.exists(path):
        run_id = storage.read_bytes(path).decode().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    with outputs.atomic(path) as tmp, open(tmp, "w") as f:
        f.write(run_id + "\n")
    return run_id


class WandbRun:
    """Process 0's W&B run (only process 0 makes one).

    W&B writes its own files in <workdir>/wandb. For a gs:// workdir they go to a local
    temporary folder instead (not the mirror's: the mirror appends to objects, and W&B
    rewrites some of its files); an offline run's folder is uploaded to <workdir>/wandb at
    `close`, for `wandb sync`. W&B cannot resume an offline run: each start of one writes
    a folder of its own with the same id."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, config: dict[str, Any]):
        """Starts (or resumes) the W&B run of `workdir`; `config` is logged as the run's config."""
        import wandb

        c = cfg.logging
        self.workdir, self.offline = workdir, c.wandb_mode == "offline"
        self.local = tempfile.mkdtemp(prefix="jaxcond-wandb-") if storage.is_url(workdir) else workdir
        name = c.wandb_name or os.path.basename(storage.absolute(workdir).rstrip("/"))
        try:
            self.run = wandb.init(project=c.wandb_project, entity=c.wandb_entity or None, name=name,
                                  id=_run_id(workdir), resume="allow", mode=c.wandb_mode, dir=self.local,
                                  config=config)
        except wandb.Error as e:  # e.g. online without credentials: say so in one line
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"W&B could not start the run ({reason}): run `wandb login` or set WANDB_API_KEY, "
                              "or set --config.logging.wandb_mode=offline") from None
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, STEP: step})

    def image(self, step: int, key: str, picture: np.ndarray, caption: str) -> None:
        import wandb

        self.run.log({key: wandb.Image(picture, caption=caption), STEP: step})

    def close(self) -> None:
        self.run.finish()
        if self.local != self.workdir:
            if self.offline:
                storage.upload(os.path.join(self.local, "wandb"), storage.join(self.workdir, "wandb"))
            shutil.rmtree(self.local, ignore_errors=True)

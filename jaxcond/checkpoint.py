"""Orbax checkpoints of the train state, with the run's config beside it.

A checkpoint holds `state` (step, trainable params incl. learned nulls, optimizer
state, EMA), `config` (JSON) and `data` (JSON: the loader's position, which is the next
step, and a fingerprint of the training set so a resume notices changed data). Nothing else is needed to continue exactly: the
masks, noise, timesteps and data order are pure functions of (config, step), and
frozen params are reloaded from the model source.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples become lists), comparable with a saved one."""
    return json.loads(cfg.to_json())


class Checkpoints:
    """A thin wrapper over ocp.CheckpointManager fixing jaxcond's layout and policy."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "config", "data"))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, cfg: ml_collections.ConfigDict, data: dict, *,
             force: bool = False) -> bool:
        """Starts saving (asynchronously if configured); True if a save was started."""
        return self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config_to_json(cfg)),
            data=ocp.args.JsonSave(data)), force=force)

    def saved_config(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def saved_data(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def restore(self, step: int, target: Any) -> Any:
        """Restores `state` onto the shapes, dtypes and shardings of `target` (arrays or
        jax.ShapeDtypeStruct with .sharding), so it can land on a different mesh."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        return self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

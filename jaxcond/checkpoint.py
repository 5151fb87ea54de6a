"""Orbax checkpoints of the train state, with the run's config beside it.

A checkpoint holds `state` (step, trainable params incl. learned nulls, optimizer
state, EMA), `config` (JSON) and `data` (JSON: the loader's position, which is the next
step, and a fingerprint of the training set so a resume notices changed data). Nothing else is needed to continue exactly: the
masks, noise, timesteps and data order are pure functions of (config, step), and
frozen params are reloaded from the model source.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
process killed mid-write (even SIGKILL) leaves the previous checkpoints intact and a
partial folder that `Checkpoints` reports and removes on the next start. Cloud Storage
has no rename: there Orbax writes the step's folder in place and its `commit_success.txt`
last, and a step folder without that marker is the partial one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxcond import storage
from jaxcond.checks import int_at_least

log = logging.getLogger("jaxcond")
PARTIAL_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix for a checkpoint still being written
COMMIT_MARK = "commit_success.txt"  # Orbax's last object of a checkpoint on Cloud Storage


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit the run; the message says what to do."""


def _scan(directory: str) -> tuple[list[str], list[str]]:
    """(every name in `directory`, the partial checkpoints among them), from one listing."""
    names = storage.listdir(directory)
    if storage.is_url(directory):
        return names, [n for n in names
                       if n.isdigit() and not storage.exists(storage.join(directory, n, COMMIT_MARK))]
    return names, [n for n in names if PARTIAL_MARK in n]


def partial_checkpoints(directory: str) -> list[str]:
    """Folders of checkpoints whose writing never finished (the process died first)."""
    return _scan(directory)[1]


def complete_steps(directory: str) -> list[int]:
    """Steps whose checkpoint is complete in `directory` (read from storage, not from a
    manager's memory, which also lists a save still being written)."""
    names, partial = _scan(directory)
    return sorted(int(n) for n in names if n.isdigit() and n not in partial)


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks `config.checkpoint` (`c`)."""
    int_at_least("checkpoint.every_steps", c.every_steps, 1)
    int_at_least("checkpoint.keep", c.keep, 1)
    int_at_least("checkpoint.storage_retries", c.storage_retries, 0)


def _set_storage_retries(retries: int) -> None:
    """Tensorstore's Cloud Storage retries for Orbax's writes and reads. Its default, 32
    (~15 min), would hold a run for a quarter of an hour on a network fault; gcsfs, which
    writes the logs, gives up after ~35 s. Orbax builds its tensorstore contexts from this
    module-level default, which has no other way in."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    spec = {"max_retries": retries, "initial_delay": "1s", "max_delay": "32s"}
    for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
        context["gcs_request_retries"] = spec


def _key(entry: Any) -> str:
    # Orbax's metadata turns optimizer namedtuples into dicts: compare names, not key kinds.
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {"/".join(_key(k) for k in path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples become lists), comparable with a saved one."""
    return json.loads(cfg.to_json())


def _quiet_closed_loop_callbacks() -> None:
    """When one array's write fails, Orbax closes that save's event loop while tensorstore
    still has the other writes in flight; each then fails to call back into the closed loop
    and Python prints it as an unraisable exception: a hundred tracebacks for one full disk,
    interleaved with the message that says what to do. They are echoes of the one error
    Orbax raises (and jaxcond reports): drop exactly those, pass anything else on."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxcond", False):
        return

    def hook(u: Any) -> None:
        tb = u.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        echo = (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")
        if not echo:
            previous(u)

    hook._jaxcond = True
    sys.unraisablehook = hook


class _NoOrbaxTracebacks(logging.Filter):
    """Orbax logs a failed background write from each of its threads, traceback and all,
    before the error reaches `wait` or `save`, which report it in one line: its log lines
    stay, their tracebacks go."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


class _DropMessage(logging.Filter):
    """Drops log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class Checkpoints:
    """A thin wrapper over ocp.CheckpointManager fixing jaxcond's layout and policy."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True,
                 read_only: bool = False, host_copy: bool | None = None, storage_retries: int = 10):
        """`host_copy`: save a host (numpy) copy of the state, fetched in one transfer,
        instead of the device arrays, and restore through one too; None: when this is the
        only process (see `save` and `restore`). `storage_retries`: config.checkpoint's."""
        self.directory = storage.absolute(directory)
        if storage.is_url(self.directory):
            _set_storage_retries(storage_retries)
        self.host_copy = jax.process_count() == 1 if host_copy is None else host_copy
        self.partial = partial_checkpoints(self.directory)
        if not read_only:
            _quiet_closed_loop_callbacks()
            absl_log = logging.getLogger("absl")
            if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl_log.filters):
                absl_log.addFilter(_NoOrbaxTracebacks())
        if self.partial and not read_only and jax.process_index() == 0:
            log.warning("ignoring %d partial checkpoint(s) in %s, left by a process that died while "
                        "writing them: %s", len(self.partial), self.directory, ", ".join(self.partial))
            for name in self.partial:  # Orbax never reads them; only process 0 deletes
                storage.remove(storage.join(self.directory, name))
        options = (ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
                   if read_only else
                   ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                                create=True, enable_async_checkpointing=async_save))
        # Orbax warns that a read-only manager is read-only; `sample`, `export` and `verify`
        # asked for that, and a warning on every call teaches users to ignore warnings.
        absl_log, quiet = logging.getLogger("absl"), _DropMessage("Given directory is read only")
        absl_log.addFilter(quiet)
        try:
            # Handlers named up front, so a fresh manager can also read a checkpoint's metadata.
            self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler()})
        finally:
            absl_log.removeFilter(quiet)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, cfg: ml_collections.ConfigDict, data: dict, *,
             force: bool = False) -> bool:
        """Starts saving (asynchronously if configured); True if a save was started.

        A failed write, this one's or the previous asynchronous one's, raises
        CheckpointError; the checkpoints completed before it stay intact.

        With `host_copy` the state is fetched to the host in one batched transfer and written
        as numpy arrays. Orbax writes device arrays one shard at a time with per-array
        bookkeeping, and its default cuts each replicated array into one slice per replica
        so that several hosts share the write: in one process that is pure overhead, most
        of a save's time for the demo's ~850 small arrays (benchmarks/checkpoint_save.py).
        Several processes cannot fetch each other's shards, so they write device arrays.
        The files are the same kind either way: every checkpoint restores onto any mesh."""
        if self.host_copy and (force or self._mgr.should_save(step)):
            state = jax.device_get(state)
        try:
            return self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                config=ocp.args.JsonSave(config_to_json(cfg)),
                data=ocp.args.JsonSave(data)), force=force)
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for I/O errors
            raise self._write_error(e) from e

    def saved_config(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def saved_data(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def complete_steps(self) -> list[int]:
        return complete_steps(self.directory)

    def _write_error(self, e: Exception) -> CheckpointError:
        fix = ("restore access to the bucket (network, permissions)" if storage.is_url(self.directory)
               else "free space or fix the directory")
        try:
            done = self.complete_steps()
        except storage.StorageError:  # the storage that failed the write may fail the listing too
            done = None
        newest = (f"The newest complete checkpoint, step {max(done)}, is intact: {fix}, then rerun the same "
                  "command to resume from it." if done else
                  f"No earlier checkpoint exists: {fix} and rerun." if done is not None else
                  f"The complete checkpoints written before are intact: {fix}, then rerun the same command "
                  "to resume from the newest.")
        cause = str(e).splitlines()[0] if str(e) else ""
        return CheckpointError(f"writing a checkpoint into {self.directory} failed ({type(e).__name__}: "
                               f"{cause}). {newest}")

    def shape_conflicts(self, step: int, target: Any) -> list[str]:
        """Arrays of the saved `state` whose path, shape or dtype differ from `target`'s
        (the model or optimizer changed in code since the checkpoint was written)."""
        saved = _shapes(self._mgr.item_metadata(step)["state"].tree)
        now = _shapes(target)
        out = [f"{p}: checkpoint has {saved[p][0]} {saved[p][1]}, the run now {now[p][0]} {now[p][1]}"
               for p in sorted(saved.keys() & now.keys()) if saved[p] != now[p]]
        out += [f"{p}: in the checkpoint, not in the run now" for p in sorted(saved.keys() - now.keys())]
        out += [f"{p}: in the run now, not in the checkpoint" for p in sorted(now.keys() - saved.keys())]
        return out

    def restore(self, step: int, target: Any) -> Any:
        """Restores `state` onto the shapes, dtypes and shardings of `target` (arrays or
        jax.ShapeDtypeStruct with .sharding), so it can land on a different mesh."""
        conflicts = self.shape_conflicts(step, target)
        if conflicts:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this run's state ("
                f"{len(conflicts)} arrays differ; the model or optimizer changed since it was written):\n  "
                + "\n  ".join(conflicts[:20]) + ("\n  ..." if len(conflicts) > 20 else "")
                + "\nRestore the code/config the run was trained with, or start a new --workdir.")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        if self.host_copy:
            # As in `save`: Orbax reads device arrays shard by shard; reading numpy arrays and
            # placing them all in one device_put took a third of the time (demo state, 8
            # devices; benchmarks/checkpoint_save.py). One process holds every shard anyway.
            args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), abstract)
            host = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                abstract, restore_args=args)))["state"]
            return jax.device_put(host, jax.tree.map(lambda x: x.sharding, abstract))
        return self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))["state"]

    def wait(self) -> None:
        """Blocks until the asynchronous save in flight is on disk (CheckpointError if it failed)."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see save()
            raise self._write_error(e) from e

    def close(self) -> None:
        self.wait()
        self._mgr.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        """Closes, also when an error leaves the block: exiting under a save in flight would
        cut its write short (and lose that checkpoint), so the save finishes first; the
        error that ended the block is the one reported, not a failed write's."""
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(CheckpointError):
                self.close()

"""Joining JAX's multi-controller runtime: one process per host, started by the launcher.

jaxcond never starts processes itself. gcloud, GKE, SLURM or a shell start the same
command on every host; each process calls `initialize` before touching a device, and
`jax.distributed.initialize` connects them (on Cloud TPU, GKE, SLURM and Open MPI it
finds the coordinator, process count and id in the environment by itself).

Modes:
  off   single process, never initialise (the default outside a cluster anyway).
  on    always call jax.distributed.initialize, with JAX's own environment detection
        unless an explicit coordinator / process count / id is given.
  auto  initialise only when explicit values are given or the environment announces
        several processes; a no-op on one host.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("jaxcond")
MODES = ("auto", "on", "off")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any: a collective, which every process
    calls at the same point. An error met by one process alone (process 0 writes the logs)
    then stops them all, where the others would wait for it in their next collective."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def is_main_process() -> bool:
    """Process 0 alone writes logs, samples and files; every process trains and checkpoints."""
    return jax.process_index() == 0


def _announced_processes() -> str | None:
    """Why the environment looks like a multi-process job, or None."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return f"SLURM job {env['SLURM_JOB_ID']} with {env['SLURM_NTASKS']} tasks"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return f"Open MPI world of {env['OMPI_COMM_WORLD_SIZE']} processes"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return f"TPU slice of {len(hosts)} hosts"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
    return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Joins the multi-process runtime if `mode` says so; returns whether it did.

    Must run before anything creates a JAX backend (jax.devices(), any array).
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: expected one of {', '.join(MODES)}")
    explicit = (coordinator_address, num_processes, process_id)
    if mode == "off":
        if any(v is not None for v in explicit):
            raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes/"
                             "--process_id; drop them or use --distributed=on")
        return False
    reason = "explicit --coordinator_address" if coordinator_address else _announced_processes()
    if mode == "auto" and reason is None:
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id "
                         "(the same address, count and a distinct id on every process)")
    # Preemption notices (SIGTERM) reach every process through this service, which picks
    # the step all of them checkpoint (jaxcond.preemption); set, not left to a default.
    jax.config.update("jax_enable_preemption_service", True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("joined %s as process %d of %d (%s)", "the JAX runtime", jax.process_index(),
             jax.process_count(), reason or "JAX's environment detection")
    return True

"""Stop requests (preemption notices, Ctrl-C) turned into a checkpoint at a step boundary.

The loop asks `should_stop(step)` after every step; when it says yes, every process
saves the same step and exits cleanly, and the next start resumes from it.

* One process: SIGTERM (the notice Cloud TPU, GKE, SLURM and Docker send before killing)
  and SIGINT (Ctrl-C) set a flag; the step in flight finishes, then the loop stops. A
  second Ctrl-C aborts at once, without a checkpoint.
* Several processes: they must stop after the same step, or their checkpoints would not
  match. JAX's multi-controller runtime already listens for SIGTERM on every process and
  agrees on a step with the others (`multihost_utils.reached_preemption_sync_point`);
  SIGINT on any process is forwarded to that mechanism as a SIGTERM to itself.
"""

from __future__ import annotations

import os
import signal
import types

import jax
from jax.experimental import multihost_utils


class StopRequests:
    """Installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> StopRequests:
        # JAX's runtime owns SIGTERM in a multi-process job: overriding it would break the agreement.
        for sig in (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Whether the loop must checkpoint and stop after `step` (the same step on all processes)."""
        if self._multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None

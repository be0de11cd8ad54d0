"""Stopping on request: SIGTERM (TPU preemption, `kill`) and Ctrl-C save at the next step boundary.

The loop checks `StopRequests.requested` after every step, saves a checkpoint and returns, so the
process exits 0 with nothing lost and the same command resumes. A second Ctrl-C aborts at once
(KeyboardInterrupt, nothing saved since the last checkpoint), for when a save is not wanted.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging


class StopRequests:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step.

    A context manager: the handlers it replaced are put back on exit, so the signals stop the
    process again once the loop is over.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        multi = jax.process_count() > 1
        # With several processes jax.distributed's preemption notifier owns SIGTERM, and
        # manager.reached_preemption(step) stops every process at the same step; a per-process flag
        # would let one process stop while the others wait for it in the next step's collectives.
        # Ctrl-C is routed through that notifier too.
        wanted = {signal.SIGINT: self._interrupt_multi if multi else self._interrupt}
        if not multi:
            wanted[signal.SIGTERM] = self._terminate
        for sig, handler in wanted.items():
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _terminate(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
        self.requested = True

    def _interrupt(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        logging.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                        "(Ctrl-C again aborts without saving)")
        self.requested = True

    def _interrupt_multi(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        logging.warning("Ctrl-C: asking every process to save at the same step and stop (again aborts)")
        self.requested = True
        os.kill(os.getpid(), signal.SIGTERM)

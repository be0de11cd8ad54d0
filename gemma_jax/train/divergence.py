"""Watching for a run that has gone wrong: non-finite steps, and divergence that stays finite.

The train step itself skips the update of a step whose loss or gradient norm is not finite
(train/step.py, `apply_if_finite`) and reports `nonfinite` = 1. This watcher reads that flag one
step late (the next step is already queued, so the device never waits for the host), counts the
skips, and stops the run after `train.max_nonfinite_steps` in a row. It also warns, once in a
while, about the two ways a run fails while staying finite: a loss far above that of uniform
guessing (2 ln V; Gemma's final soft-cap holds a blown-up model near 50) and a gradient norm of
exactly 0.
"""

from __future__ import annotations

import math

import jax
from absl import logging

from gemma_jax.errors import UserError


class DivergedError(UserError):
    """Too many non-finite steps in a row: the run stops without saving or exporting."""


class Watch:
    """Counts non-finite steps; `observe` after every step, `settle` before saving or exporting."""

    WARN_EVERY = 100  # steps between repeated warnings of finite divergence

    def __init__(self, max_in_row: int, vocab_size: int, *, warn=logging.warning):
        self.max_in_row = max(int(max_in_row), 1)
        self.loss_limit = 2.0 * math.log(max(vocab_size, 2))
        self.warn = warn
        self.in_row = self.total = 0
        self._pending = None  # (step, metrics) not yet read back
        self._warned_at = {}

    def observe(self, step: int, metrics) -> None:
        """Queues this step's metrics and reads back the previous step's."""
        previous, self._pending = self._pending, (step, metrics)
        if previous is not None:
            self._read(*previous)

    def settle(self) -> None:
        """Reads back the last step too (before a save, an export, the end)."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._read(*previous)

    def _read(self, step: int, metrics) -> None:
        m = jax.device_get({k: metrics[k] for k in ("nonfinite", "loss", "grad_norm", "tokens") if k in metrics})
        if float(m.get("nonfinite", 0.0)) > 0:
            self.in_row += 1
            self.total += 1
            self.warn(f"step {step}: loss {float(m['loss']):.4g}, grad norm {float(m['grad_norm']):.4g}: not finite, "
                      f"update skipped ({self.in_row} in a row, {self.total} in this run; the run stops after "
                      f"train.max_nonfinite_steps={self.max_in_row} in a row)")
            if self.in_row >= self.max_in_row:
                raise DivergedError(
                    f"{self.in_row} steps in a row up to step {step} had a non-finite loss or gradient (last loss "
                    f"{float(m['loss']):.4g}); stopped without saving them, the latest checkpoint is the last finite "
                    "state. Lower opt.lr, raise opt.warmup_steps, or check the data around that step")
            return
        self.in_row = 0
        loss, norm = float(m["loss"]), float(m["grad_norm"])
        if loss > self.loss_limit:
            self._warn_once("loss", step, f"step {step}: loss {loss:.2f} is above 2 ln(vocab) = {self.loss_limit:.1f}, "
                                          "worse than guessing uniformly: the run has diverged (lower opt.lr)")
        if norm == 0.0 and float(m.get("tokens", 1.0)) > 0:
            self._warn_once("grad", step, f"step {step}: gradient norm is exactly 0: nothing is learned (saturated "
                                          "soft-cap after divergence, or a loss mask with no targets)")

    def _warn_once(self, kind: str, step: int, text: str) -> None:
        last = self._warned_at.get(kind)
        if last is None or step - last >= self.WARN_EVERY:
            self._warned_at[kind] = step
            self.warn(text)

    @property
    def healthy(self) -> bool:
        """Whether the last step read back was finite (a state worth saving)."""
        return self.in_row == 0

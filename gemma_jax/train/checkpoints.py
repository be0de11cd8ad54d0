"""Orbax checkpoints of a training run: save every N steps and on preemption, resume exactly.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, meta}. `params` alone is what
`gemma_jax.load(WORKDIR)` reads (for a LoRA run: the adapters, merged into the base it names);
`meta` holds the step, the RNG and the data iterator position so a resumed run sees exactly the
batches an uninterrupted one would, and a checksum of every array.

What can go wrong with a checkpoint, and what happens:
- the state is not finite (a diverged run): it is not saved, so rotation (`checkpoint.keep`)
  never deletes the last finite step for it;
- an async save fails (full disk, lost bucket permission): the next step boundary raises it,
  and the last complete step stays the latest;
- a saved step is damaged later (truncated or rewritten file, missing meta): restore checks
  shapes, finiteness and the checksums, moves the step to WORKDIR/checkpoints_damaged/ and
  falls back to the newest step that reads back intact, naming what it skipped.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gemma_jax import paths
from gemma_jax.errors import UserError

DAMAGED = "checkpoints_damaged"


class CheckpointError(UserError):
    """No usable checkpoint, or a save that failed: the run stops and says which."""


def checkpoints_dir(workdir: str) -> str:
    """WORKDIR/checkpoints (a local absolute path, or a gs:// URL that Orbax writes directly)."""
    return paths.join(paths.absolute(workdir), "checkpoints")


def has_train_checkpoint(workdir: str) -> bool:
    """Whether the workdir holds at least one saved training step."""
    d = paths.Path(checkpoints_dir(workdir))
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


@jax.jit
def checksums(tree):
    """Per leaf [sum, sum of |x|] in float32: cheap next to a save, and any rewritten chunk or NaN
    moves them. Returned as one [leaves, 2] array."""
    rows = [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))])
            for x in jax.tree.leaves(tree)]
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.float32)


def _sums_match(stored, actual) -> bool:
    # Another mesh adds in another order: float32 sums agree to ~1e-6 relative, garbage does not.
    stored, actual = np.asarray(stored, np.float64), np.asarray(actual, np.float64)
    return stored.shape == actual.shape and bool(np.allclose(actual, stored, rtol=1e-3, atol=1e-3))


def _layout_mismatch(e: Exception) -> bool:
    """Whether a restore failed because the config expects other arrays (tree or shapes) rather
    than because the files are damaged."""
    text = str(e)
    return isinstance(e, ValueError) and ("tree structures do not match" in text or "shape mismatch" in text.lower()
                                          or "does not match the shape" in text)


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (so all of them fall back to the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class TrainCheckpoints:
    """A CheckpointManager over the train state dict {step, params, opt_state, rng} and the data iterator."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.workdir = paths.absolute(workdir)
        self.every_steps = max(int(every_steps), 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(checkpoints_dir(workdir), options=options,
                                             item_names=("params", "opt_state", "meta"))
        self.saving: int | None = None  # step of a save that may still be writing

    def latest_step(self):
        """Most recent saved step, or None."""
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the cluster signals preemption (multi-host TPU)."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # no distributed client (single process)
            return False

    def check(self, *, wait: bool = False) -> None:
        """Raises the error of an async save that failed (called at every step boundary; with
        `wait`, after the save in flight has finished)."""
        if self.saving is None:
            return
        try:
            # Orbax keeps a failed save's error on its finalize thread until someone joins it; join
            # as soon as the save is over (at once when it is: no waiting). With several processes
            # only the non-blocking check runs here, so no process waits where the others do not.
            done = wait or (jax.process_count() == 1 and not self._save_running())
            if done:
                self.manager.wait_until_finished()
            self.manager.check_for_errors()
            if done:
                self.saving = None
        except Exception as e:  # noqa: BLE001 (any storage error; re-raised with what it means)
            self._failed(e)

    def _save_running(self) -> bool:
        # A failed save never clears is_saving_in_progress(); its finalize thread does end.
        thread = getattr(self.manager, "_finalize_thread", None)
        thread = thread.get() if hasattr(thread, "get") else thread
        if isinstance(thread, threading.Thread):
            return thread.is_alive()
        return self.manager.is_saving_in_progress()

    def _failed(self, e: Exception):
        step, self.saving = self.saving, None
        cause = str(e).splitlines()[0] if str(e) else ""
        cause = cause.split(" [tensorstore_spec=")[0][:400]  # TensorStore appends its whole spec
        raise CheckpointError(
            f"saving the checkpoint of step {step} failed: {type(e).__name__}: {cause}. Training stopped; the "
            f"latest complete checkpoint is step {self._complete_before(step)} (free space or fix access to "
            f"{checkpoints_dir(self.workdir)}, then run the same command to resume)") from e

    def _complete_before(self, step):
        done = [s for s in self.manager.all_steps() if s < step]
        return max(done) if done else "none"

    def maybe_save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Saves at multiples of every_steps, or now when forced (end of run, preemption).

        A state that is not finite everywhere is never saved (CheckpointError): rotation would
        otherwise delete the last good step in its favour."""
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        self.check()
        sums = {k: np.asarray(jax.device_get(checksums(state[k]))) for k in ("params", "opt_state")}
        bad = [k for k, s in sums.items() if not np.all(np.isfinite(s))]
        if bad:
            raise CheckpointError(f"step {step}: the {' and '.join(bad)} hold NaN or inf; not saved, so the "
                                  f"latest checkpoint stays step {self._complete_before(step)}")
        meta = dict(step=int(step), rng=[int(x) for x in np.asarray(jax.device_get(state["rng"])).ravel()],
                    data=data_iter.get_state(), checksums={k: s.tolist() for k, s in sums.items()})
        try:  # waits for the previous save first, and raises its error
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001
            self.saving = self.saving or step
            self._failed(e)
        self.saving = step
        logging.info("checkpoint: saving step %d", step)
        return True

    def restore(self, trainer, data_iter):
        """The newest intact state in the trainer's shardings; moves the data iterator to where it was.

        Steps that fail to read back, or whose arrays do not match their checksums, are moved
        aside (WORKDIR/checkpoints_damaged/<step>) and the next older one is tried."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self._read(step, trainer)
                problem = self._verify(state, meta)
            except Exception as e:  # noqa: BLE001 (TensorStore, JSON errors: all mean unreadable)
                if _layout_mismatch(e):  # the config's fault, not the checkpoint's: keep it
                    raise CheckpointError(
                        f"checkpoint step {step} in {checkpoints_dir(self.workdir)} stores a different layout of "
                        "params or optimizer state than this config builds (a changed LoRA target, weight-decay "
                        f"mask or model shape): {str(e).splitlines()[0][:300]}. Run with the settings the "
                        "workdir was trained with, or use another --workdir") from e
                problem = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if not _all_processes(problem is None):
                problem = problem or "damaged on another process"
                skipped.append(step)
                self._quarantine(step, problem)
                continue
            data_iter.set_state(meta["data"])
            if skipped:
                logging.warning("checkpoint: resumed from step %d, the newest intact one (skipped damaged %s)",
                                step, ", ".join(map(str, skipped)))
            else:
                logging.info("checkpoint: resumed from step %d", step)
            return state
        if skipped:
            raise CheckpointError(
                f"every checkpoint in {checkpoints_dir(self.workdir)} is damaged (steps {', '.join(map(str, skipped))}, "
                f"moved to {paths.join(self.workdir, DAMAGED)}); nothing to resume from. Run again to start from "
                "step 0, or use another --workdir")
        return None

    def _read(self, step: int, trainer):
        shapes = trainer.param_shapes
        opt_shapes = jax.eval_shape(trainer.tx.init, shapes)
        sh = trainer.state_sharding
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(shapes, sh["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(opt_shapes, sh["opt_state"])),
            meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if not isinstance(meta, dict) or "step" not in meta or "data" not in meta:
            raise ValueError("meta is missing or incomplete")
        rng = jax.device_put(jnp.asarray(np.asarray(meta["rng"], np.uint32)), sh["rng"])
        state = dict(step=jax.device_put(jnp.int32(meta["step"]), sh["step"]), params=restored["params"],
                     opt_state=restored["opt_state"], rng=rng)
        return state, meta

    @staticmethod
    def _verify(state, meta) -> str | None:
        """None if the arrays are finite and match the checksums saved with them, else what is wrong."""
        for k in ("params", "opt_state"):
            actual = np.asarray(jax.device_get(checksums(state[k])))
            if not np.all(np.isfinite(actual)):
                return f"{k} hold NaN or inf"
            stored = meta.get("checksums", {}).get(k)
            if stored is not None and not _sums_match(stored, actual):
                return f"{k} do not match the checksums saved with them (a file was changed after the save)"
        return None

    def _quarantine(self, step: int, problem: str) -> None:
        dst = paths.join(self.workdir, DAMAGED, f"{step}-{int(time.time())}")
        logging.warning("checkpoint: step %d is damaged (%s): moved to %s, trying the previous one", step, problem, dst)
        if jax.process_index() == 0:
            paths.Path(paths.join(self.workdir, DAMAGED)).mkdir(parents=True, exist_ok=True)
            paths.Path(paths.join(checkpoints_dir(self.workdir), str(step))).rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager.reload()

    def close(self):
        """Waits for async saves to finish; raises if the last one failed."""
        try:
            self.check(wait=True)
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

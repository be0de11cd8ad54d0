"""Orbax checkpoints of a training run: save every N steps and on preemption, resume exactly.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, meta}. `params` alone is what
`gemma_jax.load(WORKDIR)` reads (for a LoRA run: the adapters, merged into the base it names); `meta` holds the step, the RNG and the data iterator position
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gemma_jax import paths



def checkpoints_dir(workdir: str) -> str:
    """WORKDIR/checkpoints (a local absolute path, or a gs:// URL that Orbax writes directly)."""
    return paths.join(paths.absolute(workdir), "checkpoints")


def has_train_checkpoint(workdir: str) -> bool:
    """Whether the workdir holds at least one saved training step."""
    d = paths.Path(checkpoints_dir(workdir))
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


class TrainCheckpoints:
    """A CheckpointManager over the train state dict {step, params, opt_state, rng} and the data iterator."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.every_steps = max(int(every_steps), 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(checkpoints_dir(workdir), options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self):
        """Most recent saved step, or None."""
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the cluster signals preemption (multi-host TPU)."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # no distributed client (single process)
            return False

    def maybe_save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Saves at multiples of every_steps, or now when forced (end of run, preemption)."""
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        meta = dict(step=int(step), rng=[int(x) for x in np.asarray(jax.device_get(state["rng"])).ravel()],
                    data=data_iter.get_state())
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta)), force=True)
        logging.info("checkpoint: saving step %d", step)
        return True

    def restore(self, trainer, data_iter):
        """The latest state in the trainer's shardings; moves the data iterator to where it was."""
        step = self.manager.latest_step()
        shapes = trainer.param_shapes
        opt_shapes = jax.eval_shape(trainer.tx.init, shapes)
        sh = trainer.state_sharding
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(shapes, sh["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(opt_shapes, sh["opt_state"])),
            meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        data_iter.set_state(meta["data"])
        rng = jax.device_put(jnp.asarray(np.asarray(meta["rng"], np.uint32)), sh["rng"])
        logging.info("checkpoint: resumed from step %d", step)
        return dict(step=jax.device_put(jnp.int32(meta["step"]), sh["step"]), params=restored["params"],
                    opt_state=restored["opt_state"], rng=rng)

    def close(self):
        """Waits for async saves to finish."""
        self.manager.wait_until_finished()
        self.manager.close()

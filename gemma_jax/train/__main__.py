"""`python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=DIR [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import json
import logging as logging_std
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gemma_jax.train import loop


def _maybe_init_distributed(flags_values) -> None:
    """jax.distributed.initialize() on multi-process launches (flags, env, TPU pods, SLURM)."""
    if flags_values.coordinator_address or flags_values.num_processes:
        jax.distributed.initialize(coordinator_address=flags_values.coordinator_address or None,
                                   num_processes=flags_values.num_processes or None,
                                   process_id=flags_values.process_id if flags_values.num_processes else None)
        return
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multi:
        jax.distributed.initialize()


class _QuietLibraries(logging_std.Filter):
    """Keeps library INFO chatter (Orbax logs every save step by step) off the console."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or not any(
            f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "jax", "grain", "etils"))


def main(argv) -> None:
    """Entry point of `python -m gemma_jax.train`."""
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())

    flags_values = flags.FLAGS
    _maybe_init_distributed(flags_values)
    cfg = flags_values.config
    metrics = loop.run(cfg, flags_values.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}))


def define_flags() -> None:
    """The flags of `python -m gemma_jax.train`."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/legal.py:tiny.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events, plots.")
    flags.DEFINE_string("coordinator_address", os.environ.get("GEMMA_JAX_COORDINATOR", ""),
                        "host:port of process 0, for clusters JAX does not detect.")
    flags.DEFINE_integer("num_processes", int(os.environ.get("GEMMA_JAX_NUM_PROCESSES", "0")), "Processes in the job.")
    flags.DEFINE_integer("process_id", int(os.environ.get("GEMMA_JAX_PROCESS_ID", "0")), "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)

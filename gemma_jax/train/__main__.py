"""`python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=DIR [--config.KEY=VALUE ...]`.

  python -m gemma_jax.train --config=configs/legal.py:tiny --show_config   # every key, value, meaning
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import flags, logging

from gemma_jax import cli, config as config_lib, errors
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


def main(fv: flags.FlagValues, args: list[str]) -> int:
    """Entry point of `python -m gemma_jax.train`."""
    cli.no_positional(args)
    cfg = fv.config
    note = config_lib.adjust_eval_for_train_override(cfg, config_lib.overridden_keys(fv))
    if fv.show_config:
        print(config_lib.describe(cfg))
        return 0
    if not fv.workdir:
        raise errors.UserError("--workdir is required (where checkpoints, metrics.jsonl and the export go)")
    if note:
        logging.warning(note)
    _maybe_init_distributed(fv)
    metrics = loop.run(cfg, fv.workdir)
    if jax.process_index() == 0:
        print(json.dumps(cli.rounded(metrics)))
    return 0


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.train`."""
    config_lib.define_config_flag("config", None, "experiment config file, e.g. configs/legal.py:tiny (or a workdir to "
                      "re-run with its recorded config); override keys with --config.KEY=VALUE", flag_values=fv)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, plots", flag_values=fv)
    flags.DEFINE_bool("show_config", False, "print every config key with its value and meaning, then exit "
                      "(no training; --workdir not needed)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", os.environ.get("GEMMA_JAX_COORDINATOR", ""),
                        "host:port of process 0, for clusters JAX does not detect", flag_values=fv)
    flags.DEFINE_integer("num_processes", int(os.environ.get("GEMMA_JAX_NUM_PROCESSES", "0")),
                         "processes in the job", flag_values=fv)
    flags.DEFINE_integer("process_id", int(os.environ.get("GEMMA_JAX_PROCESS_ID", "0")), "this process's index",
                         flag_values=fv)
    cli.require(fv, "config")


def run(argv: list[str] | None = None) -> int:
    """`python -m gemma_jax.train` (argv None) or the same flags in-process."""
    return cli.run(main, define_flags, argv, prog="python -m gemma_jax.train")


if __name__ == "__main__":
    sys.exit(run())

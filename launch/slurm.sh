#!/bin/bash
# gemma_jax on a SLURM GPU cluster: one trainer process per GPU (default) or per node.
#
#   sbatch --nodes=2 launch/slurm.sh --config=configs/legal.py:9b --workdir=/shared/runs/legal_9b
#   sbatch --nodes=2 --ntasks-per-node=1 launch/slurm.sh --config=... --workdir=...   # per node
#
# Arguments are passed to `python -m gemma_jax.train` unchanged (add --config.KEY=VALUE overrides).
# Submit from the repository root (configs' relative paths resolve there; or set GEMMA_JAX_DIR),
# with the environment that has gemma_jax[gpu] installed active (sbatch exports it) or PYTHON set.
# The workdir must be on a file system every node sees.
#
# With more than one task, the trainer calls jax.distributed.initialize(), which reads the
# coordinator (first node of the step), process count and index from SLURM_* variables, and
# with one task per GPU gives each process the GPU of its SLURM_LOCALID. With one task per node,
# JAX_LOCAL_DEVICE_IDS below gives the process every GPU of its node instead.
#
# Time limit and preemption: --signal sends SIGTERM to the tasks 5 minutes before the limit;
# the trainer then saves a checkpoint and exits 0. --requeue puts a preempted job back in the
# queue, and every run resumes from the workdir's latest checkpoint, so for runs longer than
# the time limit submit a chain that runs one after another:
#   for i in 1 2 3; do sbatch --dependency=singleton launch/slurm.sh --config=... --workdir=...; done
#
#SBATCH --job-name=gemma_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ $# -eq 0 ]; then
  echo "usage: sbatch [SBATCH OPTIONS] launch/slurm.sh --config=CONFIG --workdir=DIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi

# A quoted "~/..." (or one after `=`) reaches us unexpanded: expand a leading ~ as the shell would.
# The trainer itself resolves ~ and relative paths in its own flags (relative to the directory below).
expand_home() { case "$1" in "~") printf '%s' "$HOME" ;; "~/"*) printf '%s' "$HOME/${1#\~/}" ;; *) printf '%s' "$1" ;; esac; }
cd "$(expand_home "${GEMMA_JAX_DIR:-${SLURM_SUBMIT_DIR:-.}}")"
PYTHON="$(expand_home "${PYTHON:-python}")"

if [ "${SLURM_NTASKS_PER_NODE:-}" = "1" ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
  if [ "${gpus:-0}" -gt 0 ]; then
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
    export JAX_LOCAL_DEVICE_IDS
  fi
fi

echo "gemma_jax: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-1} processes," \
     "restart ${SLURM_RESTART_COUNT:-0}, $(pwd)"

srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" -m gemma_jax.train "$@"

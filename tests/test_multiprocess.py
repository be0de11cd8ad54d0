"""Multi-process training: 2 processes on localhost (jax.distributed, gloo) against one process.

Each child is the real command line, `python -m gemma_jax.train`, on CPU with its own virtual
devices: 2 processes x 2 devices against 1 process x 4 devices, with the same mesh (fsdp=4, so
weights and optimizer state are sharded across the processes) and the same global batch. The data
is split by process (each keeps its rows of the global batch), both processes write their shards
of one checkpoint, and the run is resumed from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import portpicker
import pytest

from gemma_jax.train import __main__ as train_main

REPO = Path(__file__).resolve().parents[1]

# The legal tiny config shrunk to a 2-layer, width-64 model; constant LR after warmup so that a
# run stopped at step 3 and resumed to step 6 follows the same curve as one run of 6 steps.
SMALL = ["--config=configs/legal.py:tiny", "--config.model.num_layers=2", "--config.model.embed_dim=64",
         "--config.model.hidden_dim=128", "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
         "--config.model.head_dim=16", "--config.data.seq_len=128", "--config.data.eval=",
         "--config.train.batch_size=4", "--config.train.log_every=1", "--config.train.progress=False",
         "--config.train.export_format=", "--config.opt.schedule=constant", "--config.opt.warmup_steps=2",
         "--config.checkpoint.every_steps=3", "--config.mesh.data=1", "--config.mesh.fsdp=4",
         "--config.mesh.tensor=1",
         # The runs below stop at step 3 and resume with more train.steps (constant lr: same curve).
         "--config.train.allow_changes=True"]
TIMEOUT = 240  # seconds per phase; a hang fails the test with the children's logs


@pytest.fixture(scope="module")
def compile_cache() -> Path:
    """The suite's persistent XLA compilation cache (tests/conftest.py), shared by the children:
    later phases, and later test runs, skip most compiles."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


def _env(devices: int, cache: Path) -> dict[str, str]:
    """The parent's environment without its XLA_FLAGS (8 devices), with `devices` CPU devices."""
    env = {k: v for k, v in os.environ.items()
           if k != "XLA_FLAGS" and not k.startswith(("GEMMA_JAX_", "JAX_COORDINATOR", "SLURM_", "TPU_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class Job:
    """Trainer processes started together; their output goes to files (no pipe can fill up)."""

    def __init__(self, tmp_path: Path, name: str, workdir: Path, steps: int, *, processes: int,
                 devices: int, cache: Path, via_env: bool = False, extra: tuple[str, ...] = ()):
        self.name, self.procs, self.logs = name, [], []
        port = portpicker.pick_unused_port()
        for i in range(processes):
            args = [sys.executable, "-m", "gemma_jax.train", *SMALL, f"--workdir={workdir}",
                    f"--config.train.steps={steps}", *extra]
            env = _env(devices, cache)
            if processes > 1 and via_env:  # the same settings from the environment
                env.update(GEMMA_JAX_COORDINATOR=f"127.0.0.1:{port}", GEMMA_JAX_NUM_PROCESSES=str(processes),
                           GEMMA_JAX_PROCESS_ID=str(i))
            elif processes > 1:
                args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                         f"--process_id={i}"]
            log = tmp_path / f"{name}_{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))

    def output(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text()[-tail:]}" for log in self.logs)

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        """Exit codes; kills every process and fails with their logs on a timeout or a failure."""
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name}: no exit within {timeout}s (hung?)\n{self.output()}")
        rcs = [p.returncode for p in self.procs]
        if any(rcs):
            pytest.fail(f"{self.name}: exit codes {rcs}\n{self.output()}")
        return rcs


def losses(workdir: Path) -> list[dict]:
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_curves_match(got: list[dict], want: list[dict], steps: list[int]):
    assert [r["step"] for r in got] == steps, [r["step"] for r in got]
    assert [r["step"] for r in want] == steps
    for key, rtol in (("loss", 1e-5), ("accuracy", 1e-6), ("learning_rate", 1e-6), ("grad_norm", 1e-4),
                      ("target_tokens", 0)):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=rtol, atol=1e-7,
                                   err_msg=f"{key} of 2 processes vs 1 process")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compile_cache):
    """A 2-process run to step 3, resumed to step 6, and the 1-process reference run of 6 steps."""
    tmp = tmp_path_factory.mktemp("runs")
    multi, single = tmp / "multi", tmp / "single"
    # The reference runs alongside the first phase: on a 2-core machine they overlap well.
    reference = Job(tmp, "single", single, 6, processes=1, devices=4, cache=compile_cache)
    first = Job(tmp, "multi_first", multi, 3, processes=2, devices=2, cache=compile_cache)
    try:
        first.wait()
        reference.wait()
    finally:
        first.kill()
        reference.kill()
    after_first = dict(steps=[r["step"] for r in losses(multi)], saved=saved_steps(multi))
    # Resume to step 6, with the distributed settings from the environment this time, and export.
    second = Job(tmp, "multi_resume", multi, 6, processes=2, devices=2, cache=compile_cache, via_env=True,
                 extra=("--config.train.export_format=hf",))
    second.wait()
    return SimpleNamespace(multi=multi, single=single, after_first=after_first, second=second)


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(runs):
    """2 processes x 2 devices = 1 process x 4 devices, step for step, through a save and a restore."""
    assert runs.after_first == dict(steps=[1, 2, 3], saved=[3])
    for log in runs.second.logs:
        assert "resumed from step 3" in log.read_text(), runs.second.output()
    assert saved_steps(runs.multi) == [3, 6] and saved_steps(runs.single) == [3, 6]
    _assert_curves_match(losses(runs.multi), losses(runs.single), list(range(1, 7)))

    # Both processes wrote their shards of one checkpoint: the final weights equal the reference's.
    import gemma_jax
    _, params_multi = gemma_jax.load(str(runs.multi))
    _, params_single = gemma_jax.load(str(runs.single))
    flat_m, flat_s = jax.tree_util.tree_leaves_with_path(params_multi), jax.tree.leaves(params_single)
    assert len(flat_m) == len(flat_s)
    for (path, a), b in zip(flat_m, flat_s):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step(runs, tmp_path, compile_cache):
    """Preemption of one host: all processes save the same step and exit 0; nobody hangs."""
    workdir = tmp_path / "wd"
    shutil.copytree(runs.multi, workdir)  # resumes at step 6: no init, compiled steps from the cache
    job = Job(tmp_path, "sigterm", workdir, 500, processes=2, devices=2, cache=compile_cache,
              extra=("--config.checkpoint.every_steps=1000",))
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and all(p.poll() is None for p in job.procs):
            if losses(workdir)[-1]["step"] >= 8:
                break
            time.sleep(0.2)
        assert losses(workdir)[-1]["step"] >= 8, job.output()
        job.procs[1].send_signal(signal.SIGTERM)
        try:
            for p in job.procs:
                p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM to process 1 left the job hanging (no exit within 20 s)\n" + job.output())
    finally:
        job.kill()
    assert [p.returncode for p in job.procs] == [0, 0], job.output()
    reached = losses(workdir)[-1]["step"]
    assert 8 <= reached < 500 and saved_steps(workdir) == [6, reached], job.output()


@pytest.mark.slow
def test_export_after_multi_process_training(runs):
    """The HF export at the end of the resumed 2-process run (weights sharded across the processes)
    is complete: it loads back equal to the trained checkpoint."""
    import gemma_jax
    _, exported = gemma_jax.load(str(runs.multi / "export"))
    _, trained = gemma_jax.load(str(runs.multi))
    assert len(jax.tree.leaves(exported)) == len(jax.tree.leaves(trained))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- _maybe_init_distributed


@pytest.fixture
def init_calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them; a clean cluster environment."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for k in list(os.environ):
        if k.startswith(("SLURM_", "TPU_", "JAX_COORDINATOR", "GEMMA_JAX_")):
            monkeypatch.delenv(k)
    return calls


def _flags(coordinator_address="", num_processes=0, process_id=0):
    return SimpleNamespace(coordinator_address=coordinator_address, num_processes=num_processes,
                           process_id=process_id)


def test_explicit_flags_are_passed_to_initialize(init_calls):
    train_main._maybe_init_distributed(_flags("10.0.0.1:1234", 4, 3))
    assert init_calls == [((), dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3))]


@pytest.mark.parametrize("env", [dict(SLURM_NTASKS="16"), dict(TPU_WORKER_HOSTNAMES="w0,w1,w2,w3"),
                                 dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:8476")])
def test_detected_clusters_call_initialize_without_arguments(init_calls, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train_main._maybe_init_distributed(_flags())
    assert init_calls == [((), {})]


@pytest.mark.parametrize("env", [{}, dict(SLURM_NTASKS="1"), dict(TPU_WORKER_HOSTNAMES="w0")])
def test_single_process_does_not_initialize(init_calls, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train_main._maybe_init_distributed(_flags())
    assert init_calls == []


def test_coordinator_alone_leaves_count_and_index_to_jax(init_calls):
    train_main._maybe_init_distributed(_flags("10.0.0.1:1234"))
    assert init_calls == [((), dict(coordinator_address="10.0.0.1:1234", num_processes=None, process_id=None))]

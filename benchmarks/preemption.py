"""Time from SIGTERM / Ctrl-C to exit, measured on the tiny config, and projected for the 2b recipe.

  python benchmarks/preemption.py [--signal INT|TERM] [--disk_dir /tmp]

1. Runs `python -m gemma_jax.train --config=configs/legal.py:tiny` in a subprocess, sends the
   signal once steps are being logged, and times signal -> exit (the trainer saves the state at
   the end of the current step, waits for the write, exits 0).
2. Measures this machine's sequential write speed (1 GiB, fsync) in --disk_dir.
3. Projects the 2b recipe's exit time: one step (the planner's step time is not known on CPU,
   so --step_s, default 2 s, an H200/v5e-8 order of magnitude) + the checkpoint bytes (params in
   float32 plus AdamW's two float32 moments; LoRA: the adapters only) / the write speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def signal_to_exit(sig: int, workdir: str) -> tuple[float, int, int]:
    """(seconds from signal to exit, exit code, step saved) of one tiny training run."""
    cmd = [sys.executable, "-m", "gemma_jax.train", "--config=configs/legal.py:tiny", f"--workdir={workdir}",
           "--config.train.steps=100000", "--config.train.log_every=1", "--config.train.progress=False",
           "--config.checkpoint.every_steps=100000"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = open(os.path.join(workdir + ".log"), "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(metrics) and sum('"loss"' in line for line in open(metrics)) >= 5:
            break
        time.sleep(0.05)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    rc = proc.wait(timeout=600)
    elapsed = time.perf_counter() - t0
    steps = [int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()]
    return elapsed, rc, max(steps) if steps else -1


def write_speed(directory: str, size: int = 1 << 30) -> float:
    """Bytes per second of a sequential fsync'ed write of `size` bytes."""
    block = os.urandom(16 << 20)
    path = os.path.join(directory, "write_speed.bin")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t0
    os.remove(path)
    return size / elapsed


def checkpoint_bytes(preset: str, lora_rank: int = 0) -> int:
    """Bytes a train checkpoint of `preset` holds: float32 params + two float32 AdamW moments."""
    import jax

    from gemma_jax.model import layers, lora
    from gemma_jax.model.config import ModelConfig

    config = ModelConfig.from_preset(preset)
    shapes = layers.param_shapes(config)
    if lora_rank:
        import jax.numpy as jnp

        from gemma_jax.config import DEFAULT_LORA_TARGETS
        shapes = lora.shapes(shapes, lora_rank, DEFAULT_LORA_TARGETS, jnp.float32)
    n = sum(x.size for x in jax.tree.leaves(shapes))
    return 3 * 4 * n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--signal", default="TERM", choices=["TERM", "INT"])
    ap.add_argument("--disk_dir", default=tempfile.gettempdir())
    ap.add_argument("--step_s", type=float, default=2.0, help="assumed 2b step time for the projection")
    args = ap.parse_args()
    sig = signal.SIGTERM if args.signal == "TERM" else signal.SIGINT
    with tempfile.TemporaryDirectory() as tmp:
        elapsed, rc, step = signal_to_exit(sig, os.path.join(tmp, "wd"))
    print(f"tiny config: SIG{args.signal} -> exit {elapsed:.1f} s (exit code {rc}, saved step {step})")
    speed = write_speed(args.disk_dir)
    print(f"disk write speed in {args.disk_dir}: {speed / 1e6:.0f} MB/s")
    out = {"tiny_signal_to_exit_s": round(elapsed, 2), "exit_code": rc, "disk_MBps": round(speed / 1e6)}
    for name, preset, rank in (("2b full", "gemma2_2b", 0), ("2b lora16", "gemma2_2b", 16)):
        size = checkpoint_bytes(preset, rank)
        total = args.step_s + size / speed
        verdict = "fits" if total <= 30 else "does NOT fit"
        print(f"{name}: checkpoint {size / 2**30:.1f} GiB -> ~{total:.0f} s to exit at {speed / 1e6:.0f} MB/s "
              f"({verdict} a 30 s preemption notice)")
        out[f"{name} checkpoint_GiB"] = round(size / 2**30, 2)
        out[f"{name} exit_s"] = round(total, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

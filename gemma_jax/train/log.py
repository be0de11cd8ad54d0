"""Training metrics: progress bar, stdout lines, metrics.jsonl, TensorBoard events, plots/.

Only process 0 writes. Each logged step carries loss, perplexity, accuracy, learning rate,
gradient norm, tokens/s, step time, an MFU estimate and device memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gemma_jax import paths

# Dense bf16 peak FLOP/s per chip, by the start of jax's device_kind.
_PEAK_FLOPS = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "Tesla T4": 65e12, "NVIDIA A10G": 125e12,
}


def peak_flops_per_device() -> float:
    """Peak FLOP/s of one local device: a table for accelerators, a measured matmul on CPU."""
    dev = jax.local_devices()[0]
    for name, peak in _PEAK_FLOPS.items():
        if dev.device_kind.startswith(name):
            return peak
    if dev.platform != "cpu":
        return 0.0
    # CPU: the fastest of a few float32 matmuls (the fastest, as other load only slows them).
    # Virtual CPU devices share the real cores, so this is the machine's peak, and MFU is
    # reported against the whole machine.
    n = 1536
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def memory_bytes() -> int:
    """Peak device memory in use (accelerators) or peak host RSS (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _tensorboard_dir(workdir) -> str:
    """WORKDIR/tensorboard, or for a remote workdir a local directory copied there at the end."""
    if not paths.is_remote(workdir):
        return os.path.join(workdir, "tensorboard")
    name = paths.absolute(workdir).split("://", 1)[1].replace("/", "_")
    return os.path.join(tempfile.gettempdir(), "gemma_jax_tensorboard", name)


def _tensorboard(logdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events")
        return None
    return SummaryWriter(logdir=logdir)


class Logger:
    """Collects step metrics and writes them wherever the user looks."""

    def __init__(self, workdir, *, config, seq_len, batch_size, total_steps, start_step, progress=True, stats=None):
        self.main = jax.process_index() == 0
        self.workdir, self.total, self.start = workdir, total_steps, start_step
        self.flops_per_token = config.flops_per_token(seq_len)
        self.positions_per_step = batch_size * seq_len
        self.peak = peak_flops_per_device() * (jax.device_count() if jax.local_devices()[0].platform != "cpu" else 1)
        self.pending: list[tuple[int, Any]] = []
        self.t_last, self.step_last = time.perf_counter(), start_step
        self.t_start = self.t_last
        self.history: list[dict] = []
        self.last: dict[str, Any] = {}
        self.bar = None
        if not self.main:
            return
        self.jsonl = paths.JsonlWriter(paths.join(workdir, "metrics.jsonl"))
        self.tb_dir = _tensorboard_dir(workdir)
        self.tb = _tensorboard(self.tb_dir)
        if stats:
            logging.info("data: %s", json.dumps(stats, default=str))
            self._write({"step": start_step, "data_stats": stats})
        if progress:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                file=sys.stdout, mininterval=1.0)
            except ImportError:
                self.bar = None

    def _write(self, record):
        self.jsonl.write(json.dumps(record) + "\n")

    def step(self, step: int, metrics, *, log: bool):
        """Records one step; every log step it syncs with the device and writes everything."""
        self.pending.append((step, metrics))
        if self.bar is not None:
            self.bar.update(1)
        if not log:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        now = time.perf_counter()
        steps = step - self.step_last
        elapsed = max(now - self.t_last, 1e-9)
        tokens = sum(float(m["tokens"]) for m in fetched)
        m = {k: float(v) for k, v in fetched[-1].items()}
        # Trained tokens per second (loss-masked tokens are what the update learns from); the
        # FLOP rate counts every position of every row, which is what the hardware computes.
        record = dict(step=step, loss=m["loss"], perplexity=float(np.exp(min(m["loss"], 50.0))),
                      accuracy=m["accuracy"], learning_rate=m["learning_rate"], grad_norm=m["grad_norm"],
                      target_tokens=tokens, tokens_per_second=tokens / elapsed, step_time=elapsed / steps,
                      memory_bytes=memory_bytes())
        record["mfu"] = self.mfu(record["step_time"])
        # Objective-specific metrics (preference: rewards/chosen, rewards/margins, logps/..., ...).
        record.update({k: v for k, v in m.items() if k not in record and k != "tokens"})
        self.pending, self.t_last, self.step_last = [], now, step
        self.last = record
        self.history.append(record)
        if not self.main:
            return
        self._write(record)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        eta = (self.total - step) * record["step_time"]
        line = (f"step {step}/{self.total} loss {record['loss']:.4f} acc {record['accuracy']:.3f} "
                f"lr {record['learning_rate']:.2e} gnorm {record['grad_norm']:.3f} "
                f"tok/s {record['tokens_per_second']:.0f} step {record['step_time'] * 1e3:.0f}ms mfu {record['mfu']:.1%} "
                f"eta {eta:.0f}s")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def mfu(self, step_time: float) -> float:
        """Model FLOPs utilisation of a step that took step_time seconds."""
        if not self.peak:
            return 0.0
        return self.flops_per_token * self.positions_per_step / step_time / self.peak

    def eval(self, step: int, metrics: dict[str, float]):
        """Writes eval metrics."""
        if not self.main:
            return
        record = dict(step=step, **{k: float(v) for k, v in metrics.items()})
        self._write(record)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", float(v), step)
        msg = f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> dict[str, Any]:
        """Flushes everything, draws plots/loss.png; returns the last logged metrics."""
        if self.main:
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
                if paths.is_remote(self.workdir):
                    paths.copy_tree(self.tb_dir, paths.join(self.workdir, "tensorboard"))
            self.jsonl.close()
            plot_metrics(paths.join(self.workdir, "metrics.jsonl"), paths.join(self.workdir, "plots"))
        return dict(self.last)


def plot_metrics(jsonl_path: str, out_dir: str) -> list[str]:
    """Loss (train and eval) and learning-rate curves from metrics.jsonl as PNGs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plots")
        return []
    records = [json.loads(line) for line in paths.Path(jsonl_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.set_title("loss"), ax1.legend()
    ax2.plot([r["step"] for r in train], [r["learning_rate"] for r in train])
    ax2.set_xlabel("step"), ax2.set_title("learning rate")
    fig.tight_layout()
    with paths.staged_dir(out_dir) as local:
        fig.savefig(os.path.join(local, "loss.png"), dpi=100)
    plt.close(fig)
    return [paths.join(out_dir, "loss.png")]

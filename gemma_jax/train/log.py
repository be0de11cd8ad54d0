"""Training metrics: progress bar, stdout lines, metrics.jsonl, TensorBoard events, plots/.

Only process 0 writes. Each logged step carries loss, perplexity, accuracy, learning rate,
gradient norm, tokens/s, step time, an MFU estimate and device memory. A preference objective
logs no perplexity (exp of a DPO loss means nothing), its accuracy is the reward accuracy, its
line adds the chosen and rejected responses' summed log-probs (metrics.jsonl also has them per
token), its tokens are both sides' response tokens, and the MFU counts two sequences per pair plus, for DPO
with a live reference, the reference's forward of both.
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

from gemma_jax import cli, paths

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


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _AboveBar:
    """A console stream that clears the progress bar before each write and redraws it after, so
    log records (stderr) land on their own lines above the bar instead of glued to it."""

    def __init__(self, stream, bar):
        self.stream, self.bar = stream, bar

    def write(self, text):
        with self.bar.external_write_mode(file=self.stream):
            return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __eq__(self, other):  # absl compares its handler's stream with sys.stderr
        return other is self or self.stream == other

    __hash__ = object.__hash__

    def __getattr__(self, name):
        return getattr(self.stream, name)


PLAIN_EVERY_S = 60.0  # not a terminal: a plain progress line at least this often between log lines


class Logger:
    """Collects step metrics and writes them wherever the user looks.

    On a terminal a progress bar advances every step (it waits for the previous step's loss, so
    one step stays in flight and the bar and its ETA follow the device, not the dispatch) with
    log lines and log records above it. Elsewhere (a log file, CI, a notebook's captured
    stdout) there is no bar and no carriage return: the log lines, plus a plain progress line at
    least every PLAIN_EVERY_S seconds. A run that has nothing left to train (start_step ==
    total_steps) draws nothing and leaves metrics.jsonl as it was unless it logs an eval.
    """

    def __init__(self, workdir, *, config, seq_len, batch_size, total_steps, start_step, progress=True, stats=None,
                 stream=None, objective=None, lora=False):
        self.main = jax.process_index() == 0
        self.workdir, self.total, self.start = workdir, total_steps, start_step
        self.done = start_step >= total_steps
        self.stream = stream or sys.stdout
        self.objective = objective
        self.flops_per_token = config.flops_per_token(seq_len)
        # Model FLOPs of a step count the output projection for the scored positions only (see
        # mfu), and for LoRA no gradients of the frozen weights: a frozen matmul costs its forward
        # and the gradient of its input, 2/3 of what full training spends on it.
        self.unembed_flops = config.unembed_flops_per_token()
        self.trained_share = 2 / 3 if lora else 1.0
        self.positions_per_step = batch_size * seq_len
        if objective is not None and objective.name != "grpo":  # (grpo: one completion per row)
            # A batch of pairs is two sequences each; DPO's live reference adds one forward of both.
            self.positions_per_step *= 2
            if objective.live_reference:
                self.flops_per_token += config.flops_per_token(seq_len, training=False)
        self.peak = 0.0 if self.done else (
            peak_flops_per_device() * (jax.device_count() if jax.local_devices()[0].platform != "cpu" else 1))
        self.pending: list[tuple[int, Any]] = []
        self.t_last, self.step_last = time.perf_counter(), start_step
        self.t_start = self.t_last
        self.t_plain = self.t_last
        self.history: list[dict] = []
        self.last: dict[str, Any] = {}
        self.bar = None
        self.plain = False
        self._swapped: list = []
        self.jsonl = self.tb = None
        self.tb_dir = _tensorboard_dir(workdir)
        if not self.main or self.done:
            return
        if stats:
            logging.info("data: %s", json.dumps(cli.rounded(stats), default=str))
            self._write({"step": start_step, "data_stats": stats})
        if progress and _isatty(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                file=self.stream, mininterval=0.5, smoothing=0.1)
                self._route_logs_above_bar()
        self.plain = progress and self.bar is None

    # ----------------------------------------------------------------------------- output

    def _route_logs_above_bar(self):
        """Console log handlers write through _AboveBar while the bar is shown (undone in close)."""
        from gemma_jax import logs

        for h in logs.console_handlers():
            stream = getattr(h, "stream", None)
            if stream is not None and not isinstance(stream, _AboveBar):
                h.stream = _AboveBar(stream, self.bar)
                self._swapped.append((h, stream))

    def _restore_logs(self):
        for h, stream in self._swapped:
            h.stream = stream
        self._swapped = []

    def _print(self, line: str):
        """A line on stdout: above the bar on a terminal, a plain line elsewhere."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _write(self, record):
        if not self.main:
            return
        if self.jsonl is None:
            self.jsonl = paths.JsonlWriter(paths.join(self.workdir, "metrics.jsonl"))
        self.jsonl.write(json.dumps(record) + "\n")

    def _board(self):
        if self.tb is None and self.main:
            self.tb = _tensorboard(self.tb_dir) or False
        return self.tb or None

    def warn(self, text: str):
        """A warning the user must see during training: a WARNING log record, above the bar."""
        logging.warning("%s", text)

    # ----------------------------------------------------------------------------- steps

    def step(self, step: int, metrics, *, log: bool):
        """Records one step; every log step it syncs with the device and writes everything."""
        self.pending.append((step, metrics))
        if self.bar is not None:
            self._advance_bar(step, log)
        elif self.plain and self.main and not log and time.perf_counter() - self.t_plain >= PLAIN_EVERY_S:
            self._plain_progress(step)
        if log:
            self._log(step)

    def flush(self):
        """Logs the last step taken if it was not a log step (a run stopped by Ctrl-C, a
        preemption or data running out between log steps), so metrics.jsonl and the summary
        end at the step the run stopped at, with that step's own values."""
        if self.pending:
            step = self.pending[-1][0]
            if self.bar is not None:
                self._advance_bar(step, True)
            self._log(step)

    def _log(self, step: int):
        """Syncs with the device and writes the pending steps' metrics as the record of `step`."""
        fetched = jax.device_get([m for _, m in self.pending])
        now = time.perf_counter()
        steps = max(step - self.step_last, 1)
        elapsed = max(now - self.t_last, 1e-9)
        tokens = sum(float(m["tokens"]) for m in fetched)
        m = {k: float(v) for k, v in fetched[-1].items()}
        # Trained tokens per second (loss-masked tokens are what the update learns from); the
        # FLOP rate counts every position through the layers and the scored ones through the
        # output projection (step_flops).
        record = dict(step=step, loss=m["loss"], perplexity=float(np.exp(min(m["loss"], 50.0))),
                      accuracy=m.get("accuracy", float("nan")), learning_rate=m["learning_rate"],
                      grad_norm=m["grad_norm"],
                      target_tokens=tokens, tokens_per_second=tokens / elapsed, step_time=elapsed / steps,
                      memory_bytes=memory_bytes())
        if self.objective is not None:  # exp(a preference loss) is no perplexity
            del record["perplexity"]
        if "accuracy" not in m:  # grpo: no token accuracy; the reward is its figure
            del record["accuracy"]
        record["mfu"] = self.mfu(record["step_time"], tokens / steps)
        # Objective-specific metrics (preference: rewards/chosen, ...) and the loop's own (nonfinite).
        record.update({k: v for k, v in m.items() if k not in record and k != "tokens"})
        if "nonfinite" in m:  # steps skipped since the last log line, not just the last one
            record["nonfinite"] = float(sum(float(x.get("nonfinite", 0.0)) for x in fetched))
        self.pending, self.t_last, self.step_last = [], now, step
        self.last = record
        self.history.append(record)
        if not self.main:
            return
        self._write(record)
        tb = self._board()
        if tb is not None:
            for k, v in record.items():
                if k != "step":
                    tb.add_scalar(f"train/{k}", v, step)
        eta = (self.total - step) * record["step_time"]
        acc = f"acc {record['accuracy']:.3f}" if "accuracy" in record else f"reward {record.get('reward', 0.0):.3f}"
        line = (f"step {step}/{self.total} loss {record['loss']:.4f} {acc} "
                f"lr {record['learning_rate']:.2e} gnorm {record['grad_norm']:.3f} "
                f"tok/s {record['tokens_per_second']:.0f} step {record['step_time'] * 1e3:.0f}ms mfu {record['mfu']:.1%} "
                f"eta {_duration(eta)}")
        if "logps/chosen" in record and "logps/rejected" in record:
            # Preference runs: the responses' summed log-probs, so a chosen side pushed down shows.
            line += f" logp chosen {record['logps/chosen']:.1f} rejected {record['logps/rejected']:.1f}"
        if record.get("nonfinite"):
            line += f" skipped {record['nonfinite']:.0f} non-finite"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
        self.t_plain = now
        self._print(line)

    def _advance_bar(self, step: int, log: bool):
        """Moves the bar to the last step the device finished: the previous one (kept in flight),
        or this one at a log step, which syncs anyway."""
        done = step if log else step - 1
        if not log and len(self.pending) >= 2:
            jax.block_until_ready(self.pending[-2][1].get("loss"))
        if log:
            jax.block_until_ready(self.pending[-1][1].get("loss"))
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _plain_progress(self, step: int):
        now = time.perf_counter()
        rate = (step - self.start) / max(now - self.t_start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        self.t_plain = now
        self._print(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) eta {_duration(eta)}")

    def step_flops(self, scored_tokens: float | None = None) -> float:
        """Model FLOPs of one step: every position through the layers, the output projection only
        for the `scored_tokens` the loss takes (all positions when not given). A chat SFT step
        with a 262k vocabulary scores a fraction of its rows, and counting the projection for
        every position would claim work the loss never needs (MFU near 100% on a laptop CPU)."""
        scored = self.positions_per_step if scored_tokens is None else min(scored_tokens, self.positions_per_step)
        body = (self.flops_per_token - self.unembed_flops) * self.positions_per_step
        return (body + self.unembed_flops * scored) * self.trained_share

    def mfu(self, step_time: float, scored_tokens: float | None = None) -> float:
        """Model FLOPs utilisation of a step that took step_time seconds."""
        if not self.peak:
            return 0.0
        return self.step_flops(scored_tokens) / step_time / self.peak

    def eval(self, step: int, metrics: dict[str, float]):
        """Writes eval metrics (nothing when there are none: a run without eval data)."""
        if not self.main or not metrics:
            return
        record = dict(step=step, **{k: float(v) for k, v in metrics.items()})
        self._write(record)
        tb = self._board()
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(f"eval/{k}", float(v), step)
        self._print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def close(self) -> dict[str, Any]:
        """Flushes everything, draws plots/loss.png; returns the last logged metrics."""
        if self.main:
            if self.bar is not None:
                self.bar.close()
                self._restore_logs()
                self.bar = None
            if self.tb:
                self.tb.close()
                if paths.is_remote(self.workdir):
                    paths.copy_tree(self.tb_dir, paths.join(self.workdir, "tensorboard"))
            if self.jsonl is not None:
                self.jsonl.close()
            metrics_path = paths.join(self.workdir, "metrics.jsonl")
            plots = paths.join(self.workdir, "plots", "loss.png")
            if paths.exists(metrics_path) and (self.jsonl is not None or not paths.exists(plots)):
                plot_metrics(metrics_path, paths.join(self.workdir, "plots"))
        return dict(self.last)


def _duration(seconds: float) -> str:
    """'42s', '6m05s', '1h10m': short enough for a progress line."""
    if not np.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def read_metrics(jsonl_path: str) -> list[dict]:
    """The records of metrics.jsonl; a line that does not parse (a run killed mid-write leaves a
    partial last line) is skipped with a warning instead of failing the plot or the re-run."""
    records, bad = [], []
    for i, line in enumerate(paths.Path(jsonl_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            bad.append(i)
    if bad:
        logging.warning("%s: skipped %d unreadable line(s) (%s): a run stopped mid-write", jsonl_path, len(bad),
                        ", ".join(map(str, bad[:5])))
    return [r for r in records if isinstance(r, dict)]


def plot_metrics(jsonl_path: str, out_dir: str) -> list[str]:
    """Loss (train and eval) and learning-rate curves from metrics.jsonl as PNGs; for GRPO also reward.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plots")
        return []
    records = read_metrics(jsonl_path)
    train = [r for r in records if "loss" in r and "learning_rate" in r]
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
    out = [paths.join(out_dir, "loss.png")]
    rewarded = [r for r in train if "reward" in r]
    if rewarded:  # grpo: the mean reward of the rollouts, and of greedy answers to the eval prompts
        out.append(_plot_reward(plt, rewarded, [r for r in records if "eval_reward" in r], out_dir))
    return out


def _plot_reward(plt, train, evals, out_dir: str) -> str:
    """plots/reward.png: mean reward of the sampled rollouts and of greedy answers to the eval prompts by step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["reward"] for r in train], label="rollouts (sampled)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="eval prompts (greedy)")
    ax.set_xlabel("step"), ax.set_ylabel("reward"), ax.set_title("reward"), ax.legend()
    fig.tight_layout()
    with paths.staged_dir(out_dir) as local:
        fig.savefig(os.path.join(local, "reward.png"), dpi=100)
    plt.close(fig)
    return paths.join(out_dir, "reward.png")

"""Training throughput of the jitted train step: tokens/s per device and MFU, per Gemma 2 size.

  python benchmarks/throughput.py                       # accelerator: 2b, 9b, 27b at full size
  python benchmarks/throughput.py --sizes 2b --batch-per-device 4 --attention splash
  python benchmarks/throughput.py --sizes 2b --batch-per-device 4 --steps 20 --attention xla,flash_gpu
  python benchmarks/throughput.py --tiny                # CPU smoke run (gemma2_tiny shape, seq 256)
  python benchmarks/throughput.py --sizes 2b --layers 2 --seq 256 --vocab 32000   # a cut-down 2b

Full sizes run the recipe of `gemma_jax.config`: bfloat16 compute, float32 master weights and
Adam, remat (dots_no_batch for 2b, full for 9b/27b) and every device on the fsdp axis. A size
whose weights and Adam state (16 bytes/param, spread over the devices) do not fit is skipped.
MFU counts model FLOPs only (`ModelConfig.flops_per_token`: local layers see at most the
window; remat recomputation is not credited) against the dense bf16 peak of the device kind.
CPUs have no such peak: tokens/s only.

Several --attention values run one after another, each in its own process so that each
peak-memory figure is its own, and end with their step-time ratio against the first and the
largest loss difference over the steps (the same batch every step, so the curves must agree
to bf16 noise).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax import config as config_lib, sharding, train  # noqa: E402
from gemma_jax.model import kernels as attention_kernels  # noqa: E402
from gemma_jax.model import ModelConfig  # noqa: E402
from gemma_jax.train.log import peak_flops_per_device  # noqa: E402

# The remat policy each size trains with in gemma_jax.config.
REMAT = {"2b": "dots_no_batch", "9b": "full", "27b": "full"}
BYTES_PER_PARAM = 16  # f32 weights 4 + f32 Adam m, v 8 + f32 gradient 4


def peak_flops() -> float | None:
    """Dense bf16 peak FLOP/s of one device; None where unknown (CPUs, unlisted accelerators)."""
    if jax.devices()[0].platform == "cpu":
        return None  # a measured CPU matmul rate is not a peak, so no MFU
    return peak_flops_per_device() or None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak."""
    return None if not peak else flops_per_token * tokens_per_s_per_device / peak


def model_config(size: str, args) -> ModelConfig:
    """The preset of a size with this run's dtypes, remat, attention and any cut-downs."""
    tiny = size == "tiny"
    overrides = dict(dtype="float32" if tiny else "bfloat16", param_dtype="float32",
                     remat=args.remat or ("none" if tiny else REMAT[size]), attention_impl=args.attention)
    if args.layers:
        overrides["num_layers"] = args.layers
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    return ModelConfig.from_preset("gemma2_tiny" if tiny else f"gemma2_{size}", **overrides)


def fits(config: ModelConfig) -> tuple[bool, str]:
    """Whether weights, gradient and Adam state fit: per device under fsdp, or in host memory
    on CPU, where every (virtual) device shares it."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    shards, room = jax.device_count(), 0.9
    if not limit:  # host memory also holds XLA's buffers for the step and everything else running
        limit, shards, room = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), 1, 0.5
    need = config.num_params() * BYTES_PER_PARAM / shards
    if need > room * limit:
        return False, f"needs ~{need / 2**30:.0f} GiB for weights+grad+Adam, has {limit / 2**30:.0f}"
    return True, ""


def peak_gib() -> float | None:
    """Peak device memory of this process so far, GiB; None where the backend keeps no count."""
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


def measure(config: ModelConfig, batch: int, seq: int, steps: int) -> tuple[float, list[float]]:
    """(mean seconds per train step after a compile step and a warm-up step, every step's loss)."""
    cfg = config_lib.base_config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.loss_chunk = 1000, batch, 1024
    cfg.opt.warmup_steps = 0
    mesh = sharding.make_mesh(1, -1, 1)  # fsdp over every device
    trainer = train.Trainer.create(cfg, config, mesh)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    batch_arrays = trainer.put_batch(dict(
        inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
        segment_ids=np.ones((batch, seq), np.int32), positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1))))
    history = []
    for _ in range(2):  # compile, then one step at speed
        state, metrics = trainer.step(state, batch_arrays)
        jax.block_until_ready(metrics)
        history.append(metrics["loss"])
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, batch_arrays)
        history.append(metrics["loss"])  # device scalars, read after the clock stops
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t) / steps
    return dt, [float(x) for x in history]


def compare(argv: list[str], attentions: list[str]) -> None:
    """Runs this script once per attention value (own process, own memory peak), then
    prints each one's step-time ratio and largest loss difference against the first."""
    results = {}
    for attn in attentions:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--attention", attn, "--json"],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if not line.startswith("RESULT ")]
        if attn != attentions[0]:  # rows only: the header is the first run's
            lines = lines[next((i + 1 for i, line in enumerate(lines) if line.startswith("---")), 0):]
        print("\n".join(lines), flush=True)
        if child.returncode:
            sys.stdout.write(child.stderr[-2000:])
        results[attn] = [json.loads(line[7:]) for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    base, rows = attentions[0], results[attentions[0]]
    for attn in attentions[1:]:
        for a, b in zip(rows, results[attn]):
            diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
            print(f"{a['size']}: {b['attention']} / {a['attention']}: step {a['step_s'] / b['step_s']:.2f}x faster, "
                  f"max |loss difference| over {len(a['losses'])} steps {diff:.2e} "
                  f"(losses {a['losses'][0]:.4f} -> {a['losses'][-1]:.4f} with {base})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2b,9b,27b", help="comma list of 2b, 9b, 27b")
    ap.add_argument("--tiny", action="store_true", help="the gemma2_tiny shape instead (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=0, help="cut every size to this many layers")
    ap.add_argument("--vocab", type=int, default=0, help="cut the vocabulary (default: the preset's)")
    ap.add_argument("--seq", type=int, default=0, help="default 2048, 256 with --tiny")
    ap.add_argument("--batch-per-device", type=int, default=0, help="default 2, 8 with --tiny")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 10, 3 with --tiny)")
    ap.add_argument("--remat", default="", help="override the per-size remat policy")
    ap.add_argument("--attention", default="auto",
                    help="auto | xla | splash | flash_gpu, or a comma list to compare (one process each)")
    ap.add_argument("--json", action="store_true", help="also print each row as a RESULT {json} line")
    args = ap.parse_args()
    attentions = [a.strip() for a in args.attention.split(",")]
    if len(attentions) > 1:
        argv = sys.argv[1:]
        for i, a in enumerate(argv):  # drop --attention LIST / --attention=LIST
            if a == "--attention":
                argv = argv[:i] + argv[i + 2:]
                break
            if a.startswith("--attention="):
                argv = argv[:i] + argv[i + 1:]
                break
        return compare(argv, attentions)

    dev = jax.devices()[0]
    cut = args.layers or args.vocab
    if dev.platform == "cpu" and not (args.tiny or cut):
        print("CPU: full sizes do not fit, running --tiny (pass --layers/--vocab to cut a real size instead)")
        args.tiny = True
    sizes = ["tiny"] if args.tiny else [s.strip() for s in args.sizes.split(",")]
    seq = args.seq or (256 if args.tiny else 2048)
    per_device = args.batch_per_device or (8 if args.tiny else 2)
    steps = args.steps or (3 if args.tiny else 10)
    n = jax.device_count()
    batch = per_device * n
    peak = peak_flops()

    print(f"{n} x {dev.device_kind} ({dev.platform}), peak "
          + (f"{peak / 1e12:.0f} TFLOP/s/device (dense bf16)" if peak else "unknown: tokens/s only"))
    print(f"seq {seq}, batch {batch} ({per_device}/device), mesh fsdp={n}, {steps} timed steps\n")
    head = (f"{'size':<5} {'layers':>6} {'params':>8} {'remat':<14} {'attention':<9} {'step s':>8} "
            f"{'tok/s/device':>13} {'TFLOP/s/dev':>12} {'MFU':>6} {'peak GiB':>8} {'loss first -> last':>19}")
    print(head)
    print("-" * len(head))
    for size in sizes:
        config = model_config(size, args)
        attn = attention_kernels.choose(config.attention_impl, jax.default_backend(), seq, config.head_dim)
        # The row starts before the run, so a process killed for memory still names its size.
        p = config.num_params()
        params = f"{p / 1e9:.2f}B" if p >= 1e8 else f"{p / 1e6:.1f}M"
        print(f"{size:<5} {config.num_layers:>6} {params:>8} {config.remat:<14} {attn:<9} ", end="", flush=True)
        ok, why = fits(config)
        if not ok:
            print(f"skipped: {why}")
            continue
        try:
            dt, losses = measure(config, batch, seq, steps)
        except jax.errors.JaxRuntimeError as e:  # out of memory for activations, most likely
            print(f"failed: {str(e).splitlines()[0][:80]}")
            continue
        tok_s = batch * seq / dt / n
        util = mfu(config.flops_per_token(seq), tok_s, peak)
        peak_mem = peak_gib()
        print(f"{dt:>8.3f} {tok_s:>13.0f} {config.flops_per_token(seq) * tok_s / 1e12:>12.2f} "
              + (f"{util:>6.1%}" if util is not None else f"{'n/a':>6}")
              + (f" {peak_mem:>8.1f}" if peak_mem else f" {'n/a':>8}")
              + f" {losses[0]:>8.4f} -> {losses[-1]:.4f}")
        if args.json:
            print("RESULT " + json.dumps(dict(size=size, attention=attn, step_s=dt, mfu=util, peak_gib=peak_mem,
                                              losses=losses)))


if __name__ == "__main__":
    main()

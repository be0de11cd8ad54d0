"""Training tokens/s: gemma_jax train_step vs transformers + torch AdamW, same config, same device.

  python benchmarks/train_step.py [--batch 4 --seq 512]                # float32 on both sides
  python benchmarks/train_step.py --dtype bfloat16                     # mixed precision on both sides
  python benchmarks/train_step.py --memory --seq 2048 --vocab 256000   # peak memory of the chunked loss

HF runs with eager attention (what HF recommends for Gemma 2: SDPA ignores the soft-cap).
--dtype bfloat16 is each side's mixed precision: float32 master weights and optimizer, bfloat16
compute (ours: model.dtype="bfloat16", our training default; HF: torch.autocast("cpu", bfloat16),
what the Trainer does with bf16=True).
MFU is against the measured float32 matmul peak of this machine (CPU) or the dense bf16 peak of
the accelerator. With a GPU, both sides run on it (torch on cuda, autocast "cuda"); there JAX's
default float32 matmuls use TF32, so torch is allowed TF32 too.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import common  # noqa: E402
from gemma_jax import config as config_lib, sharding, train  # noqa: E402
from gemma_jax.train.log import peak_flops_per_device  # noqa: E402


def ours(config, b, t, params=None, chunk=1024):
    """step() -> loss: one gemma_jax train step (compiled by the first call)."""
    cfg = config_lib.base_config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.loss_chunk = 1000, b, chunk
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay, cfg.opt.grad_clip = 1e-4, 0, 0.01, 0.0
    cfg.mesh.fsdp = 1
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = train.Trainer.create(cfg, config, mesh)
    box = {"state": trainer.init_state(params)}
    batch = trainer.put_batch(common.batch_of(config, b, t))

    def step():
        box["state"], m = trainer.step(box["state"], batch)
        return float(m["loss"])  # waits for the step

    return step


def theirs(hf, config, b, t, dtype="float32"):
    """step() -> loss: one transformers forward/backward + torch AdamW step."""
    import contextlib

    import torch

    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
    batch = common.batch_of(config, b, t)
    dev = common.torch_device()
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default float32 GPU matmuls are TF32
    inputs, targets = torch.tensor(batch["inputs"], device=dev), torch.tensor(batch["targets"], device=dev).long()
    hf.train()

    def step():
        opt.zero_grad(set_to_none=True)
        autocast = (torch.autocast(dev, dtype=torch.bfloat16) if dtype == "bfloat16"
                    else contextlib.nullcontext())
        with autocast:
            logits = hf(inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    return step


def alternate(steps, repeats):
    """Fastest step per side after a warm-up step each; the sides take turns, so load drift on
    a shared machine hits both. Returns {name: (seconds, last loss)}."""
    best, loss = {k: float("inf") for k in steps}, {k: step() for k, step in steps.items()}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            loss[k] = step()
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: (best[k], loss[k]) for k in steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000, or the --preset's")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--memory", action="store_true", help="only our step: peak host memory, chunked loss")
    ap.add_argument("--preset", default="", help="a Gemma 2 preset's shape instead (e.g. gemma2_2b; its vocab "
                    "unless --vocab is given), cut to --layers")
    ap.add_argument("--layers", type=int, default=0, help="with --preset: keep this many layers")
    args = ap.parse_args()
    if args.preset:
        from gemma_jax.model import ModelConfig

        cut = {k: v for k, v in (("num_layers", args.layers), ("vocab_size", args.vocab)) if v}
        config = ModelConfig.from_preset(args.preset, dtype=args.dtype, param_dtype="float32", remat="none", **cut)
    else:
        config = common.gemma_config(vocab_size=args.vocab or 32000, dtype=args.dtype)
    args.vocab = config.vocab_size
    n = args.batch * args.seq
    if args.memory:
        dt, _ = alternate({"ours": ours(config, args.batch, args.seq)}, 1)["ours"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        logits_gib = n * args.vocab * 4 / 2**30
        print(f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}: step {dt:.2f}s, peak host RSS {peak:.2f} GiB "
              f"(full float32 logits alone would be {logits_gib:.2f} GiB, plus as much again for their gradient)")
        return

    hf = common.hf_model(config, attn="eager")
    params = jax.device_put(common.params_from_hf(config, hf))
    (ours_t, ours_loss), (theirs_t, theirs_loss) = alternate(
        {"ours": ours(config, args.batch, args.seq, params),
         "theirs": theirs(hf, config, args.batch, args.seq, args.dtype)}, args.steps).values()
    peak = peak_flops_per_device()
    flops = config.flops_per_token(args.seq) * n
    shape = (f"{args.preset} cut to {config.num_layers} layers, vocab {config.vocab_size}" if args.preset
             else common.BENCH | {'vocab_size': args.vocab})
    print(f"config: {shape}, batch {args.batch}, seq {args.seq}, {args.dtype} compute, "
          f"{common.machine()}, matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"gemma_jax    : {n / ours_t:8.0f} tokens/s  step {ours_t:.2f}s  MFU {flops / ours_t / peak:.1%}  "
          f"loss after {args.steps + 1} steps {ours_loss:.4f}")
    print(f"transformers : {n / theirs_t:8.0f} tokens/s  step {theirs_t:.2f}s  MFU {flops / theirs_t / peak:.1%}  "
          f"loss after {args.steps + 1} steps {theirs_loss:.4f}")
    print(f"ratio gemma_jax / transformers: {theirs_t / ours_t:.2f}x")


if __name__ == "__main__":
    main()

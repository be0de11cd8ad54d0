"""Training tokens/s: gemma_jax train_step vs transformers + torch AdamW, same config, CPU, float32.

  python benchmarks/train_step.py [--batch 4 --seq 512]
  python benchmarks/train_step.py --memory --seq 2048 --vocab 256000   # peak memory of the chunked loss

HF runs with eager attention (what HF recommends for Gemma 2: SDPA ignores the soft-cap).
MFU is against the measured float32 matmul peak of this machine.
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
from gemma_jax.train_log import peak_flops_per_device  # noqa: E402


def ours(config, b, t, steps, params=None, chunk=1024):
    cfg = config_lib.base_config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.loss_chunk = 1000, b, chunk
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay, cfg.opt.grad_clip = 1e-4, 0, 0.01, 0.0
    cfg.mesh.fsdp = 1
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = train.Trainer.create(cfg, config, mesh)
    state = trainer.init_state(params)
    batch = trainer.put_batch(common.batch_of(config, b, t))
    best, state, m = common.time_train_steps(trainer, state, batch, steps)
    return best, float(m["loss"])


def theirs(hf, config, b, t, steps):
    import torch

    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
    batch = common.batch_of(config, b, t)
    inputs, targets = torch.tensor(batch["inputs"]), torch.tensor(batch["targets"]).long()
    hf.train()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = hf(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss)

    step()
    times, loss = [], 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return min(times), loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--memory", action="store_true", help="only our step: peak host memory, chunked loss")
    args = ap.parse_args()
    config = common.gemma_config(vocab_size=args.vocab)
    n = args.batch * args.seq
    if args.memory:
        dt, _ = ours(config, args.batch, args.seq, 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        logits_gib = n * args.vocab * 4 / 2**30
        print(f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}: step {dt:.2f}s, peak host RSS {peak:.2f} GiB "
              f"(full float32 logits alone would be {logits_gib:.2f} GiB, plus as much again for their gradient)")
        return

    hf = common.hf_model(config, attn="eager")
    params = jax.device_put(common.params_from_hf(config, hf))
    ours_t, ours_loss = ours(config, args.batch, args.seq, args.steps, params)
    theirs_t, theirs_loss = theirs(hf, config, args.batch, args.seq, args.steps)
    peak = peak_flops_per_device()
    flops = config.flops_per_token(args.seq) * n
    print(f"config: {common.BENCH | {'vocab_size': args.vocab}}, batch {args.batch}, seq {args.seq}, float32, "
          f"{os.cpu_count()} CPU cores, matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"gemma_jax    : {n / ours_t:8.0f} tokens/s  step {ours_t:.2f}s  MFU {flops / ours_t / peak:.1%}  "
          f"loss after {args.steps + 1} steps {ours_loss:.4f}")
    print(f"transformers : {n / theirs_t:8.0f} tokens/s  step {theirs_t:.2f}s  MFU {flops / theirs_t / peak:.1%}  "
          f"loss after {args.steps + 1} steps {theirs_loss:.4f}")
    print(f"ratio gemma_jax / transformers: {theirs_t / ours_t:.2f}x")


if __name__ == "__main__":
    main()

"""LoRA / QLoRA vs full fine-tuning: tokens/s and peak host memory of one train step, same config.

  python benchmarks/lora_step.py [--batch 4 --seq 512 --rank 16]

Each mode runs in its own process so peak RSS (ru_maxrss) is that mode's alone. The model is the
benchmark shape of benchmarks/common.py (4 layers, width 512, vocab 32000) in float32 on CPU;
the frozen base is float32 for "lora" (so only the optimizer and gradients differ from "full")
and int8 for "qlora-int8".
"""

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def one(mode: str, batch: int, seq: int, steps: int, rank: int) -> dict:
    import jax

    import common
    from gemma_jax import config as config_lib, sharding, train

    config = common.gemma_config()
    cfg = config_lib.base_config()
    cfg.train.steps, cfg.train.batch_size = 1000, batch
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.grad_clip = 1e-4, 0, 0.0
    cfg.mesh.fsdp = 1
    if mode != "full":
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = rank, 2.0 * rank, "float32"
        cfg.lora.quantize = mode.split("-")[1] if mode.startswith("qlora") else "none"
        config = train.lora_model_config(cfg, config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = train.Trainer.create(cfg, config, mesh)
    state = trainer.init_state()
    best, state, m = common.time_train_steps(trainer, state, trainer.put_batch(common.batch_of(config, batch, seq)), steps)
    trained = sum(x.size for x in jax.tree.leaves(state["params"]))
    return dict(mode=mode, step_s=best, tokens_per_s=batch * seq / best,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, trained_params=trained,
                loss=float(m["loss"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modes", default="full,lora,qlora-int8")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.batch, args.seq, args.steps, args.rank)))
        return
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--seq",
                              str(args.seq), "--steps", str(args.steps), "--rank", str(args.rank)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"benchmark shape (4 layers, width 512, vocab 32000), batch {args.batch} x {args.seq}, float32 CPU, "
          f"rank {args.rank}")
    for r in rows:
        print(f"{r['mode']:>11}: {r['tokens_per_s']:7.0f} tokens/s ({r['tokens_per_s'] / full['tokens_per_s']:.2f}x full)"
              f"  peak RSS {r['peak_rss_gib']:.2f} GiB ({r['peak_rss_gib'] / full['peak_rss_gib']:.2f}x)"
              f"  trained params {r['trained_params'] / 1e6:.2f}M")


if __name__ == "__main__":
    main()

"""Forward-pass tokens/s: gemma_jax vs transformers Gemma2ForCausalLM, same weights, CPU, float32.

  python benchmarks/forward.py [--batch 4 --seq 512]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from gemma_jax import model as M  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    config = common.gemma_config()
    hf = common.hf_model(config, attn="eager").eval()
    params = jax.device_put(common.params_from_hf(config, hf))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    n = args.batch * args.seq

    ours = common.best_time(lambda: M.logits(config, params, tokens).block_until_ready(), args.repeats)
    t_tokens = torch.tensor(tokens)
    with torch.inference_mode():
        theirs = common.best_time(lambda: hf(t_tokens).logits, args.repeats)
        ref = hf(t_tokens).logits.numpy()
    diff = np.abs(np.asarray(M.logits(config, params, tokens)) - ref).max()

    print(f"config: {common.BENCH}, batch {args.batch}, seq {args.seq}, float32, {os.cpu_count()} CPU cores")
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    print(f"gemma_jax    : {n / ours:10.0f} tokens/s ({ours * 1e3:.1f} ms)")
    print(f"transformers : {n / theirs:10.0f} tokens/s ({theirs * 1e3:.1f} ms, eager attention)")
    print(f"ratio gemma_jax / transformers: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

"""Decode tokens/s and time to first token: gemma_jax.sample vs transformers generate, same weights,
CPU, float32, greedy, at batch 1 and 8.

  python benchmarks/decode.py [--prompt 64 --new 128 --batches 1,8]

Both sides generate exactly --new tokens per row (no stop token). Time to first token is a call
with one new token (prefill + first sample); decode tokens/s counts the remaining tokens over
the remaining time. HF runs with eager attention (SDPA ignores Gemma 2's soft-cap) and its
default dynamic cache, at its better thread count. The sides alternate, so load drift on a
shared machine hits both; best of --repeats. The weight-read floor printed first bounds batch-1
decoding: each step reads every weight once. With a GPU both sides run on it, in full float32
(JAX's matmul precision set to "highest", torch's TF32 left off), so the tokens can still match.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from gemma_jax import sample  # noqa: E402


SHAPES = {"bench": {}, "tiny": dict(embed_dim=128, hidden_dim=512, num_heads=4, num_kv_heads=2, head_dim=32,
                                     query_pre_attn_scalar=32, vocab_size=2048, sliding_window=64)}


def ours(config, params, prompts):
    """run(n) -> token lists: gemma_jax generating n tokens per row."""
    return lambda n: sample.generate_ids(config, params, prompts, max_new_tokens=n).tokens


def theirs(hf, prompts, threads):
    """run(n) -> token lists: transformers generate on `threads` torch threads, left padding."""
    width = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), width), np.int64), np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    dev = common.torch_device()
    ids, mask = torch.tensor(ids, device=dev), torch.tensor(mask, device=dev)

    def run(n):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        return out[:, width:].tolist()

    return run


def timings(runs, new, repeats):
    """Best (first-token, full) wall times per side, the sides interleaved so load drift hits both."""
    best = {k: [float("inf"), float("inf")] for k in runs}
    for k, run in runs.items():  # warm up: compile, allocate
        run(1), run(new)
    for _ in range(repeats):
        for k, run in runs.items():
            for i, n in enumerate((1, new)):
                t = time.perf_counter()
                run(n)
                best[k][i] = min(best[k][i], time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (BOS included)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens per row")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench",
                    help="bench: common.BENCH; tiny: the gemma2_tiny dims (weights fit in cache)")
    args = ap.parse_args()
    if jax.default_backend() == "gpu":  # full float32 on both sides (JAX's GPU default is TF32)
        jax.config.update("jax_default_matmul_precision", "highest")

    config = common.gemma_config(**SHAPES[args.shape])
    hf = common.hf_model(config, attn="eager").eval()
    hf.generation_config.eos_token_id = None  # exactly --new tokens on both sides
    # Laid out for decoding once, as the CLI does (on CPU: layers unrolled, see decoding_layout).
    config, params = sample.decoding_layout(config, jax.device_put(common.params_from_hf(config, hf)))
    print(f"config: {common.BENCH | SHAPES[args.shape]}, prompt {args.prompt} tokens, {args.new} new tokens, "
          f"greedy, float32, {common.machine()}")
    # At batch 1 a decode step reads every weight once: reading them all is the floor of a step.
    read_all = jax.jit(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)))
    floor = common.best_time(lambda: read_all(params).block_until_ready(), 20)
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"weights {size / 2**20:.0f} MiB: reading them once takes {floor * 1e3:.2f} ms "
          f"({size / floor / 1e9:.1f} GB/s), so batch-1 decoding tops out near {1 / floor:.0f} tokens/s")
    rng = np.random.default_rng(0)
    for b in (int(x) for x in args.batches.split(",")):
        # Rows of different lengths (the longest is --prompt): padding and per-row positions matter.
        lengths = [args.prompt - (i * args.prompt) // (2 * b) for i in range(b)]
        prompts = [[2] + rng.integers(4, config.vocab_size, n - 1).tolist() for n in lengths]
        runs = {"gemma_jax": ours(config, params, prompts)}
        # transformers at 1 thread and at every core: on a busy machine torch's spinning thread
        # team can be 10x slower than one thread, and the comparison takes its best.
        for threads in sorted({1, os.cpu_count()}) if common.torch_device() == "cpu" else [os.cpu_count()]:
            runs[f"transformers {threads}T"] = theirs(hf, prompts, threads)
        best = timings(runs, args.new, args.repeats)
        hf_key = min((k for k in best if k != "gemma_jax"), key=lambda k: best[k][1])
        same = sum(a == c for a, c in zip(runs["gemma_jax"](args.new), runs[hf_key](args.new)))
        rate = {k: b * (args.new - 1) / (full - first) for k, (first, full) in best.items()}
        print(f"batch {b}: {same}/{b} rows token-identical to transformers")
        for k, (first, full) in best.items():
            print(f"  {k:16s}: decode {rate[k]:8.1f} tokens/s  time to first token {first * 1e3:7.1f} ms  "
                  f"total {full:.2f}s")
        (o_first, o_full), (t_first, t_full) = best["gemma_jax"], best[hf_key]
        print(f"  ratio gemma_jax / {hf_key}: decode {rate['gemma_jax'] / rate[hf_key]:.2f}x, "
              f"time to first token {t_first / o_first:.2f}x, end to end {t_full / o_full:.2f}x")


if __name__ == "__main__":
    main()

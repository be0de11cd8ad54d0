"""flash_gpu on a real GPU: compiled (Triton) against the xla path, then one layer's speed.

  python benchmarks/flash_check.py                 # 2b attention shape: K=4, G=2, H=256, T=2048 and 8192
  python benchmarks/flash_check.py --seqs 256 --batch 1 --heads 2   # CPU: interpret mode, a smoke run

Part 1 checks what the CPU suite cannot: the Triton lowering. At the 2b head shape it compares
outputs and q/k/v gradients with the xla path (`model.dense_attention` under the model's masks)
in float32 and bf16 inputs, on a local layer (window shorter than the sequence, so key blocks
are skipped) with packed segments and padding, logits past the cap. Part 2 times one layer's
attention forward + backward (xla's `causal_attention`, what training runs, against the kernel)
and prints the ratio, for each tile setting in --blocks.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax.model import attention as A  # noqa: E402
from gemma_jax.model import flash_gpu as F  # noqa: E402
from gemma_jax.model import kernels  # noqa: E402

CAP = 50.0


def inputs(b, t, k, g, h, dtype, seed=0):
    """Pre-scaled queries (logits up to past the cap), keys, values, two documents + padding."""
    rng = np.random.default_rng(seed)
    scale = 4.0 * h ** -0.25
    q = jnp.asarray(rng.normal(0, scale, (b, t, k, g, h)), dtype)
    keys = jnp.asarray(rng.normal(0, scale, (b, t, k, h)), dtype)
    v = jnp.asarray(rng.normal(0, 1, (b, t, k, h)), dtype)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 3:] = 2
    seg[:, t - t // 8:] = 0
    return q, keys, v, jnp.asarray(seg)


def grads(attend, w):
    """Jitted (q, k, v) -> (output, dq, dk, dv) of sum(attend(q, k, v) * w)."""
    def f(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * w)
    return jax.jit(lambda q, k, v: (attend(q, k, v), *jax.grad(f, argnums=(0, 1, 2))(q, k, v)))


def check(b, t, k, g, h, window, interpret):
    """Prints max |flash - xla| per output, float32 and bf16 inputs."""
    for dtype in (jnp.float32, jnp.bfloat16):
        q, keys, v, seg = inputs(b, t, k, g, h, dtype)
        w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
        local_BTS, _ = A.attention_masks(seg, window)
        ref = grads(lambda q, k, v: A.dense_attention(q, k, v, local_BTS, CAP), w)(q, keys, v)
        fast = grads(lambda q, k, v: kernels.flash_gpu_attention(q, k, v, seg, window=window, softcap=CAP,
                                                                 interpret=interpret), w)(q, keys, v)
        errs = [float(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)).max()) for a, r in zip(fast, ref)]
        scale = [float(jnp.abs(r.astype(jnp.float32)).max()) for r in ref]
        print(f"check T={t} H={h} G={g} window={window} {jnp.dtype(dtype).name}: max |flash - xla| "
              + ", ".join(f"{n} {e:.2e} (of {s:.1f})" for n, e, s in zip(("out", "dq", "dk", "dv"), errs, scale)),
              flush=True)


def timed(fn, *args, repeats=5):
    """Median seconds of a jitted call after a warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def speed(b, t, k, g, h, window, blocks_list, interpret):
    """One layer's attention forward + backward, bf16, xla against each tile setting."""
    q, keys, v, seg = inputs(b, t, k, g, h, jnp.bfloat16)
    w = jnp.ones(q.shape, jnp.float32)
    mask_BTT = A.attention_masks(seg, window or t)[0 if window else 1]
    xla_t = timed(grads(lambda q, k, v: A.causal_attention(q, k, v, mask_BTT, CAP, window), w), q, keys, v)
    for blocks in blocks_list:
        fn = grads(lambda q, k, v, blocks=blocks: kernels.flash_gpu_attention(
            q, k, v, seg, window=window, softcap=CAP, blocks=blocks, interpret=interpret), w)
        try:
            ft = timed(fn, q, keys, v)
        except Exception as e:  # a tile setting the GPU cannot hold (shared memory): report, go on
            print(f"speed T={t} blocks={tuple(blocks) if blocks else 'default'}: failed: {str(e).splitlines()[0][:100]}")
            continue
        print(f"speed T={t} {'local' if window else 'global'} B={b} K={k} G={g} H={h} bf16 fwd+bwd: xla {xla_t * 1e3:.2f} ms, "
              f"flash_gpu {ft * 1e3:.2f} ms (blocks {tuple(blocks) if blocks else F.default_blocks(h)}), "
              f"ratio {xla_t / ft:.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4, help="kv heads K (the 2b has 4)")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--blocks", default="default,128:64:64:64,64:64:64:64,64:32:32:32",
                    help="tile settings q:k:q_bwd:k_bwd to time, 'default' for default_blocks")
    args = ap.parse_args()
    interpret = jax.default_backend() != "gpu"
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}{', interpret mode' if interpret else ''})")
    blocks_list = [None if s == "default" else F.Blocks(*(int(x) for x in s.split(":")))
                   for s in args.blocks.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    b, k, g, h = args.batch, args.heads, args.groups, args.head_dim
    check(b, seqs[0], k, g, h, seqs[0] // 4, interpret)
    for t in seqs:
        for window in (None, 4096 if t > 4096 else t // 4):
            speed(b, t, k, g, h, window, blocks_list if t == seqs[0] else [None], interpret)


if __name__ == "__main__":
    main()

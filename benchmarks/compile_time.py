"""Compile time of a 46-layer (27B depth) tiny-width model: scanned layers vs unrolled.

  python benchmarks/compile_time.py

Scanning (local, global) layer pairs keeps the compiled program the size of one pair, so
compile time stays flat as depth grows; unrolled, it grows with the layer count.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemma_jax import model as M  # noqa: E402


def compile_seconds(config, grad: bool) -> float:
    shapes = M.param_shapes(config)
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def fwd(params, tokens):
        return jnp.mean(M.Transformer(config).apply({"params": params}, tokens))

    fn = jax.grad(fwd) if grad else fwd
    t = time.perf_counter()
    jax.jit(fn).lower(shapes, tokens).compile()
    return time.perf_counter() - t


def main():
    base = M.ModelConfig.from_preset("gemma2_27b", embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                                     head_dim=16, query_pre_attn_scalar=16, vocab_size=512, sliding_window=32)
    print(f"{'layers':>6} {'mode':>9} {'forward s':>10} {'fwd+bwd s':>10}")
    for layers in (2, base.num_layers):
        for scan in (True, False):
            c = base.replace(num_layers=layers, scan_layers=scan)
            print(f"{layers:>6} {'scan' if scan else 'unrolled':>9} {compile_seconds(c, False):>10.2f} "
                  f"{compile_seconds(c, True):>10.2f}")


if __name__ == "__main__":
    main()

"""Gemma 4 mixture-of-experts train step on the CPU mesh: tokens/s, and the share of the MoE layer's
time spent in dispatch (routing, sorting / gathering the tokens, combining the expert outputs)
rather than in the experts' matmuls; transformers' Gemma4ForCausalLM on the same batch beside it.

  python benchmarks/moe_step.py [--batch 8 --seq 256 --experts 16 --top-k 4 --steps 5]

The model is a cut-down 26B-A4B shape (4 layers, local/global alternating, width 256, 16 experts of width 256 of which 4 per
token, the dense MLP beside them, vocab 8192) in float32. Rows:
  train step   AdamW step (forward + backward + update) on 1 device, and with the experts split
               over the 8 virtual devices of the fsdp axis (expert parallelism; the 8 devices share
               this machine's cores, so this shows the dispatch and collectives cost, not a speed-up)
  MoE layer    one MoE layer's forward + backward alone; "dispatch" = that minus the same experts'
               matmuls on inputs already in place, per dispatch (dense: every expert on every token
               weighted by the routing; ragged: tokens sorted by expert, jax.lax.ragged_dot, which
               XLA:CPU runs as a masked product over every group, so it is slower here than dense;
               a share is clamped at 0 when timing noise puts the matmuls above the whole)
  transformers forward + backward of Gemma4ForCausalLM with the same shape and batch (no optimizer
               update), and our forward + backward alone, so the ratio compares like with like
"""

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from gemma_jax import config as config_lib, sharding, train  # noqa: E402
from gemma_jax import model as M  # noqa: E402
from gemma_jax.model import ModelConfig, moe  # noqa: E402


def moe_config(args, impl: str) -> ModelConfig:
    """The cut-down 26B-A4B shape."""
    return ModelConfig.from_preset(
        "gemma4_26b_a4b", num_layers=4, embed_dim=256, hidden_dim=256, num_heads=4, num_kv_heads=2, global_kv_heads=1,
        head_dim=64, global_head_dim=128, vocab_size=8192, sliding_window=128, attention_pattern=("local", "global"),
        num_experts=args.experts,
        experts_per_token=args.top_k, expert_dim=args.expert_dim, max_seq_len=8192, moe_impl=impl,
        dtype="float32", param_dtype="float32")


def train_step_time(args, config, mesh_shape) -> float:
    """Fastest AdamW step (seconds) on a (data, fsdp, tensor) mesh."""
    cfg = config_lib.base_config()
    cfg.train.steps, cfg.train.batch_size = 1000, args.batch
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.grad_clip = 1e-4, 0, 0.0
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    trainer = train.Trainer.create(cfg, config, mesh)
    state = trainer.init_state()
    best, _, _ = common.time_train_steps(trainer, state, trainer.put_batch(common.batch_of(config, args.batch, args.seq)),
                                         args.steps)
    return best


def layer_times(args, config, seed=0) -> tuple[float, float]:
    """(one MoE layer forward + backward, the same experts' matmuls alone), seconds, one device."""
    t, d = args.batch * args.seq, config.embed_dim
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(1, t, d)), jnp.float32)
    layer = moe.MoE(config)
    params = nn.unbox(layer.init(jax.random.key(0), x, x))

    @jax.jit
    def full(p, x):
        return jax.grad(lambda p, x: jnp.sum(layer.apply(p, x, x) ** 2), argnums=(0, 1))(p, x)

    # The experts' matmuls on inputs already dispatched: dense, every expert on every token; ragged,
    # the routed rows already sorted into equal groups.
    e, k = config.num_experts, config.experts_per_token
    p = params["params"]
    gw, lw = p["expert_gating"]["w"], p["expert_linear"]["w"]
    impl = moe.impl_for(config)
    if impl == "dense":
        def matmuls(gw, lw, x_TD):
            g = [jnp.einsum("TD,EDF->ETF", x_TD, gw[i]) for i in range(2)]
            return jnp.sum(jnp.einsum("ETF,EFD->ETD", jax.nn.gelu(g[0], approximate=True) * g[1], lw) ** 2)
        inputs = (x[0],)
    else:
        sizes = jnp.full((e,), t * k // e, jnp.int32)

        def matmuls(gw, lw, xs_MD):
            g = [jax.lax.ragged_dot(xs_MD, gw[i], sizes) for i in range(2)]
            return jnp.sum(jax.lax.ragged_dot(jax.nn.gelu(g[0], approximate=True) * g[1], lw, sizes) ** 2)
        inputs = (jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32),)
    experts_only = jax.jit(jax.grad(matmuls, argnums=(0, 1, 2)))
    total = common.best_time(lambda: jax.block_until_ready(full(params, x)), repeats=args.steps)
    matmul = common.best_time(lambda: jax.block_until_ready(experts_only(gw, lw, *inputs)), repeats=args.steps)
    return total, matmul


def forward_backward(args, config) -> tuple[float, float]:
    """(ours, transformers) forward + backward of the whole model on the same batch, seconds."""
    import torch
    import transformers

    import helpers

    torch.set_num_threads(os.cpu_count())
    hf = transformers.Gemma4ForCausalLM(helpers.hf_gemma4_config(config)).train()
    params = common.params_from_hf(config, hf)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    tt = torch.tensor(tokens)

    def theirs():
        hf.zero_grad()
        hf(input_ids=tt, labels=tt).loss.backward()

    @jax.jit
    def ours(params, tokens):
        def loss(params):
            logits = M.Transformer(config).apply({"params": params}, tokens)[:, :-1]
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return jax.grad(loss)(params)

    tokens_j = jnp.asarray(tokens, jnp.int32)
    mine = common.best_time(lambda: jax.block_until_ready(ours(params, tokens_j)), repeats=args.steps)
    return mine, common.best_time(theirs, repeats=max(2, args.steps // 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    tokens = args.batch * args.seq
    config = moe_config(args, "auto")
    print(f"machine: {common.machine()}; jax {jax.default_backend()} with {jax.device_count()} devices; "
          f"{config.num_layers} layers, width {config.embed_dim}, {config.num_experts} experts of width "
          f"{config.expert_dim}, {config.experts_per_token} per token; batch {args.batch} x {args.seq} tokens; "
          f"auto dispatch here: {moe.impl_for(config)}")
    print(f"{'':34} {'step s':>8} {'tokens/s':>10}")
    for impl in ("dense", "ragged"):
        c = moe_config(args, impl)
        for shape, name in (((1, 1, 1), "1 device"), ((1, 8, 1), "8 devices, experts split")):
            s = train_step_time(args, c, shape)
            print(f"train step {impl:<7} {name:<24} {s:8.3f} {tokens / s:10.0f}")
    print()
    print(f"{'MoE layer fwd+bwd':34} {'total s':>8} {'matmuls s':>10} {'dispatch share':>15}")
    for impl in ("dense", "ragged"):
        total, matmul = layer_times(args, moe_config(args, impl))
        print(f"{impl:<34} {total:8.4f} {matmul:10.4f} {max(0.0, 1 - matmul / total):15.1%}")
    print()
    mine, theirs = forward_backward(args, config)
    print(f"forward + backward, 1 device: gemma_jax {mine:.3f} s ({tokens / mine:.0f} tokens/s), transformers "
          f"{theirs:.3f} s ({tokens / theirs:.0f} tokens/s): ratio {theirs / mine:.2f}x")


if __name__ == "__main__":
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
        main()

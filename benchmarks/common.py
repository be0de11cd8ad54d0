"""Shared pieces of the side-by-side benchmarks: the config, HF twin models, timing."""

from __future__ import annotations

import os
import time

import numpy as np

# The benchmark shape named in the issues: 4 layers, width 512, vocab 32000.
BENCH = dict(num_layers=4, embed_dim=512, hidden_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
             vocab_size=32000, sliding_window=256, query_pre_attn_scalar=64)


def gemma_config(**overrides):
    """gemma_jax ModelConfig of the benchmark shape."""
    from gemma_jax.model import ModelConfig

    return ModelConfig(**{**BENCH, **overrides})


def hf_model(config, attn="eager", seed=0):
    """A transformers Gemma2ForCausalLM with the same shape (float32, random weights)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count())
    hf_cfg = transformers.Gemma2Config(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
        attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap,
        max_position_embeddings=8192, attn_implementation=attn, dtype=torch.float32)
    return transformers.Gemma2ForCausalLM(hf_cfg)


def params_from_hf(config, hf):
    """gemma_jax params holding the same weights as the HF model (so both compute the same thing)."""
    from gemma_jax import model as M

    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    tree = {"embedder": {"input_embedding": sd["model.embed_tokens.weight"]},
            "final_norm": {"scale": sd["model.norm.weight"]}}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        proj = lambda name, heads: sd[p + f"self_attn.{name}.weight"].reshape(heads, h, d).transpose(0, 2, 1)
        tree[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "post_attention_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "pre_ffw_norm": {"scale": sd[p + "pre_feedforward_layernorm.weight"]},
            "post_ffw_norm": {"scale": sd[p + "post_feedforward_layernorm.weight"]},
            "attn": {"q_einsum": {"w": proj("q_proj", n)},
                     "kv_einsum": {"w": np.stack([proj("k_proj", k), proj("v_proj", k)])},
                     "attn_vec_einsum": {"w": sd[p + "self_attn.o_proj.weight"].reshape(d, n, h).transpose(1, 2, 0)}},
            "mlp": {"gating_einsum": {"w": np.stack([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])},
                    "linear": {"w": sd[p + "mlp.down_proj.weight"].T}},
        }
    return M.stack_layers(config, tree)


def best_time(fn, repeats=5, warmup=1):
    """Minimum wall time of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)

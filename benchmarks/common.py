"""Shared pieces of the side-by-side benchmarks: the config, HF twin models, timing."""

from __future__ import annotations

import os
import time

# The benchmark shape named in the issues: 4 layers, width 512, vocab 32000.
BENCH = dict(num_layers=4, embed_dim=512, hidden_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
             vocab_size=32000, sliding_window=256, query_pre_attn_scalar=64)


def gemma_config(**overrides):
    """gemma_jax ModelConfig of the benchmark shape."""
    from gemma_jax.model import ModelConfig

    return ModelConfig(**{**BENCH, **overrides})


def torch_device() -> str:
    """Where the HF side runs: the GPU when JAX runs on one (and torch sees it), else the CPU.
    Both sides then run on the same kind of device."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def machine() -> str:
    """The device both sides run on, for the header line."""
    import jax

    dev = jax.devices()[0]
    return f"{os.cpu_count()} CPU cores" if dev.platform == "cpu" else f"{dev.device_kind} (torch on {torch_device()})"


def hf_model(config, attn="eager", seed=0):
    """A transformers Gemma2ForCausalLM with the same shape (float32, random weights), on
    torch_device()."""
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
    return transformers.Gemma2ForCausalLM(hf_cfg).to(torch_device())


def params_from_hf(config, hf):
    """gemma_jax params holding the same weights as the HF model, through a safetensors export."""
    import tempfile

    from gemma_jax import weights

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)  # from any device: safetensors writes host copies
        loaded, params = weights.load(d)
    assert loaded.replace(dtype=config.dtype, remat=config.remat) == config.replace(param_dtype=loaded.param_dtype), \
        (loaded, config)
    return params


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


def batch_of(config, b, t, seed=0):
    """A [b, t] batch of random tokens in the trainer's layout (every position in the loss)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    toks = rng.integers(0, config.vocab_size, (b, t + 1)).astype(np.int32)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((b, t), np.float32),
                segment_ids=np.ones((b, t), np.int32), positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)))


def time_train_steps(trainer, state, batch, steps):
    """(fastest step in seconds, final state, final metrics) after one compiling step."""
    import jax

    state, m = trainer.step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = trainer.step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return min(times), state, m

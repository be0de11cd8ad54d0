"""Gemma 2, 3 and 4 in Flax: no I/O, no mesh names, only logical axis names.

  config.py     ModelConfig, presets (gemma2_*, gemma3_*, gemma4_* and small test shapes), remat policies
  attention.py  the exact xla attention path: RoPE (partial too), masks, soft-capped softmax, its VJP
  kernels.py    fused attention kernels chosen by ModelConfig.attention_impl (splash on TPU)
  primitives.py Einsum (with LoRA and quantised weights), RMSNorm, lora_equations
  layers.py     the modules (Attention, MLP, Block, LayerPeriod, Embedder, Transformer) and the
                functional API: init_params, param_shapes, param_axes, logits, stack_layers
  moe.py        Gemma 4's mixture of experts: router, dispatch, expert parallelism
  kv_cache.py   the decoding cache layout
  lora.py       low-rank adapters and the quantised frozen base

`from gemma_jax import model` keeps the names it always had; code inside the package imports
from the submodule that defines a name.
"""

from gemma_jax.model.attention import (apply_rope, attention_logits, attention_masks, causal_attention,
                                       causal_blocks, dense_attention, masked_softmax, segment_positions,
                                       softcap)
from gemma_jax.model.config import REMAT_POLICIES, ModelConfig
from gemma_jax.model.layers import (EINSUMS, FEW_TOKENS, Attention, Block, Einsum, Embedder, LayerPair,
                                    LayerPeriod, MLP, Params, RMSNorm, Transformer, dequantize, final_logits,
                                    final_logits_by_vocab, init_params, logits, lora_equations, param_axes,
                                    param_shapes, stack_layers, unstack_layers)

__all__ = [
    "apply_rope", "attention_logits", "attention_masks", "causal_attention", "causal_blocks",
    "dense_attention", "masked_softmax", "segment_positions", "softcap", "REMAT_POLICIES",
    "ModelConfig", "EINSUMS", "FEW_TOKENS", "Attention", "Block", "Einsum", "Embedder", "LayerPair", "LayerPeriod",
    "MLP", "Params", "RMSNorm", "Transformer", "dequantize", "final_logits", "final_logits_by_vocab",
    "init_params", "logits", "lora_equations", "param_axes", "param_shapes", "stack_layers",
    "unstack_layers",
]

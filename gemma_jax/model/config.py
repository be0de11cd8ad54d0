"""ModelConfig: Gemma 2 shapes and numerics, the published presets, remat policies."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.model import kernels


_PRESETS: dict[str, dict[str, Any]] = {
    "gemma2_2b": dict(num_layers=26, embed_dim=2304, hidden_dim=9216, num_heads=8,
                      num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma2_9b": dict(num_layers=42, embed_dim=3584, hidden_dim=14336, num_heads=16,
                      num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    # 27B scales queries by (D/N)^-0.5 = 144^-0.5, not head_dim^-0.5.
    "gemma2_27b": dict(num_layers=46, embed_dim=4608, hidden_dim=36864, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    # Small shapes for CPU runs; vocab is set from the tokenizer at train time.
    "gemma2_tiny": dict(num_layers=4, embed_dim=128, hidden_dim=512, num_heads=4,
                        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32,
                        vocab_size=2048, sliding_window=64),
    "gemma2_test": dict(num_layers=3, embed_dim=64, hidden_dim=128, num_heads=4,
                        num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24,
                        vocab_size=512, sliding_window=8),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Gemma 2 shape and numerics; hashable so it can be a static jit argument."""

    num_layers: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 256128
    sliding_window: int = 4096
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float = 50.0  # 0 disables
    final_softcap: float = 30.0  # 0 disables
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 8192
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    # Training-pass attention: auto | xla | splash (TPU) | flash_gpu (GPU); gemma_jax.model.kernels.
    attention_impl: str = "auto"
    # Low-rank adapters (gemma_jax.model.lora), used only when a "lora" collection is passed.
    lora_scale: float = 1.0  # alpha / rank
    lora_dropout: float = 0.0  # on the adapter input, when a "dropout" rng is passed

    def __post_init__(self):
        for field in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads",
                      "head_dim", "vocab_size", "sliding_window"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; "
                                 f"choose one of {sorted(_DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        kernels.check_impl(self.attention_impl)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The named preset (gemma2_2b, gemma2_9b, gemma2_27b, gemma2_tiny, gemma2_test)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        """Names accepted by from_preset."""
        return sorted(_PRESETS)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON files."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**d)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_local(self, layer: int) -> bool:
        """Layer 0 is local (sliding window); layers alternate local/global."""
        return layer % 2 == 0

    def num_params(self) -> int:
        """Parameter count (embedding counted once: it is tied)."""
        d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
        block = n * d * h * 2 + 2 * k * d * h + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * block + d

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Model FLOPs per token for causal sequences of seq_len, counting only visible keys.

        Local layers see at most sliding_window keys, so long sequences cost less than a
        full-attention count would claim. Training is 3x the forward (forward + backward).
        """
        d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
        matmul = 2 * (2 * n * d * h + 2 * k * d * h + 3 * d * f)
        t, w = seq_len, self.sliding_window
        global_keys = (t + 1) / 2
        local_keys = global_keys if t <= w else (w * (w + 1) / 2 + (t - w) * w) / t
        attention = sum(4 * n * h * (local_keys if self.is_local(i) else global_keys)
                        for i in range(self.num_layers))
        forward = self.num_layers * matmul + attention + 2 * d * self.vocab_size
        return forward * (3 if training else 1)


# ----------------------------------------------------------------------------- primitives


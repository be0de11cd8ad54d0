"""ModelConfig: Gemma 2 and Gemma 3 shapes and numerics, the published presets, remat policies.

Generations differ by data, never by code paths keyed on a name: the layer pattern
(`attention_pattern`, the repeating cycle of "local" sliding-window and "global" layers), QK-norm,
RoPE base and linear scaling per layer type, and the soft-caps (0 = none). `family` only says
which published architecture the config follows, so exporters can name it (HF model_type).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.model import kernels


LAYER_TYPES = ("local", "global")
FAMILIES = ("gemma2", "gemma3")
# Gemma 3 releases: five sliding-window layers, then one global layer, repeated.
GEMMA3_PATTERN = ("local",) * 5 + ("global",)
# What every Gemma 3 text model shares (gemma library Gemma3_* configs, transformers Gemma3TextConfig).
_GEMMA3 = dict(family="gemma3", attention_pattern=GEMMA3_PATTERN, qk_norm=True, attn_softcap=0.0,
               final_softcap=0.0, rope_base=1_000_000.0, local_rope_base=10_000.0, vocab_size=262144)

# Fields that differ from ModelConfig's (Gemma 2) defaults in every model of a family; what a
# checkpoint of no published size starts from.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {}, "gemma3": {k: v for k, v in _GEMMA3.items() if k != "vocab_size"}}

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
    # Gemma 3 (gemma library Gemma3_270M .. Gemma3_27B). 4B and up scale global RoPE positions by
    # 1/8 (HF rope_scaling linear, factor 8) and have a 128k context; 270M and 1B 32k.
    "gemma3_270m": dict(_GEMMA3, num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4, num_kv_heads=1,
                        head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_seq_len=32768),
    "gemma3_1b": dict(_GEMMA3, num_layers=26, embed_dim=1152, hidden_dim=6912, num_heads=4, num_kv_heads=1,
                      head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_seq_len=32768),
    "gemma3_4b": dict(_GEMMA3, num_layers=34, embed_dim=2560, hidden_dim=10240, num_heads=8, num_kv_heads=4,
                      head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, rope_scale=8.0,
                      max_seq_len=131072),
    "gemma3_12b": dict(_GEMMA3, num_layers=48, embed_dim=3840, hidden_dim=15360, num_heads=16, num_kv_heads=8,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, rope_scale=8.0,
                       max_seq_len=131072),
    # 27B scales queries by (D/N)^-0.5 = 168^-0.5, as Gemma 2 27B did.
    "gemma3_27b": dict(_GEMMA3, num_layers=62, embed_dim=5376, hidden_dim=21504, num_heads=32, num_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=168, sliding_window=1024, rope_scale=8.0,
                       max_seq_len=131072),
    # Small Gemma 3 shapes for CPU runs. gemma3_test ends mid-cycle (one 5+1 period, then two
    # local layers) and has a window shorter than the test sequences.
    "gemma3_tiny": dict(_GEMMA3, num_layers=6, embed_dim=128, hidden_dim=512, num_heads=4, num_kv_heads=2,
                        head_dim=32, query_pre_attn_scalar=32, vocab_size=2048, sliding_window=64),
    "gemma3_test": dict(_GEMMA3, num_layers=8, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                        head_dim=16, query_pre_attn_scalar=24, vocab_size=512, sliding_window=8, rope_scale=4.0),
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
    """Gemma 2 / Gemma 3 shape and numerics; hashable so it can be a static jit argument."""

    num_layers: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 256128
    sliding_window: int = 4096
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float = 50.0  # 0 disables (Gemma 3)
    final_softcap: float = 30.0  # 0 disables (Gemma 3)
    rope_base: float = 10000.0  # RoPE base of global layers (Gemma 3: 1e6)
    # Which published architecture this follows: "gemma2" | "gemma3". Exporters name it (HF
    # model_type); the model itself only reads the feature fields below.
    family: str = "gemma2"
    # The repeating cycle of layer types ("local" = sliding window, "global"): layer i has type
    # attention_pattern[i % len]; a depth that ends mid-cycle keeps the cycle's first types.
    attention_pattern: tuple[str, ...] = ("local", "global")
    qk_norm: bool = False  # RMSNorm (1 + w) per head on queries and keys, before RoPE (Gemma 3)
    local_rope_base: float = 10000.0  # RoPE base of local layers
    rope_scale: float = 1.0  # linear RoPE position scaling of global layers (>= 1; Gemma 3 4B+: 8)
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
        if isinstance(self.attention_pattern, (list, str)):  # JSON gives lists; the config must hash
            pattern = (self.attention_pattern,) if isinstance(self.attention_pattern, str) else self.attention_pattern
            object.__setattr__(self, "attention_pattern", tuple(pattern))
        if not self.attention_pattern or any(t not in LAYER_TYPES for t in self.attention_pattern):
            raise ValueError(f"ModelConfig.attention_pattern={self.attention_pattern!r}; give a non-empty "
                             f"sequence of {' / '.join(LAYER_TYPES)}")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}; choose one of {list(FAMILIES)}")
        for field in ("rope_base", "local_rope_base", "rope_scale"):
            if not float(getattr(self, field)) > 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
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
        """The named preset (gemma2_2b/9b/27b, gemma3_270m/1b/4b/12b/27b, and small *_tiny, *_test shapes)."""
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
        """Inverse of to_dict; unknown keys are an error naming them.

        A dict written before local_rope_base existed (Gemma 2 model.json files) used rope_base
        for every layer, so it keeps doing so.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        d = dict(d)
        if "rope_base" in d and "local_rope_base" not in d:
            d["local_rope_base"] = d["rope_base"]
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

    @property
    def layer_types(self) -> tuple[str, ...]:
        """"local" / "global" of every layer: the attention pattern repeated over the depth."""
        p = self.attention_pattern
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    def is_local(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window."""
        return self.attention_pattern[layer % len(self.attention_pattern)] == "local"

    def rope(self, local: bool) -> tuple[float, float]:
        """(RoPE base, linear position scale) of a local or global layer."""
        return (float(self.local_rope_base), 1.0) if local else (float(self.rope_base), float(self.rope_scale))

    # Scanned layout: one period of attention_pattern is the scanned unit (a module with one
    # Block per position, named by block_names), scanned num_periods times; the remaining
    # num_layers % period layers stay unrolled as `layer_{i}`.

    @property
    def period(self) -> int:
        """Layers in one cycle of the attention pattern (the scanned unit)."""
        return len(self.attention_pattern)

    @property
    def num_periods(self) -> int:
        """How many whole periods the scan runs over."""
        return self.num_layers // self.period

    @property
    def block_names(self) -> tuple[str, ...]:
        """Names of the blocks inside one period: the type where it occurs once in the pattern
        (Gemma 2: local, global), else type_k for its k-th occurrence (Gemma 3: local_0 .. local_4,
        global)."""
        p = self.attention_pattern
        seen: dict[str, int] = {}
        names = []
        for kind in p:
            names.append(kind if p.count(kind) == 1 else f"{kind}_{seen.get(kind, 0)}")
            seen[kind] = seen.get(kind, 0) + 1
        return tuple(names)

    def scanned_layers(self) -> dict[str, list[int]]:
        """{block name: the layer indices stacked in it, in scan order} of the scanned layout."""
        return {name: [j * self.period + pos for j in range(self.num_periods)]
                for pos, name in enumerate(self.block_names)}

    def unscanned_layers(self) -> list[int]:
        """Layers kept as `layer_{i}` outside the scan (every layer when scan_layers is False)."""
        return list(range(self.num_periods * self.period if self.scan_layers else 0, self.num_layers))

    def num_params(self) -> int:
        """Parameter count (embedding counted once: it is tied)."""
        d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
        block = n * d * h * 2 + 2 * k * d * h + 3 * d * f + 4 * d + (2 * h if self.qk_norm else 0)
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


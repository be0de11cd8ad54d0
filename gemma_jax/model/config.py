"""ModelConfig: Gemma 2, 3 and 4 shapes and numerics, the published presets, remat policies.

Generations differ by data, never by code paths keyed on a name: the layer pattern
(`attention_pattern`, the repeating cycle of "local" sliding-window and "global" layers), QK-norm,
RoPE base and linear scaling per layer type, and the soft-caps (0 = none); Gemma 4 adds the norm
form, value norm, a per-layer scale, global layers with their own head_dim / kv heads / partial
RoPE / one K=V projection, per-layer input embeddings (PLE), KV sharing, the double-wide MLP and
the mixture of experts. Attributes of a layer type are read through `head_dim_of(kind)`,
`kv_heads_of(kind)`, `k_eq_v(kind)`, `rope(local)` and `rope_fraction(local)`. `family` only
says which published architecture the config follows, so exporters can name it (HF model_type).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.model import kernels


LAYER_TYPES = ("local", "global")
FAMILIES = ("gemma2", "gemma3", "gemma4")
MOE_IMPLS = ("auto", "dense", "ragged")
# Gemma 3 releases: five sliding-window layers, then one global layer, repeated.
GEMMA3_PATTERN = ("local",) * 5 + ("global",)
# What every Gemma 3 text model shares (gemma library Gemma3_* configs, transformers Gemma3TextConfig).
_GEMMA3 = dict(family="gemma3", attention_pattern=GEMMA3_PATTERN, qk_norm=True, attn_softcap=0.0,
               final_softcap=0.0, rope_base=1_000_000.0, local_rope_base=10_000.0, vocab_size=262144)

# What every Gemma 4 text model shares (gemma library _gemma4_config, transformers Gemma4TextConfig):
# the final cap 30 and no attention cap, QK-norm with queries not scaled (query scalar 1), value
# norm, norms that multiply by their stored scale, a learned per-layer scale, global layers of
# head_dim 512 rotating a quarter of it (base 1e6), local layers base 1e4.
_GEMMA4 = dict(family="gemma4", qk_norm=True, attn_softcap=0.0, final_softcap=30.0, rope_base=1_000_000.0,
               local_rope_base=10_000.0, vocab_size=262144, query_pre_attn_scalar=1.0, norm_scale_offset=0.0,
               value_norm=True, layer_scale=True, head_dim=256, global_head_dim=512, global_rope_fraction=0.25)
GEMMA4_PATTERN = ("local",) * 5 + ("global",)  # E4B, 31B, 26B-A4B; E2B: four local, one global

# Fields that differ from ModelConfig's (Gemma 2) defaults in every model of a family; what a
# checkpoint of no published size starts from.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {}, "gemma3": {k: v for k, v in _GEMMA3.items() if k != "vocab_size"},
    "gemma4": {**{k: v for k, v in _GEMMA4.items() if k not in ("vocab_size", "head_dim")},
               "attention_pattern": GEMMA4_PATTERN}}

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
    # Gemma 4 (gemma library Gemma4_E2B .. Gemma4_26B_A4B, 4.0.1; transformers Gemma4TextConfig).
    # E2B/E4B: per-layer embeddings of 256 per layer, the last 20 / 18 layers reuse the KV of the
    # last earlier layer of their type (E2B's have a double-wide MLP), 128k context.
    "gemma4_e2b": dict(_GEMMA4, num_layers=35, embed_dim=1536, hidden_dim=6144, num_heads=8, num_kv_heads=1,
                       sliding_window=512, attention_pattern=("local",) * 4 + ("global",), per_layer_dim=256,
                       num_kv_shared_layers=20, double_wide_mlp=True, max_seq_len=131072),
    "gemma4_e4b": dict(_GEMMA4, num_layers=42, embed_dim=2560, hidden_dim=10240, num_heads=8, num_kv_heads=2,
                       sliding_window=512, attention_pattern=GEMMA4_PATTERN, per_layer_dim=256,
                       num_kv_shared_layers=18, max_seq_len=131072),
    # 31B and 26B-A4B: global layers have fewer kv heads and one projection for K and V; 256k context.
    "gemma4_31b": dict(_GEMMA4, num_layers=60, embed_dim=5376, hidden_dim=21504, num_heads=32, num_kv_heads=16,
                       global_kv_heads=4, attention_k_eq_v=True, sliding_window=1024,
                       attention_pattern=GEMMA4_PATTERN, max_seq_len=262144),
    # 128 experts of width 704, 8 per token, beside a dense MLP of width 2112 in every layer.
    "gemma4_26b_a4b": dict(_GEMMA4, num_layers=30, embed_dim=2816, hidden_dim=2112, num_heads=16, num_kv_heads=8,
                           global_kv_heads=2, attention_k_eq_v=True, sliding_window=1024,
                           attention_pattern=GEMMA4_PATTERN, num_experts=128, experts_per_token=8, expert_dim=704,
                           max_seq_len=262144),
    # Small Gemma 4 shapes for CPU runs, one per released shape. gemma4_e_test: PLE, KV sharing (the
    # last 5 of 12 layers: the shared region starts mid-period, so both scans and unrolled producers
    # and consumers occur), double-wide MLP, global head_dim 32 != 16. gemma4_dense_test: global layers with 1 kv head and K = V. gemma4_moe_test: 8
    # experts, 2 per token. Windows are shorter than the test sequences.
    "gemma4_e_test": dict(_GEMMA4, num_layers=12, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                          head_dim=16, global_head_dim=32, vocab_size=512, sliding_window=8,
                          attention_pattern=("local", "local", "global"), per_layer_dim=8, num_kv_shared_layers=5,
                          double_wide_mlp=True),
    "gemma4_dense_test": dict(_GEMMA4, num_layers=8, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                              head_dim=16, global_head_dim=32, global_kv_heads=1, attention_k_eq_v=True,
                              vocab_size=512, sliding_window=8, attention_pattern=("local", "local", "local", "global")),
    "gemma4_moe_test": dict(_GEMMA4, num_layers=4, embed_dim=64, hidden_dim=64, num_heads=4, num_kv_heads=2,
                            head_dim=16, global_head_dim=32, global_kv_heads=1, attention_k_eq_v=True, vocab_size=512,
                            sliding_window=8, attention_pattern=("local", "global"), num_experts=8,
                            experts_per_token=2, expert_dim=32),
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
    """Gemma 2 / 3 / 4 shape and numerics; hashable so it can be a static jit argument."""

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
    # Gemma 4. Every default leaves Gemma 2 and 3 as they were.
    norm_scale_offset: float = 1.0  # RMSNorm multiplies by (offset + stored scale): Gemma 2/3 store scale - 1, Gemma 4 the scale
    value_norm: bool = False  # RMSNorm without a scale on every value head
    layer_scale: bool = False  # a learned scalar multiplying each layer's output (HF layer_scalar)
    global_head_dim: int = 0  # head_dim of global layers (0: head_dim)
    global_kv_heads: int = 0  # kv heads of global layers (0: num_kv_heads)
    attention_k_eq_v: bool = False  # global layers: one projection gives the keys and (before its norm) the values
    global_rope_fraction: float = 1.0  # share of a global head's dims RoPE rotates (HF "proportional" partial_rotary_factor)
    per_layer_dim: int = 0  # per-layer input embeddings (PLE): width per layer (0: none)
    per_layer_vocab: int = 0  # rows of the PLE table (0: vocab_size)
    num_kv_shared_layers: int = 0  # the last N layers reuse the KV of the last earlier layer of their type
    double_wide_mlp: bool = False  # KV-shared layers have an MLP of 2 * hidden_dim
    num_experts: int = 0  # mixture of experts beside the dense MLP in every layer (0: none)
    experts_per_token: int = 0  # top-k of the router
    expert_dim: int = 0  # hidden width of one expert
    norm_eps: float = 1e-6
    max_seq_len: int = 8192
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    # Training-pass attention: auto | xla | splash (TPU) | flash_gpu (GPU); gemma_jax.model.kernels.
    attention_impl: str = "auto"
    # Expert dispatch (gemma_jax.model.moe): dense | ragged (jax.lax.ragged_dot) | auto (ragged on
    # TPU/GPU, dense on CPU, where ragged_dot computes every group for every row).
    moe_impl: str = "auto"
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
        if self.head_dim % 2 or self.global_head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} and global_head_dim={self.global_head_dim} must be even for RoPE")
        for field in ("global_head_dim", "global_kv_heads", "per_layer_dim", "per_layer_vocab", "num_kv_shared_layers",
                      "num_experts", "experts_per_token", "expert_dim"):
            if int(getattr(self, field)) < 0:
                raise ValueError(f"ModelConfig.{field} must be >= 0, got {getattr(self, field)}")
        if self.num_heads % self.kv_heads_of("global"):
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of global_kv_heads={self.global_kv_heads}")
        if not 0 < float(self.global_rope_fraction) <= 1:
            raise ValueError(f"ModelConfig.global_rope_fraction must be in (0, 1], got {self.global_rope_fraction}")
        if self.num_kv_shared_layers:
            if self.num_kv_shared_layers >= self.num_layers:
                raise ValueError(f"num_kv_shared_layers={self.num_kv_shared_layers} must be below num_layers="
                                 f"{self.num_layers} (shared layers reuse the KV of earlier ones)")
            missing = sorted(set(self.layer_types[self.first_kv_shared:]) - set(self.layer_types[:self.first_kv_shared]))
            if missing:
                raise ValueError(f"num_kv_shared_layers={self.num_kv_shared_layers}: no earlier {missing[0]} layer "
                                 "to share the KV of (every layer type must occur before the shared layers)")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts and self.expert_dim > 0):
            raise ValueError(f"num_experts={self.num_experts} needs 0 < experts_per_token <= num_experts (got "
                             f"{self.experts_per_token}) and expert_dim > 0 (got {self.expert_dim})")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"ModelConfig.moe_impl={self.moe_impl!r}; choose one of {list(MOE_IMPLS)}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; "
                                 f"choose one of {sorted(_DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        kernels.check_impl(self.attention_impl)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The named preset (gemma2_2b/9b/27b, gemma3_270m/1b/4b/12b/27b, gemma4_e2b/e4b/31b/26b_a4b, and
        small *_tiny, *_test shapes)."""
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

    def rope_fraction(self, local: bool) -> float:
        """Share of a head's dims that RoPE rotates on a local or global layer (the rest pass unrotated)."""
        return 1.0 if local else float(self.global_rope_fraction)

    def head_dim_of(self, kind: str) -> int:
        """Head dim of a layer type ("local" / "global")."""
        return self.global_head_dim or self.head_dim if kind == "global" else self.head_dim

    def kv_heads_of(self, kind: str) -> int:
        """KV heads of a layer type."""
        return self.global_kv_heads or self.num_kv_heads if kind == "global" else self.num_kv_heads

    def k_eq_v(self, kind: str) -> bool:
        """Whether layers of this type project keys and values with one weight (Gemma 4 global layers)."""
        return self.attention_k_eq_v and kind == "global"

    # KV sharing: the last num_kv_shared_layers layers compute no keys or values of their own; they
    # attend to those of the last layer of their type before them (its "producer").

    @property
    def first_kv_shared(self) -> int:
        """Index of the first KV-shared layer (num_layers when none is shared)."""
        return self.num_layers - self.num_kv_shared_layers

    def kv_shared(self, layer: int) -> bool:
        """Whether `layer` reuses an earlier layer's keys and values (and keeps no cache)."""
        return layer >= self.first_kv_shared

    def kv_producer(self, kind: str) -> int:
        """The layer whose keys and values the shared layers of type `kind` reuse."""
        return max(i for i in range(self.first_kv_shared) if self.layer_types[i] == kind)

    def mlp_dim(self, layer: int) -> int:
        """Hidden width of the dense MLP of `layer` (double on KV-shared layers with double_wide_mlp)."""
        return self.hidden_dim * (2 if self.double_wide_mlp and self.kv_shared(layer) else 1)

    # Scanned layout: one period of attention_pattern is the scanned unit (a module with one
    # Block per position, named by block_names), scanned num_periods times; the remaining
    # num_layers % period layers stay unrolled as `layer_{i}`. With KV sharing there are two scans
    # (scan_groups): `layers` over the whole periods before the first producer, `shared_layers`
    # over the whole periods of shared layers; the producers (which hand their keys and values
    # on) and the layers between and after the two scans stay unrolled.

    @property
    def period(self) -> int:
        """Layers in one cycle of the attention pattern (the scanned unit)."""
        return len(self.attention_pattern)

    def scan_groups(self) -> dict[str, tuple[int, int]]:
        """{scan name: (first layer, number of periods)}: `layers` always, `shared_layers` when
        KV-shared layers fill at least one whole period."""
        p = self.period
        if not self.num_kv_shared_layers:
            return {"layers": (0, self.num_layers // p)}
        first_producer = min(self.kv_producer(kind) for kind in set(self.layer_types))
        groups = {"layers": (0, first_producer // p)}
        start = -(-self.first_kv_shared // p) * p
        if (self.num_layers - start) // p:
            groups["shared_layers"] = (start, (self.num_layers - start) // p)
        return groups

    @property
    def num_periods(self) -> int:
        """How many whole periods the `layers` scan runs over."""
        return self.scan_groups()["layers"][1]

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

    def scanned_groups(self) -> dict[str, dict[str, list[int]]]:
        """{scan name: {block name: the layer indices stacked in it, in scan order}}."""
        return {group: {name: [first + j * self.period + pos for j in range(periods)]
                        for pos, name in enumerate(self.block_names)}
                for group, (first, periods) in self.scan_groups().items()}

    def scanned_layers(self) -> dict[str, list[int]]:
        """{block name: the layer indices stacked in it, in scan order} of the `layers` scan."""
        return self.scanned_groups()["layers"]

    def unscanned_layers(self) -> list[int]:
        """Layers kept as `layer_{i}` outside the scans (every layer when scan_layers is False)."""
        if not self.scan_layers:
            return list(range(self.num_layers))
        scanned = {i for blocks in self.scanned_groups().values() for layers in blocks.values() for i in layers}
        return [i for i in range(self.num_layers) if i not in scanned]

    def _layer_params(self, i: int) -> tuple[int, int]:
        """(parameters of layer i, those of its experts that are not among the top-k of a token)."""
        kind, d, n = self.layer_types[i], self.embed_dim, self.num_heads
        h, k = self.head_dim_of(kind), self.kv_heads_of(kind)
        attn = 2 * n * d * h + (h if self.qk_norm else 0)
        if not self.kv_shared(i):
            attn += (1 if self.k_eq_v(kind) else 2) * k * d * h + (h if self.qk_norm else 0)
        total = attn + 3 * d * self.mlp_dim(i) + 4 * d + (1 if self.layer_scale else 0)
        if self.per_layer_dim:
            total += 2 * d * self.per_layer_dim + d
        idle = 0
        if self.num_experts:
            expert = 3 * d * self.expert_dim
            total += self.num_experts * (expert + 1) + d * self.num_experts + d + 3 * d
            idle = (self.num_experts - self.experts_per_token) * expert
        return total, idle

    def num_params(self) -> int:
        """Parameter count (embedding counted once: it is tied)."""
        total = self.vocab_size * self.embed_dim + self.embed_dim
        if self.per_layer_dim:
            lp = self.num_layers * self.per_layer_dim
            total += (self.per_layer_vocab or self.vocab_size) * lp + self.embed_dim * lp + self.per_layer_dim
        return total + sum(self._layer_params(i)[0] for i in range(self.num_layers))

    def num_active_params(self) -> int:
        """Parameters a token uses: all but the experts the router does not pick for it."""
        return self.num_params() - sum(self._layer_params(i)[1] for i in range(self.num_layers))

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Model FLOPs per token for causal sequences of seq_len, counting only visible keys and the
        experts a token is routed to.

        Local layers see at most sliding_window keys, so long sequences cost less than a
        full-attention count would claim. Training is 3x the forward (forward + backward).
        """
        d, n = self.embed_dim, self.num_heads
        t, w = seq_len, self.sliding_window
        global_keys = (t + 1) / 2
        local_keys = global_keys if t <= w else (w * (w + 1) / 2 + (t - w) * w) / t
        forward = 2 * d * self.vocab_size
        for i, kind in enumerate(self.layer_types):
            h, k = self.head_dim_of(kind), self.kv_heads_of(kind)
            kv = 0 if self.kv_shared(i) else (1 if self.k_eq_v(kind) else 2) * k * d * h
            matmul = 2 * n * d * h + kv + 3 * d * self.mlp_dim(i) + 2 * d * self.per_layer_dim
            if self.num_experts:
                matmul += d * self.num_experts + self.experts_per_token * 3 * d * self.expert_dim
            forward += 2 * matmul + 4 * n * h * (local_keys if kind == "local" else global_keys)
        if self.per_layer_dim:
            forward += 2 * d * self.num_layers * self.per_layer_dim
        return forward * (3 if training else 1)

    def unembed_flops_per_token(self, *, training: bool = True) -> float:
        """The output projection's share of flops_per_token (2 D V a position, 3x in training): a
        position the loss does not score needs none of it, and the loss skips it where it can."""
        return 2 * self.embed_dim * self.vocab_size * (3 if training else 1)


# ----------------------------------------------------------------------------- primitives


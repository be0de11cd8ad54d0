"""The official `gemma` library's Gemma 4 layout (gm.nn.Gemma4_*, 4.0.1): its names for the model's
leaves, and the Gemma 4 fields its shapes tell.

Canonical official names (official.py strips the FLAT / NESTED / wrapper differences) where they
differ from the model's:
  layer_i/skip_scale (1,)                 -> layer_i/layer_scale
  embedder/per_layer_embeddings (V,L,P)   -> embedder/per_layer_embedding
and in the mixture-of-experts layers (26B-A4B), whose dense MLP the library calls mlp2:
  mlp2/{gating_einsum,linear}             -> mlp/...
  pre_ffw2_norm, post_ffw2_norm           -> pre_ffw_norm, post_mlp_norm  (the dense branch)
  pre_ffw_norm, post_ffw1_norm            -> pre_moe_norm, post_moe_norm  (the expert branch)
  mlp/router_logits/w (D,E)               -> moe/router/w
  mlp/router_scale, mlp/per_expert_scale  -> moe/router_scale, moe/per_expert_scale
  mlp/gating_einsum/w (E,2,F,D)           -> moe/expert_gating/w (2,E,D,F)
  mlp/linear/w (E,F,D)                    -> moe/expert_linear/w
The library keeps kv_einsum and key_norm weights in KV-shared layers that it never uses; they are
not read, and `placeholders` writes zeros (ones for the norm) where the library's modules want them.

Numerics: the library routes the pre_ffw_norm-ed input (then an unscaled norm) where transformers
routes the residual stream itself; the model follows transformers (the released HF checkpoints).
"""

from __future__ import annotations

from gemma_jax.model.config import ModelConfig

PRESETS = ("gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b")
# What the shapes cannot tell about a custom-shaped Gemma 4 checkpoint (the sidecar written by
# official.write holds them): the layer pattern, the window and how many layers share KV (the
# library keeps kv weights in shared layers too); with experts, how many a token takes.
REQUIRED_HPARAMS = ("attention_pattern", "sliding_window", "num_kv_shared_layers")
FAMILY_MARKER = "layer_0/skip_scale"

_MOE_NAMES = {("pre_ffw_norm",): ("pre_ffw2_norm",), ("post_mlp_norm",): ("post_ffw2_norm",),
              ("pre_moe_norm",): ("pre_ffw_norm",), ("post_moe_norm",): ("post_ffw1_norm",),
              ("moe", "router"): ("mlp", "router_logits"), ("moe", "router_scale"): ("mlp", "router_scale"),
              ("moe", "per_expert_scale"): ("mlp", "per_expert_scale"),
              ("moe", "expert_gating"): ("mlp", "gating_einsum"), ("moe", "expert_linear"): ("mlp", "linear"),
              ("mlp",): ("mlp2",)}
EXPERT_GATING_PERM = (1, 0, 3, 2)  # stored (E, 2, F, D) -> the model's (2, E, D, F), and back


def official_name(config: ModelConfig, path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
    """(canonical official name, axis permutation taking the stored array to the model's, or None)
    of an unrolled leaf path such as ('layer_3', 'moe', 'expert_gating', 'w')."""
    if path == ("embedder", "per_layer_embedding"):
        return "embedder/per_layer_embeddings", None
    if not path[0].startswith("layer_"):
        return "/".join(path), None
    head, rest = path[0], path[1:]
    if rest == ("layer_scale",):
        return f"{head}/skip_scale", None
    if config.num_experts:
        for ours, theirs in sorted(_MOE_NAMES.items(), key=lambda kv: -len(kv[0])):
            if rest[:len(ours)] == ours:
                perm = EXPERT_GATING_PERM if ours == ("moe", "expert_gating") else None
                return "/".join((head, *theirs, *rest[len(ours):])), perm
    return "/".join(path), None


def bare(config: ModelConfig, name: str) -> bool:
    """Whether the library's NESTED tree keeps this leaf as a bare array (the dense FFW's weights,
    shared into the mlp / mlp2 scope)."""
    parts = name.split("/")
    dense = "mlp2" if config.num_experts else "mlp"
    return len(parts) == 4 and parts[1] == dense and parts[2] in ("gating_einsum", "linear") and parts[3] == "w"


def derived_fields(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The Gemma 4 fields the stored shapes ({canonical name: shape}) tell, given the layer
    pattern and KV sharing of `config`: global head dim, kv heads and K=V, PLE width and rows,
    experts and their width, the double-wide MLP."""
    def shape(name):
        if name not in shapes:
            raise ValueError(f"missing {name} in the official Gemma 4 checkpoint (the layer pattern "
                             f"{config.attention_pattern} puts it there)")
        return shapes[name]

    out = {}
    types = config.layer_types
    if "global" in types:
        g = types.index("global")
        out["global_head_dim"] = shape(f"layer_{g}/attn/q_einsum/w")[2]
        k_eq_v = f"layer_{g}/attn/k_einsum/w" in shapes
        out["attention_k_eq_v"] = k_eq_v
        kv = shape(f"layer_{g}/attn/{'k_einsum' if k_eq_v else 'kv_einsum'}/w")[-3]
        out["global_kv_heads"] = 0 if kv == config.num_kv_heads else kv
    if "embedder/per_layer_embeddings" in shapes:
        rows, _, p = shapes["embedder/per_layer_embeddings"]
        out.update(per_layer_dim=p, per_layer_vocab=0 if rows == config.vocab_size else rows)
    if "layer_0/mlp/router_logits/w" in shapes:
        e, fe, _ = shape("layer_0/mlp/linear/w")
        out.update(num_experts=e, expert_dim=fe)
    if config.num_kv_shared_layers:
        key = f"layer_{config.num_layers - 1}/{'mlp2' if out.get('num_experts') else 'mlp'}/gating_einsum/w"
        out["double_wide_mlp"] = shape(key)[1] == 2 * config.hidden_dim
    return out


def placeholders(config: ModelConfig, layer: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """{official name: (shape, fill)} of the weights the library declares in a KV-shared layer but
    never uses (the model has none): kv_einsum or k_einsum at zero, key_norm at one."""
    if not config.kv_shared(layer):
        return {}
    kind = config.layer_types[layer]
    k, d, h = config.kv_heads_of(kind), config.embed_dim, config.head_dim_of(kind)
    kv = ("k_einsum", (k, d, h)) if config.k_eq_v(kind) else ("kv_einsum", (2, k, d, h))
    return {f"layer_{layer}/attn/{kv[0]}/w": (kv[1], 0.0), f"layer_{layer}/attn/key_norm/scale": ((h,), 1.0)}

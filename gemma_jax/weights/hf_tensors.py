"""The tensors of a Hugging Face Gemma 2 / 3 / 4 text model and the model's leaves they map to, both
ways (names relative to the text model's prefix, e.g. `layers.3.self_attn.q_proj.weight`).

torch Linear weights are [out, in]; the model's einsum weights put heads first:
  q_einsum (N,D,H)    <- q_proj (N*H, D) viewed (N,H,D), axes swapped
  kv_einsum (2,K,D,H) <- k_proj, v_proj (K*H, D) likewise, k first
  k_einsum (K,D,H)    <- k_proj alone (Gemma 4 global layers with attention_k_eq_v: no v_proj)
  attn_vec_einsum (N,H,D) <- o_proj (D, N*H) viewed (D,N,H), D moved last
  gating_einsum (2,F,D) <- gate_proj, up_proj (F, D) as is, gate first
  linear (F,D)        <- down_proj (D, F) transposed
Head dims and kv heads are the layer type's; Gemma 4's KV-shared layers have no k/v weights and
no k_norm. Gemma 4 further maps
  layer_scale (1,)                        <- layer_scalar (a buffer in transformers)
  per_layer_input_gate (D,P), per_layer_projection (P,D) <- the Linear weights transposed
  embedder/per_layer_embedding (V,L,P)    <- embed_tokens_per_layer (V, L*P)
  embedder/per_layer_model_projection (D,L,P) <- per_layer_model_projection (L*P, D) transposed
  moe/router/w (D,E)                      <- router.proj (E, D) transposed
  moe/router_scale, moe/per_expert_scale  <- router.scale, router.per_expert_scale
  moe/expert_gating (2,E,D,F)             <- experts.gate_up_proj (E, 2F, D): gate rows first
  moe/expert_linear (E,F,D)               <- experts.down_proj (E, D, F)
  post_mlp_norm, pre_moe_norm, post_moe_norm <- post_feedforward_layernorm_1, pre_feedforward_layernorm_2,
                                             post_feedforward_layernorm_2
Every family stores the norm scales as the model keeps them (Gemma 2/3 zero-centred, Gemma 4 the
factor), so norms copy unchanged; lm_head is tied.
"""

from __future__ import annotations

from collections.abc import Callable

from gemma_jax.model.config import ModelConfig
from gemma_jax.weights import layout

NORMS = {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
MOE_NORMS = {"post_mlp_norm": "post_feedforward_layernorm_1", "pre_moe_norm": "pre_feedforward_layernorm_2",
             "post_moe_norm": "post_feedforward_layernorm_2"}
QK_NORMS = {"query_norm": "q_norm", "key_norm": "k_norm"}  # Gemma 3 and 4, under attn/ and self_attn.


def _dims(c: ModelConfig, i: int):
    kind = c.layer_types[i]
    return c.embed_dim, c.num_heads, c.kv_heads_of(kind), c.head_dim_of(kind), c.mlp_dim(i), kind


def read_layer(c: ModelConfig, i: int, t: Callable) -> dict:
    """Unrolled layer i from `t(name, shape)`, which returns the stored tensor (a lazy view)."""
    d, n, k, h, f, kind = _dims(c, i)
    heads_first = lambda w, heads: w.reshape(heads, h, d).transpose(0, 2, 1)  # noqa: E731
    attn = {"q_einsum": {"w": heads_first(t("self_attn.q_proj.weight", (n * h, d)), n)},
            "attn_vec_einsum": {"w": t("self_attn.o_proj.weight", (d, n * h)).reshape(d, n, h).transpose(1, 2, 0)}}
    if not c.kv_shared(i):
        key = heads_first(t("self_attn.k_proj.weight", (k * h, d)), k)
        if c.k_eq_v(kind):
            attn["k_einsum"] = {"w": key}
        else:
            attn["kv_einsum"] = {"w": layout.Stacked([key, heads_first(t("self_attn.v_proj.weight", (k * h, d)), k)])}
    if c.qk_norm:
        for ours, theirs in QK_NORMS.items():
            if ours == "query_norm" or not c.kv_shared(i):
                attn[ours] = {"scale": t(f"self_attn.{theirs}.weight", (h,))}
    layer = {"attn": attn, "mlp": {
        "gating_einsum": {"w": layout.Stacked([t("mlp.gate_proj.weight", (f, d)), t("mlp.up_proj.weight", (f, d))])},
        "linear": {"w": t("mlp.down_proj.weight", (d, f)).T}}}
    norms = {**NORMS, **(MOE_NORMS if c.num_experts else {})}
    for ours, theirs in norms.items():
        layer[ours] = {"scale": t(f"{theirs}.weight", (d,))}
    if c.layer_scale:
        layer["layer_scale"] = t("layer_scalar", (1,))
    if c.per_layer_dim:
        p = c.per_layer_dim
        layer["per_layer_input_gate"] = {"w": t("per_layer_input_gate.weight", (p, d)).T}
        layer["per_layer_projection"] = {"w": t("per_layer_projection.weight", (d, p)).T}
        layer["post_per_layer_input_norm"] = {"scale": t("post_per_layer_input_norm.weight", (d,))}
    if c.num_experts:
        e, fe = c.num_experts, c.expert_dim
        layer["moe"] = {
            "router": {"w": t("router.proj.weight", (e, d)).T},
            "router_scale": t("router.scale", (d,)), "per_expert_scale": t("router.per_expert_scale", (e,)),
            "expert_gating": {"w": t("experts.gate_up_proj", (e, 2 * fe, d)).reshape(e, 2, fe, d).transpose(1, 0, 3, 2)},
            "expert_linear": {"w": t("experts.down_proj", (e, d, fe)).transpose(0, 2, 1)}}
    return layer


def read_embedder(c: ModelConfig, t: Callable, rows: int) -> dict:
    """The unrolled embedder (with Gemma 4's per-layer tables) from `t(name, shape)`."""
    d = c.embed_dim
    out = {"input_embedding": t("embed_tokens.weight", (rows, d))}
    if c.per_layer_dim:
        lp, p = c.num_layers * c.per_layer_dim, c.per_layer_dim
        vp = c.per_layer_vocab or c.vocab_size
        out["per_layer_embedding"] = t("embed_tokens_per_layer.weight", (vp, lp)).reshape(vp, c.num_layers, p)
        out["per_layer_model_projection"] = {"w": t("per_layer_model_projection.weight", (lp, d)).T.reshape(
            d, c.num_layers, p)}
        out["per_layer_projection_norm"] = {"scale": t("per_layer_projection_norm.weight", (p,))}
    return out


def write_layer(c: ModelConfig, i: int, L: dict) -> list[tuple[str, tuple[int, ...], Callable]]:
    """(name, shape, producer) of every tensor of layer i, `L` the unrolled view of the layer
    (zero-arg callables giving arrays)."""
    d, n, k, h, f, kind = _dims(c, i)
    a = L["attn"]
    flat = lambda w, heads: w.transpose(0, 2, 1).reshape(heads * h, d)  # noqa: E731
    out = [("self_attn.q_proj.weight", (n * h, d), lambda: flat(a["q_einsum"]["w"](), n))]
    if not c.kv_shared(i):
        if c.k_eq_v(kind):
            out.append(("self_attn.k_proj.weight", (k * h, d), lambda: flat(a["k_einsum"]["w"](), k)))
        else:
            out += [("self_attn.k_proj.weight", (k * h, d), lambda: flat(a["kv_einsum"]["w"]()[0], k)),
                    ("self_attn.v_proj.weight", (k * h, d), lambda: flat(a["kv_einsum"]["w"]()[1], k))]
    out += [("self_attn.o_proj.weight", (d, n * h),
             lambda: a["attn_vec_einsum"]["w"]().transpose(2, 0, 1).reshape(d, n * h)),
            ("mlp.gate_proj.weight", (f, d), lambda: L["mlp"]["gating_einsum"]["w"]()[0]),
            ("mlp.up_proj.weight", (f, d), lambda: L["mlp"]["gating_einsum"]["w"]()[1]),
            ("mlp.down_proj.weight", (d, f), lambda: L["mlp"]["linear"]["w"]().T)]
    norms = {**NORMS, **(MOE_NORMS if c.num_experts else {})}
    out += [(f"{theirs}.weight", (d,), lambda o=ours: L[o]["scale"]()) for ours, theirs in norms.items()]
    if c.qk_norm:
        out += [(f"self_attn.{theirs}.weight", (h,), lambda o=ours: a[o]["scale"]())
                for ours, theirs in QK_NORMS.items() if ours == "query_norm" or not c.kv_shared(i)]
    if c.layer_scale:
        out.append(("layer_scalar", (1,), lambda: L["layer_scale"]()))
    if c.per_layer_dim:
        p = c.per_layer_dim
        out += [("per_layer_input_gate.weight", (p, d), lambda: L["per_layer_input_gate"]["w"]().T),
                ("per_layer_projection.weight", (d, p), lambda: L["per_layer_projection"]["w"]().T),
                ("post_per_layer_input_norm.weight", (d,), lambda: L["post_per_layer_input_norm"]["scale"]())]
    if c.num_experts:
        e, fe, m = c.num_experts, c.expert_dim, L["moe"]
        out += [("router.proj.weight", (e, d), lambda: m["router"]["w"]().T),
                ("router.scale", (d,), lambda: m["router_scale"]()),
                ("router.per_expert_scale", (e,), lambda: m["per_expert_scale"]()),
                ("experts.gate_up_proj", (e, 2 * fe, d),
                 lambda: m["expert_gating"]["w"]().transpose(1, 0, 3, 2).reshape(e, 2 * fe, d)),
                ("experts.down_proj", (e, d, fe), lambda: m["expert_linear"]["w"]().transpose(0, 2, 1))]
    return out


def write_embedder(c: ModelConfig, E: dict, rows: int) -> list[tuple[str, tuple[int, ...], Callable]]:
    """(name, shape, producer) of the embedding tables (`rows` rows of the token table)."""
    d = c.embed_dim
    out = [("embed_tokens.weight", (rows, d), lambda: E["input_embedding"]()[:rows])]
    if c.per_layer_dim:
        lp, p = c.num_layers * c.per_layer_dim, c.per_layer_dim
        vp = c.per_layer_vocab or c.vocab_size
        out += [("embed_tokens_per_layer.weight", (vp, lp), lambda: E["per_layer_embedding"]().reshape(vp, lp)),
                ("per_layer_model_projection.weight", (lp, d),
                 lambda: E["per_layer_model_projection"]["w"]().reshape(d, lp).T),
                ("per_layer_projection_norm.weight", (p,), lambda: E["per_layer_projection_norm"]["scale"]())]
    return out

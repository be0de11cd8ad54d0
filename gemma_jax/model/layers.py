"""Gemma 2 / 3 / 4 decoder in Flax linen: the modules, the functional API, layer stacking.

Dimension letters used in names and einsums:
  B batch, T query length, S key length, N query heads, K kv heads, G = N/K query heads per
  kv head, H head dim, D model dim, F MLP hidden dim, V vocabulary, C a small stacked axis
  (k/v, gate/up); Gemma 4 adds P per-layer input width, Y layers (of the PLE table), E experts,
  M rows routed to an expert.

Parameters carry logical axis names (embed, vocab, heads, kv_heads, head_dim, mlp, layers,
per_layer, expert);
`gemma_jax.sharding` maps them onto mesh axes. Layers run as `nn.scan` over one period of
config.attention_pattern (Gemma 2: a local and a global layer; Gemma 3: five local then one
global), so a 46-layer model compiles like its period. Parameter tree (scan_layers=True):

  embedder/input_embedding          (V, D)
  layers/<name>/<block>             every leaf with a leading axis of num_layers // period, one
                                    <name> per position in the period (config.block_names: Gemma 2
                                    local, global; Gemma 3 local_0 .. local_4, global)
  layer_{i}/<block>                 the num_layers % period layers after the last whole period
  final_norm/scale                  (D,)

with <block> = pre_attention_norm/scale, attn/{q_einsum (N,D,H), kv_einsum (2,K,D,H),
attn_vec_einsum (N,H,D)}/w, [attn/{query_norm,key_norm}/scale (H,) with qk_norm],
post_attention_norm/scale, pre_ffw_norm/scale, mlp/{gating_einsum (2,F,D), linear (F,D)}/w,
post_ffw_norm/scale. With scan_layers=False the blocks are `layer_{i}` for every i, the official
checkpoint's own naming.

Gemma 4 adds, where its config has them: attn/k_einsum (K,D,H) instead of kv_einsum on global
layers with attention_k_eq_v; global layers' own head_dim and kv heads; no kv weights and no
key_norm on KV-shared layers; layer_scale (1,); per_layer_input_gate (D,P),
per_layer_projection (P,D), post_per_layer_input_norm; embedder/per_layer_embedding (V,L,P),
embedder/per_layer_model_projection (D,L,P), embedder/per_layer_projection_norm; moe/... (see
gemma_jax.model.moe) with post_mlp_norm, pre_moe_norm, post_moe_norm. KV-shared layers that fill
whole periods scan as `shared_layers/<name>` (config.scan_groups).

Decoding passes an explicit KV cache (`kv_cache.init_cache`) through `Transformer(...,
cache=cache)`, laid out like the layers; local layers keep a ring buffer of sliding_window slots.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gemma_jax.model import kernels
from gemma_jax.model.attention import (apply_rope, attention_logits, attention_masks, attention_parts, causal_attention,
                                       dense_attention, masked_softmax, segment_positions, softcap)
from gemma_jax.model.config import REMAT_POLICIES, ModelConfig
from gemma_jax.model.kv_cache import cache_update
from gemma_jax.model.moe import MoE
from gemma_jax.model.primitives import (EINSUMS, FEW_TOKENS, Einsum, RMSNorm, contracted_axes,  # noqa: F401
                                        dequantize, init, lora_equations)

Params = Any


def final_logits(config: ModelConfig, x_BTD, table_VD):
    """Tied-embedding projection with the final soft-cap, in float32."""
    logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, table_VD.astype(x_BTD.dtype),
                            preferred_element_type=jnp.float32)
    return softcap(logits_BTV, config.final_softcap)


def final_logits_by_vocab(config: ModelConfig, x_BD, table_VD):
    """final_logits of one position per row [B, D] -> [B, V], computed vocabulary-major.

    For the few rows of a decode step XLA:CPU runs [V, D] x [D, B] ~1.5x faster than
    [B, D] x [D, V] (the product is bound by reading the table).
    """
    logits_VB = jnp.einsum("VD,BD->VB", table_VD.astype(x_BD.dtype), x_BD, preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the transpose back into the product.
    return jax.lax.optimization_barrier(softcap(logits_VB, config.final_softcap)).T


class Attention(nn.Module):
    """Grouped-query attention with RoPE (base, scale and rotated share of the layer's type),
    optional QK-norm and value norm, and the attention-logit soft-cap.

    Head dim and kv heads are the layer type's (config.head_dim_of / kv_heads_of); a global layer
    with attention_k_eq_v projects once for keys and values. A KV-shared layer (`shared`) projects
    only queries and attends to `shared_kv`, the keys and values its producer layer handed on:
    [B, S, K, H] arrays, or in a decode step the producer's updated cache [B, K, S, H].

    Without a cache, config.attention_impl may route the product to a fused kernel, which needs
    the segment ids and `local` (the sliding window) instead of the dense mask. Asking for the
    attention probabilities (mutable "intermediates") always takes the xla path: a fused kernel
    never forms them. Returns (output, updated cache, keys and values for layers sharing them).
    """

    config: ModelConfig
    local: bool = False
    shared: bool = False  # KV-shared: attends to shared_kv, no keys or values of its own
    cache_pass: bool = False  # (shared layers, which get no cache) the pass runs with a KV cache

    @nn.compact
    def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, slots_BT=None, segment_ids_BT=None,
                 shared_kv=None):
        c = self.config
        kind = "local" if self.local else "global"
        n, k, h, d = c.num_heads, c.kv_heads_of(kind), c.head_dim_of(kind), c.embed_dim
        g = n // k
        cache_pass = cache is not None or self.cache_pass
        b, t = x_BTD.shape[:2]
        cached = cache_pass and b * t < FEW_TOKENS
        q_BTNH = Einsum((n, d, h), ("heads", "embed", "head_dim"), c, cached=cached,
                        name="q_einsum")("BTD,NDH->BTNH", x_BTD)
        if not self.shared:
            if c.k_eq_v(kind):  # the values are the keys before their norm and RoPE (Gemma 4)
                k_BSKH = Einsum((k, d, h), ("kv_heads", "embed", "head_dim"), c, cached=cached,
                                name="k_einsum")("BSD,KDH->BSKH", x_BTD)
                v_BSKH = k_BSKH
            else:
                k_BSKH, v_BSKH = Einsum((2, k, d, h), (None, "kv_heads", "embed", "head_dim"), c,
                                        cached=cached, name="kv_einsum")("BSD,CKDH->CBSKH", x_BTD)
        if c.qk_norm:  # per head, before RoPE (Gemma 3, 4)
            q_BTNH = RMSNorm(c, axis="head_dim", name="query_norm")(q_BTNH)
            if not self.shared:
                k_BSKH = RMSNorm(c, axis="head_dim", name="key_norm")(k_BSKH)
        base, scale = c.rope(self.local)
        fraction = c.rope_fraction(self.local)
        q_BTNH = apply_rope(q_BTNH, positions_BT, base, scale, fraction)
        if not self.shared:
            if c.value_norm:
                v_BSKH = RMSNorm(c, axis="head_dim", with_scale=False, name="value_norm")(v_BSKH)
            k_BSKH = apply_rope(k_BSKH, positions_BT, base, scale, fraction)
        else:
            k_BSKH, v_BSKH = shared_kv["k"], shared_kv["v"]
        q_BTNH = q_BTNH * jnp.asarray(c.query_pre_attn_scalar ** -0.5, q_BTNH.dtype)
        q_BTKGH = q_BTNH.reshape(b, t, k, g, h)
        step = cache_pass and t == 1
        if step and self.shared:  # the producer's cache, already holding this step's token
            enc_BTKGH = self._attend_cache(q_BTKGH, k_BSKH, v_BSKH, mask_BTS)
        elif step:
            enc_BTKGH, cache = self._decode_step(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, cache, slots_BT)
        elif (impl := self._fused(t, cache_pass, segment_ids_BT)) != "xla":
            enc_BTKGH = kernels.attend(
                impl, q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window=c.sliding_window if self.local else None,
                softcap=c.attn_softcap).astype(v_BSKH.dtype)
        elif self.is_mutable_collection("intermediates"):
            # The same forward, its float32 probabilities kept (apply(..., mutable=["intermediates"])).
            enc_BTKGH, _, _, probs_BKGTS = attention_parts(c.attn_softcap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS)
            self.sow("intermediates", "attention_probs", probs_BKGTS)
        elif not cache_pass:
            # Key blocks are skipped by index distance; rows without segment ids here are branch
            # rows (Transformer's branch_BT), whose window is in positions: only the mask decides.
            window = c.sliding_window if self.local and segment_ids_BT is not None else None
            enc_BTKGH = causal_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, c.attn_softcap, window)
        else:
            enc_BTKGH = dense_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, c.attn_softcap)
        if cache is not None and t > 1:
            # A prefill chunk attends to itself (the cache is empty), then fills its slots.
            cache = {"k": _write(cache["k"], slots_BT, k_BSKH), "v": _write(cache["v"], slots_BT, v_BSKH)}
        kv = cache if step and not self.shared else {"k": k_BSKH, "v": v_BSKH}
        enc_BTNH = enc_BTKGH.reshape(b, t, n, h)
        out_BTD = Einsum((n, h, d), ("heads", "head_dim", "embed"), c, cached=cached,
                         name="attn_vec_einsum")("BTNH,NHD->BTD", enc_BTNH)
        return out_BTD, cache, kv

    def _fused(self, t, cache_pass, segment_ids_BT) -> str:
        """The implementation of a pass without a cache; prefill and probability capture use xla."""
        if cache_pass or segment_ids_BT is None or self.is_mutable_collection("intermediates"):
            return "xla"
        c = self.config
        head_dim = c.head_dim_of("local" if self.local else "global")
        impl = kernels.choose(c.attention_impl, jax.default_backend(), t, head_dim)
        if impl != c.attention_impl and c.attention_impl != "auto" and not self.is_initializing():
            logging.warning("attention_impl=%r runs xla for length %d, head dim %d (needs a multiple of %d)",
                            c.attention_impl, t, head_dim, kernels.min_block(c.attention_impl))
        return impl

    def _decode_step(self, q_B1KGH, k_B1KH, v_B1KH, mask_B1S, cache, slots_B1):
        """One token per row: written into its slot first, then attending to the cache in place."""
        # A ring slot it overwrites held the position one window back, which the mask excludes.
        cache = {"k": _write(cache["k"], slots_B1, k_B1KH), "v": _write(cache["v"], slots_B1, v_B1KH)}
        return self._attend_cache(q_B1KGH, cache["k"], cache["v"], mask_B1S), cache

    def _attend_cache(self, q_B1KGH, k_BKSH, v_BKSH, mask_B1S):
        """One query per row against a cache [B, K, S, H], read in place."""
        # Batch-major products (BKSH cache, BKG.. outputs): XLA:CPU reads the cache in place.
        logits_BKG1S = attention_logits(self.config, q_B1KGH, k_BKSH, keys="BKSH")
        probs_BKG1S = masked_softmax(logits_BKG1S, mask_B1S).astype(v_BKSH.dtype)
        enc_BKG1H = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKG1S, v_BKSH)
        return jnp.einsum("BKGTH->BTKGH", enc_BKG1H)


def _write(cache_BKSH, slots_BT, new_BTKH):
    """Scatters new keys or values into their cache slots; slot S (one past the end) is dropped."""
    b_B1 = jnp.arange(slots_BT.shape[0])[:, None]
    out_BKSH = cache_BKSH.at[b_B1, :, slots_BT].set(new_BTKH.astype(cache_BKSH.dtype), mode="drop")
    return nn.with_logical_constraint(out_BKSH, ("batch", "kv_heads", "length", "head_dim"))


class MLP(nn.Module):
    """GeGLU feed-forward with tanh-approximated gelu."""

    config: ModelConfig
    cached: bool = False
    hidden: int = 0  # 0: config.hidden_dim (Gemma 4's double-wide layers: twice that)

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        f = self.hidden or c.hidden_dim
        gate_BTF, up_BTF = Einsum((2, f, c.embed_dim), (None, "mlp", "embed"), c,
                                  cached=self.cached, name="gating_einsum")("BTD,CFD->CBTF", x_BTD)
        h_BTF = jax.nn.gelu(gate_BTF, approximate=True) * up_BTF
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return Einsum((f, c.embed_dim), ("mlp", "embed"), c, cached=self.cached,
                      name="linear")("BTF,FD->BTD", h_BTF)


class Block(nn.Module):
    """One decoder layer with Gemma's sandwich norms; with Gemma 4's features where the config has
    them: the experts beside the MLP (each branch normed before and after, then the sum), the
    per-layer input (PLE) added after the feed-forward, and the learned layer scale.

    Returns (x, updated cache, the layer's keys and values for KV-shared layers)."""

    config: ModelConfig
    local: bool = False  # sliding-window attention; the mask says so too, a fused kernel needs it here
    shared: bool = False  # KV-shared (Gemma 4): attends to the producer's keys and values
    cache_pass: bool = False  # (shared layers) the pass runs with a KV cache
    hidden: int = 0  # MLP width (0: config.hidden_dim)

    @nn.compact
    def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, slots_BT=None, segment_ids_BT=None,
                 ple_BTP=None, shared_kv=None):
        c = self.config
        attn_BTD, cache, kv = Attention(c, local=self.local, shared=self.shared, cache_pass=self.cache_pass,
                                        name="attn")(
            RMSNorm(c, name="pre_attention_norm")(x_BTD), positions_BT, mask_BTS, cache, slots_BT, segment_ids_BT,
            shared_kv)
        x_BTD = x_BTD + RMSNorm(c, name="post_attention_norm")(attn_BTD)
        b, t, d = x_BTD.shape
        few = (cache is not None or self.cache_pass) and b * t < FEW_TOKENS
        ffw_BTD = MLP(c, cached=few, hidden=self.hidden, name="mlp")(RMSNorm(c, name="pre_ffw_norm")(x_BTD))
        if c.num_experts:  # Gemma 4 26B-A4B: the router reads the residual stream, the experts its pre_moe_norm
            ffw_BTD = RMSNorm(c, name="post_mlp_norm")(ffw_BTD)
            moe_BTD = MoE(c, cached=few, name="moe")(x_BTD, RMSNorm(c, name="pre_moe_norm")(x_BTD))
            ffw_BTD = ffw_BTD + RMSNorm(c, name="post_moe_norm")(moe_BTD)
        x_BTD = x_BTD + RMSNorm(c, name="post_ffw_norm")(ffw_BTD)
        if c.per_layer_dim:  # Gemma 4 PLE: a gate on the stream picks up this layer's per-layer input
            p = c.per_layer_dim
            gate_BTP = Einsum((d, p), ("embed", "per_layer"), c, cached=few,
                              name="per_layer_input_gate")("BTD,DP->BTP", x_BTD)
            gate_BTP = jax.nn.gelu(gate_BTP, approximate=True) * ple_BTP.astype(gate_BTP.dtype)
            ple_BTD = Einsum((p, d), ("per_layer", "embed"), c, cached=few,
                             name="per_layer_projection")("BTP,PD->BTD", gate_BTP)
            x_BTD = x_BTD + RMSNorm(c, name="post_per_layer_input_norm")(ple_BTD)
        if c.layer_scale:
            scale_1 = self.param("layer_scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
                                 (1,), c.weight_dtype)
            x_BTD = x_BTD * scale_1.astype(x_BTD.dtype)
        return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), cache, kv


class LayerPeriod(nn.Module):
    """One period of config.attention_pattern, a Block per position (named by
    config.block_names): the unit that is scanned.

    masks_BTS and slots_BT map a layer type ("local"/"global") to its mask and cache slots;
    `cache` maps block names to their caches (decoding) or is None; ple_QBTP holds the per-layer
    inputs of the period's Q layers; shared_kv maps a layer type to its producer's keys and values
    (the `shared_layers` scan of Gemma 4's KV-shared layers, which keep no cache).
    """

    config: ModelConfig
    shared: bool = False
    cache_pass: bool = False
    first: int = 0  # the first layer of the scan (the MLP width may depend on it)

    @nn.compact
    def __call__(self, x_BTD, positions_BT, masks_BTS, slots_BT=None, cache=None, segment_ids_BT=None,
                 ple_QBTP=None, shared_kv=None):
        c = self.config
        new_cache = {}
        for pos, (name, kind) in enumerate(zip(c.block_names, c.attention_pattern)):
            x_BTD, new_cache[name], _ = Block(c, local=kind == "local", shared=self.shared, cache_pass=self.cache_pass,
                                              hidden=c.mlp_dim(self.first + pos), name=name)(
                x_BTD, positions_BT, masks_BTS[kind], None if cache is None else cache[name],
                None if slots_BT is None else slots_BT[kind], segment_ids_BT,
                None if ple_QBTP is None else ple_QBTP[pos], None if shared_kv is None else shared_kv[kind])
        return x_BTD, (None if cache is None else new_cache)


LayerPair = LayerPeriod  # the name of the scanned unit when it was always a local/global pair


class Embedder(nn.Module):
    """Token embedding, scaled by sqrt(D), tied with the output projection; with Gemma 4's
    per-layer input embeddings (PLE), the per-layer inputs of every layer."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.input_embedding = self.param(
            "input_embedding", init(("vocab", "embed")), (c.vocab_size, c.embed_dim), c.weight_dtype)
        if c.per_layer_dim:
            shape = (c.per_layer_vocab or c.vocab_size, c.num_layers, c.per_layer_dim)
            self.per_layer_embedding = self.param("per_layer_embedding", init(("vocab", None, "per_layer")), shape,
                                                  c.weight_dtype)
            self.per_layer_model_projection = Einsum((c.embed_dim, c.num_layers, c.per_layer_dim),
                                                     ("embed", None, "per_layer"), c)
            self.per_layer_projection_norm = RMSNorm(c, axis="per_layer")

    def encode(self, tokens_BT):
        c = self.config
        x_BTD = jnp.take(self.input_embedding, tokens_BT, axis=0).astype(c.compute_dtype)
        # The scale is rounded to the activation dtype first (bf16: 48.0 for 2B), as in the reference.
        return x_BTD * jnp.asarray(np.sqrt(c.embed_dim), c.compute_dtype)

    def per_layer_inputs(self, tokens_BT, x_BTD):
        """[B, T, L, P]: (the normed projection of the embedded tokens x_BTD + the tokens' rows of
        the per-layer table times sqrt(P)) / sqrt(2), as transformers' Gemma4TextModel."""
        c = self.config
        dt = c.compute_dtype
        rows = c.per_layer_vocab or c.vocab_size
        tokens_BT = jnp.where((tokens_BT >= 0) & (tokens_BT < rows), tokens_BT, 0)
        table_BTLP = jnp.take(self.per_layer_embedding, tokens_BT, axis=0).astype(dt)
        table_BTLP = table_BTLP * jnp.asarray(np.sqrt(c.per_layer_dim), dt)
        proj_BTLP = self.per_layer_model_projection("BTD,DYP->BTYP", x_BTD) * jnp.asarray(c.embed_dim ** -0.5, dt)
        proj_BTLP = self.per_layer_projection_norm(proj_BTLP)
        return (proj_BTLP + table_BTLP) * jnp.asarray(2 ** -0.5, dt)

    def decode(self, x_BTD):
        return final_logits(self.config, x_BTD, self.input_embedding)


class Transformer(nn.Module):
    """Gemma: tokens [B, T] -> float32 logits [B, T, V] (or final hidden states).

    With `cache` (from `kv_cache.init_cache`), returns (logits or hidden, updated cache):
    `positions_BT` are then required, absolute, -1 marking padding (neither attended to nor
    cached). T > 1 tokens prefill an empty cache; T = 1 decodes one token per row after them.

    `branch_BT` (with positions and segment ids; no cache) scores rows of shared-prefix trees, see
    attention.attention_masks; such rows take the xla attention path.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, return_hidden=False, cache=None,
                 branch_BT=None):
        c = self.config
        if branch_BT is not None:
            if cache is not None or positions_BT is None or segment_ids_BT is None:
                raise ValueError("branch_BT needs positions_BT and segment_ids_BT, and no cache")
        if cache is None:
            if segment_ids_BT is None:
                segment_ids_BT = jnp.ones_like(tokens_BT, jnp.int32)
            if positions_BT is None:
                positions_BT = segment_positions(segment_ids_BT)
            local_BTS, global_BTS = attention_masks(segment_ids_BT, c.sliding_window, positions_BT, branch_BT)
            masks_BTS, slots_BT = {"local": local_BTS, "global": global_BTS}, None
            if branch_BT is not None:  # fused kernels and key-block skipping know segments, not branches
                segment_ids_BT = None
        else:
            if positions_BT is None or segment_ids_BT is not None:
                raise ValueError("with a cache, pass absolute positions (-1 = padding) and no segment_ids")
            # One view per layer type in the cache (each type's layers write the same slots).
            masks_BTS, slots_BT, new_cache = {}, {}, {"positions": {}}
            for kind, slot_positions_BS in cache["positions"].items():
                masks_BTS[kind], slots_BT[kind], new_cache["positions"][kind] = cache_update(
                    slot_positions_BS, positions_BT, c.sliding_window if kind == "local" else None)
        embedder = Embedder(c, name="embedder")
        x_BTD = nn.with_logical_constraint(embedder.encode(tokens_BT), ("batch", "length", "embed"))
        ple_BTLP = embedder.per_layer_inputs(tokens_BT, x_BTD) if c.per_layer_dim else None

        policy = REMAT_POLICIES[c.remat]
        cache_pass = cache is not None
        groups = c.scan_groups() if c.scan_layers else {}
        # Scans and unrolled layers in layer order: KV-shared layers read what producers hand on.
        steps = sorted([(first, 0, name) for name, (first, _) in groups.items()]
                       + [(i, 1, i) for i in c.unscanned_layers()])
        shared_kv: dict = {}
        block = Block if c.remat == "none" or cache_pass else nn.remat(Block, policy=policy)
        for first, is_layer, name in steps:
            if not is_layer:
                periods = groups[name][1]
                shared = name == "shared_layers"
                ple_QBTP = None
                if ple_BTLP is not None:  # [B, T, periods * Q, P] -> [periods, Q, B, T, P]
                    sl = ple_BTLP[:, :, first:first + periods * c.period]
                    ple_QBTP = sl.reshape(*sl.shape[:2], periods, c.period, c.per_layer_dim).transpose(2, 3, 0, 1, 4)
                if not cache_pass:
                    period = (LayerPeriod if c.remat == "none" else
                              nn.remat(LayerPeriod, policy=policy, prevent_cse=False))
                    in_axes = (nn.broadcast,) * 5 + (0, nn.broadcast)
                    args = (positions_BT, masks_BTS, None, None, segment_ids_BT, ple_QBTP, shared_kv or None)
                elif shared:  # decoding: KV-shared layers keep no cache
                    period = LayerPeriod
                    in_axes = (nn.broadcast,) * 5 + (0, nn.broadcast)
                    args = (positions_BT, masks_BTS, slots_BT, None, None, ple_QBTP, shared_kv)
                else:  # decoding: no remat, and the per-period caches are scanned in and out
                    period = LayerPeriod
                    in_axes = (nn.broadcast,) * 3 + (0, nn.broadcast, 0, nn.broadcast)
                    args = (positions_BT, masks_BTS, slots_BT, cache["layers"], None, ple_QBTP, None)
                scanned = nn.scan(
                    period, variable_axes={"params": 0, "lora": 0, "quant": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=in_axes, length=periods,
                    metadata_params={nn.PARTITION_NAME: "layers"})
                x_BTD, layer_cache = scanned(c, shared=shared, cache_pass=cache_pass, first=first, name=name)(
                    x_BTD, *args)
                if cache_pass and not shared:
                    new_cache[name] = layer_cache
                continue
            i, kind = name, c.layer_types[name]
            shared = c.kv_shared(i)
            x_BTD, layer_cache, kv = block(c, local=kind == "local", shared=shared, cache_pass=cache_pass,
                                           hidden=c.mlp_dim(i), name=f"layer_{i}")(
                x_BTD, positions_BT, masks_BTS[kind], None if shared or not cache_pass else cache[f"layer_{i}"],
                slots_BT[kind] if cache_pass else None, segment_ids_BT,
                None if ple_BTLP is None else ple_BTLP[:, :, i], shared_kv.get(kind) if shared else None)
            if cache_pass and not shared:
                new_cache[f"layer_{i}"] = layer_cache
            if c.num_kv_shared_layers and not shared and i == c.kv_producer(kind):
                shared_kv[kind] = kv

        x_BTD = RMSNorm(c, name="final_norm")(x_BTD)
        out = x_BTD if return_hidden else embedder.decode(x_BTD)
        return out if cache is None else (out, new_cache)


# ----------------------------------------------------------------------------- functional API


def init_params(config: ModelConfig, rng) -> Params:
    """Random parameters (plain arrays, no sharding metadata)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Transformer(config).init(rng, tokens)["params"])


def param_shapes(config: ModelConfig) -> Params:
    """ShapeDtypeStruct tree of the parameters, computed without allocating them."""
    return nn.unbox(jax.eval_shape(functools.partial(init_params, config), jax.random.key(0)))


def param_axes(config: ModelConfig) -> Params:
    """Tree of logical PartitionSpecs, one per parameter (e.g. P('layers', 'heads', 'embed', 'head_dim'))."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)["params"]
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(config, params, tokens, segment_ids, positions):
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids)


def logits(config: ModelConfig, params: Params, tokens, *, segment_ids=None, positions=None):
    """float32 logits [batch, length, vocab] of the model on `tokens` [batch, length]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    positions = None if positions is None else jnp.asarray(positions, jnp.int32)
    return _logits(config, params, tokens, segment_ids, positions)


# ----------------------------------------------------------------------------- layer tree surgery
# Checkpoints on disk (official, HF) name every layer separately, while the scanned model wants
# one array per leaf with a leading layer axis: layer first + j * period + p of a scan goes to
# slot j of its block config.block_names[p], and the layers outside the scans stay `layer_{i}`.


def stack_layers(config: ModelConfig, params: Params, stack=None) -> Params:
    """Unrolled tree (layer_0, layer_1, ...) -> scanned tree (layers/<block name>, [shared_layers/...],
    layer_{i} outside the scans)."""
    stack = stack or (lambda xs: jnp.stack(xs))
    scanned = config.replace(scan_layers=True)
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    for group, blocks in scanned.scanned_groups().items():
        out[group] = {
            # A model shorter than one period scans over nothing: empty stacks shaped like a layer.
            name: (jax.tree.map(lambda *xs: stack(xs), *[params[f"layer_{i}"] for i in layers]) if layers else
                   jax.tree.map(lambda x: jnp.zeros((0, *x.shape), x.dtype), params["layer_0"]))
            for name, layers in blocks.items()}
    for i in scanned.unscanned_layers():
        out[f"layer_{i}"] = params[f"layer_{i}"]
    return out


def unstack_layers(config: ModelConfig, params: Params) -> Params:
    """Scanned tree -> unrolled tree with one `layer_{i}` entry per layer."""
    groups = config.replace(scan_layers=True).scanned_groups()
    out = {k: v for k, v in params.items() if k not in groups}
    for group, blocks in groups.items():
        for name, layers in blocks.items():
            for j, i in enumerate(layers):
                out[f"layer_{i}"] = jax.tree.map(lambda x, j=j: x[j], params[group][name])
    return out

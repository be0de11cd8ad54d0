"""Gemma 2 / Gemma 3 decoder in Flax linen: the modules, the functional API, layer stacking.

Dimension letters used in names and einsums:
  B batch, T query length, S key length, N query heads, K kv heads, G = N/K query heads per
  kv head, H head dim, D model dim, F MLP hidden dim, V vocabulary, C a small stacked axis
  (k/v, gate/up).

Parameters carry logical axis names (embed, vocab, heads, kv_heads, head_dim, mlp, layers);
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


def dequantize(q, scale, dtype):
    """Integer weight times its scale. An axis where the scale is shorter than the weight (but
    not 1) holds one scale per group of consecutive entries along it."""
    for i, (n, m) in enumerate(zip(q.shape, scale.shape)):
        if m not in (1, n):
            scale = jnp.repeat(scale, n // m, axis=i)
    return q.astype(dtype) * scale.astype(dtype)


def _init(axes, stddev=0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


# ----------------------------------------------------------------------------- modules


# The product each weight takes part in. gemma_jax.lora reads them to shape adapters: the
# contracted letters of the weight are its inputs, the rest (but a stacked C) its outputs.
EINSUMS = {
    "q_einsum": "BTD,NDH->BTNH",
    "kv_einsum": "BSD,CKDH->CBSKH",
    "attn_vec_einsum": "BTNH,NHD->BTD",
    "gating_einsum": "BTD,CFD->CBTF",
    "linear": "BTF,FD->BTD",
}

# A pass with a KV cache over fewer tokens than this (decode steps, short prompts) multiplies a
# stacked weight in one product, as copying out its slices would cost about as much as the
# products; from here on the per-slice products of training are faster on XLA:CPU (prefill of
# 8 x 64 tokens ~20% faster, of 1 x 64 ~15% slower).
FEW_TOKENS = 256


def _few_tokens(x_BTD, cache) -> bool:
    """Whether a pass multiplies stacked weights in one product (Einsum.cached): see FEW_TOKENS."""
    return cache is not None and x_BTD.shape[0] * x_BTD.shape[1] < FEW_TOKENS


def lora_equations(eqn: str) -> tuple[str, str, str]:
    """(x-to-rank, rank-to-output, merge) einsums of an adapter pair A, B for a weight product.

    A holds the weight's contracted axes then rank R, B holds R then its output axes (both
    led by C for a stacked weight): e.g. "BTD,NDH->BTNH" gives A "DR", B "RNH", so
    x A B = x (A B) with A B laid out as the weight "NDH".
    """
    lhs, rest = eqn.split(",")
    rhs, out = rest.split("->")
    lead = "C" if rhs[0] == "C" else ""
    a = lead + "".join(c for c in rhs if c in lhs) + "R"
    b = lead + "R" + "".join(c for c in rhs if c not in lhs and c != "C")
    mid = "".join(c for c in lhs if c not in rhs)
    return f"{lhs},{a}->{lead}{mid}R", f"{lead}{mid}R,{b}->{out}", f"{a},{b}->{rhs}"


class Einsum(nn.Module):
    """One weight `w` contracted with the input by an einsum equation.

    Two optional collections change the weight without changing the parameter tree: "quant"
    holds a `scale` for an integer `w` (dequantised here, one layer at a time inside the scan),
    and "lora" holds adapters `a`, `b` whose product x a b, times config.lora_scale, is added to
    the output (see gemma_jax.lora).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    config: ModelConfig
    cached: bool = False  # a pass with a KV cache over few tokens (see FEW_TOKENS)

    @nn.compact
    def __call__(self, eqn: str, x):
        c = self.config
        w = self.param("w", _init(self.axes), self.shape, c.weight_dtype)
        if self.has_variable("quant", "scale"):
            w = dequantize(w, self.get_variable("quant", "scale"), c.compute_dtype)
        w = w.astype(c.compute_dtype)
        lhs, rest = eqn.split(",")
        rhs, out = rest.split("->")
        stacked = rhs[0] == "C" and out[0] == "C"  # k/v, gate/up: a tuple of products
        if self.cached:
            # No gradient here: one product even for a stacked weight (each slice w[c] would be a
            # copy of the weight), and a single token per row takes forms that read the weight
            # in place, as it is read once per token.
            y = (self._project_in_place if x.shape[1] == 1 else self._project)(eqn, x, w)
            y = y + self._lora(eqn, x) if self.has_variable("lora", "a") else y
            return tuple(y[i] for i in range(w.shape[0])) if stacked else y
        if stacked:
            # Separate products: one einsum with the stack axis in its output is ~3x slower to
            # differentiate on XLA:CPU.
            single = f"{lhs},{rhs[1:]}->{out[1:]}"
            ys = [self._project(single, x, w[i]) for i in range(w.shape[0])]
            if self.has_variable("lora", "a"):  # per slice too, for the same reason
                ys = [y + self._lora(single, x, i) for i, y in enumerate(ys)]
            return tuple(ys)
        y = self._project(eqn, x, w)
        return y + self._lora(eqn, x) if self.has_variable("lora", "a") else y

    def _lora(self, eqn, x, index=None):
        """config.lora_scale * x a b, the adapter's share of the product (stack axis first), or
        of slice `index` of a stacked weight (then `eqn` is the single slice's product)."""
        c = self.config
        a = self.get_variable("lora", "a").astype(c.compute_dtype)
        b = self.get_variable("lora", "b").astype(c.compute_dtype)
        if index is not None:
            a, b = a[index], b[index]
        if c.lora_dropout and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - c.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - c.lora_dropout), 0).astype(x.dtype)
        to_rank, from_rank, _ = lora_equations(eqn)
        h = self._project(to_rank, x, a)
        return self._project(from_rank, h, b) * jnp.asarray(c.lora_scale, x.dtype)

    @staticmethod
    def _project(eqn, x, w):
        lhs, rest = eqn.split(",")
        out = rest.split("->")[1]
        if lhs[:2] in ("BT", "BS") and out.startswith(lhs[:2]):
            # Fold batch and length into one token axis: the weight gradient then contracts one
            # axis instead of two, which XLA:CPU runs ~3x faster (the same math everywhere).
            y = jnp.einsum("M" + eqn[2:].replace("->" + lhs[:2], "->M"), x.reshape(-1, *x.shape[2:]), w)
            return y.reshape(*x.shape[:2], *y.shape[1:])
        return jnp.einsum(eqn, x, w)

    @staticmethod
    def _project_in_place(eqn, x, w):
        """The same product in forms XLA:CPU multiplies without first copying the weight.

        Decoding reads every weight once per token, so a per-step transposed copy (what XLA:CPU
        makes for a contraction inside the weight, or over two of its axes) would double the
        cost of the step.
        """
        lhs, rest = eqn.split(",")
        rhs, out = rest.split("->")
        i = next(j for j, a in enumerate(rhs) if a in lhs)
        k = sum(a in lhs for a in rhs)
        if 0 < i and i + k < len(rhs) and rhs[i:i + k] == lhs[-k:]:
            # Contraction inside the weight ([N, D, H]): its leading axes become batch axes.
            lead, free = rhs[:i], lhs[:-k] + rhs[i + k:]
            x = jnp.broadcast_to(x, w.shape[:i] + x.shape)
            return jnp.einsum(f"{lead}{free}->{out}", jnp.einsum(f"{lead}{lhs},{rhs}->{lead}{free}", x, w))
        if i == 0 and k > 1 and rhs[:k] == lhs[-k:] and out == lhs[:-k] + rhs[k:]:
            # Contraction over the weight's leading axes ([N, H, D]): one matmul on flattened axes.
            y = x.reshape(*x.shape[:-k], -1) @ w.reshape(-1, *w.shape[k:])
            return y
        return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale) over the last axis, computed in float32."""

    config: ModelConfig
    axis: str = "embed"  # logical name of the normalised axis (QK-norm: head_dim)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis,)),
                           (x.shape[-1],), self.config.weight_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with RoPE (base and scale of the layer's type), optional QK-norm
    and the attention-logit soft-cap.

    Without a cache, config.attention_impl may route the product to a fused kernel, which needs
    the segment ids and `local` (the sliding window) instead of the dense mask. Asking for the
    attention probabilities (mutable "intermediates") always takes the xla path: a fused kernel
    never forms them.
    """

    config: ModelConfig
    local: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, slots_BT=None, segment_ids_BT=None):
        c = self.config
        n, k, g, h, d = c.num_heads, c.num_kv_heads, c.num_groups, c.head_dim, c.embed_dim
        cached = _few_tokens(x_BTD, cache)
        q_BTNH = Einsum((n, d, h), ("heads", "embed", "head_dim"), c, cached=cached,
                        name="q_einsum")("BTD,NDH->BTNH", x_BTD)
        k_BSKH, v_BSKH = Einsum((2, k, d, h), (None, "kv_heads", "embed", "head_dim"), c,
                                cached=cached, name="kv_einsum")("BSD,CKDH->CBSKH", x_BTD)
        if c.qk_norm:  # per head, before RoPE (Gemma 3)
            q_BTNH = RMSNorm(c, axis="head_dim", name="query_norm")(q_BTNH)
            k_BSKH = RMSNorm(c, axis="head_dim", name="key_norm")(k_BSKH)
        base, scale = c.rope(self.local)
        q_BTNH = apply_rope(q_BTNH, positions_BT, base, scale)
        k_BSKH = apply_rope(k_BSKH, positions_BT, base, scale)
        q_BTNH = q_BTNH * jnp.asarray(c.query_pre_attn_scalar ** -0.5, q_BTNH.dtype)
        b, t = x_BTD.shape[:2]
        q_BTKGH = q_BTNH.reshape(b, t, k, g, h)
        if cache is not None and t == 1:
            enc_BTKGH, cache = self._decode_step(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, cache, slots_BT)
        elif (impl := self._fused(t, cache, segment_ids_BT)) != "xla":
            enc_BTKGH = kernels.attend(
                impl, q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window=c.sliding_window if self.local else None,
                softcap=c.attn_softcap).astype(v_BSKH.dtype)
        elif self.is_mutable_collection("intermediates"):
            # The same forward, its float32 probabilities kept (apply(..., mutable=["intermediates"])).
            enc_BTKGH, _, _, probs_BKGTS = attention_parts(c.attn_softcap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS)
            self.sow("intermediates", "attention_probs", probs_BKGTS)
        elif cache is None:
            # Key blocks are skipped by index distance; rows without segment ids here are branch
            # rows (Transformer's branch_BT), whose window is in positions: only the mask decides.
            window = c.sliding_window if self.local and segment_ids_BT is not None else None
            enc_BTKGH = causal_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, c.attn_softcap, window)
        else:
            enc_BTKGH = dense_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, c.attn_softcap)
        if cache is not None and t > 1:
            # A prefill chunk attends to itself (the cache is empty), then fills its slots.
            cache = {"k": _write(cache["k"], slots_BT, k_BSKH), "v": _write(cache["v"], slots_BT, v_BSKH)}
        enc_BTNH = enc_BTKGH.reshape(b, t, n, h)
        out_BTD = Einsum((n, h, d), ("heads", "head_dim", "embed"), c, cached=cached,
                         name="attn_vec_einsum")("BTNH,NHD->BTD", enc_BTNH)
        return out_BTD, cache

    def _fused(self, t, cache, segment_ids_BT) -> str:
        """The implementation of a pass without a cache; prefill and probability capture use xla."""
        if cache is not None or segment_ids_BT is None or self.is_mutable_collection("intermediates"):
            return "xla"
        c = self.config
        impl = kernels.choose(c.attention_impl, jax.default_backend(), t, c.head_dim)
        if impl != c.attention_impl and c.attention_impl != "auto" and not self.is_initializing():
            logging.warning("attention_impl=%r runs xla for length %d, head dim %d (needs a multiple of %d)",
                            c.attention_impl, t, c.head_dim, kernels.min_block(c.attention_impl))
        return impl

    def _decode_step(self, q_B1KGH, k_B1KH, v_B1KH, mask_B1S, cache, slots_B1):
        """One token per row: written into its slot first, then attending to the cache in place."""
        c = self.config
        # A ring slot it overwrites held the position one window back, which the mask excludes.
        cache = {"k": _write(cache["k"], slots_B1, k_B1KH), "v": _write(cache["v"], slots_B1, v_B1KH)}
        # Batch-major products (BKSH cache, BKG.. outputs): XLA:CPU reads the cache in place.
        logits_BKG1S = attention_logits(c, q_B1KGH, cache["k"], keys="BKSH")
        probs_BKG1S = masked_softmax(logits_BKG1S, mask_B1S).astype(v_B1KH.dtype)
        enc_BKG1H = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKG1S, cache["v"])
        return jnp.einsum("BKGTH->BTKGH", enc_BKG1H), cache


def _write(cache_BKSH, slots_BT, new_BTKH):
    """Scatters new keys or values into their cache slots; slot S (one past the end) is dropped."""
    b_B1 = jnp.arange(slots_BT.shape[0])[:, None]
    out_BKSH = cache_BKSH.at[b_B1, :, slots_BT].set(new_BTKH.astype(cache_BKSH.dtype), mode="drop")
    return nn.with_logical_constraint(out_BKSH, ("batch", "kv_heads", "length", "head_dim"))


class MLP(nn.Module):
    """GeGLU feed-forward with tanh-approximated gelu."""

    config: ModelConfig
    cached: bool = False

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        gate_BTF, up_BTF = Einsum((2, c.hidden_dim, c.embed_dim), (None, "mlp", "embed"), c,
                                  cached=self.cached, name="gating_einsum")("BTD,CFD->CBTF", x_BTD)
        h_BTF = jax.nn.gelu(gate_BTF, approximate=True) * up_BTF
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return Einsum((c.hidden_dim, c.embed_dim), ("mlp", "embed"), c, cached=self.cached,
                      name="linear")("BTF,FD->BTD", h_BTF)


class Block(nn.Module):
    """One decoder layer with Gemma's sandwich norms."""

    config: ModelConfig
    local: bool = False  # sliding-window attention; the mask says so too, a fused kernel needs it here

    @nn.compact
    def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, slots_BT=None, segment_ids_BT=None):
        c = self.config
        attn_BTD, cache = Attention(c, local=self.local, name="attn")(
            RMSNorm(c, name="pre_attention_norm")(x_BTD), positions_BT, mask_BTS, cache, slots_BT, segment_ids_BT)
        x_BTD = x_BTD + RMSNorm(c, name="post_attention_norm")(attn_BTD)
        mlp_BTD = MLP(c, cached=_few_tokens(x_BTD, cache), name="mlp")(RMSNorm(c, name="pre_ffw_norm")(x_BTD))
        x_BTD = x_BTD + RMSNorm(c, name="post_ffw_norm")(mlp_BTD)
        return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), cache


class LayerPeriod(nn.Module):
    """One period of config.attention_pattern, a Block per position (named by
    config.block_names): the unit that is scanned.

    masks_BTS and slots_BT map a layer type ("local"/"global") to its mask and cache slots;
    `cache` maps block names to their caches (decoding) or is None.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, masks_BTS, slots_BT=None, cache=None, segment_ids_BT=None):
        c = self.config
        new_cache = {}
        for name, kind in zip(c.block_names, c.attention_pattern):
            x_BTD, new_cache[name] = Block(c, local=kind == "local", name=name)(
                x_BTD, positions_BT, masks_BTS[kind], None if cache is None else cache[name],
                None if slots_BT is None else slots_BT[kind], segment_ids_BT)
        return x_BTD, (None if cache is None else new_cache)


LayerPair = LayerPeriod  # the name of the scanned unit when it was always a local/global pair


class Embedder(nn.Module):
    """Token embedding, scaled by sqrt(D), tied with the output projection."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.input_embedding = self.param(
            "input_embedding", _init(("vocab", "embed")), (c.vocab_size, c.embed_dim), c.weight_dtype)

    def encode(self, tokens_BT):
        c = self.config
        x_BTD = jnp.take(self.input_embedding, tokens_BT, axis=0).astype(c.compute_dtype)
        # The scale is rounded to the activation dtype first (bf16: 48.0 for 2B), as in the reference.
        return x_BTD * jnp.asarray(np.sqrt(c.embed_dim), c.compute_dtype)

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

        policy = REMAT_POLICIES[c.remat]
        if c.scan_layers:
            if cache is None:
                period = LayerPeriod if c.remat == "none" else nn.remat(LayerPeriod, policy=policy, prevent_cse=False)
                in_axes = (nn.broadcast,) * 5
                args = (positions_BT, masks_BTS, None, None, segment_ids_BT)
            else:  # decoding: no remat, and the per-period caches are scanned in and out
                period = LayerPeriod
                in_axes = (nn.broadcast,) * 3 + (0,)
                args = (positions_BT, masks_BTS, slots_BT, cache["layers"])
            scanned = nn.scan(
                period, variable_axes={"params": 0, "lora": 0, "quant": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=in_axes, length=c.num_periods,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTD, layer_cache = scanned(c, name="layers")(x_BTD, *args)
            if cache is not None:
                new_cache["layers"] = layer_cache
        block = Block if c.remat == "none" or cache is not None else nn.remat(Block, policy=policy)
        for i in c.unscanned_layers():
            kind = c.layer_types[i]
            if cache is None:
                x_BTD, _ = block(c, local=kind == "local", name=f"layer_{i}")(
                    x_BTD, positions_BT, masks_BTS[kind], None, None, segment_ids_BT)
            else:
                x_BTD, new_cache[f"layer_{i}"] = block(c, local=kind == "local", name=f"layer_{i}")(
                    x_BTD, positions_BT, masks_BTS[kind], cache[f"layer_{i}"], slots_BT[kind])

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
# one array per leaf with a leading layer axis: layer j * period + p goes to slot j of block
# config.block_names[p], and the layers after the last whole period stay outside the scan.


def stack_layers(config: ModelConfig, params: Params, stack=None) -> Params:
    """Unrolled tree (layer_0, layer_1, ...) -> scanned tree (layers/<block name>, layer_{i} tail)."""
    stack = stack or (lambda xs: jnp.stack(xs))
    scanned = config.replace(scan_layers=True)
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    template = params["layer_0"]
    out["layers"] = {
        # A model shorter than one period scans over nothing: empty stacks shaped like a layer.
        name: (jax.tree.map(lambda *xs: stack(xs), *[params[f"layer_{i}"] for i in layers]) if layers else
               jax.tree.map(lambda x: jnp.zeros((0, *x.shape), x.dtype), template))
        for name, layers in scanned.scanned_layers().items()}
    for i in scanned.unscanned_layers():
        out[f"layer_{i}"] = params[f"layer_{i}"]
    return out


def unstack_layers(config: ModelConfig, params: Params) -> Params:
    """Scanned tree -> unrolled tree with one `layer_{i}` entry per layer."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for name, layers in config.replace(scan_layers=True).scanned_layers().items():
        for j, i in enumerate(layers):
            out[f"layer_{i}"] = jax.tree.map(lambda x, j=j: x[j], params["layers"][name])
    return out

"""The building blocks every layer is made of: einsum weights (with their LoRA adapters and
quantised forms) and RMSNorm. Dimension letters as in `gemma_jax.model.layers`."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.model.config import ModelConfig


def dequantize(q, scale, dtype):
    """Integer weight times its scale. An axis where the scale is shorter than the weight (but
    not 1) holds one scale per group of consecutive entries along it."""
    for i, (n, m) in enumerate(zip(q.shape, scale.shape)):
        if m not in (1, n):
            scale = jnp.repeat(scale, n // m, axis=i)
    return q.astype(dtype) * scale.astype(dtype)


def init(axes, stddev=0.02):
    """Normal initialiser carrying the parameter's logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


# ----------------------------------------------------------------------------- modules


# The product each weight takes part in. gemma_jax.lora reads them to shape adapters: the
# contracted letters of the weight are its inputs, the rest (but a stacked C) its outputs.
EINSUMS = {
    "q_einsum": "BTD,NDH->BTNH",
    "kv_einsum": "BSD,CKDH->CBSKH",
    "k_einsum": "BSD,KDH->BSKH",  # Gemma 4 global layers with attention_k_eq_v: keys, and values from them
    "attn_vec_einsum": "BTNH,NHD->BTD",
    "gating_einsum": "BTD,CFD->CBTF",
    "linear": "BTF,FD->BTD",
    # Gemma 4 per-layer inputs (P: per_layer_dim, Y: layers) and experts (E: experts, M: the rows
    # routed to an expert, a batch axis of the weight: each expert has adapters of its own).
    "per_layer_model_projection": "BTD,DYP->BTYP",
    "per_layer_input_gate": "BTD,DP->BTP",
    "per_layer_projection": "BTP,PD->BTD",
    "expert_gating": "EMD,CEDF->CEMF",
    "expert_linear": "EMF,EFD->EMD",
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
    led by C for a stacked weight, and by the weight's batch axes, those also in the input and
    the output, such as an expert axis): e.g. "BTD,NDH->BTNH" gives A "DR", B "RNH", so
    x A B = x (A B) with A B laid out as the weight "NDH"; "EMD,CEDF->CEMF" gives A "CEDR", B "CERF".
    """
    lhs, rest = eqn.split(",")
    rhs, out = rest.split("->")
    batch = "".join(c for c in rhs if c in lhs and c in out)
    lead = ("C" if rhs[0] == "C" else "") + batch
    a = lead + "".join(c for c in rhs if c in lhs and c not in batch) + "R"
    b = lead + "R" + "".join(c for c in rhs if c not in lhs and c != "C")
    mid = "".join(c for c in lhs if c not in rhs)
    return f"{lhs},{a}->{lead}{mid}R", f"{lead}{mid}R,{b}->{out}", f"{a},{b}->{rhs}"


def contracted_axes(eqn: str) -> str:
    """Letters of the weight of `eqn` that its product sums over (not its batch axes)."""
    lhs, rest = eqn.split(",")
    rhs, out = rest.split("->")
    return "".join(c for c in rhs if c in lhs and c not in out)


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
        w = self.param("w", init(self.axes), self.shape, c.weight_dtype)
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
        if self.cached:  # no backward pass to save anything for
            return self._project(from_rank, h, b) * jnp.asarray(c.lora_scale, x.dtype)
        # The adapter's full-width product is recomputed in the backward pass instead of kept:
        # with a (size-1) batch axis it is not "saveable" under remat dots_no_batch, so a LoRA
        # layer keeps one product per projection, the base's, as full fine-tuning does (kept
        # apart, the two products doubled that memory). Redoing it from the rank-R input is cheap.
        y = jax.vmap(functools.partial(self._project, from_rank))(h[None], b[None])[0]
        return y * jnp.asarray(c.lora_scale, x.dtype)

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


def rms_normalize(x, eps: float):
    """x * rsqrt(mean(x^2) + eps) over the last axis, in float32 (the unscaled RMSNorm)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (offset + scale) over the last axis, computed in float32.

    config.norm_scale_offset is 1 for Gemma 2 and 3 (the stored scale is zero-centred) and 0 for
    Gemma 4 (the stored scale is the factor); a new scale starts where the factor is 1. With
    `with_scale=False` there is no parameter (Gemma 4's value norm).
    """

    config: ModelConfig
    axis: str = "embed"  # logical name of the normalised axis (QK-norm: head_dim)
    with_scale: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.config
        normed = rms_normalize(x, c.norm_eps)
        if not self.with_scale:
            return normed.astype(x.dtype)
        offset = float(c.norm_scale_offset)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(1.0 - offset), (self.axis,)),
                           (x.shape[-1],), c.weight_dtype)
        return (normed * (offset + scale.astype(jnp.float32))).astype(x.dtype)

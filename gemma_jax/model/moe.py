"""Gemma 4's mixture of experts (26B-A4B): the router, top-k routing, the expert FFNs, their dispatch
and expert parallelism.

Numerics follow transformers 5.x `Gemma4TextRouter` / `Gemma4TextExperts`: the router reads the
residual stream (before any norm), normalises it without a scale, multiplies by a learned
per-channel scale and D^-0.5, and projects to one logit per expert; a float32 softmax over all
experts, the top-k probabilities renormalised to sum to 1, times a learned per-expert scale,
weight each chosen expert's GeGLU FFN of the normed input. (The official `gemma` library routes
the pre-FFW-normed input instead; the released checkpoints are the ones transformers loads.)

Parameters (E experts of width F, stacked gate/up first as the dense MLP's):
  moe/router/w (D, E), moe/router_scale (D,), moe/per_expert_scale (E,),
  moe/expert_gating/w (2, E, D, F), moe/expert_linear/w (E, F, D)
The expert weights are laid out as jax.lax.ragged_dot multiplies them ([E, in, out]); their
LoRA adapters are per expert (A [.., E, in, R], B [.., E, R, out], see lora_equations).

Dispatch (config.moe_impl): "ragged" sorts the (token, choice) pairs by expert and runs two
`ragged_dot`s, exactly the routed work; "dense" runs every expert on every token and weights
the results by the (mostly zero) routing weights, E/k times the work but plain batched matmuls,
which XLA:CPU runs far faster than its ragged_dot (that computes every group for every row).
"auto" takes ragged on TPU/GPU, dense on CPU. Both are exact: no capacity, no dropped tokens.

Expert parallelism: the expert axis of the weights carries the logical name "expert"; when the
rules of the trace map it to a mesh axis of size > 1 that divides E, each device runs only its
own experts (shard_map, manual over that axis only) on every token, and a psum over the axis
adds their shares. Tokens are gathered over that axis on the way in (the same collective volume
as an all-to-all exchange within a factor of 2, and no capacity); the result equals one device
up to the order of the float additions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma_jax.model.config import ModelConfig
from gemma_jax.model.primitives import Einsum, dequantize, init, rms_normalize


def route(config: ModelConfig, logits_TE):
    """(expert ids [T, k], weights [T, k]) of float32 router logits: top-k of the softmax,
    renormalised over the k (the per-expert scale is applied by the caller)."""
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    top_TK, idx_TK = jax.lax.top_k(probs_TE, config.experts_per_token)
    return idx_TK, top_TK / jnp.sum(top_TK, axis=-1, keepdims=True)


def impl_for(config: ModelConfig) -> str:
    """The dispatch config.moe_impl runs on this backend (see the module docstring)."""
    if config.moe_impl != "auto":
        return config.moe_impl
    return "dense" if jax.default_backend() == "cpu" else "ragged"


def _adapter(x, pair, product, scale):
    """scale * x A B for one adapter pair (A, B) with `product(x, w)` multiplying like the weight."""
    if pair is None:
        return 0.0
    a, b = pair
    return product(product(x, a), b) * jnp.asarray(scale, x.dtype)


def expert_ffn(x_TD, idx_TK, w_TK, gating, linear, *, first: int | jax.Array = 0, impl: str = "dense",
               lora_scale: float = 1.0):
    """sum_k w[t, k] * FFN_{idx[t, k]}(x[t]) over the choices whose expert lies in [first, first + E_l),
    E_l the experts in `linear`; the rest add nothing (another device holds them).

    gating = (w (2, E_l, D, F), lora pair or None), linear = (w (E_l, F, D), lora pair or None),
    lora pairs as (A, B) laid out per EINSUMS["expert_gating"/"expert_linear"].
    """
    (gw, gab), (lw, lab) = gating, linear
    e_local = lw.shape[0]
    local_TK = idx_TK - first
    if impl == "dense":
        def mm(x, w):  # every expert on every token: [T, in] or [E, T, in] times [E, in, out]
            return jnp.einsum("TI,EIO->ETO" if x.ndim == 2 else "ETI,EIO->ETO", x, w)

        gates = [mm(x_TD, gw[i]) + _adapter(x_TD, None if gab is None else (gab[0][i], gab[1][i]), mm, lora_scale)
                 for i in range(2)]
        h_ETF = jax.nn.gelu(gates[0], approximate=True) * gates[1]
        y_ETD = mm(h_ETF, lw) + _adapter(h_ETF, lab, mm, lora_scale)
        # one_hot is all-zero for ids outside [0, E_l): experts of other devices weigh nothing here.
        comb_TE = jnp.einsum("TK,TKE->TE", w_TK.astype(jnp.float32),
                             jax.nn.one_hot(local_TK, e_local, dtype=jnp.float32))
        return jnp.einsum("ETD,TE->TD", y_ETD, comb_TE.astype(y_ETD.dtype))
    if impl != "ragged":
        raise ValueError(f"moe_impl={impl!r}; choose dense or ragged")
    t, k = idx_TK.shape
    e_M = local_TK.reshape(-1)
    valid_M = (e_M >= 0) & (e_M < e_local)
    key_M = jnp.where(valid_M, e_M, e_local)  # other devices' choices sort last, past every group
    order_M = jnp.argsort(key_M, stable=True)
    tok_M = (jnp.arange(t * k, dtype=jnp.int32) // k)[order_M]
    weight_M = jnp.where(valid_M, w_TK.reshape(-1), 0.0)[order_M]
    sizes_E = jnp.bincount(key_M, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs_MD = x_TD[tok_M]

    def mm(x, w):  # rows past the last group come out 0
        return jax.lax.ragged_dot(x, w, sizes_E)

    gates = [mm(xs_MD, gw[i]) + _adapter(xs_MD, None if gab is None else (gab[0][i], gab[1][i]), mm, lora_scale)
             for i in range(2)]
    h_MF = jax.nn.gelu(gates[0], approximate=True) * gates[1]
    y_MD = mm(h_MF, lw) + _adapter(h_MF, lab, mm, lora_scale)
    y_MD = y_MD * weight_M[:, None].astype(y_MD.dtype)
    return jnp.zeros_like(x_TD).at[tok_M].add(y_MD)


def expert_axis(num_experts: int):
    """The mesh axis (or axes) the experts are split over in the current trace, or None: the mesh
    of `jax.set_mesh` and the flax logical-axis rules in effect, as for every parameter."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    axes = nn.logical_to_mesh_axes(("expert",))[0]
    if axes is None:
        return None
    names = axes if isinstance(axes, tuple) else (axes,)
    if any(a not in mesh.axis_names for a in names):
        return None
    size = 1
    for a in names:
        size *= mesh.shape[a]
    if size == 1 or num_experts % size:
        return None  # the weights stay whole on every device (sharding._fit does the same)
    return axes


def experts(x_TD, idx_TK, w_TK, gating, linear, *, impl: str, lora_scale: float):
    """expert_ffn over all experts: on one device, or split over the expert mesh axis (psum)."""
    axis = expert_axis(linear[0].shape[0])
    if axis is None:
        return expert_ffn(x_TD, idx_TK, w_TK, gating, linear, impl=impl, lora_scale=lora_scale)
    names = axis if isinstance(axis, tuple) else (axis,)

    def local(x_TD, idx_TK, w_TK, gating, linear):
        first = jax.lax.axis_index(axis) * linear[0].shape[0]
        out = expert_ffn(x_TD, idx_TK, w_TK, gating, linear, first=first, impl=impl, lora_scale=lora_scale)
        return jax.lax.psum(out, axis)

    def spec(x, expert_dim):
        return P(*([None] * expert_dim + [axis]))

    g_spec = (spec(None, 1), None if gating[1] is None else (spec(None, 1), spec(None, 1)))
    l_spec = (spec(None, 0), None if linear[1] is None else (spec(None, 0), spec(None, 0)))
    return jax.shard_map(local, in_specs=(P(), P(), P(), g_spec, l_spec), out_specs=P(),
                         axis_names=set(names), check_vma=False)(x_TD, idx_TK, w_TK, gating, linear)


class ExpertWeight(nn.Module):
    """One stacked expert weight `w` (dequantised if a "quant" scale is present) and its LoRA
    pair from the "lora" collection (or None)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    config: ModelConfig

    @nn.compact
    def __call__(self):
        c = self.config
        w = self.param("w", init(self.axes), self.shape, c.weight_dtype)
        if self.has_variable("quant", "scale"):
            w = dequantize(w, self.get_variable("quant", "scale"), c.compute_dtype)
        w = w.astype(c.compute_dtype)
        if not self.has_variable("lora", "a"):
            return w, None
        return w, (self.get_variable("lora", "a").astype(c.compute_dtype),
                   self.get_variable("lora", "b").astype(c.compute_dtype))


class MoE(nn.Module):
    """Router + experts of one layer: [B, T, D] residual stream and its pre-MoE-normed form in,
    the weighted sum of the chosen experts' outputs out."""

    config: ModelConfig
    cached: bool = False  # a pass with a KV cache over few tokens

    @nn.compact
    def __call__(self, x_BTD, normed_BTD):
        c = self.config
        b, t, d = x_BTD.shape
        e, f = c.num_experts, c.expert_dim
        scale_D = self.param("router_scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                             (d,), c.weight_dtype)
        per_expert_E = self.param("per_expert_scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                                   ("expert",)), (e,), c.weight_dtype)
        r_BTD = rms_normalize(x_BTD, c.norm_eps).astype(x_BTD.dtype)
        r_BTD = r_BTD * scale_D.astype(x_BTD.dtype) * jnp.asarray(d ** -0.5, x_BTD.dtype)
        logits_BTE = Einsum((d, e), ("embed", None), c, cached=self.cached, name="router")("BTD,DE->BTE", r_BTD)
        idx_TK, w_TK = route(c, logits_BTE.reshape(b * t, e))
        w_TK = w_TK * per_expert_E.astype(jnp.float32)[idx_TK]
        gating = ExpertWeight((2, e, d, f), (None, "expert", "embed", "mlp"), c, name="expert_gating")()
        linear = ExpertWeight((e, f, d), ("expert", "mlp", "embed"), c, name="expert_linear")()
        y_TD = experts(normed_BTD.reshape(b * t, d), idx_TK, w_TK.astype(x_BTD.dtype), gating, linear,
                       impl=impl_for(c), lora_scale=c.lora_scale)
        return y_TD.reshape(b, t, d)

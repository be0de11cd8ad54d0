"""A Pallas (Triton) flash-attention kernel for GPUs with Gemma 2's soft-cap, window and segments.

Forward and backward of causal grouped-query self-attention over pre-scaled queries, in the
layout the model uses (q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT; T == S). Dimension letters as
in `gemma_jax.model.layers`. The math is the xla path's (`model.attention`): float32 logits
q . k, soft-capped cap * tanh(x / cap) before masking, then the causal mask, the sliding window
on local layers (key k visible from query q when 0 <= q - k < window) and the segment mask
(same id, padding id 0 included), softmax over the visible keys.

  forward  grid (query block, batch, query head). Each program holds one [bq, H] query tile
           and walks only the key blocks its rows can see (`key_blocks`), an online softmax
           in float32; it writes the output and the per-row log-sum-exp.
  dq       same grid and walk; recomputes the probabilities from the log-sum-exp.
  dk, dv   grid (key block, batch, kv head). Each program walks the query blocks that can see
           its keys (`query_blocks`) for every one of the kv head's G query heads, so the GQA
           sum happens in registers and no per-query-head key gradient is ever written.

K and V are read through the BlockSpec index maps (query head n reads kv head n // G), never
repeated in memory. Dots take bf16 (or float32) tiles and accumulate in float32. With
`interpret=True` the same program runs on CPU through Pallas interpret mode, which is how the
tests check it against the xla path.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Finite stand-in for -inf: exp() of it underflows to 0 and it never makes inf - inf = nan.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Triton's dot needs tiles of at least 16 along every axis.
MIN_BLOCK = 16


class Blocks(NamedTuple):
    """Tile sizes: forward (and dq) query and key blocks, dk/dv query and key blocks."""

    q: int
    k: int
    q_bwd: int
    k_bwd: int


def default_blocks(head_dim: int) -> Blocks:
    """Tiles that keep a program's float32 accumulators in registers at this head dim.

    GEMMA_JAX_FLASH_BLOCKS="q,k,q_bwd,k_bwd" overrides them, for tuning on a new GPU
    without editing code (benchmarks/gpu_session.sh sweeps it).
    """
    env = os.environ.get("GEMMA_JAX_FLASH_BLOCKS", "")
    if env:
        return Blocks(*(int(x) for x in env.split(",")))
    # The dk/dv program holds two [bk, H] float32 accumulators plus its k and v tiles.
    return Blocks(128, 64, 64, 64) if head_dim <= 128 else Blocks(64, 64, 32, 32)


def fit_block(preferred: int, length: int) -> int:
    """The largest power-of-two tile <= preferred that divides length (at least MIN_BLOCK)."""
    b = min(preferred, length)
    while b > MIN_BLOCK and length % b:
        b //= 2
    if length % b or b < MIN_BLOCK:
        raise ValueError(f"flash_gpu needs a sequence length divisible by {MIN_BLOCK}; got {length}")
    return b


def _div(a, b: int):
    """Integer a // b for a non-negative traced or Python a (Triton's lowering has no floor
    division of program ids; lax.div truncates, the same for non-negative a)."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def key_blocks(q_block, bq: int, bk: int, window: int | None):
    """[lo, hi) key blocks that hold a key some row of query block q_block can see.

    Causal: keys up to the block's last query. Local: from the first key the window reaches
    from the block's first query (q - k < window, i.e. k >= q - window + 1). Blocks outside
    are masked for every row and skipped. Integer ops only, so it runs on traced program ids.
    """
    first_q = q_block * bq
    hi = _div(first_q + bq + bk - 1, bk)
    if window is None:
        return 0, hi
    return _div(jnp.maximum(first_q - window + 1, 0), bk), hi


def query_blocks(k_block, bq: int, bk: int, window: int | None, num_q_blocks: int):
    """[lo, hi) query blocks with a row that can see some key of key block k_block."""
    first_k = k_block * bk
    lo = _div(first_k, bq)
    if window is None:
        return lo, num_q_blocks
    return lo, jnp.minimum(_div(first_k + bk - 1 + window - 1 + bq, bq), num_q_blocks)


def _dot(a, b, contract=(1, 1)):
    """a . b over the given axes of two 2-D tiles, float32 accumulation; float32 tiles use
    IEEE products (Triton would otherwise take TF32 and miss the 1e-5 agreement)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def _capped_logits(q_QH, k_KH, cap: float | None):
    """(soft-capped float32 logits [bq, bk], the cap's derivative 1 - tanh^2, or None)."""
    s_QK = _dot(q_QH, k_KH)
    if not cap:
        return s_QK, None
    t_QK = jnp.tanh(s_QK / cap)
    return t_QK * cap, 1.0 - t_QK * t_QK


def _visible(first_q, first_k, bq: int, bk: int, segq_Q, segk_K, window: int | None):
    """[bq, bk] mask: causal, same segment, and inside the window on local layers."""
    q_Q1 = first_q + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_1K = first_k + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask_QK = (q_Q1 >= k_1K) & (segq_Q[:, None] == segk_K[None, :])
    if window is not None:
        mask_QK &= q_Q1 - k_1K < window
    return mask_QK


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, cap, window, bq, bk):
    """One query tile of one head: online softmax over the key blocks it can see."""
    i = pl.program_id(0)
    first_q = i * bq
    q_QH = q_ref[...]
    segq_Q = seg_ref[pl.ds(first_q, bq)]
    h = q_QH.shape[-1]

    def body(j, carry):
        acc_QH, m_Q, l_Q = carry
        first_k = j * bk
        k_KH = k_ref[pl.ds(first_k, bk), :]
        v_KH = v_ref[pl.ds(first_k, bk), :]
        s_QK, _ = _capped_logits(q_QH, k_KH, cap)
        mask_QK = _visible(first_q, first_k, bq, bk, segq_Q, seg_ref[pl.ds(first_k, bk)], window)
        s_QK = jnp.where(mask_QK, s_QK, MASK_VALUE)
        m_new_Q = jnp.maximum(m_Q, jnp.max(s_QK, axis=1))
        alpha_Q = jnp.exp(m_Q - m_new_Q)
        # A row with no visible key in this block must add nothing, not exp(0) per key.
        p_QK = jnp.where(mask_QK, jnp.exp(s_QK - m_new_Q[:, None]), 0.0)
        l_Q = alpha_Q * l_Q + jnp.sum(p_QK, axis=1)
        acc_QH = alpha_Q[:, None] * acc_QH + _dot(p_QK.astype(v_KH.dtype), v_KH, (1, 0))
        return acc_QH, m_new_Q, l_Q

    lo, hi = key_blocks(i, bq, bk, window)
    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc_QH, m_Q, l_Q = lax.fori_loop(lo, hi, body, init)
    # Every row sees at least its own key, so l > 0.
    o_ref[...] = (acc_QH / l_Q[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_Q + jnp.log(l_Q)


def _dlogits(q_QH, k_KH, v_KH, do_QH, lse_Q, delta_Q, mask_QK, cap):
    """(probabilities, gradient of the pre-cap logits) of one [bq, bk] tile."""
    s_QK, dcap_QK = _capped_logits(q_QH, k_KH, cap)
    p_QK = jnp.where(mask_QK, jnp.exp(s_QK - lse_Q[:, None]), 0.0)
    # Softmax backward with delta = rowsum(o * do) = rowsum(p * dp).
    ds_QK = p_QK * (_dot(do_QH, v_KH) - delta_Q[:, None])
    if cap:
        ds_QK = ds_QK * dcap_QK
    return p_QK, ds_QK


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cap, window, bq, bk):
    """Query gradient of one query tile of one head, over the key blocks it can see."""
    i = pl.program_id(0)
    first_q = i * bq
    q_QH, do_QH = q_ref[...], do_ref[...]
    lse_Q, delta_Q = lse_ref[...], delta_ref[...]
    segq_Q = seg_ref[pl.ds(first_q, bq)]

    def body(j, dq_QH):
        first_k = j * bk
        k_KH = k_ref[pl.ds(first_k, bk), :]
        mask_QK = _visible(first_q, first_k, bq, bk, segq_Q, seg_ref[pl.ds(first_k, bk)], window)
        _, ds_QK = _dlogits(q_QH, k_KH, v_ref[pl.ds(first_k, bk), :], do_QH, lse_Q, delta_Q, mask_QK, cap)
        return dq_QH + _dot(ds_QK.astype(k_KH.dtype), k_KH, (1, 0))

    lo, hi = key_blocks(i, bq, bk, window)
    dq_QH = lax.fori_loop(lo, hi, body, jnp.zeros(q_QH.shape, jnp.float32))
    dq_ref[...] = dq_QH.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cap, window, bq, bk, groups, num_q_blocks):
    """Key and value gradients of one key tile of one kv head, summed over its G query heads
    and the query blocks that can see it."""
    j = pl.program_id(0)
    first_k = j * bk
    k_KH, v_KH = k_ref[pl.ds(first_k, bk), :], v_ref[pl.ds(first_k, bk), :]
    segk_K = seg_ref[pl.ds(first_k, bk)]
    lo, hi = query_blocks(j, bq, bk, window, num_q_blocks)
    carry = (jnp.zeros(k_KH.shape, jnp.float32), jnp.zeros(v_KH.shape, jnp.float32))
    for g in range(groups):  # G is small (2 for every Gemma 2 size): unrolled

        def body(i, carry, g=g):
            dk_KH, dv_KH = carry
            first_q = i * bq
            q_QH = q_ref[pl.ds(first_q, bq), g, :]
            do_QH = do_ref[pl.ds(first_q, bq), g, :]
            mask_QK = _visible(first_q, first_k, bq, bk, seg_ref[pl.ds(first_q, bq)], segk_K, window)
            p_QK, ds_QK = _dlogits(q_QH, k_KH, v_KH, do_QH, lse_ref[g, pl.ds(first_q, bq)],
                                   delta_ref[g, pl.ds(first_q, bq)], mask_QK, cap)
            dv_KH = dv_KH + _dot(p_QK.astype(do_QH.dtype), do_QH, (0, 0))
            dk_KH = dk_KH + _dot(ds_QK.astype(q_QH.dtype), q_QH, (0, 0))
            return dk_KH, dv_KH

        carry = lax.fori_loop(lo, hi, body, carry)
    dk_ref[...] = carry[0].astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _compiler_params(head_dim: int, interpret: bool):
    """Triton launch settings; interpret mode takes none."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _specs(t, g, h, bq):
    """BlockSpecs shared by the forward and dq calls, grid (query block i, batch b, head n)."""
    q_spec = pl.BlockSpec((None, bq, None, None, h), lambda i, b, n: (b, i, n // g, n % g, 0))
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, b, n: (b, 0, n // g, 0))
    seg_spec = pl.BlockSpec((None, t), lambda i, b, n: (b, 0))
    row_spec = pl.BlockSpec((None, None, None, bq), lambda i, b, n: (b, n // g, n % g, i))
    return q_spec, kv_spec, seg_spec, row_spec


def _forward(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window, cap, blocks, interpret):
    """(output [B, T, K, G, H], float32 log-sum-exp [B, K, G, T])."""
    b, t, k, g, h = q_BTKGH.shape
    bq, bk = fit_block(blocks.q, t), fit_block(blocks.k, t)
    q_spec, kv_spec, seg_spec, row_spec = _specs(t, g, h, bq)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cap=cap, window=window, bq=bq, bk=bk),
        grid=(t // bq, b, k * g),
        in_specs=[q_spec, kv_spec, kv_spec, seg_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q_BTKGH.shape, q_BTKGH.dtype),
                   jax.ShapeDtypeStruct((b, k, g, t), jnp.float32)],
        compiler_params=_compiler_params(h, interpret), interpret=interpret, name="gemma_flash_fwd",
    )(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT)


def _backward(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, do_BTKGH, lse_BKGT, delta_BKGT,
              window, cap, blocks, interpret):
    """(dq, dk, dv) by the dq and dk/dv kernels."""
    b, t, k, g, h = q_BTKGH.shape
    bq, bk = fit_block(blocks.q, t), fit_block(blocks.k, t)
    q_spec, kv_spec, seg_spec, row_spec = _specs(t, g, h, bq)
    params = _compiler_params(h, interpret)
    dq_BTKGH = pl.pallas_call(
        functools.partial(_dq_kernel, cap=cap, window=window, bq=bq, bk=bk),
        grid=(t // bq, b, k * g),
        in_specs=[q_spec, kv_spec, kv_spec, seg_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BTKGH.shape, q_BTKGH.dtype),
        compiler_params=params, interpret=interpret, name="gemma_flash_dq",
    )(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, do_BTKGH, lse_BKGT, delta_BKGT)

    bq, bk = fit_block(blocks.q_bwd, t), fit_block(blocks.k_bwd, t)
    # Grid (key block j, batch b, kv head n): whole rows of queries and of the G heads.
    q_all = pl.BlockSpec((None, t, None, g, h), lambda j, b, n: (b, 0, n, 0, 0))
    kv_all = pl.BlockSpec((None, t, None, h), lambda j, b, n: (b, 0, n, 0))
    kv_tile = pl.BlockSpec((None, bk, None, h), lambda j, b, n: (b, j, n, 0))
    rows = pl.BlockSpec((None, None, g, t), lambda j, b, n: (b, n, 0, 0))
    seg_spec = pl.BlockSpec((None, t), lambda j, b, n: (b, 0))
    dk_BSKH, dv_BSKH = pl.pallas_call(
        functools.partial(_dkv_kernel, cap=cap, window=window, bq=bq, bk=bk, groups=g,
                          num_q_blocks=t // bq),
        grid=(t // bk, b, k),
        in_specs=[q_all, kv_all, kv_all, seg_spec, q_all, rows, rows],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k_BSKH.shape, k_BSKH.dtype),
                   jax.ShapeDtypeStruct(v_BSKH.shape, v_BSKH.dtype)],
        compiler_params=params, interpret=interpret, name="gemma_flash_dkv",
    )(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, do_BTKGH, lse_BKGT, delta_BKGT)
    return dq_BTKGH, dk_BSKH, dv_BSKH


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window, cap, blocks, interpret):
    return _forward(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window, cap, blocks, interpret)[0]


def _flash_fwd(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window, cap, blocks, interpret):
    out_BTKGH, lse_BKGT = _forward(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window, cap, blocks, interpret)
    return out_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, out_BTKGH, lse_BKGT)


def _flash_bwd(window, cap, blocks, interpret, residuals, do_BTKGH):
    q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, out_BTKGH, lse_BKGT = residuals
    # One [B, K, G, T] product replaces a pass over the probabilities (as in the xla backward).
    delta_BKGT = jnp.einsum("BTKGH,BTKGH->BKGT", out_BTKGH.astype(jnp.float32), do_BTKGH.astype(jnp.float32))
    do_BTKGH = do_BTKGH.astype(q_BTKGH.dtype)
    dq, dk, dv = _backward(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, do_BTKGH, lse_BKGT, delta_BKGT,
                           window, cap, blocks, interpret)
    return dq, dk, dv, np.zeros(segment_ids_BT.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None, softcap: float,
                    blocks: Blocks | None = None, interpret: bool = False):
    """Causal grouped-query self-attention of pre-scaled queries -> [B, T, K, G, H], by the kernel.

    window: the sliding window of a local layer (None for global ones). softcap: the logit
    cap (0 for none). The sequence length must divide by MIN_BLOCK; tiles shrink to fit it.
    """
    if k_BSKH.shape[1] != q_BTKGH.shape[1]:
        raise ValueError(f"flash_gpu is self-attention: {q_BTKGH.shape[1]} queries, {k_BSKH.shape[1]} keys")
    blocks = default_blocks(q_BTKGH.shape[-1]) if blocks is None else blocks
    cap = float(softcap) if softcap else None
    window = None if window is None or window >= q_BTKGH.shape[1] else int(window)
    return _flash(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32), window, cap, blocks, interpret)

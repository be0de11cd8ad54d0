"""Attention math of the xla path: RoPE, masks, soft-capped softmax, hand-written backward.

Dimension letters as in `gemma_jax.model.layers`. `dense_attention` is exact and differentiable
with a VJP written for XLA's layouts; `causal_attention` splits a self-attending sequence into
query blocks that each read only the keys they can see. Fused kernels live in `kernels.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.model.config import ModelConfig


def softcap(x, cap: float):
    """cap * tanh(x / cap); identity when cap is 0."""
    return jnp.tanh(x / cap) * cap if cap else x


def apply_rope(x_BTNH, positions_BT, base: float, scale: float = 1.0, fraction: float = 1.0):
    """Rotary embedding, half-split convention, angles in float32; positions divided by `scale`
    (linear scaling, Gemma 3's global layers). With `fraction` < 1 only the first
    int(fraction * H / 2) frequencies of each half turn, the others are 0 (Gemma 4's global
    layers: HF "proportional" RoPE, whose frequencies keep the full head_dim's spacing)."""
    h = x_BTNH.shape[-1]
    inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    if scale != 1.0:  # on the frequencies, as the reference does (1 leaves Gemma 2 bit-identical)
        inv_freq = inv_freq / scale
    if fraction != 1.0:
        inv_freq = jnp.where(jnp.arange(h // 2) < int(fraction * h // 2), inv_freq, 0.0)
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def segment_positions(segment_ids_BT):
    """Positions that restart at 0 where the segment id changes (packed sequences)."""
    t = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BT.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool),
         segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_idx_BT = jax.lax.cummax(jnp.where(starts, idx_BT, 0), axis=1)
    return idx_BT - start_idx_BT


def attention_masks(segment_ids_BT, sliding_window: int, positions_BT=None, branch_BT=None):
    """(local, global) boolean [B, T, S] masks: causal, same segment, local also windowed.

    With `branch_BT` (the harness's shared-prefix rows) a segment is a trunk (branch 0) followed
    by branches 1, 2, ...: every token sees the trunk before it and its own branch only, so
    several continuations of one context are scored in one row at the cost of the context once.
    The window is then measured in `positions_BT` (branches restart where the trunk ends).
    """
    t = segment_ids_BT.shape[1]
    q_T1 = jnp.arange(t)[:, None]
    k_1S = jnp.arange(t)[None, :]
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    global_BTS = same_BTS & (k_1S <= q_T1)[None]
    if branch_BT is None:
        local_BTS = global_BTS & (q_T1 - k_1S < sliding_window)[None]
        return local_BTS, global_BTS
    seen_BTS = (branch_BT[:, None, :] == 0) | (branch_BT[:, None, :] == branch_BT[:, :, None])
    global_BTS = global_BTS & seen_BTS
    local_BTS = global_BTS & (positions_BT[:, :, None] - positions_BT[:, None, :] < sliding_window)
    return local_BTS, global_BTS


def attention_logits(config: ModelConfig, q_BTKGH, k_BSKH, keys: str = "BSKH"):
    """Soft-capped float32 attention logits [B, K, G, T, S] of scaled queries against keys."""
    logits_BKGTS = jnp.einsum(f"BTKGH,{keys}->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    # The cap applies before masking, as in the reference implementations.
    return softcap(logits_BKGTS, config.attn_softcap)


def masked_softmax(logits_BKGTS, mask_BTS):
    """float32 softmax over keys, masked keys excluded."""
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BKGTS, axis=-1)


def dense_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, cap: float):
    """softmax(softcap(q k) masked) v over all keys at once -> [B, T, K, G, H] (the xla path).

    Same math as masked_softmax(attention_logits(...)) followed by the value product, with a
    hand-written gradient (`_dense_attention_bwd`) whose products read the [T, S] matrices in
    the layout they were written in. Left to autodiff, the key and value gradients contract
    over the query axis, and XLA:CPU first writes a transposed copy of each [B, K, G, T, S]
    float32 matrix, which made the attention backward ~2.5x slower than its matmuls.
    """
    return _dense_attention(cap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS)


def causal_blocks(t: int, window: int | None = None) -> list[tuple[int, int, int]]:
    """(first query, end query, first key) of the query blocks causal_attention splits a
    length-t sequence into: 4 from 512 tokens (when t divides by 4), 2 from 256, else 1. A
    block's keys run from its first key to its last query (causal), starting no earlier than
    the window reaches back from its first query."""
    n = 4 if t >= 512 and t % 4 == 0 else 2 if t >= 256 and t % 2 == 0 else 1
    size = t // n
    return [(i * size, (i + 1) * size, 0 if window is None else max(0, i * size - window + 1)) for i in range(n)]


def causal_attention(q_BTKGH, k_BTKH, v_BTKH, mask_BTT, cap: float, window: int | None = None):
    """dense_attention of a sequence attending to itself under a causal (and for local layers
    windowed) mask, by query blocks (causal_blocks) that each read only the keys they can see.

    The skipped keys are masked anyway, so the result is the same; at 4 blocks the [T, S]
    work drops to 62% (global layers) or less (window <= T/2) of the full square, at 2 to 75%.
    """
    blocks = causal_blocks(q_BTKGH.shape[1], window)
    if len(blocks) == 1:
        return dense_attention(q_BTKGH, k_BTKH, v_BTKH, mask_BTT, cap)
    return jnp.concatenate([
        dense_attention(q_BTKGH[:, lo:hi], k_BTKH[:, first:hi], v_BTKH[:, first:hi], mask_BTT[:, lo:hi, first:hi], cap)
        for lo, hi, first in blocks], axis=1)


def attention_parts(cap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS):
    """(output, capped float32 logits, log-sum-exp over visible keys, float32 probabilities)."""
    # The small q is reordered to [B, K, G, T, H] so the product comes out as [B, K, G, T, S].
    q_BKGTH = q_BTKGH.transpose(0, 2, 3, 1, 4)
    capped_BKGTS = softcap(jax.lax.dot_general(q_BKGTH, k_BSKH, (((4,), (3,)), ((0, 1), (0, 2))),
                                               preferred_element_type=jnp.float32), cap)
    visible_B11TS = mask_BTS[:, None, None]
    masked_BKGTS = jnp.where(visible_B11TS, capped_BKGTS, jnp.finfo(jnp.float32).min)
    max_BKGT = jax.lax.stop_gradient(jnp.max(masked_BKGTS, axis=-1))
    lse_BKGT = max_BKGT + jnp.log(jnp.sum(jnp.exp(masked_BKGTS - max_BKGT[..., None]), axis=-1))
    probs_BKGTS = jnp.exp(masked_BKGTS - lse_BKGT[..., None])
    enc_BKGTH = jax.lax.dot_general(probs_BKGTS.astype(v_BSKH.dtype), v_BSKH, (((4,), (1,)), ((0, 1), (0, 2))))
    return enc_BKGTH.transpose(0, 3, 1, 2, 4), capped_BKGTS, lse_BKGT, probs_BKGTS


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_attention(cap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS):
    return attention_parts(cap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS)[0]


def _dense_attention_fwd(cap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS):
    enc_BTKGH, capped_BKGTS, lse_BKGT, _ = attention_parts(cap, q_BTKGH, k_BSKH, v_BSKH, mask_BTS)
    return enc_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, mask_BTS, capped_BKGTS, lse_BKGT, enc_BTKGH)


def _dense_attention_bwd(cap, residuals, denc_BTKGH):
    """Gradients of q, k, v. The products against the [B, K, G, T, S] matrices contract them
    over S (query gradient) or over their leading G, T (key and value gradients, computed
    transposed as [B, K, H, S]), so neither matrix is copied into another layout."""
    q_BTKGH, k_BSKH, v_BSKH, mask_BTS, capped_BKGTS, lse_BKGT, enc_BTKGH = residuals
    f32 = jnp.float32
    probs_BKGTS = jnp.where(mask_BTS[:, None, None], jnp.exp(capped_BKGTS - lse_BKGT[..., None]), 0.0)
    denc_BKGTH = denc_BTKGH.transpose(0, 2, 3, 1, 4)
    # d(probs): [B, K, G, T, H] x [B, S, K, H] over H.
    dprobs_BKGTS = jax.lax.dot_general(denc_BKGTH, v_BSKH, (((4,), (3,)), ((0, 1), (0, 2))),
                                       preferred_element_type=f32)
    # Softmax backward: probs * (dprobs - sum_S probs dprobs), where the row sum equals
    # sum_H denc * enc (the output is probs @ v), a [B, K, G, T] product instead of a pass
    # over the [T, S] matrix.
    row_BKGT = jnp.einsum("BTKGH,BTKGH->BKGT", denc_BTKGH.astype(f32), enc_BTKGH.astype(f32))
    dlogits_BKGTS = probs_BKGTS * (dprobs_BKGTS - row_BKGT[..., None])
    if cap:  # d(cap * tanh(z / cap)) / dz = 1 - (capped / cap)^2
        dlogits_BKGTS = dlogits_BKGTS * (1.0 - jnp.square(capped_BKGTS / cap))
    dlogits_BKGTS = dlogits_BKGTS.astype(q_BTKGH.dtype)
    probs_BKGTS = probs_BKGTS.astype(v_BSKH.dtype)
    # Key and value gradients as [B, K, H, S]: the big matrix is the right operand, contracted
    # over its leading (G, T) axes in storage order; the small one is what gets transposed.
    dims = (((3, 4), (2, 3)), ((0, 1), (0, 1)))
    dv_BKHS = jax.lax.dot_general(denc_BKGTH.transpose(0, 1, 4, 2, 3), probs_BKGTS, dims,
                                  preferred_element_type=f32)
    dk_BKHS = jax.lax.dot_general(q_BTKGH.transpose(0, 2, 4, 3, 1), dlogits_BKGTS, dims,
                                  preferred_element_type=f32)
    dq_BKGTH = jax.lax.dot_general(dlogits_BKGTS, k_BSKH, (((4,), (1,)), ((0, 1), (0, 2))),
                                   preferred_element_type=f32)
    return (dq_BKGTH.transpose(0, 3, 1, 2, 4).astype(q_BTKGH.dtype),
            dk_BKHS.transpose(0, 3, 1, 2).astype(k_BSKH.dtype),
            dv_BKHS.transpose(0, 3, 1, 2).astype(v_BSKH.dtype),
            np.zeros(mask_BTS.shape, jax.dtypes.float0))


_dense_attention.defvjp(_dense_attention_fwd, _dense_attention_bwd)


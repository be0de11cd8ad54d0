"""The decoding KV cache: layout, slot bookkeeping and masks (the attention itself is in layers.py).

A cache mirrors the parameter tree: layers/<block name> hold k and v [P, B, K, S, H] (the period
axis first, so they scan with the layers; see ModelConfig.block_names), layer_{i} [B, K, S, H] for
layers outside the scan, and positions/<type> [B, S] the absolute position held by each slot
(-1 = empty), once per layer type ("local", "global") present in the model, since every layer of
a type writes the same slots. Local (sliding-window) layers keep a ring buffer of
min(sliding_window, length) slots, slot = position % slots, so memory for long generations grows
only in the global layers. K before S: XLA:CPU multiplies that layout in place when one token
attends to the cache. K and H are the layer type's (Gemma 4's global layers have their own), and
Gemma 4's KV-shared layers keep no cache: they attend to their producer layer's.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def init_cache(config, batch: int, length: int, dtype=None) -> dict[str, Any]:
    """Empty cache for `batch` rows of up to `length` tokens of a model.ModelConfig."""
    dtype = dtype or config.compute_dtype
    slots = {"local": min(config.sliding_window, length), "global": length}

    def kv(kind, *lead):
        shape = (*lead, batch, config.kv_heads_of(kind), slots[kind], config.head_dim_of(kind))
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    cache = {"positions": {kind: jnp.full((batch, slots[kind]), -1, jnp.int32)
                           for kind in sorted(set(config.attention_pattern))}}
    if config.scan_layers:
        cache["layers"] = {name: kv(kind, config.num_periods)
                           for name, kind in zip(config.block_names, config.attention_pattern)}
    for i in config.unscanned_layers():
        if not config.kv_shared(i):
            cache[f"layer_{i}"] = kv(config.layer_types[i])
    return cache


def cache_update(slot_positions_BS, positions_BT, sliding_window: int | None = None):
    """One layer type's view of a step: (mask [B, T, keys], slots [B, T], new slot positions).

    A single token per row (decoding) is written first and attends to the S updated slots. A
    chunk (T > 1) is a prefill into an empty cache: it attends to its own T tokens, then fills
    the slots. Token t goes to slot position % S, or to slot S (dropped by the scatter) when it
    is padding (position -1) or not among the last S tokens of its row.
    """
    s = slot_positions_BS.shape[1]
    last_B1 = jnp.max(positions_BT, axis=1, keepdims=True)
    # Positions within a row are consecutive, so the last S real tokens land in distinct slots.
    write_BT = (positions_BT >= 0) & (positions_BT > last_B1 - s)
    slots_BT = jnp.where(write_BT, positions_BT % s, s)
    b_B1 = jnp.arange(positions_BT.shape[0])[:, None]
    new_BS = slot_positions_BS.at[b_B1, slots_BT].set(positions_BT, mode="drop")
    keys_BS = new_BS if positions_BT.shape[1] == 1 else positions_BT
    q_BT1, k_B1S = positions_BT[:, :, None], keys_BS[:, None, :]
    mask_BTS = (k_B1S >= 0) & (k_B1S <= q_BT1)
    if sliding_window is not None:
        mask_BTS &= q_BT1 - k_B1S < sliding_window
    return mask_BTS, slots_BT, new_BS

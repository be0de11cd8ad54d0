"""Gradient accumulation: one step's gradients summed over micro-batches (SFT, preference, GRPO)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulate(grads_of, batch, params, accum: int, aux_zeros=None):
    """(summed aux, summed gradients) of `grads_of(micro_batch, i) -> (aux, grads)` over `accum`
    micro-batches of `batch`; gradients accumulate in float32, aux (a pytree of sums) from
    `aux_zeros` (default: zeros shaped like one micro-batch's aux).

    Rows i, i+accum, ... form micro-batch i, so each stays spread over the batch shards. With
    accum 1 there is no accumulator: zero-filling a float32 copy of the model costs a pass over it.
    """
    if accum == 1:
        return grads_of(batch, 0)
    micro_batches = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    if aux_zeros is None:
        first = jax.tree.map(lambda x: x[0], micro_batches)
        aux_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grads_of(first, 0)[0]))

    def micro(carry, xs):
        aux, grads = grads_of(*xs)
        g_acc, a_acc = carry
        return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, a_acc, aux)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, aux), _ = jax.lax.scan(micro, (zeros, aux_zeros), (micro_batches, jnp.arange(accum)))
    return aux, grads

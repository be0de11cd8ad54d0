"""Scoring sequences: the fused chunked cross-entropy, token accuracy, the loss of a batch.

Training, evaluation and anything else that scores tokens (preference objectives, the
lm-evaluation-harness backend) use these, so every figure is computed the same way: summed over
the loss-masked target tokens, in float32, `chunk` tokens of logits at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.model.config import ModelConfig
from gemma_jax.model.layers import Transformer, final_logits


def chunked_cross_entropy(config: ModelConfig, hidden_BTD, table_VD, targets_BT, mask_BT, chunk: int,
                          table_grad: bool = True):
    """Sums of masked token losses and correct predictions, computed `chunk` tokens at a time.

    The [tokens, vocab] float32 logits exist for one chunk at a time, so a 256k vocabulary
    never needs [batch, length, vocab]. The gradient is formed in the same pass (see
    `_fused_ce`), so unlike rematerialising each chunk the logits are computed only once.
    `table_grad=False` (a frozen embedding, as in LoRA) skips the [vocab, embed] float32
    gradient accumulator.
    """
    d = hidden_BTD.shape[-1]
    x_ND = hidden_BTD.reshape(-1, d)
    y_N, m_N = targets_BT.reshape(-1), mask_BT.reshape(-1).astype(jnp.float32)
    n = x_ND.shape[0]
    count = None
    if _unsharded():
        # The targets first: chunks past the last one are skipped at run time. Only the loss-masked
        # tokens (model turns: a quarter of a packed chat batch) then pay for the vocabulary
        # projection, which is most of a step's work for a small model with a 262k vocabulary.
        order_N = jnp.argsort(m_N <= 0, stable=True)
        x_ND, y_N, m_N = x_ND[order_N], y_N[order_N], m_N[order_N]
        count = jnp.sum(m_N > 0).astype(jnp.int32)
        chunk = min(chunk, SKIP_CHUNK)  # the granularity of the skipping
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    if pad:
        x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
        y_N, m_N = jnp.pad(y_N, (0, pad)), jnp.pad(m_N, (0, pad))
    loss_sum, correct, _, _ = _fused_ce(config, chunk, table_grad, x_ND, table_VD, y_N, m_N, count)
    return loss_sum, correct


# Chunk size (tokens) when the loss skips chunks past the last target (see chunked_cross_entropy).
SKIP_CHUNK = 128


def _unsharded() -> bool:
    """Whether the trace runs on one device (no mesh, or a mesh of one), where gathering the target
    tokens to the front is free of cross-device traffic."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _ce_chunks(config: ModelConfig, chunk: int, table_grad: bool, x_ND, table_VD, y_N, m_N, count):
    """Loss sum, correct count, d(loss)/d(hidden) and d(loss)/d(table), one chunk at a time.

    The loss is the last operation of the step, so its gradient can be formed while each
    chunk's logits are at hand: softmax minus one-hot, times the soft-cap's derivative. With a
    `count`, chunks that start at or past that token hold no targets and are skipped.
    """
    d = x_ND.shape[-1]
    cap = config.final_softcap

    def one(carry, xs):
        i, x_CD, y_C, m_C = xs
        if count is None:
            return compute(carry, x_CD, y_C, m_C)
        return jax.lax.cond(i * chunk < count, compute, lambda c, *_: (c, jnp.zeros_like(x_CD)), carry, x_CD, y_C, m_C)

    def compute(carry, x_CD, y_C, m_C):
        loss, hits, dtable_VD = carry
        logits_CV = final_logits(config, x_CD[None], table_VD)[0]
        max_C = jnp.max(logits_CV, axis=-1)
        logz_C = max_C + jnp.log(jnp.sum(jnp.exp(logits_CV - max_C[:, None]), axis=-1))
        true_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        # A hit is a target logit equal to the row's maximum: the same as argmax == target but
        # for exact ties, and a plain max instead of XLA:CPU's slow (value, index) reduction.
        hits = hits + jnp.sum((true_C >= max_C) * m_C)
        dlogits_CV = jnp.exp(logits_CV - logz_C[:, None]) * m_C[:, None]
        dlogits_CV = dlogits_CV.at[jnp.arange(y_C.shape[0]), y_C].add(-m_C)
        if cap:  # d(cap * tanh(z / cap)) / dz = 1 - (capped / cap)^2
            dlogits_CV = dlogits_CV * (1.0 - jnp.square(logits_CV / cap))
        # Both gradient products run in the compute dtype, as the forward one does: bf16 under
        # mixed precision (what torch autocast does), accumulating in float32. Left in float32
        # they made a 2b step on an H200 378 ms instead of 334 (README, Fine-tuning).
        dlogits_CV = dlogits_CV.astype(x_CD.dtype)
        dx_CD = jnp.einsum("CV,VD->CD", dlogits_CV, table_VD.astype(x_CD.dtype), preferred_element_type=jnp.float32)
        if table_grad:
            dtable_VD = dtable_VD + jnp.einsum("CV,CD->VD", dlogits_CV, x_CD, preferred_element_type=jnp.float32)
        loss = loss + jnp.sum((logz_C - true_C) * m_C)
        return (loss, hits, dtable_VD), dx_CD.astype(x_CD.dtype)

    steps = x_ND.shape[0] // chunk
    xs = (jnp.arange(steps, dtype=jnp.int32), x_ND.reshape(-1, chunk, d), y_N.reshape(-1, chunk),
          m_N.reshape(-1, chunk))
    init = (jnp.float32(0), jnp.float32(0), jnp.zeros(table_VD.shape if table_grad else (), jnp.float32))
    (loss, hits, dtable_VD), dx = jax.lax.scan(one, init, xs)
    return loss, hits, dx.reshape(x_ND.shape), dtable_VD.astype(table_VD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_ce(config, chunk, table_grad, x_ND, table_VD, y_N, m_N, count):
    return _ce_chunks(config, chunk, table_grad, x_ND, table_VD, y_N, m_N, count)


def _fused_ce_fwd(config, chunk, table_grad, x_ND, table_VD, y_N, m_N, count):
    out = _ce_chunks(config, chunk, table_grad, x_ND, table_VD, y_N, m_N, count)
    return out, (out[2], out[3], y_N, m_N, count, table_VD.shape)


def _fused_ce_bwd(config, chunk, table_grad, residuals, cotangents):
    dx_ND, dtable_VD, y_N, m_N, count, table_shape = residuals
    g = cotangents[0]  # only the loss sum is differentiated; counts and the gradients are outputs
    dtable_VD = dtable_VD * g.astype(dtable_VD.dtype) if table_grad else jnp.zeros(table_shape, dtable_VD.dtype)
    return (dx_ND * g.astype(dx_ND.dtype), dtable_VD,
            np.zeros(y_N.shape, jax.dtypes.float0), jnp.zeros_like(m_N),
            None if count is None else np.zeros((), jax.dtypes.float0))


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def final_hidden(params, batch, frozen=None, *, config: ModelConfig, rng=None, adapters: bool = True):
    """(final hidden states [B, T, D], the embedding table [V, D] that projects them to logits).

    `params` are the trained weights: the whole model, or with `frozen` (a LoRA run: {"params":
    base, optionally "quant": scales}) the adapters alone; `adapters=False` runs the frozen base
    alone (LoRA switched off), and then `params` is unused. `rng` drives adapter dropout.
    """
    if frozen:
        variables = dict(frozen, lora=params) if adapters else dict(frozen)
        table_VD = frozen["params"]["embedder"]["input_embedding"]
    else:
        variables = {"params": params}
        table_VD = params["embedder"]["input_embedding"]
    rngs = {"dropout": rng} if rng is not None and config.lora_dropout and adapters else None
    hidden_BTD = Transformer(config).apply(
        variables, batch["inputs"], batch["positions"], batch["segment_ids"], return_hidden=True, rngs=rngs)
    return hidden_BTD, table_VD


def batch_loss(params, batch, frozen=None, *, config: ModelConfig, chunk: int, rng=None):
    """(sum of token losses, (target tokens, correct tokens)) of one batch; `params`, `frozen` and
    `rng` as in final_hidden."""
    hidden_BTD, table_VD = final_hidden(params, batch, frozen, config=config, rng=rng)
    loss_sum, correct = chunked_cross_entropy(
        config, hidden_BTD, table_VD, batch["targets"], batch["loss_mask"], chunk, table_grad=not frozen)
    return loss_sum, (jnp.sum(batch["loss_mask"]), correct)


def score_batch(params, batch, frozen=None, *, config: ModelConfig, chunk: int):
    """Summed loss, target tokens and correct tokens of one eval batch."""
    loss_sum, (tokens, correct) = batch_loss(params, batch, frozen, config=config, chunk=chunk)
    return dict(loss_sum=loss_sum, tokens=tokens, correct=correct)


def token_logps(config: ModelConfig, hidden_BTD, table_VD, targets_BT, chunk: int, table_grad: bool = True,
                temperature: float = 1.0):
    """float32 log-probabilities [B, T] of the target tokens, computed `chunk` tokens at a time.

    `temperature` scores the distribution sampling draws from: softmax of the (soft-capped)
    logits / temperature, as RL objectives (GRPO) compare it with the sampler's.

    Like chunked_cross_entropy, [tokens, vocab] logits exist for one chunk at a time. Each
    token's gradient with respect to its hidden state depends on its own logits only, so with
    `table_grad=False` (LoRA) the differentiated pass forms it beside the forward one and the
    backward pass only scales it; with a trained table the backward pass recomputes each chunk.
    """
    b, t, d = hidden_BTD.shape
    x_ND, y_N = hidden_BTD.reshape(-1, d), targets_BT.reshape(-1)
    n = x_ND.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    if pad:
        x_ND, y_N = jnp.pad(x_ND, ((0, pad), (0, 0))), jnp.pad(y_N, (0, pad))
    return _fused_logp(config, chunk, table_grad, float(temperature), x_ND, table_VD, y_N)[:n].reshape(b, t)


def _logp_chunk(config, x_CD, table_VD, y_C, temperature=1.0):
    """(log p of the targets, logits / temperature, log Z) of one chunk."""
    logits_CV = final_logits(config, x_CD[None], table_VD)[0]
    if temperature != 1.0:
        logits_CV = logits_CV / temperature
    max_C = jnp.max(logits_CV, axis=-1)
    logz_C = max_C + jnp.log(jnp.sum(jnp.exp(logits_CV - max_C[:, None]), axis=-1))
    true_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
    return true_C - logz_C, logits_CV, logz_C


def _dlogp_dlogits(config, logits_CV, logz_C, y_C, w_C, temperature=1.0):
    """w * d(log p of the target) / d(pre-cap logits): w * (one-hot - softmax) / temperature * cap'
    (`logits_CV` are the tempered ones)."""
    dlogits_CV = -jnp.exp(logits_CV - logz_C[:, None]) * w_C[:, None]
    dlogits_CV = dlogits_CV.at[jnp.arange(y_C.shape[0]), y_C].add(w_C)
    if temperature != 1.0:
        dlogits_CV, logits_CV = dlogits_CV / temperature, logits_CV * temperature
    cap = config.final_softcap
    return dlogits_CV * (1.0 - jnp.square(logits_CV / cap)) if cap else dlogits_CV


def _logp_scan(config, chunk, x_ND, table_VD, y_N, with_dx: bool, temperature: float = 1.0):
    d = x_ND.shape[-1]

    def one(_, xs):
        x_CD, y_C = xs
        logp_C, logits_CV, logz_C = _logp_chunk(config, x_CD, table_VD, y_C, temperature)
        if not with_dx:
            return None, (logp_C, jnp.zeros((0,), x_CD.dtype))
        dlogits_CV = _dlogp_dlogits(config, logits_CV, logz_C, y_C, jnp.ones_like(logp_C),
                                    temperature).astype(x_CD.dtype)
        dx_CD = jnp.einsum("CV,VD->CD", dlogits_CV, table_VD.astype(x_CD.dtype), preferred_element_type=jnp.float32)
        return None, (logp_C, dx_CD.astype(x_CD.dtype))

    _, (logp, dx) = jax.lax.scan(one, None, (x_ND.reshape(-1, chunk, d), y_N.reshape(-1, chunk)))
    return logp.reshape(-1), (dx.reshape(x_ND.shape) if with_dx else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused_logp(config, chunk, table_grad, temperature, x_ND, table_VD, y_N):
    return _logp_scan(config, chunk, x_ND, table_VD, y_N, with_dx=False, temperature=temperature)[0]


def _fused_logp_fwd(config, chunk, table_grad, temperature, x_ND, table_VD, y_N):
    if table_grad:  # the backward pass recomputes each chunk's logits for both gradients
        logp_N, _ = _logp_scan(config, chunk, x_ND, table_VD, y_N, with_dx=False, temperature=temperature)
        return logp_N, (x_ND, table_VD, y_N, None)
    logp_N, dx_ND = _logp_scan(config, chunk, x_ND, table_VD, y_N, with_dx=True, temperature=temperature)
    return logp_N, (None, table_VD, y_N, dx_ND)


def _fused_logp_bwd(config, chunk, table_grad, temperature, residuals, g_N):
    x_ND, table_VD, y_N, dx_ND = residuals
    float0 = np.zeros(y_N.shape, jax.dtypes.float0)
    if not table_grad:
        return (dx_ND * g_N[:, None].astype(dx_ND.dtype), jnp.zeros(table_VD.shape, table_VD.dtype), float0)
    d = x_ND.shape[-1]

    def one(dtable_VD, xs):
        x_CD, y_C, g_C = xs
        _, logits_CV, logz_C = _logp_chunk(config, x_CD, table_VD, y_C, temperature)
        dlogits_CV = _dlogp_dlogits(config, logits_CV, logz_C, y_C, g_C, temperature).astype(x_CD.dtype)
        dx_CD = jnp.einsum("CV,VD->CD", dlogits_CV, table_VD.astype(x_CD.dtype), preferred_element_type=jnp.float32)
        dtable_VD = dtable_VD + jnp.einsum("CV,CD->VD", dlogits_CV, x_CD, preferred_element_type=jnp.float32)
        return dtable_VD, dx_CD.astype(x_CD.dtype)

    xs = (x_ND.reshape(-1, chunk, d), y_N.reshape(-1, chunk), g_N.reshape(-1, chunk))
    dtable_VD, dx = jax.lax.scan(one, jnp.zeros(table_VD.shape, jnp.float32), xs)
    return dx.reshape(x_ND.shape), dtable_VD.astype(table_VD.dtype), float0


_fused_logp.defvjp(_fused_logp_fwd, _fused_logp_bwd)


def sequence_logps(params, batch, frozen=None, *, config: ModelConfig, chunk: int, rng=None, adapters: bool = True):
    """(summed target log-probs [B, S], target-token counts [B, S]) per packed segment of each row.

    Index s holds segment id s (0 is padding, so [:, 0] is zero), S = length + 1 bounds the
    segments a row can hold. `params`, `frozen`, `rng` and `adapters` as in final_hidden.
    """
    hidden_BTD, table_VD = final_hidden(params, batch, frozen, config=config, rng=rng, adapters=adapters)
    logp_BT = token_logps(config, hidden_BTD, table_VD, batch["targets"], chunk, table_grad=not frozen)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return segment_sums(logp_BT * mask_BT, batch["segment_ids"]), segment_sums(mask_BT, batch["segment_ids"])


def segment_sums(values_BT, segment_ids_BT):
    """[B, T] values summed per (row, segment id) -> [B, T + 1] (index s: segment s)."""
    b, t = values_BT.shape
    # A scatter-add: a [B, T, S] one-hot would be quadratic in the length.
    index_BT = jnp.arange(b)[:, None] * (t + 1) + segment_ids_BT
    out = jax.ops.segment_sum(values_BT.reshape(-1), index_BT.reshape(-1), num_segments=b * (t + 1))
    return out.reshape(b, t + 1)

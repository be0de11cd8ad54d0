"""GRPO and its variants: group-normalised advantages, the clipped policy loss, the pure train step.

Definitions follow TRL 1.16's GRPOTrainer (its names and defaults are the config's, grpo.*):

  advantages  rewards r (the weighted sum of the reward functions; functions that return None
              for a completion are left out, one that no function applies to gets advantage 0),
              A = r - mean of its group, divided by std + 1e-4 (Bessel-corrected) of the group
              (scale_rewards=group), of the whole batch (batch), or not at all (none).
  log p       of each completion token under softmax(logits / temperature), the distribution the
              rollouts were sampled from (TRL scores the policy, old policy and reference so).
  ratio       rho = exp(log p - log p_old) per completion token; log p_old is the policy's at
              sampling time (num_iterations > 1), else log p itself without gradient, so rho is
              exactly 1 and the gradient is A * grad log p.
  token term  l = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta * KL, with the
              k3 estimator times the ratio (TRL's default bias correction, use_bias_correction_kl):
              KL = rho * (exp(q - log p) - (q - log p) - 1), q the reference's log-prob; rho keeps its
              gradient, so even at rho = 1 the KL's gradient is the unbiased reverse-KL one.
  loss        grpo     mean over completions of each completion's token mean of l
              bnpo     token mean of l over each micro-batch, averaged over the micro-batches
              dr_grpo  sum of l / (completions * max_new_tokens)
              dapo     sum of l / completion tokens of the whole step
  (with one micro-batch bnpo and dapo agree, as in TRL on one process.)

Completions of a skipped group (a reward returned NaN) carry loss mask 0 and are not counted.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import loss as loss_lib
from gemma_jax.model.config import ModelConfig
from gemma_jax.train.micro_batches import accumulate

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)
# Per-token float fields a GRPO batch carries beside the token rows.
ADVANTAGES, OLD_LOGPS, REF_LOGPS = "advantages", "old_logps", "ref_logps"


@dataclasses.dataclass(frozen=True)
class GRPO:
    """The GRPO objective and its hyperparameters (hashable: a static argument of the step)."""

    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = 1
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    name: str = "grpo"
    precomputed: bool = False  # (preference objectives' flag; never for GRPO)

    @property
    def uses_reference(self) -> bool:
        """A reference pass exists only with a KL term (beta > 0)."""
        return self.beta != 0.0

    @property
    def live_reference(self) -> bool:
        """False: the reference's log-probs are computed once per batch of rollouts, not in the step."""
        return False

    def batch_fields(self) -> tuple[str, ...]:
        """The float fields of a batch beside the token rows."""
        return (ADVANTAGES,) + ((OLD_LOGPS,) if self.num_iterations > 1 else ()) + \
            ((REF_LOGPS,) if self.uses_reference else ())


def from_config(cfg) -> GRPO:
    """The GRPO objective from the grpo section (its values were checked against their rules in
    gemma_jax/config.py before the run started)."""
    g = cfg.grpo
    eps = float(g.epsilon)
    return GRPO(int(g.group_size), int(g.max_new_tokens), float(g.temperature), float(g.top_p), float(g.beta),
                eps, eps if g.epsilon_high is None else float(g.epsilon_high), int(g.num_iterations),
                str(g.loss_type), str(g.scale_rewards))


# ----------------------------------------------------------------------------- advantages (host, numpy)


def nanstd(x, axis=None):
    """Bessel-corrected standard deviation ignoring NaN (NaN with fewer than two values), as TRL's."""
    x = np.asarray(x, np.float64)
    count = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(np.isnan(x).all(axis=axis, keepdims=True), 0.0, x), axis=axis, keepdims=True)
        var = np.nansum((x - mean) ** 2, axis=axis) / (count - 1)
    return np.where(count > 1, np.sqrt(var), np.nan)


def advantages(rewards, group_size: int, scale: str, skipped=None):
    """(advantages [n], group std [n/G]) of total rewards [n] (NaN: no function applied), groups of
    `group_size` consecutive completions. Groups marked in `skipped` [n/G] get advantage 0 and are
    left out of the batch statistics."""
    r = np.asarray(rewards, np.float64).copy()
    groups = r.shape[0] // group_size
    skipped = np.zeros(groups, bool) if skipped is None else np.asarray(skipped, bool)
    r[np.repeat(skipped, group_size)] = np.nan
    grouped = r.reshape(groups, group_size)
    with warnings.catch_warnings():  # an all-NaN group (no function applied) has mean NaN: advantages 0
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(grouped, axis=1)
    std_group = nanstd(grouped, axis=1)
    std = np.repeat(std_group, group_size) if scale != "batch" else np.full(r.shape, nanstd(r))
    adv = r - np.repeat(mean, group_size)
    if scale != "none":
        adv = adv / (std + STD_EPS)
    return np.nan_to_num(adv, nan=0.0), std_group


# ----------------------------------------------------------------------------- the loss (device, jax)


def token_terms(logp, old, ref, adv, obj: GRPO):
    """Per-token loss terms l, KL (0 without a reference) and the low/high clipped masks ([R, T] each)."""
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - obj.epsilon, 1.0 + obj.epsilon_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    kl = jnp.zeros_like(logp)
    if obj.uses_reference:  # k3, times the ratio (TRL's use_bias_correction_kl, its default): unbiased off-policy
        d = ref - logp
        kl = (jnp.exp(d) - d - 1.0) * ratio
        loss = loss + obj.beta * kl
    low = (ratio < 1.0 - obj.epsilon) & (adv < 0)
    high = (ratio > 1.0 + obj.epsilon_high) & (adv > 0)
    return loss, kl, low, high


def row_weights(mask_RT, obj: GRPO, accum: int):
    """Each row's weight on its summed token terms, so the step's loss is loss_type's normalisation
    (rows i, i + accum, ... form micro-batch i, as in the step)."""
    tokens_R = jnp.sum(mask_RT, axis=-1)
    rows = jnp.maximum(jnp.sum((tokens_R > 0).astype(jnp.float32)), 1.0)
    if obj.loss_type == "grpo":
        return 1.0 / (jnp.maximum(tokens_R, 1.0) * rows)
    if obj.loss_type == "bnpo":
        per_micro = tokens_R.reshape(-1, accum).sum(axis=0)  # [accum]
        return jnp.tile(1.0 / (jnp.maximum(per_micro, 1.0) * accum), tokens_R.shape[0] // accum)
    if obj.loss_type == "dr_grpo":
        return jnp.full_like(tokens_R, 1.0 / (rows * obj.max_new_tokens))
    return jnp.full_like(tokens_R, 1.0 / jnp.maximum(jnp.sum(tokens_R), 1.0))  # dapo


def reduce_loss(loss_RT, mask_RT, obj: GRPO, accum: int = 1):
    """loss_type's normalisation of per-token terms (what the step's weights add up to)."""
    w_R = row_weights(mask_RT, obj, accum)
    return jnp.sum(loss_RT * mask_RT * w_R[:, None])


def token_logps(params, rows, frozen=None, *, config: ModelConfig, chunk: int, rng=None, adapters: bool = True,
                temperature: float = 1.0):
    """Log-probabilities [R, T] of each row's targets under softmax(logits / temperature), the
    distribution the rollouts were sampled from (as TRL scores them): the policy (LoRA: the
    adapters on `frozen`), or with adapters=False the frozen base alone."""
    hidden_BTD, table_VD = loss_lib.final_hidden(params, rows, frozen, config=config, rng=rng, adapters=adapters)
    return loss_lib.token_logps(config, hidden_BTD, table_VD, rows["targets"], chunk, table_grad=not frozen,
                                temperature=temperature)


def rollout_logps(params, rows, frozen=None, reference=None, *, config: ModelConfig, chunk: int, obj: GRPO):
    """The log-probs a batch of rollouts needs once, without gradient: the sampling policy's
    (num_iterations > 1) and the reference's (beta > 0: LoRA's base with adapters off, or the
    frozen initial weights)."""
    out, t = {}, obj.temperature
    if obj.num_iterations > 1:
        out[OLD_LOGPS] = token_logps(params, rows, frozen, config=config, chunk=chunk, temperature=t)
    if obj.uses_reference:
        out[REF_LOGPS] = (token_logps(None, rows, frozen, config=config, chunk=chunk, adapters=False, temperature=t)
                          if frozen else token_logps(reference, rows, config=config, chunk=chunk, temperature=t))
    return jax.lax.stop_gradient(out)


def grpo_step(state, batch, frozen=None, reference=None, *, config: ModelConfig, tx, chunk: int, accum: int,
              schedule, objective: GRPO, update):
    """One optimizer step of GRPO over `accum` micro-batches of rollout rows [R, T].

    `batch` holds the token rows (loss mask on completion tokens) and the per-token fields of
    GRPO.batch_fields. The policy's log-probs are recomputed here and differentiated; the
    normalisers are read from the masks up front, so micro-batches add up to the one-batch
    gradient. `reference` is unused (its log-probs come with the batch). `update` is the trainer's
    optimizer update (train.step.apply_if_finite: a non-finite step is skipped and counted).
    """
    del reference
    obj = objective
    params = state["params"]
    step_rng = (jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
                if config.lora_dropout else None)
    mask_RT = batch["loss_mask"].astype(jnp.float32)
    batch = dict(batch, weight=row_weights(mask_RT, obj, accum))

    def loss_fn(p, mb, rng):
        logp = token_logps(p, mb, frozen, config=config, chunk=chunk, rng=rng, temperature=obj.temperature)
        old = mb[OLD_LOGPS] if obj.num_iterations > 1 else jax.lax.stop_gradient(logp)
        ref = mb.get(REF_LOGPS)
        loss_t, kl_t, low_t, high_t = token_terms(logp, old, ref, mb[ADVANTAGES], obj)
        m = mb["loss_mask"].astype(jnp.float32)
        total = jnp.sum(loss_t * m * mb["weight"][:, None])
        sums = dict(loss=total, kl=jnp.sum(kl_t * m), low=jnp.sum(low_t * m), high=jnp.sum(high_t * m),
                    region=jnp.sum((low_t | high_t) * m), tokens=jnp.sum(m),
                    rows=jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32)))
        return total, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_of(mb, i):
        rng = None if step_rng is None else jax.random.fold_in(step_rng, i)
        (_, sums), grads = grad_fn(params, mb, rng)
        return sums, grads

    sums, grads = accumulate(grads_of, batch, params, accum)

    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    new_state, grad_norm, nonfinite = update(state, grads, sums["loss"], tx)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {"loss": sums["loss"], "tokens": sums["tokens"], "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), "nonfinite": nonfinite,
               "clip_ratio/low_mean": sums["low"] / tokens, "clip_ratio/high_mean": sums["high"] / tokens,
               "clip_ratio/region_mean": sums["region"] / tokens}
    if obj.uses_reference:
        metrics["kl"] = sums["kl"] / tokens
    return new_state, metrics


def host_rows(prompt_ids, completion_ids, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Token rows [n, seq_len] of prompt + completion sequences, loss mask on the completion's
    tokens (its stop token included), one sequence per row."""
    n = len(prompt_ids)
    rows = {k: np.zeros((n, seq_len), np.float32 if k == "loss_mask" else np.int32)
            for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    rows["inputs"][:] = pad_id
    rows["targets"][:] = pad_id
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        seq = np.concatenate([np.asarray(p, np.int32), np.asarray(c, np.int32)])
        k = len(seq) - 1
        if k > seq_len:
            raise ValueError(f"row {i}: {len(seq)} tokens do not fit data.seq_len={seq_len}")
        rows["inputs"][i, :k] = seq[:-1]
        rows["targets"][i, :k] = seq[1:]
        rows["loss_mask"][i, len(p) - 1:k] = 1.0
        rows["segment_ids"][i, :k] = 1
        rows["positions"][i, :k] = np.arange(k)
    return rows



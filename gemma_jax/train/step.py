"""The pure train step: gradients over micro-batches, one optimizer update, step metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from gemma_jax import loss
from gemma_jax.model.config import ModelConfig
from gemma_jax.train import objectives
from gemma_jax.train.micro_batches import accumulate


def train_step(state, batch, frozen=None, *, config: ModelConfig, tx, chunk: int, accum: int, schedule):
    """One optimizer step over `accum` micro-batches, weighted by their target-token counts.

    Gradients of the summed token losses are added up and divided by the step's total target
    tokens, so k micro-batches of b rows give the same update as one batch of k*b rows. With
    `frozen` (LoRA) only state["params"], the adapters, are differentiated and updated.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss.batch_loss, config=config, chunk=chunk), has_aux=True)
    params = state["params"]
    # Only adapter dropout draws random numbers; without it the step carries no RNG work.
    step_rng = (jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
                if config.lora_dropout else None)

    def grads_of(mb, i):
        return grad_fn(params, mb, frozen, rng=None if step_rng is None else jax.random.fold_in(step_rng, i))

    f32 = jnp.float32(0)
    (loss_sum, (tokens, correct)), grads = accumulate(grads_of, batch, params, accum, (f32, (f32, f32)))

    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grads, params)
    new_state, grad_norm, nonfinite = apply_if_finite(state, grads, loss_sum, tx)
    metrics = dict(loss=loss_sum / denom, accuracy=correct / denom, tokens=tokens, grad_norm=grad_norm,
                   learning_rate=schedule(state["step"]), nonfinite=nonfinite)
    return new_state, metrics


def apply_if_finite(state, grads, loss, tx):
    """The optimizer update, kept only when the loss and the gradient norm are finite.

    A NaN or inf step (overflow, a bad batch, a too-high lr) would poison every weight and every
    Adam moment at once; instead the step counter moves on (the batch is consumed, as the data
    iterator's position says) while params and opt_state stay as they were. Returns
    (new state, grad norm, 1.0 if the update was skipped else 0.0); the loop counts the skips.
    """
    params = state["params"]
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = dict(state, step=state["step"] + 1, params=keep(optax.apply_updates(params, updates), params),
                     opt_state=keep(opt_state, state["opt_state"]))
    return new_state, grad_norm, 1.0 - finite.astype(jnp.float32)


def preference_step(state, batch, frozen=None, reference=None, *, config: ModelConfig, tx, chunk: int, accum: int,
                    schedule, objective):
    """One optimizer step of a preference objective (gemma_jax.train.objectives) over `accum` micro-batches.

    `batch` holds pairs: [B, 2, T] arrays (chosen, rejected), several pairs per row when packed
    (segment ids). The loss is normalised by the whole step's pair and chosen-token counts, read
    from the masks up front, so micro-batches add up to the one-batch gradient. DPO's reference
    log-probs come from the frozen base with adapters off (LoRA, `frozen`), the frozen initial
    weights (`reference`), or with dpo.precompute_reference from the batch; they are computed
    outside the differentiated function.
    """
    params = state["params"]
    step_rng = (jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
                if config.lora_dropout else None)
    pairs, chosen_tokens = objectives.pair_counts(objectives.pair_rows(batch))
    score = functools.partial(objectives.pair_scores, obj=objective, config=config, chunk=chunk)

    def loss_fn(p, rows, ref, rng):
        scores = score(p, rows, ref, frozen, rng=rng)
        return objectives.step_loss(scores, pairs, chosen_tokens), scores

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_of(mb, i):
        rows = objectives.pair_rows(mb)
        ref = objectives.step_reference(rows, frozen, reference, objective, config=config, chunk=chunk)
        rng = None if step_rng is None else jax.random.fold_in(step_rng, i)
        (_, scores), grads = grad_fn(params, rows, ref, rng)
        return scores, grads

    scores, grads = accumulate(grads_of, batch, params, accum)

    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = objectives.scores_to_metrics(scores, objective)
    new_state, grad_norm, nonfinite = apply_if_finite(state, grads, metrics["loss"], tx)
    metrics.update(accuracy=metrics["rewards/accuracies"], tokens=scores["tokens"], grad_norm=grad_norm,
                   learning_rate=schedule(state["step"]), nonfinite=nonfinite)
    return new_state, metrics

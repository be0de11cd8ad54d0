"""Preference objectives (DPO, IPO, conservative DPO, ORPO, SimPO) on summed response log-probabilities.

Every loss takes per-pair sums of the response tokens' log-probabilities under the policy (and
for DPO the frozen reference) and the response lengths, the quantities TRL's trainers reduce to.
Hyperparameters keep TRL's names and defaults, except that DPO adds the NLL term by default
(dpo.sft_weight 1; 0 is TRL's plain DPO):

  dpo    beta 0.1; loss "sigmoid" (the DPO paper's -log sigmoid(beta * h), h the difference of
         the chosen and rejected log-ratios to the reference) or "ipo" ((h' - 1/(2 beta))^2 with
         h' the same difference of per-token averaged log-ratios, as TRL computes it);
         label_smoothing eps > 0 is conservative DPO: -(1-eps) log s(beta h) - eps log s(-beta h);
         sft_weight w > 0 adds w times the token-mean NLL of the step's chosen responses (TRL's
         loss_type ["sigmoid", "sft"] with loss_weights [1, w], formerly rpo_alpha). DPO alone
         only moves the difference h: on pairs it separates easily it pushes both likelihoods
         down (the chosen one too) and the model's own answers drift; the NLL term holds the
         chosen responses' likelihood up.
  orpo   beta 0.1 (the paper's lambda): token-mean NLL of the chosen responses minus
         beta * log sigmoid(log odds(chosen) - log odds(rejected)), odds of the per-token average
         probability. No reference.
  simpo  beta 2.0, gamma 0.5 (TRL's simpo_gamma): -log sigmoid(beta * (avg_c - avg_r) - gamma)
         with avg the per-token average log-probability. No reference.

Rewards as TRL logs them: DPO beta * (log p - log p_ref), ORPO and SimPO beta * average log p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma_jax import loss as loss_lib
from gemma_jax.errors import UserError
from gemma_jax.train import grpo

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo")
# Per-pair quantities averaged over the pairs of a step (train and eval), as TRL names them.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
# Log-probability per response token, pooled over the step's responses (sum of log-probs / tokens):
# with logps/chosen (a response's sum) they show the displacement of the chosen side.
TOKEN_METRICS = {"logps/chosen_per_token": "chosen_tokens", "logps/rejected_per_token": "rejected_tokens"}


@dataclasses.dataclass(frozen=True)
class Objective:
    """A preference objective and its hyperparameters (hashable: a static argument of the step)."""

    name: str  # dpo | orpo | simpo
    beta: float
    loss: str = "sigmoid"  # dpo only
    label_smoothing: float = 0.0  # dpo only
    gamma: float = 0.0  # simpo only
    precomputed: bool = False  # dpo: reference log-probs read from the batch (dpo.precompute_reference)
    sft_weight: float = 0.0  # dpo only: weight of the chosen responses' token-mean NLL

    @property
    def uses_reference(self) -> bool:
        return self.name == "dpo"

    @property
    def live_reference(self) -> bool:
        """The reference runs in every step (a frozen copy, or the LoRA base with adapters off)."""
        return self.uses_reference and not self.precomputed


def from_config(cfg) -> Objective | grpo.GRPO | None:
    """The run's preference objective from train.objective and its section (grpo.GRPO for RL on
    prompts); None for SFT."""
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise UserError(f"train.objective={name!r}; choose one of {', '.join(OBJECTIVES)}")
    if name == "sft":
        return None
    if name == "grpo":
        return grpo.from_config(cfg)
    if name == "dpo":
        d = cfg.dpo
        if d.loss not in DPO_LOSSES:
            raise UserError(f"dpo.loss={d.loss!r}; choose one of {', '.join(DPO_LOSSES)}")
        if not 0.0 <= float(d.label_smoothing) < 0.5:
            raise UserError(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
        if d.loss == "ipo" and float(d.label_smoothing):
            raise UserError("dpo.label_smoothing applies to dpo.loss='sigmoid' only (conservative DPO); "
                            "set it to 0 for 'ipo'")
        sft_weight = float(d.sft_weight)
        if not 0.0 <= sft_weight < float("inf"):
            raise UserError(f"dpo.sft_weight={d.sft_weight} must be >= 0 (0: plain DPO; 1 as TRL's "
                            "loss_weights=[1, 1] for loss_type ['sigmoid', 'sft'])")
        obj = Objective("dpo", float(d.beta), d.loss, float(d.label_smoothing),
                        precomputed=bool(d.precompute_reference), sft_weight=sft_weight)
    elif name == "orpo":
        obj = Objective("orpo", float(cfg.orpo["lambda"]))
    else:
        obj = Objective("simpo", float(cfg.simpo.beta), gamma=float(cfg.simpo.gamma))
    if obj.beta <= 0:
        key = "orpo.lambda" if name == "orpo" else f"{name}.beta"
        raise UserError(f"{key}={obj.beta} must be positive")
    return obj


QUICKSTART = "python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal_tiny"


def check_start(cfg) -> None:
    """What train.run checks of the objective before anything is written: its settings, and that
    DPO has a model to start from (its own reference: random weights would make it meaningless)."""
    from_config(cfg)
    if cfg.train.objective == "dpo" and not cfg.model.init_checkpoint:
        raise UserError("model.init_checkpoint is empty: DPO tunes a model you already have, which is also its "
                        "reference; give one with --config.model.init_checkpoint=DIR (any checkpoint or training "
                        f"workdir; for configs/preference.py:tiny the Quickstart's: run `{QUICKSTART}`, then "
                        "--config.model.init_checkpoint=/tmp/legal_tiny)")


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    x = jnp.minimum(x, -1e-7)  # a response of probability 1 would make the odds infinite
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _smoothed(z, eps):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    loss = -jax.nn.log_sigmoid(z)
    return loss if not eps else (1.0 - eps) * loss - eps * jax.nn.log_sigmoid(-z)


def pair_terms(obj: Objective, logp_c, logp_r, len_c, len_r, ref_c=None, ref_r=None) -> dict:
    """Per-pair loss terms and rewards from summed log-probs and lengths (any matching shapes).

    Returns {"loss": the pair's preference term, "nll": its summed chosen-token NLL times the
    term's weight (ORPO's SFT term, DPO's with dpo.sft_weight; normalised by the step's chosen
    tokens; 0 otherwise), "rewards/chosen",
    "rewards/rejected"} and for ORPO "log_odds_ratio", "log_odds_chosen".
    """
    avg_c, avg_r = logp_c / jnp.maximum(len_c, 1.0), logp_r / jnp.maximum(len_r, 1.0)
    out = {}
    if obj.name == "dpo":
        ratio_c, ratio_r = logp_c - ref_c, logp_r - ref_r
        if obj.loss == "ipo":
            h = ratio_c / jnp.maximum(len_c, 1.0) - ratio_r / jnp.maximum(len_r, 1.0)
            out["loss"] = jnp.square(h - 1.0 / (2.0 * obj.beta))
        else:
            out["loss"] = _smoothed(obj.beta * (ratio_c - ratio_r), obj.label_smoothing)
        out["rewards/chosen"], out["rewards/rejected"] = obj.beta * ratio_c, obj.beta * ratio_r
        # sft_weight 0 adds exact zeros: the loss and gradient of plain DPO, bit for bit.
        out["nll"] = -obj.sft_weight * logp_c if obj.sft_weight else jnp.zeros_like(logp_c)
    elif obj.name == "orpo":
        log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
        ratio = jax.nn.log_sigmoid(log_odds)
        out["loss"] = -obj.beta * ratio
        out["nll"] = -logp_c
        out["log_odds_ratio"], out["log_odds_chosen"] = ratio, log_odds
        out["rewards/chosen"], out["rewards/rejected"] = obj.beta * avg_c, obj.beta * avg_r
    elif obj.name == "simpo":
        out["loss"] = _smoothed(obj.beta * (avg_c - avg_r) - obj.gamma, 0.0)
        out["rewards/chosen"], out["rewards/rejected"] = obj.beta * avg_c, obj.beta * avg_r
        out["nll"] = jnp.zeros_like(logp_c)
    else:
        raise ValueError(f"not a preference objective: {obj.name!r}")
    return out


def split_pairs(sums_BS, counts_BS):
    """Per-segment sums of [2B, S] rows (row 2r chosen, 2r+1 rejected) -> chosen/rejected [B, S-1]
    log-probs and lengths, and the mask of real pairs."""
    s = sums_BS.shape[-1]
    sums, counts = sums_BS.reshape(-1, 2, s)[:, :, 1:], counts_BS.reshape(-1, 2, s)[:, :, 1:]
    valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    return sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1], valid


def summed_metrics(terms: dict, logp_c, logp_r, valid) -> dict:
    """Sums over the real pairs of every logged per-pair quantity (divide by the pair count)."""
    w = valid.astype(jnp.float32)
    out = {"rewards/chosen": terms["rewards/chosen"], "rewards/rejected": terms["rewards/rejected"],
           "rewards/margins": terms["rewards/chosen"] - terms["rewards/rejected"],
           "rewards/accuracies": (terms["rewards/chosen"] > terms["rewards/rejected"]).astype(jnp.float32),
           "logps/chosen": logp_c, "logps/rejected": logp_r}
    for k in ("log_odds_ratio", "log_odds_chosen"):
        if k in terms:
            out[k] = terms[k]
    return {k: jnp.sum(jnp.where(valid, v, 0.0) * w) for k, v in out.items()}


def pair_rows(batch) -> dict:
    """Pair arrays [B, 2, T] (chosen, rejected) -> model rows [2B, T], row 2r chosen and 2r+1
    rejected, so each batch shard's rows stay on it."""
    return {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in ROW_FIELDS + (REF_FIELD,) if k in batch}


ROW_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# dpo.precompute_reference: each sequence's summed reference log-prob at its segment's first
# token, zeros elsewhere, so per-segment sums of the field give the reference sums back.
REF_FIELD = "ref_logps"


def step_reference(rows, frozen, reference, obj: Objective, *, config, chunk: int):
    """The reference sums [2B, T+1] a step or eval batch uses: from the batch when precomputed,
    else by a forward of the reference (reference_logps); None for objectives without one."""
    if not obj.uses_reference:
        return None
    if obj.precomputed:
        return loss_lib.segment_sums(rows[REF_FIELD].astype(jnp.float32), rows["segment_ids"])
    return reference_logps(rows, frozen, reference, config=config, chunk=chunk)


def reference_logps(rows, frozen, reference, *, config, chunk: int):
    """Summed reference log-probs [2B, T+1] per segment: the frozen base with adapters off (LoRA)
    or the frozen initial weights (full fine-tuning). Never differentiated."""
    if frozen:
        sums, _ = loss_lib.sequence_logps(None, rows, frozen, config=config, chunk=chunk, adapters=False)
    else:
        sums, _ = loss_lib.sequence_logps(reference, rows, config=config, chunk=chunk)
    return jax.lax.stop_gradient(sums)


def pair_scores(params, rows, ref_BS, frozen=None, *, obj: Objective, config, chunk: int, rng=None) -> dict:
    """Sums over the real pairs of `rows`: loss_sum (preference terms), nll_sum (ORPO, DPO's
    sft_weight), pairs, chosen_tokens, rejected_tokens, tokens and every PAIR_METRICS quantity.
    `ref_BS` from reference_logps (DPO)."""
    sums, counts = loss_lib.sequence_logps(params, rows, frozen, config=config, chunk=chunk, rng=rng)
    logp_c, logp_r, len_c, len_r, valid = split_pairs(sums, counts)
    ref_c = ref_r = None
    if obj.uses_reference:
        ref_c, ref_r, _, _, _ = split_pairs(ref_BS, counts)
    terms = pair_terms(obj, logp_c, logp_r, len_c, len_r, ref_c, ref_r)
    out = summed_metrics(terms, logp_c, logp_r, valid)
    out.update(loss_sum=jnp.sum(jnp.where(valid, terms["loss"], 0.0)),
               nll_sum=jnp.sum(jnp.where(valid, terms["nll"], 0.0)),
               pairs=jnp.sum(valid.astype(jnp.float32)),
               chosen_tokens=jnp.sum(jnp.where(valid, len_c, 0.0)),
               rejected_tokens=jnp.sum(jnp.where(valid, len_r, 0.0)),
               tokens=jnp.sum(rows["loss_mask"].astype(jnp.float32)))
    return out


def step_loss(scores: dict, pairs, chosen_tokens):
    """The loss of a step from summed scores: mean preference term over the step's pairs, plus
    for ORPO (and DPO with sft_weight) the weighted chosen responses' NLL per chosen token."""
    return scores["loss_sum"] / jnp.maximum(pairs, 1.0) + scores["nll_sum"] / jnp.maximum(chosen_tokens, 1.0)


def pair_counts(rows):
    """(real pairs, chosen target tokens) of pair rows, from the masks alone (no forward pass)."""
    mask = rows["loss_mask"].astype(jnp.float32)
    counts = loss_lib.segment_sums(mask, rows["segment_ids"])
    _, _, len_c, _, valid = split_pairs(jnp.zeros_like(counts), counts)
    return jnp.sum(valid.astype(jnp.float32)), jnp.sum(jnp.where(valid, len_c, 0.0))


def scores_to_metrics(scores: dict, obj: Objective, prefix: str = "") -> dict:
    """Step or eval scores -> logged means: loss, every per-pair metric and the per-token log-probs."""
    pairs = jnp.maximum(scores["pairs"], 1.0)
    out = {f"{prefix}loss": step_loss(scores, scores["pairs"], scores["chosen_tokens"])}
    for k in PAIR_METRICS + ("log_odds_ratio", "log_odds_chosen"):
        if k in scores:
            out[prefix + k] = scores[k] / pairs
    for k, count in TOKEN_METRICS.items():
        if count in scores:
            out[prefix + k] = scores[k.rsplit("_per_token", 1)[0]] / jnp.maximum(scores[count], 1.0)
    if obj.name == "orpo":
        out[prefix + "nll_loss"] = scores["nll_sum"] / jnp.maximum(scores["chosen_tokens"], 1.0)
    return out

"""Fine-tuning: `python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=DIR`.

  model_setup.py  the run's tokenizer and ModelConfig (from the config and any init checkpoint)
  optimizer.py    AdamW, warmup + schedule, decay mask, clipping
  step.py         the pure train step (micro-batches, one update, metrics), SFT or preference pairs
  micro_batches.py  gradient accumulation over micro-batches, shared by every objective's step
  objectives.py   DPO / IPO / cDPO, ORPO, SimPO losses on summed response log-probs, pair metrics
  reference.py    dpo.precompute_reference: the reference log-probs in one pass, stored in the workdir
  grpo.py         GRPO (train.objective=grpo): advantages, the clipped policy loss per loss type, the step
  rewards.py      GRPO reward functions: grpo.rewards loaded and checked, built-ins, TRL's calling contract
  rollout.py      GRPO's outer loop: sample groups on the mesh, score, advantages, update; resumable
  state.py        Trainer: state shardings, sharded init, the jitted train and eval steps
  checkpoints.py  Orbax checkpoints of the train state and data iterator, exact resume
  log.py          progress, metrics.jsonl, TensorBoard, plots
  loop.py         run(): set up, restore, loop, finish
  __main__.py     the command line

The loss itself is `gemma_jax.loss`, shared with evaluation (it was `train.loss_fn`,
`train.chunked_cross_entropy`, `train.eval_step`). `train.run`, `train.Trainer` and the
optimizer helpers keep their names.
"""

from gemma_jax.train.loop import run
from gemma_jax.train.model_setup import find_tokenizer, lora_enabled, lora_model_config, model_config
from gemma_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer
from gemma_jax.train.state import Trainer
from gemma_jax.train.step import train_step

__all__ = ["run", "find_tokenizer", "lora_enabled",
           "lora_model_config", "model_config", "decay_mask", "lr_schedule", "make_optimizer", "Trainer",
           "train_step"]

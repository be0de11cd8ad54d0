"""GRPO: loss parity with TRL's GRPOTrainer on fixed rollouts, and the step time (rollouts + update) beside it.

  python benchmarks/grpo.py [--prompts 2 --group 8 --prompt_len 64 --new_tokens 64 --steps 3]

Parity: a random float32 Gemma 2 in transformers, loaded into gemma_jax from its safetensors
export; the same fixed rollouts (prompts of one length, completions of several lengths, group
advantages, old and reference per-token log-probs) go through TRL 1.16's own
GRPOTrainer._compute_loss and through gemma_jax's GRPO loss (train/grpo.py), for every loss type,
with temperature 0.7, clip 0.2 / 0.28 and beta 0.04.

Step time: one GRPO step as each trainer runs it on the benchmark shape (benchmarks/common.py),
`prompts` prompts x `group` completions of `new_tokens` tokens (a random model never stops early):
sampling, the reward (a Python function), advantages and one AdamW update. gemma_jax:
rollout.Rollouts.step (KV-cache sampler, jitted step); TRL: GRPOTrainer.train() (transformers
generate, its loss, backward, AdamW), timed per step by a callback. Fastest of `steps` after a
warm-up step each. Needs `pip install trl`.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from gemma_jax import config as config_lib, sharding, train  # noqa: E402
from gemma_jax.tokenizer import Tokenizer  # noqa: E402
from gemma_jax.train import grpo, rollout  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "tokenizer.model")


def length_reward(prompts, completions, **kwargs):
    """A cheap reward with a spread: the completion's length in characters, mod 7."""
    return [float(len(c) % 7) for c in completions]


def _hf_tokenizer(d):
    import shutil

    import transformers

    shutil.copy(TOKENIZER, os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "GemmaTokenizer", "add_bos_token": true}')
    return transformers.AutoTokenizer.from_pretrained(d)


def _trl_trainer(model, d, *, loss_type="dapo", batch, group, new_tokens, temperature=1.0, epsilon_high=None,
                 steps=1, prompts=None, callbacks=None, generation_kwargs=None):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=d, loss_type=loss_type, per_device_train_batch_size=batch, num_generations=group,
                      max_completion_length=new_tokens, temperature=temperature, epsilon=0.2,
                      epsilon_high=epsilon_high, beta=0.0, report_to=[], use_cpu=True, bf16=False, max_steps=steps,
                      learning_rate=1e-5, logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      generation_kwargs=generation_kwargs)
    ds = datasets.Dataset.from_dict({"prompt": prompts or ["a"] * (batch // group)})
    return GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds,
                       processing_class=_hf_tokenizer(d), callbacks=callbacks)


def fixed_rollouts(vocab, n, group, prompt_len, rng):
    """Prompts (one length per group, as TRL left-pads them), completions of 2-12 tokens, advantages."""
    prompts = [rng.integers(3, vocab, prompt_len) for _ in range(n // group) for _ in range(group)]
    comps = [rng.integers(3, vocab, rng.integers(2, 13)) for _ in range(n)]
    adv, _ = grpo.advantages(rng.normal(size=n), group, "group")
    return prompts, comps, adv


def trl_losses(model, prompts, comps, adv, old, ref, *, temperature, beta, group):
    """TRL's loss of the rollouts for each loss type (its trainer's _compute_loss, eval mode)."""
    import torch

    c = max(map(len, comps))
    comp_ids = np.zeros((len(comps), c), np.int64)
    comp_mask = np.zeros_like(comp_ids)
    for i, x in enumerate(comps):
        comp_ids[i, :len(x)], comp_mask[i, :len(x)] = x, 1
    p = np.stack(prompts).astype(np.int64)
    t = lambda x, dt=torch.long: torch.tensor(np.asarray(x), dtype=dt)  # noqa: E731
    inputs = dict(prompt_ids=t(p), prompt_mask=t(np.ones_like(p)), completion_ids=t(comp_ids),
                  completion_mask=t(comp_mask), advantages=t(adv, torch.float32),
                  old_per_token_logps=t(old[:, :c], torch.float32), ref_per_token_logps=t(ref[:, :c], torch.float32),
                  num_items_in_batch=t(comp_mask.sum(), torch.float32))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for loss_type in grpo.LOSS_TYPES:
            trainer = _trl_trainer(model, d, loss_type=loss_type, batch=len(comps), group=group, new_tokens=c,
                                   temperature=temperature, epsilon_high=0.28)
            trainer.beta = beta  # (set after init: with beta > 0 TRL would load a reference model by name)
            trainer.model.eval()
            with torch.no_grad():
                out[loss_type] = float(trainer._compute_loss(trainer.model, inputs))
    return out


def parity():
    config = common.gemma_config(num_layers=2, embed_dim=128, hidden_dim=256, num_heads=4, num_kv_heads=2,
                                 head_dim=32, query_pre_attn_scalar=32, sliding_window=8, dtype="float32")
    policy = common.hf_model(config, seed=0).float()
    params = common.params_from_hf(config, policy)
    rng = np.random.default_rng(0)
    group, temperature, beta = 4, 0.7, 0.04
    prompts, comps, adv = fixed_rollouts(config.vocab_size, 8, group, 12, rng)
    t = len(prompts[0]) + max(map(len, comps))
    rows = {k: jnp.asarray(v) for k, v in grpo.host_rows(prompts, comps, t, pad_id=0).items()}
    logp = np.asarray(grpo.token_logps(params, rows, config=config, chunk=64, temperature=temperature))
    # Per-token old / reference log-probs near the policy's, as after a few updates.
    old_rows = logp + rng.normal(0, 0.15, logp.shape)
    ref_rows = logp + rng.normal(0, 0.3, logp.shape)
    # TRL's layout: completion token j of row i <- our row position len(prompt) - 1 + j.
    start = len(prompts[0]) - 1
    old = old_rows[:, start:].astype(np.float32)
    ref = ref_rows[:, start:].astype(np.float32)
    theirs = trl_losses(policy, prompts, comps, adv, old, ref, temperature=temperature, beta=beta, group=group)
    print(f"parity with TRL GRPOTrainer._compute_loss (float32, 8 completions, temperature {temperature}, clip 0.2/0.28, "
          f"beta {beta}):")
    for loss_type in grpo.LOSS_TYPES:
        obj = grpo.GRPO(max_new_tokens=max(map(len, comps)), temperature=temperature, beta=beta, epsilon=0.2,
                        epsilon_high=0.28, num_iterations=2, loss_type=loss_type)
        batch = dict(rows, **{grpo.ADVANTAGES: jnp.asarray(np.repeat(adv[:, None], t, 1), jnp.float32),
                              grpo.OLD_LOGPS: jnp.asarray(old_rows, jnp.float32),
                              grpo.REF_LOGPS: jnp.asarray(ref_rows, jnp.float32)})
        loss_t, _, _, _ = grpo.token_terms(jnp.asarray(logp), batch[grpo.OLD_LOGPS], batch[grpo.REF_LOGPS],
                                           batch[grpo.ADVANTAGES], obj)
        ours = float(grpo.reduce_loss(loss_t, rows["loss_mask"], obj))
        print(f"  {loss_type:8s} gemma_jax {ours:.6f}  trl {theirs[loss_type]:.6f}  |diff| {abs(ours - theirs[loss_type]):.2e}")


def our_step_time(config, args, d):
    """Fastest gemma_jax GRPO step (Rollouts.step: sampling, reward, update), full fine-tuning, 1 device."""
    batch = args.prompts * args.group
    prompts = os.path.join(d, "prompts.jsonl")
    with open(prompts, "w") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"prompt": " ".join(["word"] * (args.prompt_len - 12)) + f" {i}"}) + "\n")
    cfg = config_lib.base_config()
    cfg.train.objective, cfg.train.steps, cfg.train.batch_size = "grpo", 1000, batch
    cfg.data.train, cfg.data.tokenizer = prompts, TOKENIZER
    cfg.data.seq_len = args.prompt_len + args.new_tokens + 16  # (the turn markers around the prompt)
    cfg.opt.warmup_steps, cfg.mesh.fsdp = 0, 1
    cfg.grpo.rewards = f"{os.path.abspath(__file__)}:length_reward"
    cfg.grpo.group_size, cfg.grpo.max_new_tokens, cfg.grpo.log_rollouts_every = args.group, args.new_tokens, 0
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = train.Trainer.create(cfg, config, mesh)
    tok = Tokenizer(TOKENIZER)
    tok.eos_id = tok.end_of_turn_id = -1  # no stop token: every completion runs to new_tokens, as TRL's below
    ro = rollout.build(cfg, tok, trainer, d).train
    state = trainer.init_state()
    times = []
    for i in range(args.steps + 1):  # the first compiles
        t0 = time.perf_counter()
        state, m = ro.step(state)
        jax.block_until_ready(state["params"])
        if i:
            tokens = float(m["completions/mean_length"]) * batch
            times.append((time.perf_counter() - t0, tokens / float(m["sample_tokens_per_second"]),
                          tokens / float(m["train_tokens_per_second"])))
    return min(times), float(m["completions/mean_length"])


def trl_step_time(config, args, d):
    """Fastest TRL GRPO training step (GRPOTrainer.train: generate, reward, loss, backward, AdamW)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = common.hf_model(config, seed=0).float()
    marks = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **kw):
            marks.append(["begin", time.perf_counter()])

        def on_step_end(self, *a, **kw):
            marks.append(["end", time.perf_counter()])

    prompts = [" ".join(["word"] * (args.prompt_len - 12)) + f" {i}" for i in range(args.prompts)]
    trainer = _trl_trainer(model, d, batch=args.prompts * args.group, group=args.group, new_tokens=args.new_tokens,
                           steps=args.steps + 1, prompts=prompts, callbacks=[Timer()],
                           generation_kwargs={"min_new_tokens": args.new_tokens})  # the same work as ours
    trainer.train()
    steps = [e - b for (kb, b), (ke, e) in zip(marks[::2], marks[1::2]) if kb == "begin" and ke == "end"]
    return min(steps[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip_parity", action="store_true")
    ap.add_argument("--skip_trl_steps", action="store_true", help="time gemma_jax's step only")
    args = ap.parse_args()
    if not args.skip_parity:
        parity()
    config = common.gemma_config(dtype="float32")
    with tempfile.TemporaryDirectory() as d:
        (ours, sampling, update), length = our_step_time(config, args, d)
    print(f"GRPO step on {common.machine()}, {common.BENCH['num_layers']} layers width {common.BENCH['embed_dim']} "
          f"vocab {common.BENCH['vocab_size']}, {args.prompts} prompts x {args.group} completions of {args.new_tokens} "
          f"tokens after ~{args.prompt_len}-token prompts (float32, full fine-tuning):")
    print(f"  gemma_jax (KV-cache sampler + jitted update): {ours * 1e3:.0f} ms (sampling {sampling * 1e3:.0f} ms, "
          f"update {update * 1e3:.0f} ms; completions of {length:.0f} tokens)")
    if not args.skip_trl_steps:
        with tempfile.TemporaryDirectory() as d:
            theirs = trl_step_time(config, args, d)
        print(f"  TRL GRPOTrainer (transformers generate + torch update): {theirs * 1e3:.0f} ms"
              f"  -> gemma_jax is {theirs / ours:.2f}x faster")


if __name__ == "__main__":
    main()

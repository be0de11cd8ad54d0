"""Reinforcement learning from verifiable rewards (GRPO, train.objective=grpo): prompts, sampled answers, rewards.

  python -m gemma_jax.train --config=configs/rl.py:tiny_sft --workdir=/tmp/rl_sft     # warm start, CPU, 3-6 min
  python -m gemma_jax.train --config=configs/rl.py:tiny --workdir=/tmp/rl_tiny        # GRPO, CPU, ~3 min
  python -m gemma_jax.train --config=configs/rl.py:tiny --workdir=/tmp/rl_drgrpo --config.grpo.loss_type=dr_grpo
  python -m gemma_jax.train --config=configs/rl.py:gemma3_270m --workdir=/tmp/rl_270m
  python -m gemma_jax.train --config=configs/rl.py:2b_lora --workdir=gs://BUCKET/gsm8k_2b
  python -m gemma_jax.train --config=configs/rl.py:9b_lora --workdir=gs://BUCKET/gsm8k_9b
  python -m gemma_jax.train --config=configs/rl.py:gemma4_e2b_lora --workdir=gs://BUCKET/gsm8k_g4_e2b
  python -m gemma_jax.train --config=configs/rl.py:gemma4_26b_a4b_lora --workdir=gs://BUCKET/gsm8k_g4_26b

`tiny` is a task a tiny model can learn in minutes on a CPU: single-digit sums (data/rl/, written
by data/rl/make_rl.py). `tiny_sft` first teaches a 4-layer model the answer format from noisy
data (every sum answered right once and off by one once), so its sampled answers are right about
a third of the time (greedy: mostly the wrong answer); `tiny` then runs GRPO from that workdir on
the 100 sums, 16 per step with 8 sampled answers each, rewarded by the function in
data/rl/rewards.py (the exact answer, 1.0) plus the built-in `regex` format reward (a bare
number, 0.2), and every 20 steps scores the greedy answers to the same prompts (the answers
themselves never reach the model, only the rewards).

The larger variants train on GSM8K (Hugging Face `openai/gsm8k`, config main: 7,473 train and
1,319 test problems, records {"question", "answer"}; the answer ends with "#### N"), rewarded by
data/rl/rewards.py:gsm8k_answer (the last number of the completion against N). Export it once as
JSON lines (the readers read files, TFDS and hf: specs):

  python -c "import datasets as d; [d.load_dataset('openai/gsm8k', 'main', split=s)
             .to_json(f'data/gsm8k/{s}.jsonl') for s in ('train', 'test')]"

They start from instruction-tuned weights (weights/gemma-3-270m-it: Hugging Face
google/gemma-3-270m-it; weights/gemma2-SIZE-it as the other configs; weights/gemma-4-e2b-it and
weights/gemma-4-26b-a4b-it: google/gemma-4-E2B-it, google/gemma-4-26B-A4B-it), with TRL's GRPO
defaults (group of 8, temperature 1.0, clip 0.2, loss dapo, beta 0) and LoRA on the Gemma 2 and 4
sizes (Gemma 4: adapters on the K=V projections and the experts too; the KL reference, when
grpo.beta > 0, is then the base with adapters off).
"""

from gemma_jax.config import DEFAULT_LORA_TARGETS, GEMMA4_LORA_TARGETS, base_config, lock

REWARDS = "data/rl/rewards.py"
_LARGE = {
    # preset, weights, LoRA rank, lr, completions per step, grad accumulation, remat
    "gemma3_270m": ("gemma3_270m", "weights/gemma-3-270m-it", 0, 1e-6, 64, 1, "none"),
    "2b_lora": ("gemma2_2b", "weights/gemma2-2b-it", 16, 2e-5, 64, 2, "dots_no_batch"),
    "9b_lora": ("gemma2_9b", "weights/gemma2-9b-it", 16, 1e-5, 64, 4, "full"),
    "gemma4_e2b_lora": ("gemma4_e2b", "weights/gemma-4-e2b-it", 16, 2e-5, 64, 2, "full"),
    "gemma4_26b_a4b_lora": ("gemma4_26b_a4b", "weights/gemma-4-26b-a4b-it", 16, 1e-5, 64, 4, "full"),
}


def get_config(arg: str = "tiny"):
    c = base_config()
    c.eval.general = ""
    if arg in ("tiny", "tiny_sft"):
        c.model.preset, c.model.dtype = "gemma2_tiny", "float32"  # bf16 is slower than f32 on CPUs
        c.data.tokenizer = "data/tokenizer.model"
        c.train.export_format = ""
        c.checkpoint.every_steps = 50
        if arg == "tiny_sft":
            c.data.train, c.data.eval = "data/rl/warmup.jsonl", ""
            c.data.seq_len = 64  # about three examples per packed row
            c.train.steps, c.train.batch_size, c.train.log_every = 300, 32, 50
            c.opt.lr, c.opt.warmup_steps, c.opt.weight_decay = 3e-3, 20, 0.0
        else:
            c.model.init_checkpoint = "/tmp/rl_sft"
            c.data.tokenizer = ""  # the warm start's copy
            c.data.train, c.data.eval = "data/rl/train.jsonl", "data/rl/train.jsonl"
            c.data.seq_len = 64  # prompt (20 tokens here; room for a longer task's) + answer
            c.eval.max_examples = 0  # greedy answers to all 100 prompts
            c.train.objective = "grpo"
            c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 80, 128, 2, 20
            c.opt.lr, c.opt.warmup_steps, c.opt.weight_decay, c.opt.schedule = 4e-4, 5, 0.0, "constant"
            g = c.grpo
            g.rewards, g.reward_weights = f"{REWARDS}:correct_sum,regex", "1.0,0.2"
            g.format_regex = r"\d+"
            g.group_size, g.max_new_tokens = 8, 8  # short answers (here 1-2 digits and <end_of_turn>)
            g.log_rollouts_every = 10
    elif arg in _LARGE:
        preset, weights, rank, lr, batch, accum, remat = _LARGE[arg]
        c.model.preset, c.model.init_checkpoint, c.model.remat = preset, weights, remat
        c.data.tokenizer = ""
        c.data.train, c.data.eval = "data/gsm8k/train.jsonl", "data/gsm8k/test.jsonl"
        c.data.field_map = "prompt=question"
        c.data.seq_len = 1024
        c.train.objective = "grpo"
        c.train.steps, c.train.batch_size, c.train.grad_accum = 1000, batch, accum
        c.train.log_every, c.train.eval_every, c.eval.max_examples = 10, 200, 256
        c.opt.lr, c.opt.warmup_steps, c.opt.weight_decay, c.opt.schedule = lr, 20, 0.0, "constant"
        c.grpo.rewards = f"{REWARDS}:gsm8k_answer"
        c.grpo.group_size, c.grpo.max_new_tokens = 8, 512
        c.checkpoint.every_steps = 100
        if rank:
            targets = GEMMA4_LORA_TARGETS if preset.startswith("gemma4") else DEFAULT_LORA_TARGETS
            c.lora.rank, c.lora.alpha, c.lora.targets = rank, 2.0 * rank, targets
            c.train.loss_chunk = 256
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/rl.py; choose tiny_sft, tiny, {', '.join(_LARGE)}")
    return lock(c)

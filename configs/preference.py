"""Preference tuning (DPO by default; ORPO, SimPO by train.objective) that keeps the model it starts from.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal_tiny        # SFT first (Quickstart)
  python -m gemma_jax.train --config=configs/preference.py:tiny --workdir=/tmp/legal_dpo \
      --config.model.init_checkpoint=/tmp/legal_tiny                                        # CPU, minutes
  python -m gemma_jax.evaluate --checkpoint=/tmp/legal_dpo --baseline=/tmp/legal_tiny --output=/tmp/legal_dpo/eval
  python -m gemma_jax.evaluate --checkpoint=/tmp/legal_dpo --baseline=/tmp/legal_tiny \
      --config=configs/legal.py:tiny --output=/tmp/legal_dpo/eval_legal                    # the legal task kept?
  python -m gemma_jax.train --config=configs/preference.py:tiny --workdir=/tmp/legal_orpo \
      --config.model.init_checkpoint=/tmp/legal_tiny --config.train.objective=orpo
  python -m gemma_jax.train --config=configs/preference.py:2b_lora --workdir=gs://BUCKET/uf_2b_dpo
  python -m gemma_jax.train --config=configs/preference.py:27b_qlora --workdir=gs://BUCKET/uf_27b_dpo

`tiny` tunes the SFT model of the Quickstart, named by model.init_checkpoint (no default: the run
stops with an error until it is set), on data/preference/ (data/make_preference.py writes it): 300
pairs preferring a precise legal summary over a vague one (what the SFT model already does) and
300 preferring a date written "March 14, 2025." over "2025-03-14." (a format it has never
produced), 40 + 40 held out. DPO with beta 0.1 and an NLL term on the chosen responses
(dpo.sft_weight 1) at lr 2e-4 (1/15 of the SFT's) for 100 steps of 8 pairs: held-out reward
accuracy 1.0, greedy answers in the chosen date format 0.00 -> 0.82, ROUGE-L on the legal eval set
within 4% of the SFT start, every answer still ending with <end_of_turn>. With the old settings
(plain DPO at lr 5e-4 on the legal pairs) the legal task fell apart (ROUGE-L 76.9 -> 22.0, no
stop); the figures and the comparison with TRL: benchmarks/dpo_quality.py, docs/preference.md.

The full-size variants train on UltraFeedback binarized (Hugging Face
`HuggingFaceH4/ultrafeedback_binarized`, split train_prefs, 61,135 pairs; test_prefs 2,000): records
{"prompt": str, "chosen": [messages], "rejected": [messages]}, read as they are. Export it once as
JSON lines (the readers read files and TFDS, not the Hub):

  python -c "import datasets as d; [d.load_dataset('HuggingFaceH4/ultrafeedback_binarized', split=s)
             .to_json(f'data/ultrafeedback/{s}.jsonl') for s in ('train_prefs', 'test_prefs')]"

They start from the instruction-tuned weights in weights/gemma2-SIZE-it, one epoch, DPO beta 0.1,
lr 5e-6 (LoRA 5e-5), as TRL's DPO recipes do, with the same NLL term (dpo.sft_weight 1, as TRL's
loss_type ["sigmoid", "sft"] with loss_weights [1, 1]).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    c = experiment(
        arg, domain="preference", task="lm", metric="loss",
        tiny_train="data/preference/train.jsonl,data/preference/dates_train.jsonl",
        tiny_eval="data/preference/eval.jsonl,data/preference/dates_eval.jsonl",
        full=dict(train="data/ultrafeedback/train_prefs.jsonl", eval="data/ultrafeedback/test_prefs.jsonl",
                  seq_len=1024, epochs=1, examples=61135))
    c.train.objective = "dpo"
    c.eval.general = ""
    c.dpo.sft_weight = 1.0
    if arg == "tiny":
        c.model.init_checkpoint = ""  # required: the Quickstart's workdir (--config.model.init_checkpoint=...)
        c.data.tokenizer = ""  # the SFT workdir's copy
        # One pair per row: train.batch_size pairs per step (as TRL counts them); the longest pair
        # side is 165 tokens.
        c.data.packing, c.data.seq_len = False, 192
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 100, 8, 10, 50
        c.opt.lr, c.opt.warmup_steps = 2e-4, 5
        c.dpo.beta, c.dpo.sft_weight = 0.1, 1.0
        # `evaluate` on the workdir: greedy answers to the held-out prompts against the chosen
        # responses (ROUGE-L, chosen_rate) and the general-text loss beside the baseline's.
        c.eval.task, c.eval.metric, c.eval.general = "summarization", "rouge_l", "data/general/eval.txt"
        c.eval.max_new_tokens = 64
        c.train.export_format = ""
        c.checkpoint.every_steps = 50
    elif arg == "gemma3_270m":  # LoRA DPO on the real 270M GGUF, CPU: experiment()'s steps and warmup
        c.opt.lr = 1e-4
        c.train.export_format = ""
    else:
        c.opt.lr = 5e-5 if c.lora.rank else 5e-6
        c.opt.warmup_steps = 50
    return c

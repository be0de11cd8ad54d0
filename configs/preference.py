"""Preference tuning (DPO by default; ORPO, SimPO by train.objective): precise over vague legal summaries.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal_tiny        # SFT first
  python -m gemma_jax.train --config=configs/preference.py:tiny --workdir=/tmp/legal_dpo     # CPU, minutes
  python -m gemma_jax.train --config=configs/preference.py:tiny --workdir=/tmp/legal_orpo --config.train.objective=orpo
  python -m gemma_jax.train --config=configs/preference.py:2b_lora --workdir=gs://BUCKET/uf_2b_dpo
  python -m gemma_jax.train --config=configs/preference.py:27b_qlora --workdir=gs://BUCKET/uf_27b_dpo

`tiny` starts from the SFT Quickstart's workdir (model.init_checkpoint=/tmp/legal_tiny) and trains
on data/preference/ (300 pairs, 40 held out; data/make_preference.py writes them).

The full-size variants train on UltraFeedback binarized (Hugging Face
`HuggingFaceH4/ultrafeedback_binarized`, split train_prefs, 61,135 pairs; test_prefs 2,000): records
{"prompt": str, "chosen": [messages], "rejected": [messages]}, read as they are. Export it once as
JSON lines (the readers read files and TFDS, not the Hub):

  python -c "import datasets as d; [d.load_dataset('HuggingFaceH4/ultrafeedback_binarized', split=s)
             .to_json(f'data/ultrafeedback/{s}.jsonl') for s in ('train_prefs', 'test_prefs')]"

They start from the instruction-tuned weights in weights/gemma2-SIZE-it, one epoch, DPO beta 0.1,
lr 5e-6 (LoRA 5e-5), as TRL's DPO recipes do.
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    c = experiment(
        arg, domain="preference", task="lm", metric="loss",
        tiny_train="data/preference/train.jsonl", tiny_eval="data/preference/eval.jsonl",
        full=dict(train="data/ultrafeedback/train_prefs.jsonl", eval="data/ultrafeedback/test_prefs.jsonl",
                  seq_len=1024, epochs=1, examples=61135))
    c.train.objective = "dpo"
    c.eval.general = ""
    if arg == "tiny":
        c.model.init_checkpoint = "/tmp/legal_tiny"
        c.data.tokenizer = ""  # the SFT workdir's copy
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 60, 8, 10, 30
        c.opt.lr, c.opt.warmup_steps = 5e-4, 5
        c.train.export_format = ""
        c.checkpoint.every_steps = 30
    elif arg == "gemma3_270m":  # LoRA DPO on the real 270M GGUF, CPU: experiment()'s steps and warmup
        c.opt.lr = 1e-4
        c.train.export_format = ""
    else:
        c.opt.lr = 5e-5 if c.lora.rank else 5e-6
        c.opt.warmup_steps = 50
    return c

"""Creative writing: short stories and poems from a prompt.

  python -m gemma_jax.train --config=configs/creative.py:tiny --workdir=/tmp/creative_tiny
  python -m gemma_jax.train --config=configs/creative.py:gemma3_270m --workdir=/tmp/creative_270m  # real 270M, CPU
  python -m gemma_jax.train --config=configs/creative.py:2b --workdir=gs://BUCKET/creative_2b
  python -m gemma_jax.train --config=configs/creative.py:27b_qlora --workdir=gs://BUCKET/creative_27b_qlora

The full-size variants write Reddit TIFU stories from their titles (TFDS `reddit_tifu/long`,
42,139 posts; it has a single train split, so 5% is held out for evaluation).

LoRA variants (rank 16, adapters only; `:27b_qlora` freezes the base in int8) are sized for one
TPU v5e-8 host (8 chips x 16 GiB, batch 16 x 2048, splash attention). GiB per chip from
`python -m gemma_jax.memory --config=configs/creative.py:VARIANT --device=tpu-v5e --no_compile`:
2b_lora 8.1, 9b_lora 4.6, 27b_lora 10.3, 27b_qlora 7.2, gemma3_1b_lora 5.3, gemma3_4b_lora 3.4; full
fine-tuning `:2b` 11.5 fits, while `:9b` (26.2) and `:27b` (61.9) need a larger slice (tests/test_cli.py
checks these figures).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="creative", task="lm", metric="loss",
        tiny_train="data/creative/train.jsonl", tiny_eval="data/creative/eval.jsonl",
        full=dict(train="tfds:reddit_tifu/long:train", eval="", eval_fraction=0.05,
                  field_map="input=title,output=documents",
                  default_instruction="Write the story behind this title.", epochs=2, examples=42_139))

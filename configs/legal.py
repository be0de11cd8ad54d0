"""Legal: answer questions about and summarise contract and statute text.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal_tiny   # CPU, minutes
  python -m gemma_jax.train --config=configs/legal.py:gemma3_270m --workdir=/tmp/legal_270m  # real 270M, CPU
  python -m gemma_jax.train --config=configs/legal.py:2b --workdir=gs://BUCKET/legal_2b
  python -m gemma_jax.train --config=configs/legal.py:27b_qlora --workdir=gs://BUCKET/legal_27b_qlora

The full-size variants fine-tune on BillSum (US congressional bills -> summaries, TFDS
`billsum`, 18,949 training bills). Prepare it once with TFDS as array_record (see README,
"Bring your own data"); weights go in weights/gemma2-2b-it (or set model.init_checkpoint).

LoRA variants (rank 16, adapters only; `:27b_qlora` freezes the base in int8) are sized for one
TPU v5e-8 host (8 chips x 16 GiB, batch 16 x 2048, splash attention). GiB per chip from
`python -m gemma_jax.memory --config=configs/legal.py:VARIANT --device=tpu-v5e --no_compile`:
2b_lora 8.1, 9b_lora 4.6, 27b_lora 10.3, 27b_qlora 7.2, gemma3_1b_lora 5.3, gemma3_4b_lora 3.4; full
fine-tuning `:2b` 11.5 fits, while `:9b` (26.2) and `:27b` (61.9) need a larger slice (tests/test_cli.py
checks these figures).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="legal", task="summarization", metric="rouge_l",
        tiny_train="data/legal/train.jsonl", tiny_eval="data/legal/eval.jsonl",
        full=dict(train="tfds:billsum:train", eval="tfds:billsum:test", field_map="input=text,output=summary",
                  default_instruction="Summarise this bill in plain English.", epochs=2, examples=18949))

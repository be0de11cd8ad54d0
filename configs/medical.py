"""Medical notes: clinical note -> structured summary (chat format with a system message).

  python -m gemma_jax.train --config=configs/medical.py:tiny --workdir=/tmp/medical_tiny
  python -m gemma_jax.train --config=configs/medical.py:gemma3_270m --workdir=/tmp/medical_270m  # real 270M, CPU
  python -m gemma_jax.train --config=configs/medical.py:2b --workdir=gs://BUCKET/medical_2b
  python -m gemma_jax.train --config=configs/medical.py:27b_qlora --workdir=gs://BUCKET/medical_27b_qlora

The full-size variants summarise PubMed articles into their abstracts (TFDS
`scientific_papers/pubmed`, 119,924 articles).

LoRA variants (rank 16, adapters only; `:27b_qlora` freezes the base in int8) are sized for one
TPU v5e-8 host (8 chips x 16 GiB, batch 16 x 2048, splash attention). GiB per chip from
`python -m gemma_jax.memory --config=configs/medical.py:VARIANT --device=tpu-v5e --no_compile`:
2b_lora 8.1, 9b_lora 4.6, 27b_lora 10.3, 27b_qlora 7.2, gemma3_1b_lora 5.3, gemma3_4b_lora 3.4; full
fine-tuning `:2b` 11.5 fits, while `:9b` (26.2) and `:27b` (61.9) need a larger slice (tests/test_cli.py
checks these figures).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="medical", task="summarization", metric="rouge_l",
        tiny_train="data/medical/train.jsonl", tiny_eval="data/medical/eval.jsonl",
        full=dict(train="tfds:scientific_papers/pubmed:train", eval="tfds:scientific_papers/pubmed:validation",
                  field_map="input=article,output=abstract",
                  default_instruction="Write the abstract of this medical article.", epochs=1, examples=119_924))

"""Translation: English -> French.

  python -m gemma_jax.train --config=configs/translation.py:tiny --workdir=/tmp/translation_tiny
  python -m gemma_jax.train --config=configs/translation.py:gemma3_270m --workdir=/tmp/translation_270m  # real 270M, CPU
  python -m gemma_jax.train --config=configs/translation.py:9b --workdir=gs://BUCKET/translation_9b
  python -m gemma_jax.train --config=configs/translation.py:27b_qlora --workdir=gs://BUCKET/translation_27b_qlora

The full-size variants use WMT14 fr-en from TFDS (`wmt14_translate/fr-en`), capped by
train.steps: one pass over its 40M pairs is far more than a fine-tune needs.

LoRA variants (rank 16, adapters only; `:27b_qlora` freezes the base in int8) are sized for one
TPU v5e-8 host (8 chips x 16 GiB, batch 16 x 2048, splash attention). GiB per chip from
`python -m gemma_jax.memory --config=configs/translation.py:VARIANT --device=tpu-v5e --no_compile`:
2b_lora 8.1, 9b_lora 4.6, 27b_lora 10.3, 27b_qlora 7.2, gemma3_1b_lora 5.3, gemma3_4b_lora 3.4; full
fine-tuning `:2b` 11.5 fits, while `:9b` (26.2) and `:27b` (61.9) need a larger slice (tests/test_cli.py
checks these figures).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="translation", task="translation", metric="chrf",
        tiny_train="data/translation/train.csv", tiny_eval="data/translation/eval.csv",
        full=dict(train="tfds:wmt14_translate/fr-en:train", eval="tfds:wmt14_translate/fr-en:validation",
                  field_map="input=en,output=fr", default_instruction="Translate into French.",
                  epochs=1, examples=200_000))

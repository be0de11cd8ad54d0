"""Translation: English -> French.

  python -m gemma_jax.train --config=configs/translation.py:tiny --workdir=/tmp/translation_tiny
  python -m gemma_jax.train --config=configs/translation.py:9b --workdir=gs://BUCKET/translation_9b

The full-size variants use WMT14 fr-en from TFDS (`wmt14_translate/fr-en`), capped by
train.steps: one pass over its 40M pairs is far more than a fine-tune needs.
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="translation", task="translation", metric="chrf",
        tiny_train="data/translation/train.csv", tiny_eval="data/translation/eval.csv",
        full=dict(train="tfds:wmt14_translate/fr-en:train", eval="tfds:wmt14_translate/fr-en:validation",
                  field_map="input=en,output=fr", default_instruction="Translate into French.",
                  epochs=1, examples=200_000))

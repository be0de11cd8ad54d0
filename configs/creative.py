"""Creative writing: short stories and poems from a prompt.

  python -m gemma_jax.train --config=configs/creative.py:tiny --workdir=/tmp/creative_tiny
  python -m gemma_jax.train --config=configs/creative.py:2b --workdir=gs://BUCKET/creative_2b

The full-size variants write Reddit TIFU stories from their titles (TFDS `reddit_tifu/long`,
42,139 posts; it has a single train split, so 5% is held out for evaluation).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="creative", task="lm", metric="loss",
        tiny_train="data/creative/train.jsonl", tiny_eval="data/creative/eval.jsonl",
        full=dict(train="tfds:reddit_tifu/long:train", eval="", eval_fraction=0.05,
                  field_map="input=title,output=documents",
                  default_instruction="Write the story behind this title.", epochs=2, examples=42_139))

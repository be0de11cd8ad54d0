"""Legal: answer questions about and summarise contract and statute text.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal_tiny   # CPU, minutes
  python -m gemma_jax.train --config=configs/legal.py:2b --workdir=gs://BUCKET/legal_2b

The full-size variants fine-tune on BillSum (US congressional bills -> summaries, TFDS
`billsum`, 18,949 training bills). Prepare it once with TFDS as array_record (see README,
"Bring your own data"); weights go in weights/gemma2-2b-it (or set model.init_checkpoint).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="legal", task="summarization", metric="rouge_l",
        tiny_train="data/legal/train.jsonl", tiny_eval="data/legal/eval.jsonl",
        full=dict(train="tfds:billsum:train", eval="tfds:billsum:test", field_map="input=text,output=summary",
                  default_instruction="Summarise this bill in plain English.", epochs=2, examples=18949))

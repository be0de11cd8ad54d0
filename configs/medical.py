"""Medical notes: clinical note -> structured summary (chat format with a system message).

  python -m gemma_jax.train --config=configs/medical.py:tiny --workdir=/tmp/medical_tiny
  python -m gemma_jax.train --config=configs/medical.py:2b --workdir=gs://BUCKET/medical_2b

The full-size variants summarise PubMed articles into their abstracts (TFDS
`scientific_papers/pubmed`, 119,924 articles).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="medical", task="summarization", metric="rouge_l",
        tiny_train="data/medical/train.jsonl", tiny_eval="data/medical/eval.jsonl",
        full=dict(train="tfds:scientific_papers/pubmed:train", eval="tfds:scientific_papers/pubmed:validation",
                  field_map="input=article,output=abstract",
                  default_instruction="Write the abstract of this medical article.", epochs=1, examples=119_924))

"""Code: write small Python functions from a description.

  python -m gemma_jax.train --config=configs/code.py:tiny --workdir=/tmp/code_tiny
  python -m gemma_jax.train --config=configs/code.py:2b --workdir=gs://BUCKET/code_2b

The full-size variants use MBPP (974 crowd-sourced Python problems with tests): download
mbpp.jsonl from github.com/google-research/google-research/tree/master/mbpp into data/mbpp/.
Its columns are text (the task), code and test_list.
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="code", task="code", metric="pass_rate",
        tiny_train="data/code/train.json", tiny_eval="data/code/eval.json",
        full=dict(train="data/mbpp/mbpp.jsonl", eval="", eval_fraction=0.1,
                  field_map="instruction=text,output=code", epochs=5, examples=974))

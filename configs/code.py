"""Code: write small Python functions from a description.

  python -m gemma_jax.train --config=configs/code.py:tiny --workdir=/tmp/code_tiny
  python -m gemma_jax.train --config=configs/code.py:gemma3_270m --workdir=/tmp/code_270m  # real 270M, CPU
  python -m gemma_jax.train --config=configs/code.py:2b --workdir=gs://BUCKET/code_2b
  python -m gemma_jax.train --config=configs/code.py:27b_qlora --workdir=gs://BUCKET/code_27b_qlora

The full-size variants use MBPP (974 crowd-sourced Python problems with tests): download
mbpp.jsonl from github.com/google-research/google-research/tree/master/mbpp into data/mbpp/.
Its columns are text (the task), code and test_list.

LoRA variants (rank 16, adapters only; `:27b_qlora` freezes the base in int8) are sized for one
TPU v5e-8 host (8 chips x 16 GiB, batch 16 x 2048, splash attention). GiB per chip from
`python -m gemma_jax.memory --config=configs/code.py:VARIANT --device=tpu-v5e --no_compile`:
2b_lora 8.1, 9b_lora 4.6, 27b_lora 10.3, 27b_qlora 7.2, gemma3_1b_lora 5.3, gemma3_4b_lora 3.4; full
fine-tuning `:2b` 11.5 fits, while `:9b` (26.2) and `:27b` (61.9) need a larger slice (tests/test_cli.py
checks these figures).
"""

from gemma_jax.config import experiment


def get_config(arg: str = "tiny"):
    return experiment(
        arg, domain="code", task="code", metric="pass_rate",
        tiny_train="data/code/train.json", tiny_eval="data/code/eval.json",
        full=dict(train="data/mbpp/mbpp.jsonl", eval="", eval_fraction=0.1,
                  field_map="instruction=text,output=code", epochs=5, examples=974))

"""Writes data/rl/: a verifiable task for the GRPO Quickstart, single-digit sums.

    python data/rl/make_rl.py [--out=data/rl]

warmup.jsonl  SFT data for the warm start (configs/rl.py:tiny_sft): every sum "What is A + B?"
              three times, answered right (A+B) once and off by one (A+B+1) twice, so the model
              learns the answer format but is right less than half the time when it samples, and
              its greedy answers are mostly wrong.
train.jsonl   the 100 sums as RL prompts {"prompt", "answer"} (configs/rl.py:tiny); the answer is
              the column the reward functions compare with (the model never sees it). The run also
              evaluates greedy answers to these prompts: what RL from a verifiable reward improves.

Deterministic: the same seed writes byte-identical files.
"""

import argparse
import json
import os
import random

def prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sums = [(a, b) for a in range(10) for b in range(10)]
    warmup = [{"prompt": prompt(a, b), "completion": str(a + b + wrong)} for a, b in sums for wrong in (0, 1, 1)]
    rng.shuffle(warmup)
    rng.shuffle(sums)
    files = {"warmup.jsonl": warmup,
             "train.jsonl": [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in sums]}
    for name, records in files.items():
        with open(os.path.join(args.out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{name}: {len(records)} records")


if __name__ == "__main__":
    main()

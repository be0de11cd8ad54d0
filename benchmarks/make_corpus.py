"""Writes a synthetic instruction corpus for the data-pipeline benchmark (not committed data).

  python benchmarks/make_corpus.py --n 20000 --out /tmp/corpus_20k.jsonl
  python benchmarks/make_corpus.py --n 200000 --out /tmp/corpus_200k.jsonl

Each record is {"instruction", "input", "output"} of words drawn (seeded) from the shipped sample
data, sized so that the shipped tokenizer (data/tokenizer.model) gives about --tokens tokens per
example in the chat format (~2.9 KB of JSON per 1,000 tokens, as in the issue's measurements).
Deterministic: the same --n and --seed give the same file.
"""

import argparse
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS_PER_TOKEN = 0.267  # measured on these words with data/tokenizer.model (chat format)


def vocabulary():
    words = set()
    for name in ("legal/train.jsonl", "medical/train.jsonl", "creative/train.jsonl"):
        with open(os.path.join(REPO, "data", name), encoding="utf-8") as f:
            words.update(f.read().replace('"', " ").replace("\\n", " ").split())
    return sorted(w for w in words if w.isascii() and "\\" not in w)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="records")
    p.add_argument("--tokens", type=int, default=1000, help="about this many tokens per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    words = np.array(vocabulary())
    rng = np.random.default_rng(a.seed)
    n_words = int(a.tokens * WORDS_PER_TOKEN)
    with open(a.out, "w", encoding="utf-8") as f:
        for start in range(0, a.n, 1000):
            k = min(1000, a.n - start)
            sizes = rng.integers(int(0.8 * n_words), int(1.2 * n_words), k)
            drawn = words[rng.integers(0, len(words), int(sizes.sum()))]
            at = 0
            for s in sizes:
                w = drawn[at:at + s]
                at += s
                cut = int(0.8 * s)  # 80% prompt (instruction + input), 20% response
                f.write(json.dumps({"instruction": " ".join(w[:12]), "input": " ".join(w[12:cut]),
                                    "output": " ".join(w[cut:])}) + "\n")
    print(f"wrote {a.n} records to {a.out} ({os.path.getsize(a.out) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()

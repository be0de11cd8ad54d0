"""Writes data/preference/: legal preference pairs, a precise summary (chosen) over a vague one (rejected).

Written for this project, all fictional, deterministic (the same seed gives byte-identical files).
The clauses and their precise summaries come from make_samples.legal_clause; the rejected side is
a vague paraphrase that drops every figure. Run from the repository root:

    python data/make_preference.py [--out=data/preference] [--seed=0]
"""

import argparse
import json
import os
import random

from make_samples import SUMMARISE, legal_clause, unique

N_TRAIN, N_EVAL = 300, 40
VAGUE = ["This clause deals with some obligations between the parties.",
         "The parties agree on certain terms here.",
         "It sets out rules that the parties have to follow.",
         "This part of the agreement covers an important matter.",
         "Basically, one side has to do something under certain conditions.",
         "The clause is about the relationship between the parties."]


def pair(rng):
    text, summ, _ = legal_clause(rng)
    return {"prompt": f"{rng.choice(SUMMARISE)}\n\n{text}", "chosen": summ, "rejected": rng.choice(VAGUE)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/preference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    pairs = unique(pair, N_TRAIN + N_EVAL, rng, key=lambda r: r["prompt"])
    os.makedirs(args.out, exist_ok=True)
    for name, part in (("eval.jsonl", pairs[:N_EVAL]), ("train.jsonl", pairs[N_EVAL:])):
        with open(os.path.join(args.out, name), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)


if __name__ == "__main__":
    main()

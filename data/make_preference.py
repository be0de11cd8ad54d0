"""Writes data/preference/: two sets of legal preference pairs (written for this project, all fictional).

  train.jsonl, eval.jsonl              a precise summary (chosen) over a vague one (rejected). The
                                       clauses and their precise summaries come from
                                       make_samples.legal_clause; the rejected side is a vague
                                       paraphrase that drops every figure.
  dates_train.jsonl, dates_eval.jsonl  a date format: a question about a clause dated "14 March
                                       2025" answered "March 14, 2025." (chosen) over "2025-03-14."
                                       (rejected). The SFT Quickstart model has seen no dates, so
                                       this preference is new to it: what DPO has to teach, not
                                       what the model already does.

Deterministic (the same seed gives byte-identical files). Run from the repository root:

    python data/make_preference.py [--out=data/preference] [--seed=0]
"""

import argparse
import json
import os
import random

from make_samples import ANSWER, GOODS, SUMMARISE, company, legal_clause, unique

N_TRAIN, N_EVAL = 300, 40
VAGUE = ["This clause deals with some obligations between the parties.",
         "The parties agree on certain terms here.",
         "It sets out rules that the parties have to follow.",
         "This part of the agreement covers an important matter.",
         "Basically, one side has to do something under certain conditions.",
         "The clause is about the relationship between the parties."]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def pair(rng):
    text, summ, _ = legal_clause(rng)
    return {"prompt": f"{rng.choice(SUMMARISE)}\n\n{text}", "chosen": summ, "rejected": rng.choice(VAGUE)}


def date_pair(rng):
    """A dated clause and a question about its date: "March 14, 2025." chosen, "2025-03-14." rejected."""
    a, b = company(rng), company(rng)
    year, month, day = rng.randrange(2019, 2032), rng.randrange(1, 13), rng.randrange(1, 29)
    written = f"{day} {MONTHS[month - 1]} {year}"
    kind = rng.randrange(4)
    if kind == 0:
        text, q = (f"This Agreement between {a} and {b} takes effect on {written} and continues until "
                   "terminated by either party."), "When does the Agreement take effect?"
    elif kind == 1:
        goods = rng.choice(GOODS)
        text, q = (f"{a} shall deliver the {goods} to {b} no later than {written}. Late delivery entitles "
                   f"{b} to a discount of 5 percent."), f"By what date must {a} deliver the {goods}?"
    elif kind == 2:
        text, q = (f"The lease of the premises to {b} ends on {written} unless both parties agree in writing "
                   "to renew it."), "When does the lease end?"
    else:
        text, q = (f"{a} served a notice of termination on {b} on {written}. The Agreement ends 30 days "
                   "after the notice is served."), "On what date was the notice served?"
    return {"prompt": f"{rng.choice(ANSWER).format(q=q)}\n\n{text}", "chosen": f"{MONTHS[month - 1]} {day}, {year}.",
            "rejected": f"{year:04d}-{month:02d}-{day:02d}."}


def write(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/preference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for prefix, make, seed in (("", pair, args.seed), ("dates_", date_pair, args.seed + 1)):
        rng = random.Random(seed)
        pairs = unique(make, N_TRAIN + N_EVAL, rng, key=lambda r: r["prompt"])
        write(os.path.join(args.out, f"{prefix}eval.jsonl"), pairs[:N_EVAL])
        write(os.path.join(args.out, f"{prefix}train.jsonl"), pairs[N_EVAL:])


if __name__ == "__main__":
    main()

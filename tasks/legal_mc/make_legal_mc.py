"""Writes legal_mc.jsonl, the shipped lm-evaluation-harness task, from the held-out legal sample.

  python tasks/legal_mc/make_legal_mc.py

Each record of data/legal/eval.jsonl becomes one multiple-choice question: the record's own
instruction and clause, its reference answer and three answers of other records to other
questions (so each wrong choice is a fluent legal answer, just not to this question). The
choice order is shuffled with a fixed seed, so the file is the same on every run.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "data" / "legal" / "eval.jsonl"


def main() -> None:
    """Write legal_mc.jsonl beside this script."""
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    out = []
    for i, row in enumerate(rows):
        others = sorted({r["output"] for r in rows if r["output"] != row["output"]
                         and r["instruction"] != row["instruction"]})
        choices = [row["output"], *rng.sample(others, 3)]
        rng.shuffle(choices)
        out.append({"id": i + 1, "instruction": row["instruction"], "input": row["input"],
                    "choices": choices, "label": choices.index(row["output"])})
    (HERE / "legal_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {len(out)} questions to {HERE / 'legal_mc.jsonl'}")


if __name__ == "__main__":
    main()

"""Reward functions for configs/rl.py, written as a user would: TRL's GRPOTrainer signature.

    fn(prompts, completions, **columns) -> list[float | None]

`completions` are strings (or, for message-list prompts, [{"role": "assistant", "content": ...}]);
every other field of the prompt records (here `answer`) arrives by name, one value per completion.
"""

import re


def _text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct_sum(prompts, completions, answer, **kwargs):
    """1.0 when the completion is exactly the right number, else 0.0."""
    return [1.0 if _text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(prompts, completions, answer, **kwargs):
    """GSM8K: 1.0 when the last number of the completion equals the number after "####" in the
    reference solution, else 0.0; None for a record without one (not scored)."""
    out = []
    for c, a in zip(completions, answer):
        ref = str(a).split("####")[-1].strip().replace(",", "") if "####" in str(a) else None
        found = _NUMBER.findall(_text(c))
        out.append(None if ref is None else float(bool(found) and found[-1].replace(",", "").rstrip(".") == ref))
    return out

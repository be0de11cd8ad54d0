"""Text metrics: extremes, worked cases by hand and against the libraries, code run in a subprocess."""

from __future__ import annotations

import math
import time

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gemma_jax.eval import metrics

PRED = ["the cat sat on the mat", "the cat sat"]
REF = ["the cat is on the mat", "the cat sat on the mat"]


def test_identical_strings_score_100_and_disjoint_0():
    same = ["the lessee shall pay rent monthly", "le chien dort"]
    other = ["zzz qqq", "xx yy"]
    assert metrics.rouge(same, same) == pytest.approx({"rouge1": 100, "rouge2": 100, "rouge_l": 100})
    assert metrics.bleu(same, same) == pytest.approx(100)
    assert metrics.chrf(same, same) == pytest.approx(100)
    assert metrics.exact_match(same, same) == 100 and metrics.token_f1(same, same) == 100
    assert metrics.rouge(other, same) == {"rouge1": 0, "rouge2": 0, "rouge_l": 0}
    assert metrics.bleu(other, same) == 0 and metrics.chrf(other, same) == 0
    assert metrics.exact_match(other, same) == 0 and metrics.token_f1(other, same) == 0


def test_rouge_worked_case():
    """Example 1: 5 of 6 unigrams, 3 of 5 bigrams, LCS 5. Example 2: the prediction is a 3-token
    prefix of a 6-token reference, so P = 1, R = 1/2 (unigrams, LCS) and 2/5 (bigrams)."""
    f = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    by_hand = {"rouge1": (5 / 6 + f(1, 1 / 2)) / 2, "rouge2": (3 / 5 + f(1, 2 / 5)) / 2,
               "rouge_l": (5 / 6 + f(1, 1 / 2)) / 2}
    got = metrics.rouge(PRED, REF, use_stemmer=False)
    for key, value in by_hand.items():
        assert got[key] == pytest.approx(100 * value), key

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PRED, REF)]
    stemmed = metrics.rouge(PRED, REF)
    for lib_key, key in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rouge_l")):
        assert stemmed[key] == pytest.approx(100 * sum(d[lib_key].fmeasure for d in direct) / 2)
    # Swapping prediction and reference swaps P and R, which moves no F-measure here, so check the
    # stemmer instead: "pays" only matches "pay" when stemming.
    assert metrics.rouge(["tenant pays"], ["tenant pay"])["rouge1"] == pytest.approx(100)
    assert metrics.rouge(["tenant pays"], ["tenant pay"], use_stemmer=False)["rouge1"] == pytest.approx(50)


def test_bleu_worked_case():
    """One extra word: n-gram precisions 6/7, 5/6, 4/5, 3/4, so BLEU = (3/7)^(1/4), no brevity penalty.
    One word short: every precision is 1 and the brevity penalty is exp(1 - 6/5)."""
    assert metrics.bleu(["the cat sat on the mat today"], ["the cat sat on the mat"]) == pytest.approx(
        100 * (3 / 7) ** 0.25)
    assert metrics.bleu(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.2))
    # Corpus level: n-gram counts are pooled over sentences, not sentence scores averaged.
    corpus = metrics.bleu(PRED, REF)
    assert corpus == pytest.approx(sacrebleu.corpus_bleu(PRED, [REF]).score)
    mean_of_sentences = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PRED, REF)) / 2
    assert abs(corpus - mean_of_sentences) > 1
    assert metrics.chrf(PRED, REF) == pytest.approx(sacrebleu.corpus_chrf(PRED, [REF]).score)


def test_exact_match_and_token_f1_by_hand():
    assert metrics.normalize_answer("  The Lessee's  RENT, a month! ") == "lessees rent month"
    assert metrics.exact_match(["The Cat!", "a dog"], ["cat", "the cat"]) == 50
    # Any of several acceptable answers counts.
    assert metrics.exact_match(["30 days"], [["thirty days", "30 days."]]) == 100
    # [quick, brown, fox] vs [quick, fox, jumps]: 2 shared tokens, P = R = 2/3.
    assert metrics.token_f1(["the quick brown fox"], ["quick fox jumps"]) == pytest.approx(100 * 2 / 3)
    # Repeated tokens count once per occurrence: [rent, rent] vs [rent]: P = 1/2, R = 1.
    assert metrics.token_f1(["rent rent"], ["rent"]) == pytest.approx(100 * 2 / 3)
    assert metrics.token_f1(["x", "the quick brown fox"], ["y", "quick fox jumps"]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.exact_match(["a", "b"], ["a"])


def test_code_pass_rate_runs_programs_in_a_subprocess_with_a_time_limit():
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    programs = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # fenced, as chat models answer
        "def add(a, b):\n    return a - b",  # fails an assert
        "def add(a, b):\n    while True:\n        pass",  # never returns
        "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)",  # exits 0 before the asserts
        "def add(a, b) return a + b",  # syntax error
    ]
    start = time.perf_counter()
    out = metrics.code_pass_rate(programs, [tests] * len(programs), timeout=2.0)
    elapsed = time.perf_counter() - start
    assert out["results"] == ["passed", "failed", "timeout", "failed", "failed"]
    assert (out["passed"], out["failed"], out["timeout"]) == (1, 4, 1)
    assert out["pass_rate"] == pytest.approx(20)
    assert elapsed < 15, elapsed  # the loop was killed at its limit
    # The assert strings really run: the same correct program fails a wrong test.
    assert metrics.code_pass_rate([programs[0]], [["assert add(2, 2) == 5"]])["results"] == ["failed"]


def test_task_scores_dispatch():
    assert set(metrics.task_scores("summarization", PRED, REF)) == {"rouge1", "rouge2", "rouge_l"}
    assert set(metrics.task_scores("translation", PRED, REF)) == {"bleu", "chrf"}
    assert metrics.task_scores("lm", PRED, REF) == {}
    with pytest.raises(ValueError, match="unknown eval task 'poetry'"):
        metrics.task_scores("poetry", PRED, REF)

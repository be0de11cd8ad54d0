"""Text metrics for generated outputs: ROUGE, BLEU, chrF, exact match, token F1, code pass rate.

Host side only (no jax). Every score is a percentage in [0, 100], the scale sacrebleu reports,
so one table and one chart can hold them all. Predictions and references are parallel lists of
strings; scores are corpus level (BLEU, chrF) or the mean over examples (the rest).

The overlap metrics are the libraries' own implementations (`rouge-score`, `sacrebleu`), so the
numbers compare with published ones. Exact match and token F1 follow the SQuAD evaluation:
answers are normalised (lowercase, no punctuation, no articles a/an/the, single spaces) before
they are compared. Generated programs run in a separate Python process with a time limit,
never in this one (gemma_jax.eval.sandbox): a generated `while True` or `sys.exit()` cannot hang
or end the evaluation, read your environment or leave a process running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import string
from collections.abc import Sequence

from gemma_jax.eval import sandbox

ROUGE_KEYS = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def _check_parallel(predictions, references, what: str) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(f"{what}: predictions and references are lists of strings, not one string")
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"{what}: no predictions to score")


# ----------------------------------------------------------------------------- overlap metrics


def rouge(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (x100), as `rouge1`, `rouge2`, `rouge_l`.

    rouge-score's tokenizer keeps only ASCII letters and digits (lowercased), which suits English
    summaries; for other languages chrF is the better measure. The Porter stemmer (on by
    default, as in most summarisation papers) lets "pays" match "pay".
    """
    from rouge_score import rouge_scorer

    _check_parallel(predictions, references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)
    totals = collections.Counter()
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction): the order matters for P and R
        for key, name in ROUGE_KEYS.items():
            totals[name] += scores[key].fmeasure
    return {name: 100.0 * totals[name] / len(predictions) for name in ROUGE_KEYS.values()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, 4-grams, brevity penalty), 0..100."""
    import sacrebleu

    _check_parallel(predictions, references, "bleu")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2): robust to morphology and to short outputs, 0..100."""
    import sacrebleu

    _check_parallel(predictions, references, "chrf")
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


# ----------------------------------------------------------------------------- QA metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answers(ref) -> list[str]:
    """A reference is one answer or a list of acceptable answers."""
    answers = [ref] if isinstance(ref, str) else list(ref)
    if not answers:
        raise ValueError("a reference has no acceptable answers")
    return answers


def _f1(pred: str, ref: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)  # both empty counts as agreement
    common = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence) -> float:
    """Percentage of predictions equal to a reference answer after `normalize_answer`."""
    _check_parallel(predictions, references, "exact_match")
    hits = sum(max(normalize_answer(p) == normalize_answer(a) for a in _answers(r))
               for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def token_f1(predictions: Sequence[str], references: Sequence) -> float:
    """Mean bag-of-tokens F1 against the best-matching reference answer (x100), as in SQuAD."""
    _check_parallel(predictions, references, "token_f1")
    total = sum(max(_f1(p, a) for a in _answers(r)) for p, r in zip(predictions, references))
    return 100.0 * total / len(predictions)


# ----------------------------------------------------------------------------- code


def extract_code(text: str) -> str:
    """The program in a generation: the first fenced ```python block if there is one, else all of it.

    Instruction-tuned models wrap code in Markdown fences; the fence lines are not Python.
    """
    m = _FENCE.search(text)
    return m.group(1) if m else text


def code_pass_rate(programs: Sequence[str], tests: Sequence[Sequence[str]], *, timeout: float = 10.0,
                   workers: int | None = None) -> dict:
    """Runs each program, then its assert statements, in gemma_jax.eval.sandbox; counts the passes.

    Returns {"pass_rate" (x100), "passed", "failed", "timeout", "results": per program}. A
    program that errors, fails an assert, exits early or outlives `timeout` seconds counts as
    failed. Each runs in a clean environment and a private directory, under resource limits, and
    leaves no process behind; it is still not a sandbox (see sandbox.py): generated code runs with
    your user's permissions, so evaluate untrusted models in a container.
    """
    if len(programs) != len(tests):
        raise ValueError(f"code_pass_rate: {len(programs)} programs but {len(tests)} test lists")
    if not programs:
        raise ValueError("code_pass_rate: no programs to run")
    for i, t in enumerate(tests):
        if isinstance(t, str) or not t:
            raise ValueError(f"code_pass_rate: tests[{i}] must be a non-empty list of assert strings, got {t!r}")
    jobs = [(extract_code(p), list(t)) for p, t in zip(programs, tests)]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1, 8))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda job: sandbox.run_tests(*job, timeout=timeout), jobs))
    counts = collections.Counter(results)
    return {"pass_rate": 100.0 * counts["passed"] / len(results), "passed": counts["passed"],
            "failed": counts["failed"] + counts["timeout"], "timeout": counts["timeout"], "results": results}


# ----------------------------------------------------------------------------- by task

TASK_METRICS = {
    "summarization": ("rouge1", "rouge2", "rouge_l"),
    "translation": ("bleu", "chrf"),
    "qa": ("exact_match", "token_f1"),
    "code": ("pass_rate",),
    "lm": (),
}


def task_scores(task: str, predictions: Sequence[str], references: Sequence[str],
                tests: Sequence[Sequence[str]] | None = None, *, code_timeout: float = 10.0) -> dict[str, float]:
    """The generation metrics of `task` (see TASK_METRICS) for predictions against references."""
    if task not in TASK_METRICS:
        raise ValueError(f"unknown eval task {task!r}; choose one of {', '.join(TASK_METRICS)}")
    if task == "summarization":
        return rouge(predictions, references)
    if task == "translation":
        return {"bleu": bleu(predictions, references), "chrf": chrf(predictions, references)}
    if task == "qa":
        return {"exact_match": exact_match(predictions, references),
                "token_f1": token_f1(predictions, references)}
    if task == "code":
        if tests is None:
            raise ValueError("task 'code' needs the tests of every example")
        return {"pass_rate": code_pass_rate(predictions, tests, timeout=code_timeout)["pass_rate"]}
    return {}

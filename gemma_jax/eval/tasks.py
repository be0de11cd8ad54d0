"""Task evaluation of a fine-tuned model against its baseline: loss, task metrics, forgetting.

  python -m gemma_jax.evaluate --checkpoint=/tmp/legal_tiny --baseline=weights/gemma2-2b-it \\
      --config=configs/legal.py:tiny --output=/tmp/legal_tiny/eval

For each model (the tuned one, and the baseline if given):

  loss, perplexity, token_accuracy   on the model turns of the eval data, exactly as training
                                     scores them (same chat format, loss mask and chunked loss);
  task metrics                       from greedy (or sampled) generations of the first
                                     `max_examples` prompts, formatted with the chat template
                                     as training formats them: summarization rouge1/rouge2/rouge_l,
                                     translation bleu/chrf, qa exact_match/token_f1, code pass_rate
                                     (records carry `tests`); lm has none;
  general_loss, general_perplexity   on plain general text (one document per line), the
                                     catastrophic-forgetting check: its relative rise from the
                                     baseline is reported and logged as a warning past
                                     `forgetting_threshold`.

Preference pairs ({"prompt", "chosen", "rejected"} or any schema gemma_jax.data.preference reads)
are scored as their prompts with the chosen responses as the references; generations also give
chosen_rate: the share of answers closer to the chosen response than to the rejected one (by
ROUGE-L; a tie, such as an answer sharing no word with either, is not chosen).

`run_eval` returns the report dict ({"baseline", "tuned", "delta", "forgetting", "examples", ...});
report.py writes it out. The training loop calls the same function on params in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging

from gemma_jax import data as data_lib, loss, sample, sharding
from gemma_jax.data import preference
from gemma_jax.eval import metrics as metrics_lib
from gemma_jax.model.config import ModelConfig

LOSS_METRICS = ("loss", "perplexity", "token_accuracy")
GENERAL_METRICS = ("general_loss", "general_perplexity")
PREFERENCE_METRICS = ("chosen_rate",)  # generations on preference pairs
# Smaller is better for these; every other metric is a score where larger is better.
LOWER_IS_BETTER = {"loss", "perplexity", "general_loss", "general_perplexity"}
TESTS_FIELDS = ("tests", "test_list")  # test_list: MBPP's name for the same thing
LOSS_CHUNK = 1024  # tokens per logits chunk, as train.loss_chunk: bounds the [chunk, vocab] memory


@dataclasses.dataclass
class Item:
    """One generation case: the chat turns before the answer, the reference answer, code tests."""

    source: str
    prompt: list[dict]
    reference: str
    tests: list[str] | None = None
    rejected: str | None = None  # preference pairs: the reference is the chosen response


@dataclasses.dataclass
class ChosenExample(data_lib.Example):
    """A preference pair read as its prompt and chosen response (the rejected one kept aside)."""

    rejected: str = ""


# ----------------------------------------------------------------------------- data


def _data_option(data_cfg, key, default):
    if data_cfg is None:
        return default
    return data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)


def read_eval_data(spec: str, data_cfg=None, *, holdout_seed: int = 0) -> list[data_lib.Example]:
    """Examples of `spec`, read with the data options of `data_cfg` (a config's `data` section).

    An empty spec means the config's held-out split: data.eval, else the data.eval_fraction of
    data.train that training held out (the same examples when `holdout_seed` is train.seed).
    """
    read = functools.partial(
        data_lib.read_examples, field_map=_data_option(data_cfg, "field_map", ""),
        default_instruction=_data_option(data_cfg, "default_instruction", ""),
        text_split=_data_option(data_cfg, "text_split", "line"),
        skip_invalid=_data_option(data_cfg, "skip_invalid", False),
        tfds_data_dir=_data_option(data_cfg, "tfds_data_dir", ""))
    read_pairs = functools.partial(
        preference.read_pairs, field_map=_data_option(data_cfg, "field_map", ""),
        skip_invalid=_data_option(data_cfg, "skip_invalid", False),
        text_split=_data_option(data_cfg, "text_split", "line"),
        tfds_data_dir=_data_option(data_cfg, "tfds_data_dir", ""))

    def read_any(s):
        if not is_pair_data(s, data_cfg):
            return read(s)[0]
        return [ChosenExample(p.source, turns=p.prompt + [{"role": "model", "content": p.chosen}],
                              rejected=p.rejected) for p in read_pairs(s)[0]]

    spec = spec or _data_option(data_cfg, "eval", "")
    if spec:
        return read_any(spec)
    fraction, train_spec = _data_option(data_cfg, "eval_fraction", 0.0), _data_option(data_cfg, "train", "")
    if not (fraction and train_spec):
        raise data_lib.DataError("no eval data: give a data spec, or a config with data.eval or data.eval_fraction")
    # The same pairs preference.build holds out: the same list order, length and seed.
    return data_lib.holdout(read_any(train_spec), fraction, seed=holdout_seed)[1]


def is_pair_data(spec: str, data_cfg=None) -> bool:
    """Whether `spec` holds preference pairs: its first record has the chosen and rejected fields
    (the columns data.field_map names for them, when it is a pair field map)."""
    try:
        fmap = preference.parse_pair_field_map(_data_option(data_cfg, "field_map", ""))
    except data_lib.DataError:  # a field map of the SFT schemas
        return False
    names = (fmap.get("chosen", "chosen"), fmap.get("rejected", "rejected"))
    text_split, tfds_dir = _data_option(data_cfg, "text_split", "line"), _data_option(data_cfg, "tfds_data_dir", "")
    for source in data_lib.sources(spec):
        for _, rec in data_lib.records(source, text_split, tfds_dir):
            return isinstance(rec, Mapping) and all(n in rec for n in names)
    return False


def _tests_by_source(spec: str, data_cfg=None) -> dict[str, list[str]]:
    """The `tests` (or `test_list`) field of every raw record of spec, keyed like Example.source.

    data.Example keeps only the turns, so the tests are read from the same records again.
    """
    out = {}
    text_split = _data_option(data_cfg, "text_split", "line")
    tfds_dir = _data_option(data_cfg, "tfds_data_dir", "")
    for source in data_lib.sources(spec):
        for where, rec in data_lib.records(source, text_split, tfds_dir):
            if not isinstance(rec, dict):
                continue
            field = next((f for f in TESTS_FIELDS if f in rec), None)
            if field is None:
                continue
            tests = rec[field]
            if isinstance(tests, str):
                tests = [tests]
            if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
                raise data_lib.DataError(f"{where}: field {json.dumps(field)}: expected a non-empty list of "
                                         f"assert strings, got {str(tests)[:60]!r}", "wrong_type")
            out[where] = tests
    return out


def generation_items(examples, *, task: str, spec: str = "", data_cfg=None, limit: int = 0) -> list[Item]:
    """The first `limit` (0: all) chat examples as prompts (turns before the last model turn) and
    references (that turn). Raw-text examples have no answer to compare, so they are skipped.

    `spec` names the files the examples came from (read again for code tests).
    """
    chats = [ex for ex in examples if ex.turns is not None]
    if limit:
        chats = chats[:limit]
    tests = _tests_by_source(spec, data_cfg) if task == "code" else {}
    items = []
    for ex in chats:
        last = max(i for i, t in enumerate(ex.turns) if t["role"] == "model")
        item = Item(ex.source, ex.turns[:last], ex.turns[last]["content"], rejected=getattr(ex, "rejected", None))
        if task == "code":
            if ex.source not in tests:
                raise data_lib.DataError(f"{ex.source}: task 'code' needs a field \"tests\" (a list of "
                                         "assert statements) in every record", "missing_field")
            item.tests = tests[ex.source]
        items.append(item)
    return items


# ----------------------------------------------------------------------------- loss


@functools.lru_cache(maxsize=8)
def _eval_fn(config: ModelConfig, chunk: int):
    return jax.jit(functools.partial(loss.score_batch, config=config, chunk=chunk))


def _batch_shards(mesh, rules) -> int:
    if mesh is None:
        return 1
    axes = dict(rules).get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def token_loss(config: ModelConfig, params, rows, *, batch_size: int = 8, pad_id: int = 0, chunk: int = LOSS_CHUNK,
               mesh=None, rules=sharding.DEFAULT_RULES) -> dict[str, float]:
    """Loss, perplexity and token accuracy over packed rows (from data.pack), as training computes them."""
    fn = _eval_fn(config, int(chunk))
    if mesh is None:
        batches = data_lib.eval_batches(rows, global_batch_size=batch_size, pad_id=pad_id)

        def put(b):
            return b
    else:
        shards = _batch_shards(mesh, rules)
        batch_size = -(-batch_size // shards) * shards  # every batch shard gets whole rows
        # Each process holds its slice of every global batch, as in training.
        batches = data_lib.eval_batches(rows, global_batch_size=batch_size, pad_id=pad_id,
                                        process_index=jax.process_index(), process_count=jax.process_count())
        batch_sh = sharding.batch_sharding(mesh, rules)

        def put(b):
            return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in b.items()}
    totals = dict(loss_sum=0.0, tokens=0.0, correct=0.0)
    with sharding.mesh_context(mesh, rules):
        for b in batches:
            out = jax.device_get(fn(params, put(b)))
            for k in totals:
                totals[k] += float(out[k])
    loss_sum, tokens, correct = totals["loss_sum"], totals["tokens"], totals["correct"]
    if not tokens:
        raise ValueError("no target tokens to score (every example was cut off or is empty)")
    mean = loss_sum / tokens
    return dict(loss=mean, perplexity=math.exp(min(mean, 50.0)), token_accuracy=correct / tokens, tokens=tokens)


def pack_rows(examples, tokenizer, *, seq_len: int, train_on_prompt: bool = False):
    """Examples -> packed rows, tokenised and masked as training does; stats say what was cut."""
    rows, stats = data_lib.pack(data_lib.encode(examples, tokenizer, train_on_prompt=train_on_prompt), seq_len,
                                pad_id=tokenizer.pad_id, packing=True, seed=0)
    if stats["truncated"] or stats["dropped_no_target"]:
        logging.warning("eval: %d examples truncated to seq_len=%d, %d dropped with no target left",
                        stats["truncated"], seq_len, stats["dropped_no_target"])
    return rows


# ----------------------------------------------------------------------------- generation


def generate_answers(config: ModelConfig, params, tokenizer, items: Sequence[Item], *, max_new_tokens: int = 128,
                     temperature: float = 0.0, batch_size: int = 16, seed: int = 0, mesh=None,
                     rules=sharding.DEFAULT_RULES) -> list[str]:
    """The model's answer to each item's prompt, in batches through the KV-cache sampler."""
    config, params = sample.decoding_layout(config, params)  # once, not per batch
    out = []
    for i in range(0, len(items), batch_size):
        prompts = [it.prompt for it in items[i:i + batch_size]]
        out += sample.generate(config, params, tokenizer, prompts, chat=True, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed + i, mesh=mesh, rules=rules)
    return out


def score_answers(task: str, answers: Sequence[str], items: Sequence[Item], *,
                  code_timeout: float = 10.0) -> tuple[dict[str, float], list | None]:
    """(task metrics, per-example pass/fail for code else None); items of preference pairs add
    chosen_rate."""
    if task == "code":
        out = metrics_lib.code_pass_rate(answers, [it.tests for it in items], timeout=code_timeout)
        return {"pass_rate": out["pass_rate"]}, out["results"]
    scores = metrics_lib.task_scores(task, answers, [it.reference for it in items])
    if items and all(it.rejected is not None for it in items):
        scores["chosen_rate"] = chosen_rate(answers, [it.reference for it in items], [it.rejected for it in items])
    return scores, None


def chosen_rate(answers: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> float:
    """Share of answers closer (ROUGE-L) to their chosen response than to their rejected one; a tie
    (an answer sharing no word with either, say) is not chosen."""
    wins = [metrics_lib.rouge([a], [c])["rouge_l"] > metrics_lib.rouge([a], [r])["rouge_l"]
            for a, c, r in zip(answers, chosen, rejected, strict=True)]
    return float(np.mean(wins)) if wins else 0.0


# ----------------------------------------------------------------------------- one evaluation


def validate(eval_cfg) -> tuple[str, str]:
    """(task, metric) of config.eval, or a ValueError naming the key and the choices."""
    task, metric = eval_cfg.task, eval_cfg.metric
    if task not in metrics_lib.TASK_METRICS:
        raise ValueError(f"eval.task={task!r}; choose one of {', '.join(metrics_lib.TASK_METRICS)}")
    known = LOSS_METRICS + metrics_lib.TASK_METRICS[task]
    if metric not in known:
        raise ValueError(f"eval.metric={metric!r} is not reported for eval.task={task!r}; choose one of "
                         f"{', '.join(known)}")
    if not eval_cfg.forgetting_threshold >= 0:
        raise ValueError(f"eval.forgetting_threshold must be >= 0, got {eval_cfg.forgetting_threshold}")
    return task, metric


def _model_metrics(config, params, tokenizer, *, rows, general_rows, items, task, eval_cfg, batch_size, seed,
                   mesh, rules, code_timeout) -> tuple[dict, list[str], list | None]:
    out = token_loss(config, params, rows, batch_size=batch_size, pad_id=tokenizer.pad_id, mesh=mesh, rules=rules)
    tokens = out.pop("tokens")
    if general_rows is not None:
        general = token_loss(config, params, general_rows, batch_size=batch_size, pad_id=tokenizer.pad_id,
                             mesh=mesh, rules=rules)
        out.update(general_loss=general["loss"], general_perplexity=general["perplexity"])
    answers, passed = [], None
    if items:
        answers = generate_answers(config, params, tokenizer, items, max_new_tokens=int(eval_cfg.max_new_tokens),
                                   temperature=float(eval_cfg.temperature), batch_size=max(batch_size, 16),
                                   seed=seed, mesh=mesh, rules=rules)
        scores, passed = score_answers(task, answers, items, code_timeout=code_timeout)
        out.update(scores)
    # Headline first, then the other task scores, the loss and the general-text loss.
    order = [eval_cfg.metric, *metrics_lib.TASK_METRICS[task], *PREFERENCE_METRICS, *LOSS_METRICS, *GENERAL_METRICS]
    out = {k: out[k] for k in dict.fromkeys(order) if k in out}
    logging.info("eval over %d target tokens: %s", tokens, ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out, answers, passed


def forgetting_check(baseline: dict, tuned: dict, threshold: float, general: str) -> dict:
    """Relative rise of the general-text loss from baseline to tuned, flagged past `threshold`."""
    before, after = baseline["general_loss"], tuned["general_loss"]
    change = (after - before) / before if before else 0.0
    flagged = change > threshold
    if flagged:
        logging.warning("catastrophic forgetting: loss on general text %s rose %.1f%% (%.4f -> %.4f), past "
                        "eval.forgetting_threshold=%.0f%%", general, 100 * change, before, after, 100 * threshold)
    return dict(general=general, loss_baseline=before, loss_tuned=after, relative_change=change,
                threshold=float(threshold), exceeded=bool(flagged))


def run_eval(config: ModelConfig, params, tokenizer, eval_cfg, data_spec: str, *, baseline_params=None,
             baseline_config: ModelConfig | None = None, data_cfg=None, generate: bool = True,
             batch_size: int = 8, seed: int = 0, holdout_seed: int = 0, mesh=None, rules=sharding.DEFAULT_RULES,
             code_timeout: float = 10.0) -> dict:
    """Evaluates params (and baseline_params, same tokenizer) on data_spec; returns the report dict.

    `eval_cfg` is a config's `eval` section (task, metric, general, forgetting_threshold,
    max_examples, max_new_tokens, temperature); `data_cfg` its `data` section, for field_map,
    seq_len and the other reading options. An empty `data_spec` evaluates the config's held-out
    split (data.eval, or the data.eval_fraction of data.train split off with `holdout_seed`, as
    training does with train.seed). `generate=False` skips the generation metrics (loss and the
    forgetting check only), for frequent evaluations inside a training loop; the `in_training`
    key is the loop's to read. Params may be sharded on `mesh`, as the trainer holds them.
    """
    task, metric = validate(eval_cfg)
    seq_len = int(_data_option(data_cfg, "seq_len", 1024))
    train_on_prompt = bool(_data_option(data_cfg, "train_on_prompt", False))
    source = data_spec or _data_option(data_cfg, "eval", "")  # empty: a held-out part of data.train
    examples = read_eval_data(source, data_cfg, holdout_seed=holdout_seed)
    train_spec = _data_option(data_cfg, "train", "")
    data_spec = source or f"{train_spec} (held-out {_data_option(data_cfg, 'eval_fraction', 0.0)})"
    rows = pack_rows(examples, tokenizer, seq_len=seq_len, train_on_prompt=train_on_prompt)
    general_rows = None
    if eval_cfg.general:
        general_ex, _ = data_lib.read_examples(eval_cfg.general, text_split="line")
        general_rows = pack_rows(general_ex, tokenizer, seq_len=seq_len)
    items = []
    if generate and task != "lm":
        items = generation_items(examples, task=task, spec=source or train_spec, data_cfg=data_cfg,
                                 limit=int(eval_cfg.max_examples))
        if not items:
            raise ValueError(f"{data_spec}: no chat/instruction examples to generate from for task {task!r}")
    run = functools.partial(_model_metrics, tokenizer=tokenizer, rows=rows, general_rows=general_rows, items=items,
                            task=task, eval_cfg=eval_cfg, batch_size=batch_size, seed=seed, mesh=mesh, rules=rules,
                            code_timeout=code_timeout)
    report = dict(task=task, metric=metric, data=data_spec, generated=len(items),
                  settings=dict(max_new_tokens=int(eval_cfg.max_new_tokens), temperature=float(eval_cfg.temperature),
                                seq_len=seq_len, general=eval_cfg.general))
    tuned, tuned_answers, tuned_passed = run(config, params)
    base_answers, base_passed = None, None
    if baseline_params is not None:
        baseline, base_answers, base_passed = run(baseline_config or config, baseline_params)
        report["baseline"] = baseline
    report["tuned"] = tuned
    if baseline_params is not None:
        report["delta"] = {k: tuned[k] - report["baseline"][k] for k in tuned if k in report["baseline"]}
        if "general_loss" in tuned:
            report["forgetting"] = forgetting_check(report["baseline"], tuned, float(eval_cfg.forgetting_threshold),
                                                    eval_cfg.general)
    report["examples"] = []
    for i, it in enumerate(items):
        ex = dict(source=it.source, prompt=it.prompt[-1]["content"], reference=it.reference, tuned=tuned_answers[i])
        if it.rejected is not None:
            ex["rejected"] = it.rejected
        if tuned_passed is not None:
            ex["tuned_passed"] = tuned_passed[i] == "passed"
        if base_answers is not None:
            ex["baseline"] = base_answers[i]
            if base_passed is not None:
                ex["baseline_passed"] = base_passed[i] == "passed"
        report["examples"].append(ex)
    return report

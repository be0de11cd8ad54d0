"""Evaluation of a fine-tuned model against its baseline: loss, task metrics, forgetting.

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

Writes report.json ({"baseline", "tuned", "delta", "forgetting", "examples", ...}), report.md
(baseline vs tuned with deltas, example generations beside their references) and metrics.png.
The task, headline metric and the rest default from the `eval` section of `--config`;
`run_eval` is the same evaluation for a training loop, on params already in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from gemma_jax import data as data_lib, metrics as metrics_lib, sharding
from gemma_jax.model import ModelConfig

LOSS_METRICS = ("loss", "perplexity", "token_accuracy")
GENERAL_METRICS = ("general_loss", "general_perplexity")
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
    spec = spec or _data_option(data_cfg, "eval", "")
    if spec:
        return read(spec)[0]
    fraction, train_spec = _data_option(data_cfg, "eval_fraction", 0.0), _data_option(data_cfg, "train", "")
    if not (fraction and train_spec):
        raise data_lib.DataError("no eval data: give a data spec, or a config with data.eval or data.eval_fraction")
    return data_lib.holdout(read(train_spec)[0], fraction, seed=holdout_seed)[1]


def _tests_by_source(spec: str, data_cfg=None) -> dict[str, list[str]]:
    """The `tests` (or `test_list`) field of every raw record of spec, keyed like Example.source.

    data.Example keeps only the turns, so the tests are read from the same records again.
    """
    out = {}
    text_split = _data_option(data_cfg, "text_split", "line")
    tfds_dir = _data_option(data_cfg, "tfds_data_dir", "")
    for source in data_lib._sources(spec):
        for where, rec in data_lib._records(source, text_split, tfds_dir):
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
        item = Item(ex.source, ex.turns[:last], ex.turns[last]["content"])
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
    from gemma_jax import train

    return jax.jit(functools.partial(train.eval_step, config=config, chunk=chunk))


def _mesh_context(mesh, rules):
    from gemma_jax import sample

    return sample._mesh_context(mesh, rules)


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
    with _mesh_context(mesh, rules):
        for b in batches:
            out = jax.device_get(fn(params, put(b)))
            for k in totals:
                totals[k] += float(out[k])
    loss_sum, tokens, correct = totals["loss_sum"], totals["tokens"], totals["correct"]
    if not tokens:
        raise ValueError("no target tokens to score (every example was cut off or is empty)")
    loss = loss_sum / tokens
    return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)), token_accuracy=correct / tokens, tokens=tokens)


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
    from gemma_jax import sample

    config, params = sample.decoding_layout(config, params)  # once, not per batch
    out = []
    for i in range(0, len(items), batch_size):
        prompts = [it.prompt for it in items[i:i + batch_size]]
        out += sample.generate(config, params, tokenizer, prompts, chat=True, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed + i, mesh=mesh, rules=rules)
    return out


def score_answers(task: str, answers: Sequence[str], items: Sequence[Item], *,
                  code_timeout: float = 10.0) -> tuple[dict[str, float], list | None]:
    """(task metrics, per-example pass/fail for code else None)."""
    if task == "code":
        out = metrics_lib.code_pass_rate(answers, [it.tests for it in items], timeout=code_timeout)
        return {"pass_rate": out["pass_rate"]}, out["results"]
    return metrics_lib.task_scores(task, answers, [it.reference for it in items]), None


# ----------------------------------------------------------------------------- one evaluation


def _validate(eval_cfg) -> tuple[str, str]:
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
    order = [eval_cfg.metric, *metrics_lib.TASK_METRICS[task], *LOSS_METRICS, *GENERAL_METRICS]
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
    task, metric = _validate(eval_cfg)
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
        if tuned_passed is not None:
            ex["tuned_passed"] = tuned_passed[i] == "passed"
        if base_answers is not None:
            ex["baseline"] = base_answers[i]
            if base_passed is not None:
                ex["baseline_passed"] = base_passed[i] == "passed"
        report["examples"].append(ex)
    return report


# ----------------------------------------------------------------------------- outputs


def code_fence(text: str) -> str:
    """A code fence longer than any backtick run inside the text, so generated Markdown stays inside."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _verdict(name: str, delta: float) -> str:
    if abs(delta) < 1e-12:
        return "same"
    better = delta < 0 if name in LOWER_IS_BETTER else delta > 0
    return "better" if better else "worse"


def markdown(report: dict, *, show: int = 3, chart: str = "metrics.png", names: tuple[str, str] = ("", "")) -> str:
    """report.md text: metrics table (baseline, tuned, delta), forgetting, example generations."""
    tuned, base = report["tuned"], report.get("baseline")
    tuned_name, base_name = names
    lines = [f"# Evaluation: {report['task']} on `{report['data']}`", ""]
    if tuned_name:
        lines += [f"Tuned `{tuned_name}`" + (f", baseline `{base_name}`" if base is not None else "") + ".", ""]
    s = report["settings"]
    lines += [f"{report['generated']} examples generated (max_new_tokens={s['max_new_tokens']}, "
              f"temperature={s['temperature']}); loss over every example, rows of {s['seq_len']} tokens. "
              "Scores are 0-100; token_accuracy is a fraction.", ""]
    if base is not None:
        lines += ["| metric | baseline | tuned | delta | |", "|---|---:|---:|---:|---|"]
    else:
        lines += ["| metric | tuned |", "|---|---:|"]
    for name, value in tuned.items():
        label = f"**{name}**" if name == report["metric"] else name
        if base is not None and name in base:
            d = value - base[name]
            delta = f"{d:+.4f}" if abs(d) < 10 else f"{d:+.2f}"
            lines.append(f"| {label} | {_fmt(base[name])} | {_fmt(value)} | {delta} | {_verdict(name, d)} |")
        else:
            lines.append(f"| {label} | {_fmt(value)} |")
    f = report.get("forgetting")
    if f:
        state = "**WARNING: past the threshold**" if f["exceeded"] else "within the threshold"
        lines += ["", f"Forgetting check on `{f['general']}`: general-text loss {f['loss_baseline']:.4f} -> "
                      f"{f['loss_tuned']:.4f} ({100 * f['relative_change']:+.1f}%, threshold "
                      f"{100 * f['threshold']:.0f}%): {state}."]
    if chart:
        lines += ["", f"![metrics]({chart})"]
    examples = report.get("examples", [])[:show]
    if examples:
        lines += ["", "## Example generations"]
    for i, ex in enumerate(examples, 1):
        lines += ["", f"### {i}. `{ex['source']}`"]
        parts = [("Prompt", ex["prompt"]), ("Reference", ex["reference"])]
        if "baseline" in ex:
            parts.append(("Baseline" + _pass_note(ex.get("baseline_passed")), ex["baseline"]))
        parts.append(("Tuned" + _pass_note(ex.get("tuned_passed")), ex["tuned"]))
        for title, text in parts:
            if not text.strip():
                lines += ["", f"**{title}**: *(empty or only whitespace)*"]
                continue
            fence = code_fence(text)
            lines += ["", f"**{title}**", "", f"{fence}text", text.strip("\n"), fence]
    return "\n".join(lines).rstrip() + "\n"


def _pass_note(passed) -> str:
    return "" if passed is None else " (tests pass)" if passed else " (tests fail)"


def bar_chart(report: dict, path: str) -> str:
    """metrics.png: one small panel per metric, baseline and tuned bars side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned, base = report["tuned"], report.get("baseline")
    names = list(tuned)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.2 * rows), dpi=80, squeeze=False)
    for ax, name in zip(axes.flat, names):
        labels, values, colors = ["tuned"], [tuned[name]], ["tab:blue"]
        if base is not None and name in base:
            labels, values, colors = ["baseline", "tuned"], [base[name], tuned[name]], ["tab:gray", "tab:blue"]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
        ax.set_title(name + (" *" if name == report["metric"] else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{report['task']}: baseline vs tuned (* headline metric)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict, output: str, *, show: int = 3, names: tuple[str, str] = ("", "")) -> list[str]:
    """Writes report.json, report.md and metrics.png into `output`; returns their paths."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, n) for n in ("report.json", "report.md", "metrics.png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    bar_chart(report, paths[2])
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(report, show=show, names=names))
    return paths


# ----------------------------------------------------------------------------- command line


def load_config(spec: str):
    """configs/NAME.py[:ARG] -> get_config(ARG), the same files the trainer takes."""
    path, arg = (spec.rsplit(":", 1) if ".py:" in spec else (spec, None))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_gemma_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config={spec}: {path} defines no get_config()")
    return module.get_config() if arg is None else module.get_config(arg)


def _eval_settings(args):
    """(eval section, data section) of the config, with the command-line flags laid over them."""
    from gemma_jax import config as config_lib

    cfg = load_config(args.config) if args.config else config_lib.base_config()
    eval_cfg, data_cfg = cfg.eval, cfg.data  # locked against new keys, not new values
    for key in ("task", "metric", "general", "forgetting_threshold", "max_examples", "max_new_tokens", "temperature"):
        if getattr(args, key) is not None:
            eval_cfg[key] = getattr(args, key)
    if args.task is not None and args.metric is None and eval_cfg.metric not in (
            LOSS_METRICS + metrics_lib.TASK_METRICS.get(args.task, ())):
        eval_cfg.metric = (metrics_lib.TASK_METRICS.get(args.task) or ("loss",))[-1]  # rouge_l, chrf, ...
    if args.seq_len is not None:
        data_cfg.seq_len = args.seq_len
    return cfg, eval_cfg, data_cfg


def main(argv=None) -> int:
    """CLI: evaluate a checkpoint (and a baseline) and write report.json, report.md, metrics.png."""
    ap = argparse.ArgumentParser(prog="python -m gemma_jax.evaluate",
                                 description="Evaluate a fine-tuned Gemma 2 against its baseline: held-out "
                                             "loss, task metrics from generations, forgetting on general text.")
    ap.add_argument("--checkpoint", required=True,
                    help="the tuned model (any format gemma_jax.load reads, a workdir too)")
    ap.add_argument("--baseline", default="", help="the model before fine-tuning, for deltas and the forgetting check")
    ap.add_argument("--output", required=True, help="directory for report.json, report.md, metrics.png")
    ap.add_argument("--config", default="",
                    help="experiment config (configs/legal.py:tiny): eval.* and data.* defaults")
    ap.add_argument("--data", default="", help="eval data (files, globs, tfds:name:split); default: the "
                    "config's data.eval, or the data.eval_fraction of data.train that training held out")
    ap.add_argument("--task", default=None, choices=list(metrics_lib.TASK_METRICS))
    ap.add_argument("--metric", default=None, help="headline metric (default: the config's eval.metric)")
    ap.add_argument("--general", default=None, help="general text for the forgetting check; '' skips it")
    ap.add_argument("--forgetting_threshold", type=float, default=None)
    ap.add_argument("--max_examples", type=int, default=None, help="examples to generate from (0: all)")
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=8, help="rows per loss batch; generation uses at least 16")
    ap.add_argument("--seq_len", type=int, default=None, help="loss row length (default: the config's data.seq_len)")
    ap.add_argument("--code_timeout", type=float, default=10.0, help="seconds per generated program (task code)")
    ap.add_argument("--show", type=int, default=3, help="example generations in report.md")
    ap.add_argument("--tokenizer", default="", help="default: beside --checkpoint, else the config's data.tokenizer")
    ap.add_argument("--dtype", default=None, help="parameter dtype to load as (float32, bfloat16)")
    ap.add_argument("--mesh", default="auto", help="auto, none, or DATA,FSDP,TENSOR axis sizes")
    args = ap.parse_args(argv)

    from gemma_jax import checkpoint, sample
    from gemma_jax.tokenizer import Tokenizer

    cfg, eval_cfg, data_cfg = _eval_settings(args)
    tok_path = args.tokenizer or checkpoint.find_tokenizer(args.checkpoint) or data_cfg.tokenizer
    if not tok_path:
        ap.error(f"no tokenizer.model beside {args.checkpoint}; pass --tokenizer=PATH")
    tokenizer = Tokenizer(tok_path)
    if args.baseline:
        _check_same_tokenizer(tokenizer, checkpoint.find_tokenizer(args.baseline), args.baseline)
    mesh = sample._parse_mesh(args.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    config, params = checkpoint.load(args.checkpoint, dtype=args.dtype, mesh=mesh, rules=rules)
    base_config = base_params = None
    if args.baseline:
        base_config, base_params = checkpoint.load(args.baseline, dtype=args.dtype, mesh=mesh, rules=rules)
    # No --data: the config's data.eval, or the part of data.train that training held out.
    report = run_eval(config, params, tokenizer, eval_cfg, args.data, baseline_params=base_params,
                      baseline_config=base_config, data_cfg=data_cfg, batch_size=args.batch_size, seed=args.seed,
                      holdout_seed=int(cfg.train.seed), mesh=mesh, rules=rules, code_timeout=args.code_timeout)
    paths = write_report(report, args.output, show=args.show, names=(args.checkpoint, args.baseline))
    for name, value in report["tuned"].items():
        before = report.get("baseline", {}).get(name)
        print(f"{name:>20}: " + (f"{before:10.4f} -> " if before is not None else "") + f"{value:10.4f}")
    print("wrote " + ", ".join(paths))
    return 0


def _check_same_tokenizer(tokenizer, other_path, where: str) -> None:
    """Raises when the baseline ships a different tokenizer: the same ids would mean other text."""
    if not other_path:
        return
    with open(tokenizer.path, "rb") as a, open(other_path, "rb") as b:
        if a.read() != b.read():
            raise ValueError(f"the baseline {where} has its own tokenizer {other_path}, different from "
                             f"{tokenizer.path}; both models must share one tokenizer to be compared")


if __name__ == "__main__":
    sys.exit(main())

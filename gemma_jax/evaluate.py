"""`python -m gemma_jax.evaluate`: a fine-tuned model against its baseline, written as a report.

  python -m gemma_jax.evaluate --checkpoint=/tmp/legal_tiny --baseline=weights/gemma2-2b-it \\
      --config=configs/legal.py:tiny --output=/tmp/legal_tiny/eval

Writes report.json, report.md (baseline vs tuned with deltas, example generations beside their
references) and metrics.png. The task, headline metric and the rest default from the `eval`
section of `--config`: an experiment file or a training workdir (`--config=WORKDIR` reads its
config.json; a workdir given as --checkpoint is read by default), with --config.KEY=VALUE
overrides. Without --data the run's own eval split is scored: data.eval, or the
data.eval_fraction of data.train that training held out with its train.seed. --harness_tasks
adds lm-evaluation-harness scores for both models. What is measured is described in
`gemma_jax.eval.tasks`.
"""

from __future__ import annotations

import sys

from absl import flags, logging

from gemma_jax import cli, config as config_lib, paths, sharding, weights
from gemma_jax.errors import UserError
from gemma_jax.eval import metrics as metrics_lib, report as report_lib, tasks
from gemma_jax.tokenizer import Tokenizer

# eval.* keys that a flag of the same name overrides when given.
_EVAL_FLAGS = ("task", "metric", "general", "forgetting_threshold", "max_examples", "max_new_tokens", "temperature")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.evaluate`."""
    d = lambda *a, **k: a[0](*a[1:], flag_values=fv, **k)  # noqa: E731
    d(flags.DEFINE_string, "checkpoint", None, "the tuned model (any format gemma_jax.load reads, a workdir too)")
    d(flags.DEFINE_string, "baseline", "", "the model before fine-tuning, for deltas and the forgetting check")
    d(flags.DEFINE_string, "output", None, "directory for report.json, report.md, metrics.png")
    config_lib.define_config_flag("config", None, "experiment config (configs/legal.py:tiny) or a training workdir (its "
                      "config.json): eval.* and data.* defaults, --config.KEY=VALUE overrides; default: the "
                      "--checkpoint workdir's own config.json when it has one", flag_values=fv)
    d(flags.DEFINE_string, "data", "", "eval data (files, globs, tfds:name:split); default: the config's data.eval, "
      "or the data.eval_fraction of data.train that training held out (with the run's train.seed)")
    d(flags.DEFINE_enum, "task", None, list(metrics_lib.TASK_METRICS), "default: the config's eval.task")
    d(flags.DEFINE_string, "metric", None, "headline metric (default: the config's eval.metric)")
    d(flags.DEFINE_string, "general", None, "general text for the forgetting check; '' skips it "
      "(default: the config's eval.general)")
    d(flags.DEFINE_float, "forgetting_threshold", None, "default: the config's eval.forgetting_threshold")
    d(flags.DEFINE_integer, "max_examples", None, "examples to generate from (0: all; default: eval.max_examples)")
    d(flags.DEFINE_integer, "max_new_tokens", None, "default: the config's eval.max_new_tokens")
    d(flags.DEFINE_float, "temperature", None, "0 is greedy (default: the config's eval.temperature)")
    d(flags.DEFINE_integer, "seed", 0, "sampling seed")
    d(flags.DEFINE_integer, "batch_size", 8, "rows per loss batch; generation uses at least 16")
    d(flags.DEFINE_integer, "seq_len", None, "loss row length (default: the config's data.seq_len)")
    d(flags.DEFINE_float, "code_timeout", 10.0, "seconds per generated program (task code)")
    d(flags.DEFINE_integer, "show", 3, "example generations in report.md")
    d(flags.DEFINE_string, "tokenizer", "", "default: beside --checkpoint, else the config's data.tokenizer")
    d(flags.DEFINE_string, "dtype", None, "parameter dtype to load as (float32, bfloat16)")
    d(flags.DEFINE_string, "mesh", "auto", "auto, none, or DATA,FSDP,TENSOR axis sizes")
    d(flags.DEFINE_list, "harness_tasks", [], "also score these lm-evaluation-harness tasks (comma separated, "
      "built-in or from --harness_include_path) for baseline and tuned; needs the harness extra")
    d(flags.DEFINE_string, "harness_include_path", None, "directory of local lm_eval task YAML files")
    d(flags.DEFINE_integer, "harness_num_fewshot", None, "few-shot examples per harness request (default: the task's)")
    d(flags.DEFINE_float, "harness_limit", None, "harness examples per task (a fraction if below 1)")
    d(flags.DEFINE_bool, "harness_apply_chat_template", False, "harness requests in the Gemma turn format")
    cli.require(fv, "checkpoint", "output")


def run_config(fv):
    """The config the evaluation reads its defaults from: --config (with overrides), else the
    checkpoint's own workdir config, else base_config(); data.train overridden without data.eval
    switches to a hold-out (config.adjust_eval_for_train_override), as in training."""
    if fv.config is not None:
        cfg = fv.config
        note = config_lib.adjust_eval_for_train_override(cfg, config_lib.overridden_keys(fv))
        if note:
            logging.warning(note)
        return cfg
    if paths.exists(paths.join(fv.checkpoint, config_lib.CONFIG_JSON)):
        logging.info("config: %s", paths.join(fv.checkpoint, config_lib.CONFIG_JSON))
        return config_lib.load_recorded(fv.checkpoint)
    return config_lib.base_config()


def _eval_settings(fv):
    """(config, eval section, data section), with the command-line flags laid over them."""
    cfg = run_config(fv)
    eval_cfg, data_cfg = cfg.eval, cfg.data  # locked against new keys, not new values
    for key in _EVAL_FLAGS:
        if getattr(fv, key) is not None:
            eval_cfg[key] = getattr(fv, key)
    if fv.task is not None and fv.metric is None and eval_cfg.metric not in (
            tasks.LOSS_METRICS + metrics_lib.TASK_METRICS.get(fv.task, ())):
        eval_cfg.metric = (metrics_lib.TASK_METRICS.get(fv.task) or ("loss",))[-1]  # rouge_l, chrf, ...
    if fv.seq_len is not None:
        data_cfg.seq_len = fv.seq_len
    config_lib.validate(cfg, argv=sys.argv)  # a recorded config and the flags laid over it, too
    return cfg, eval_cfg, data_cfg


def _main(fv, args) -> int:
    """Evaluate a checkpoint (and a baseline) and write report.json, report.md, metrics.png."""
    cli.no_positional(args)
    if not paths.exists(fv.checkpoint):
        raise FileNotFoundError(f"--checkpoint={fv.checkpoint}: no such checkpoint")
    if fv.baseline and not paths.exists(fv.baseline):
        raise FileNotFoundError(f"--baseline={fv.baseline}: no such checkpoint")
    cfg, eval_cfg, data_cfg = _eval_settings(fv)
    if fv.harness_tasks:  # a misspelled task fails before any model is loaded
        from gemma_jax.eval import harness

        harness.task_manager(fv.harness_tasks, fv.harness_include_path)
    tok_path = fv.tokenizer or weights.find_tokenizer(fv.checkpoint) or data_cfg.tokenizer
    if not tok_path:
        raise UserError(f"no tokenizer.model beside {fv.checkpoint}; pass --tokenizer=PATH")
    tokenizer = Tokenizer(tok_path)
    if fv.baseline:
        _check_same_tokenizer(tokenizer, weights.find_tokenizer(fv.baseline), fv.baseline)
    mesh = sharding.parse_mesh(fv.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    config, params = weights.load(fv.checkpoint, dtype=fv.dtype, mesh=mesh, rules=rules)
    base_config = base_params = None
    if fv.baseline:
        base_config, base_params = weights.load(fv.baseline, dtype=fv.dtype, mesh=mesh, rules=rules)
    # No --data: the config's data.eval, or the part of data.train that training held out.
    report = tasks.run_eval(config, params, tokenizer, eval_cfg, fv.data, baseline_params=base_params,
                            baseline_config=base_config, data_cfg=data_cfg, batch_size=fv.batch_size, seed=fv.seed,
                            holdout_seed=int(cfg.train.seed), mesh=mesh, rules=rules, code_timeout=fv.code_timeout)
    if fv.harness_tasks:
        report["harness"] = harness_report(fv, tokenizer, (config, params), (base_config, base_params), mesh, rules)
    paths_out = report_lib.write_report(report, fv.output, show=fv.show, names=(fv.checkpoint, fv.baseline))
    if "harness" in report:
        with open(paths_out[1], "a", encoding="utf-8") as f:
            f.write("\n" + harness_markdown(report["harness"]))
    for name, value in report["tuned"].items():
        before = report.get("baseline", {}).get(name)
        print(f"{name:>20}: " + (f"{before:10.4f} -> " if before is not None else "") + f"{value:10.4f}")
    for task, row in report.get("harness", {}).get("tuned", {}).items():
        for name, value in row.items():
            before = report["harness"].get("baseline", {}).get(task, {}).get(name)
            print(f"{task + ' ' + name:>20}: " + (f"{before:10.4f} -> " if before is not None else "") + f"{value:10.4f}")
    print("wrote " + ", ".join(paths_out))
    return 0


def harness_report(fv, tokenizer, tuned, baseline, mesh, rules) -> dict:
    """{"tasks", "tuned": {task: {metric: v}}, "baseline": ..., "delta": ...} of --harness_tasks."""
    from gemma_jax.eval import harness

    limit = fv.harness_limit if fv.harness_limit is None or fv.harness_limit < 1 else int(fv.harness_limit)
    score = lambda model: harness.harness_scores(  # noqa: E731
        model[0], model[1], tokenizer, fv.harness_tasks, include_path=fv.harness_include_path,
        num_fewshot=fv.harness_num_fewshot, limit=limit, apply_chat_template=fv.harness_apply_chat_template,
        mesh=mesh, rules=rules, seed=fv.seed)
    out = dict(tasks=list(fv.harness_tasks), tuned=score(tuned))
    if baseline[1] is not None:
        out["baseline"] = score(baseline)
        out["delta"] = {t: {m: v - out["baseline"][t][m] for m, v in row.items() if m in out["baseline"].get(t, {})}
                        for t, row in out["tuned"].items()}
    return out


def harness_markdown(h: dict) -> str:
    """The harness scores as a Markdown table, baseline beside tuned."""
    base = h.get("baseline")
    lines = ["## lm-evaluation-harness", ""]
    lines += ["| task | metric | baseline | tuned | delta |", "|---|---|---:|---:|---:|"] if base is not None else \
        ["| task | metric | tuned |", "|---|---|---:|"]
    for task, row in h["tuned"].items():
        for name, value in row.items():
            if base is not None and name in base.get(task, {}):
                b = base[task][name]
                lines.append(f"| {task} | {name} | {b:.4f} | {value:.4f} | {value - b:+.4f} |")
            else:
                lines.append(f"| {task} | {name} | {value:.4f} |" + (" | |" if base is not None else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.evaluate` (argv None), or its flags as a list in-process."""
    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.evaluate")


def _check_same_tokenizer(tokenizer, other_path, where: str) -> None:
    """Raises when the baseline ships a different tokenizer: the same ids would mean other text."""
    if not other_path:
        return
    other_path = Tokenizer(other_path).path  # a GGUF baseline's vocabulary, rebuilt as a tokenizer.model
    with open(tokenizer.path, "rb") as a, open(other_path, "rb") as b:
        if a.read() != b.read():
            raise UserError(f"the baseline {where} has its own tokenizer {other_path}, different from "
                             f"{tokenizer.path}; both models must share one tokenizer to be compared")


if __name__ == "__main__":
    sys.exit(main())

"""`python -m gemma_jax.evaluate`: a fine-tuned model against its baseline, written as a report.

  python -m gemma_jax.evaluate --checkpoint=/tmp/legal_tiny --baseline=weights/gemma2-2b-it \\
      --config=configs/legal.py:tiny --output=/tmp/legal_tiny/eval

Writes report.json, report.md (baseline vs tuned with deltas, example generations beside their
references) and metrics.png. The task, headline metric and the rest default from the `eval`
section of `--config`. What is measured is described in `gemma_jax.eval.tasks`.
"""

from __future__ import annotations

import argparse
import sys

from gemma_jax import config as config_lib, sharding, weights
from gemma_jax.eval import metrics as metrics_lib, report as report_lib, tasks
from gemma_jax.tokenizer import Tokenizer


def _eval_settings(args):
    """(eval section, data section) of the config, with the command-line flags laid over them."""
    cfg = config_lib.load(args.config) if args.config else config_lib.base_config()
    eval_cfg, data_cfg = cfg.eval, cfg.data  # locked against new keys, not new values
    for key in ("task", "metric", "general", "forgetting_threshold", "max_examples", "max_new_tokens", "temperature"):
        if getattr(args, key) is not None:
            eval_cfg[key] = getattr(args, key)
    if args.task is not None and args.metric is None and eval_cfg.metric not in (
            tasks.LOSS_METRICS + metrics_lib.TASK_METRICS.get(args.task, ())):
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

    cfg, eval_cfg, data_cfg = _eval_settings(args)
    tok_path = args.tokenizer or weights.find_tokenizer(args.checkpoint) or data_cfg.tokenizer
    if not tok_path:
        ap.error(f"no tokenizer.model beside {args.checkpoint}; pass --tokenizer=PATH")
    tokenizer = Tokenizer(tok_path)
    if args.baseline:
        _check_same_tokenizer(tokenizer, weights.find_tokenizer(args.baseline), args.baseline)
    mesh = sharding.parse_mesh(args.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    config, params = weights.load(args.checkpoint, dtype=args.dtype, mesh=mesh, rules=rules)
    base_config = base_params = None
    if args.baseline:
        base_config, base_params = weights.load(args.baseline, dtype=args.dtype, mesh=mesh, rules=rules)
    # No --data: the config's data.eval, or the part of data.train that training held out.
    report = tasks.run_eval(config, params, tokenizer, eval_cfg, args.data, baseline_params=base_params,
                      baseline_config=base_config, data_cfg=data_cfg, batch_size=args.batch_size, seed=args.seed,
                      holdout_seed=int(cfg.train.seed), mesh=mesh, rules=rules, code_timeout=args.code_timeout)
    paths = report_lib.write_report(report, args.output, show=args.show, names=(args.checkpoint, args.baseline))
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

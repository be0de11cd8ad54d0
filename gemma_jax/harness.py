"""`python -m gemma_jax.harness`: lm-evaluation-harness tasks on any gemma_jax checkpoint, on the mesh.

  python -m gemma_jax.harness --checkpoint=runs/legal_2b --tasks=arc_easy,hellaswag --output=runs/legal_2b/harness
  python -m gemma_jax.harness --checkpoint=/tmp/legal_tiny --tasks=my_task --include_path=tasks/ --limit=20

Writes lm_eval's standard results JSON (OUTPUT/<checkpoint name>/results_<date>.json, as
`lm_eval --output_path` does) and results.md, a Markdown table of the scores. Needs the
`harness` extra (pip install 'gemma_jax[harness]').
"""

from __future__ import annotations

import os
import sys

from absl import flags

from gemma_jax import cli


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.harness`."""
    d = lambda *a, **k: a[0](*a[1:], flag_values=fv, **k)  # noqa: E731
    d(flags.DEFINE_string, "checkpoint", None, "any checkpoint gemma_jax.load reads (HF, official, gemma_jax, a "
      "workdir, a LoRA workdir: loaded merged)")
    d(flags.DEFINE_list, "tasks", None, "lm_eval task or group names, comma separated (built-in or from "
      "--include_path)")
    d(flags.DEFINE_string, "include_path", None, "directory of local task YAML files")
    d(flags.DEFINE_integer, "num_fewshot", None, "few-shot examples per request (default: each task's own)")
    d(flags.DEFINE_float, "limit", None, "examples per task (a fraction if below 1); for quick checks")
    d(flags.DEFINE_string, "output", None, "directory for the results JSON and results.md")
    d(flags.DEFINE_string, "mesh", "auto", "auto, none, or DATA,FSDP,TENSOR axis sizes")
    d(flags.DEFINE_bool, "apply_chat_template", False, "wrap requests in the Gemma turn format (instruction-tuned "
      "models)")
    d(flags.DEFINE_bool, "fewshot_as_multiturn", False, "with --apply_chat_template: few-shot examples as chat turns")
    d(flags.DEFINE_string, "tokenizer", None, "tokenizer.model; default: found beside the checkpoint")
    d(flags.DEFINE_string, "dtype", None, "parameter dtype to load as (float32, bfloat16)")
    d(flags.DEFINE_string, "lora_base", None, "base checkpoint of a LoRA workdir whose lora.json base moved")
    d(flags.DEFINE_integer, "batch_size", 32, "most rows per compiled batch")
    d(flags.DEFINE_integer, "max_length", None, "context length in tokens (default: the model's max_seq_len)")
    d(flags.DEFINE_integer, "max_gen_toks", 256, "generated tokens per request unless the task sets max_gen_toks")
    d(flags.DEFINE_integer, "seed", 0, "sampling seed (tasks that sample)")
    d(flags.DEFINE_bool, "log_samples", False, "also write every request and response (samples_<task>_<date>.jsonl)")
    cli.require(fv, "checkpoint", "tasks")


def _main(FLAGS, args) -> int:  # noqa: N803 (the flag values, read as absl's FLAGS would be)
    """CLI: run the tasks, write the results JSON and results.md, print the table."""
    cli.no_positional(args)
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    from gemma_jax.eval import harness

    # Inputs checked before the model loads: --limit, the task files and their datasets, unknown tasks.
    harness.check_limit(FLAGS.limit)
    harness.task_manager(FLAGS.tasks, FLAGS.include_path)
    lm = harness.GemmaJaxLM(FLAGS.checkpoint, tokenizer=FLAGS.tokenizer, mesh=FLAGS.mesh, dtype=FLAGS.dtype,
                            lora_base=FLAGS.lora_base, batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                            max_gen_toks=FLAGS.max_gen_toks, seed=FLAGS.seed)
    tracker = EvaluationTracker(output_path=FLAGS.output) if FLAGS.output else None
    limit = FLAGS.limit if FLAGS.limit is None or FLAGS.limit < 1 else int(FLAGS.limit)
    results = harness.run_harness(
        lm, FLAGS.tasks, include_path=FLAGS.include_path, num_fewshot=FLAGS.num_fewshot, limit=limit,
        apply_chat_template=FLAGS.apply_chat_template, fewshot_as_multiturn=FLAGS.fewshot_as_multiturn,
        log_samples=FLAGS.log_samples, evaluation_tracker=tracker,
        model_args={"pretrained": FLAGS.checkpoint})
    if results is None:  # not the first process
        return 0
    samples = results.pop("samples", None)
    table = make_table(results)
    if "groups" in results:
        table += "\n" + make_table(results, "groups")
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if FLAGS.log_samples and samples:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        os.makedirs(FLAGS.output, exist_ok=True)
        with open(os.path.join(FLAGS.output, "results.md"), "w", encoding="utf-8") as f:
            f.write(f"# lm-evaluation-harness: {FLAGS.checkpoint}\n\n{table}\n")
    print(table)
    if FLAGS.output:
        print(f"wrote {FLAGS.output}/results.md and the results JSON under {FLAGS.output}/")
    return 0


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.harness` (argv None), or its flags as a list in-process."""
    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.harness")


def run():
    """Entry point of `python -m gemma_jax.harness`."""
    return main()


if __name__ == "__main__":
    sys.exit(main())

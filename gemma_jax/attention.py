"""`python -m gemma_jax.attention`: which attention heads did fine-tuning change?

  python -m gemma_jax.attention --base=weights/gemma2-2b-it --tuned=runs/legal_2b \\
      --data=data/legal/eval.jsonl --output=runs/legal_2b/attention
  python -m gemma_jax.attention --base=weights/gemma2-2b-it --tuned=runs/legal_2b --output=OUT
      # no --data: the run's own eval split (its config.json), as gemma_jax.evaluate scores it

Outputs in --output: attention.json (the [layer, head] grids, heads ranked by js, and for the top
heads the tokens that one sample prompt's last position attends to most, before and after),
attention.md (the same as tables) and attention_heatmap.png (layers x heads: js, and the entropy
change). The measures are described in `gemma_jax.eval.attention`.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags, logging

from gemma_jax import cli, config as config_lib, paths, sharding, weights
from gemma_jax.errors import UserError
from gemma_jax.eval import attention as analysis, tasks
from gemma_jax.tokenizer import Tokenizer


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.attention`."""
    d = lambda *a, **k: a[0](*a[1:], flag_values=fv, **k)  # noqa: E731
    d(flags.DEFINE_string, "base", None, "the model before fine-tuning (any format gemma_jax.load reads)")
    d(flags.DEFINE_string, "tuned", None, "the fine-tuned model (a training workdir works)")
    d(flags.DEFINE_string, "data", "", "domain examples: files, globs or tfds:name:split; default: the config's "
      "eval split (data.eval, or the data.eval_fraction hold-out of data.train with the run's train.seed)")
    config_lib.define_config_flag("config", None, "experiment config (configs/legal.py:tiny) or a training workdir (its "
                      "config.json) for the default --data, field_map and default_instruction, with "
                      "--config.KEY=VALUE overrides; default: the --tuned workdir's config.json when it has one",
                      flag_values=fv)
    d(flags.DEFINE_string, "output", None, "directory for attention.json, attention.md and the heatmap")
    d(flags.DEFINE_integer, "max_prompts", 32, "prompts analysed (the first ones of --data)")
    d(flags.DEFINE_integer, "seq_len", 256, "prompts are cut to this many tokens")
    d(flags.DEFINE_integer, "batch_size", 4, "prompts per forward pass")
    d(flags.DEFINE_integer, "top_heads", 10, "heads listed with their attended tokens")
    d(flags.DEFINE_integer, "sample_index", 0, "which prompt shows the attended tokens")
    d(flags.DEFINE_bool, "with_response", False, "analyse whole examples (prompt + reference answer) instead of "
      "prompts only")
    d(flags.DEFINE_string, "field_map", "", "as data.field_map, e.g. input=text,output=summary "
      "(default: the config's)")
    d(flags.DEFINE_string, "default_instruction", "", "as data.default_instruction (default: the config's)")
    d(flags.DEFINE_string, "tokenizer", "", "default: found beside --tuned, else beside --base")
    d(flags.DEFINE_string, "dtype", "float32", "parameter dtype to load both models as")
    d(flags.DEFINE_string, "mesh", "auto", "auto, none, or DATA,FSDP,TENSOR axis sizes")
    cli.require(fv, "base", "tuned", "output")


def _run_config(fv):
    """--config (overrides applied, data.train overrides -> hold-out), else the --tuned workdir's, else None."""
    if fv.config is not None:
        note = config_lib.adjust_eval_for_train_override(fv.config, config_lib.overridden_keys(fv))
        if note:
            logging.warning(note)
        return fv.config
    if paths.exists(paths.join(fv.tuned, config_lib.CONFIG_JSON)):
        return config_lib.load_recorded(fv.tuned)
    return None


def read_examples(fv, cfg):
    """--data read with the data options (flags first, then the config's); no --data: the config's
    eval split or hold-out, exactly as training and gemma_jax.evaluate read it."""
    data_cfg = config_lib.base_config().data if cfg is None else cfg.data.copy_and_resolve_references()
    for key in ("field_map", "default_instruction"):
        if fv[key].present or cfg is None:
            data_cfg[key] = fv[key].value
    if not fv.data and cfg is None:
        raise UserError("--data is required unless --config (or a --tuned training workdir) gives the eval split")
    seed = int(cfg.train.seed) if cfg is not None else 0
    return tasks.read_eval_data(fv.data, data_cfg, holdout_seed=seed)


def _main(fv, args) -> int:
    """Compare base and tuned attention on domain prompts; write json, md and a heatmap."""
    cli.no_positional(args)
    if fv.max_prompts < 1 or fv.seq_len < 2 or fv.batch_size < 1:
        raise UserError("--max_prompts and --batch_size must be >= 1 and --seq_len >= 2")
    cfg = _run_config(fv)
    tok_path = fv.tokenizer or weights.find_tokenizer(fv.tuned) or weights.find_tokenizer(fv.base)
    if not tok_path:
        raise UserError(f"no tokenizer.model beside {fv.tuned} or {fv.base}; pass --tokenizer=PATH")
    tokenizer = Tokenizer(tok_path)
    examples = read_examples(fv, cfg)
    data_name = fv.data or (cfg.data.eval or f"{cfg.data.train} (held-out {cfg.data.eval_fraction})")
    prompts = analysis.prompt_ids(examples[:fv.max_prompts], tokenizer, with_response=fv.with_response)
    mesh = sharding.parse_mesh(fv.mesh)
    base_config, base_params = weights.load(fv.base, dtype=fv.dtype, mesh=mesh)
    config, tuned_params = weights.load(fv.tuned, dtype=fv.dtype, mesh=mesh)
    analysis.check_comparable(base_config, config)
    # One compiled program serves both models, so both run in the tuned model's numerics.
    config = config.replace(dtype="float32", remat="none")
    report = analysis.compare(config, base_params, tuned_params, tokenizer, prompts, seq_len=fv.seq_len,
                              batch_size=fv.batch_size, top_heads=fv.top_heads, sample_index=fv.sample_index,
                              mesh=mesh)
    report = dict(base=fv.base, tuned=fv.tuned, data=data_name, with_response=fv.with_response, **report)
    os.makedirs(fv.output, exist_ok=True)
    with open(os.path.join(fv.output, "attention.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    analysis.heatmap({k: np.asarray(v) for k, v in report["grids"].items()},
                     os.path.join(fv.output, "attention_heatmap.png"),
                     kinds=list(config.layer_types),
                     title=f"{_name(fv.tuned)} vs {_name(fv.base)}")
    analysis.write_markdown(report, os.path.join(fv.output, "attention.md"), top=fv.top_heads)
    for i, h in enumerate(report["ranked"][:5], 1):
        print(f"{i}. layer {h['layer']} ({h['kind']}) head {h['head']}: JS {h['js']:.4f} bits, entropy "
              f"{h['entropy_base']:.2f} -> {h['entropy_tuned']:.2f}, distance "
              f"{h['distance_base']:.1f} -> {h['distance_tuned']:.1f} tokens")
    print(f"wrote {fv.output}/attention.json, attention.md, attention_heatmap.png")
    return 0


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.attention` (argv None), or its flags as a list in-process."""
    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.attention")


if __name__ == "__main__":
    sys.exit(main())

"""`python -m gemma_jax.attention`: which attention heads did fine-tuning change?

  python -m gemma_jax.attention --base=weights/gemma2-2b-it --tuned=runs/legal_2b \\
      --data=data/legal/eval.jsonl --output=runs/legal_2b/attention

Outputs in --output: attention.json (the [layer, head] grids, heads ranked by js, and for the top
heads the tokens that one sample prompt's last position attends to most, before and after),
attention.md (the same as tables) and attention_heatmap.png (layers x heads: js, and the entropy
change). The measures are described in `gemma_jax.eval.attention`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from gemma_jax import data as data_lib, sharding, weights
from gemma_jax.eval import attention as analysis
from gemma_jax.tokenizer import Tokenizer


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def main(argv=None) -> int:
    """CLI: compare base and tuned attention on domain prompts; write json, md and a heatmap."""
    ap = argparse.ArgumentParser(prog="python -m gemma_jax.attention",
                                 description="Which attention heads did fine-tuning change? Entropy, "
                                             "distance and base-vs-tuned JS divergence per layer and head.")
    ap.add_argument("--base", required=True, help="the model before fine-tuning (any format gemma_jax.load reads)")
    ap.add_argument("--tuned", required=True, help="the fine-tuned model (a training workdir works)")
    ap.add_argument("--data", required=True, help="domain examples: files, globs or tfds:name:split")
    ap.add_argument("--output", required=True, help="directory for attention.json, attention.md and the heatmap")
    ap.add_argument("--max_prompts", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=256, help="prompts are cut to this many tokens")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--top_heads", type=int, default=10, help="heads listed with their attended tokens")
    ap.add_argument("--sample_index", type=int, default=0, help="which prompt shows the attended tokens")
    ap.add_argument("--with_response", action="store_true",
                    help="analyse whole examples (prompt + reference answer) instead of prompts only")
    ap.add_argument("--field_map", default="", help="as data.field_map, e.g. input=text,output=summary")
    ap.add_argument("--default_instruction", default="")
    ap.add_argument("--tokenizer", default="", help="default: found beside --tuned, else beside --base")
    ap.add_argument("--dtype", default="float32", help="parameter dtype to load both models as")
    ap.add_argument("--mesh", default="auto", help="auto, none, or DATA,FSDP,TENSOR axis sizes")
    args = ap.parse_args(argv)
    if args.max_prompts < 1 or args.seq_len < 2 or args.batch_size < 1:
        ap.error("--max_prompts and --batch_size must be >= 1 and --seq_len >= 2")

    tok_path = args.tokenizer or weights.find_tokenizer(args.tuned) or weights.find_tokenizer(args.base)
    if not tok_path:
        ap.error(f"no tokenizer.model beside {args.tuned} or {args.base}; pass --tokenizer=PATH")
    tokenizer = Tokenizer(tok_path)
    examples, _ = data_lib.read_examples(args.data, field_map=args.field_map,
                                         default_instruction=args.default_instruction)
    prompts = analysis.prompt_ids(examples[:args.max_prompts], tokenizer, with_response=args.with_response)
    mesh = sharding.parse_mesh(args.mesh)
    base_config, base_params = weights.load(args.base, dtype=args.dtype, mesh=mesh)
    config, tuned_params = weights.load(args.tuned, dtype=args.dtype, mesh=mesh)
    analysis.check_comparable(base_config, config)
    # One compiled program serves both models, so both run in the tuned model's numerics.
    config = config.replace(dtype="float32", remat="none")
    report = analysis.compare(config, base_params, tuned_params, tokenizer, prompts, seq_len=args.seq_len,
                     batch_size=args.batch_size, top_heads=args.top_heads, sample_index=args.sample_index,
                     mesh=mesh)
    report = dict(base=args.base, tuned=args.tuned, data=args.data, with_response=args.with_response, **report)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "attention.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    analysis.heatmap({k: np.asarray(v) for k, v in report["grids"].items()},
            os.path.join(args.output, "attention_heatmap.png"),
            kinds=["local" if config.is_local(i) else "global" for i in range(config.num_layers)],
            title=f"{_name(args.tuned)} vs {_name(args.base)}")
    analysis.write_markdown(report, os.path.join(args.output, "attention.md"), top=args.top_heads)
    for i, h in enumerate(report["ranked"][:5], 1):
        print(f"{i}. layer {h['layer']} ({h['kind']}) head {h['head']}: JS {h['js']:.4f} bits, entropy "
              f"{h['entropy_base']:.2f} -> {h['entropy_tuned']:.2f}, distance "
              f"{h['distance_base']:.1f} -> {h['distance_tuned']:.1f} tokens")
    print(f"wrote {args.output}/attention.json, attention.md, attention_heatmap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

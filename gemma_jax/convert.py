"""Converts Gemma 2 weights between formats.

  python -m gemma_jax.convert --input=PATH --output=PATH --to={hf,official,gemma_jax,keras} \
      [--dtype=float32|bfloat16] [--gating_layout=DF|FD] [--overwrite]
  python -m gemma_jax.convert --merge_lora --input=LORA_WORKDIR --output=PATH --to=hf [--lora_base=BASE]

The input format is detected (HF, official Flax/Orbax, KerasHub, gemma_jax, training workdir);
a tokenizer.model found in or beside the input is copied into the output. A LoRA workdir
always loads merged (its adapters added to the base its lora.json names); --merge_lora says
that is what you expect, and fails if the input holds no adapters.
"""

from __future__ import annotations

from absl import app, flags

from gemma_jax import weights
from gemma_jax.weights import native

flags.DEFINE_string("input", None, "Checkpoint directory to read (any supported format).")
flags.DEFINE_string("output", None, "Directory to write.")
flags.DEFINE_enum("to", None, ["hf", "official", "gemma_jax", "keras"], "Output format.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Weight dtype (default: as stored).")
flags.DEFINE_enum("gating_layout", None, ["DF", "FD"],
                  "Official output only: MLP gating layout (default: DF for the 2B shape, else FD).")
flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "HF output only: largest safetensors shard.")
flags.DEFINE_bool("overwrite", False, "Replace an existing official/gemma_jax output directory.")
flags.DEFINE_bool("merge_lora", False, "The input is a LoRA training workdir: merge its adapters into the base.")
flags.DEFINE_string("lora_base", None, "Base checkpoint of a LoRA workdir, if not where its lora.json says.")
flags.mark_flags_as_required(["input", "output", "to"])
FLAGS = flags.FLAGS


def convert(input_path: str, output_path: str, to: str, *, dtype=None, gating_layout=None,
            max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, merge_lora: bool = False,
            lora_base: str | None = None) -> str:
    """Loads `input_path`, writes it as `to` into `output_path`; returns a summary line."""
    fmt = weights.detect_format(input_path)
    meta = native.read_lora_json(input_path) if fmt == "workdir" else None
    if (merge_lora or lora_base) and meta is None:
        raise ValueError(f"--merge_lora: {input_path} is a {fmt} checkpoint, not a LoRA training workdir "
                         f"(a workdir with {native.LORA_JSON})")
    config, params = weights.load(input_path, dtype=dtype, lora_base=lora_base)
    kwargs = {}
    if to == "official" and gating_layout:
        kwargs["gating_layout"] = gating_layout
    if to == "hf":
        kwargs["max_shard_bytes"] = max_shard_bytes
    tokenizer = weights.find_tokenizer(input_path)
    out = weights.save(output_path, config, params, format=to, tokenizer=tokenizer,
                          overwrite=overwrite, **kwargs)
    what = f"LoRA workdir {input_path} (rank {meta['rank']}, merged into {lora_base or meta['base']})" if meta else \
        f"{fmt} checkpoint {input_path}"
    return (f"converted {what} -> {to} checkpoint {out}: "
            f"{config.num_layers} layers, embed_dim {config.embed_dim}, vocab rows {config.vocab_size}, "
            f"{config.num_params():,} parameters in {config.param_dtype}"
            + (f"; copied tokenizer.model from {tokenizer}" if tokenizer else "; no tokenizer.model found"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    print(convert(FLAGS.input, FLAGS.output, FLAGS.to, dtype=FLAGS.dtype, gating_layout=FLAGS.gating_layout,
                  max_shard_bytes=FLAGS.max_shard_bytes, overwrite=FLAGS.overwrite, merge_lora=FLAGS.merge_lora,
                  lora_base=FLAGS.lora_base))


if __name__ == "__main__":
    app.run(main)

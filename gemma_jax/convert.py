"""Converts Gemma weights between formats.

  python -m gemma_jax.convert --input=PATH --output=PATH --to={hf,official,gemma_jax,keras,gguf} \
      [--dtype=float32|bfloat16|float16|q8_0] [--gating_layout=DF|FD] [--overwrite] [--model_config=FILE.json]
  python -m gemma_jax.convert --merge_lora --input=LORA_WORKDIR --output=PATH --to=hf [--lora_base=BASE]

The input format is detected (HF, official Flax/Orbax flat or nested, KerasHub, GGUF, gemma_jax,
training workdir); a tokenizer.model found in or beside the input (a GGUF input: the file's own
vocabulary) goes into the output (for HF with the transformers tokenizer files and chat template,
for GGUF inside the file). --to=gguf writes OUTPUT/model.gguf; --dtype=q8_0 is for GGUF only.
A non-empty output directory is refused unless --overwrite, which replaces only the model files
in it. A LoRA workdir always
loads merged (its adapters added to the base its lora.json names); --merge_lora says that is
what you expect, and fails if the input holds no adapters.
"""

from __future__ import annotations

from absl import flags

from gemma_jax import cli, weights
from gemma_jax.weights import api, native


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (cli.run defines them only when the command runs)."""
    flags.DEFINE_string("input", None, "Checkpoint directory to read (any supported format).", flag_values=fv)
    flags.DEFINE_string("output", None, "Directory to write.", flag_values=fv)
    flags.DEFINE_enum("to", None, ["hf", "official", "gemma_jax", "keras", "gguf"], "Output format.",
                      flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16", "q8_0"],
                      "Weight dtype (default: as stored; q8_0: GGUF output only).", flag_values=fv)
    flags.DEFINE_enum("gating_layout", None, ["DF", "FD"], "Official output only: MLP gating layout "
                      "(default: DF for the 2B shape, else FD).", flag_values=fv)
    flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "HF output only: largest safetensors shard.",
                         flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace the model files of a non-empty output directory "
                      "(other files in it are kept).", flag_values=fv)
    flags.DEFINE_bool("merge_lora", False, "The input is a LoRA training workdir: merge its adapters into "
                      "the base.", flag_values=fv)
    flags.DEFINE_string("lora_base", None, "Base checkpoint of a LoRA workdir (default: where its lora.json "
                        "says).", flag_values=fv)
    flags.DEFINE_string("model_config", None, "Official input of no published size only: a JSON file of "
                        "ModelConfig hyperparameters (query_pre_attn_scalar, sliding_window, attn_softcap, "
                        "final_softcap, ...), e.g. a model.json (default: the gemma_jax_config.json beside "
                        "the weights, or the published size's).", flag_values=fv)
    cli.require(fv, "input", "output", "to")


def convert(input_path: str, output_path: str, to: str, *, dtype=None, gating_layout=None,
            max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, merge_lora: bool = False,
            lora_base: str | None = None, model_config: str | None = None) -> str:
    """Loads `input_path`, writes it as `to` into `output_path`; returns a summary line."""
    if dtype == "q8_0" and to != "gguf":
        raise ValueError(f"--dtype=q8_0 is a GGUF quantisation; --to={to} takes float32, bfloat16 or float16")
    fmt = weights.detect_format(input_path)
    meta = native.read_lora_json(input_path) if fmt == "workdir" else None
    if (merge_lora or lora_base) and meta is None:
        raise ValueError(f"--merge_lora: {input_path} is a {fmt} checkpoint, not a LoRA training workdir "
                         f"(a workdir with {native.LORA_JSON})")
    if model_config and fmt != "official":
        raise ValueError(f"--model_config is only for official checkpoints (which store no hyperparameters); "
                         f"{input_path} is a {fmt} checkpoint and has its own")
    # GGUF output quantises from the loaded values (float32 unless the input is half precision).
    load_dtype = None if to == "gguf" else dtype
    config, params = weights.load(input_path, dtype=load_dtype, lora_base=lora_base, config=model_config or None)
    kwargs = {"dtype": dtype} if to == "gguf" and dtype else {}
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
            f"{config.num_params():,} parameters in {dtype if to == 'gguf' and dtype else config.param_dtype}"
            + (f"; {'embedded the tokenizer' if to == 'gguf' else 'copied tokenizer.model'} from {tokenizer}"
               if tokenizer else "; no tokenizer.model found"))


def _main(fv, args) -> int:
    cli.no_positional(args)
    # Check the output before the (slow) load; the library's message names overwrite=True.
    try:
        api.check_output(fv.output, fv.overwrite, fv.to)
        print(convert(fv.input, fv.output, fv.to, dtype=fv.dtype, gating_layout=fv.gating_layout,
                      max_shard_bytes=fv.max_shard_bytes, overwrite=fv.overwrite, merge_lora=fv.merge_lora,
                      lora_base=fv.lora_base, model_config=fv.model_config))
    except api.OutputExistsError as e:
        raise e.reworded("--overwrite") from None
    return 0


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.convert` (argv None), or its flags as a list in-process."""
    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.convert")


if __name__ == "__main__":
    main()

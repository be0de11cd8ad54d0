"""Gemma 2 / 3 / 4 weights in and out of every format users bring or want back.

  api.py       load / save / detect_format / find_tokenizer: format detection and dispatch,
               LoRA workdirs merged into their base
  layout.py    the unrolled intermediate all formats share, built straight into shardings
  hf.py        Hugging Face safetensors (transformers' Gemma2/3/4ForCausalLM, the text model of
               Gemma3/4ForConditionalGeneration), with the tokenizer files, chat template and
               generation config transformers reads
  hf_config.py their config.json files, read and written
  hf_tensors.py their tensor names and layouts, both ways
  official.py  the official Flax/Orbax checkpoints: the flat Kaggle layout (google/gemma-2/flax,
               gemma-3) and the gemma library's nested trees (gm.ckpts.save_params)
  keras.py     KerasHub presets (optional extra)
  gguf.py      llama.cpp's GGUF files (gemma2 / gemma3; optional `gguf` extra): every type gguf
               dequantises in, float32/float16/bfloat16/q8_0 out with the tokenizer inside
  native.py    gemma_jax checkpoints and training workdirs (model.json, lora.json)
"""

from gemma_jax.weights.api import (FORMATS, SAVE_FORMATS, OutputExistsError, check_output, detect_format,
                                   find_tokenizer, load, save)

__all__ = ["FORMATS", "SAVE_FORMATS", "OutputExistsError", "check_output", "detect_format", "find_tokenizer",
           "load", "save"]

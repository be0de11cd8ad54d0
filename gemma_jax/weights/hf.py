"""Hugging Face Gemma 2 / Gemma 3 safetensors directories, read and written without torch.

Read: `Gemma2ForCausalLM` (model_type gemma2), `Gemma3ForCausalLM` (gemma3_text) and the text
model of `Gemma3ForConditionalGeneration` (gemma3: text_config, weights under
model.language_model.* or language_model.model.*; the vision tower is skipped). Written:
Gemma2ForCausalLM, or Gemma3ForCausalLM for a config of family gemma3.

Safetensors is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw row-major tensor bytes. Reading parses the header and memory-maps
each tensor, so BF16 works through ml_dtypes and a sharded load touches only the slices each
device needs. Writing streams one tensor at a time (the header is computed from the config
first), so exporting never holds more than one tensor on the host.

Tree surgery: torch Linear weights are [out, in]; the model's einsum weights put heads first:
  q_einsum (N,D,H)   <- q_proj (N*H, D) viewed (N,H,D), axes swapped
  kv_einsum (2,K,D,H) <- k_proj, v_proj (K*H, D) likewise, k first
  attn_vec_einsum (N,H,D) <- o_proj (D, N*H) viewed (D,N,H), D moved last
  gating_einsum (2,F,D) <- gate_proj, up_proj (F, D) as is, gate first
  linear (F,D) <- down_proj (D, F) transposed
Both formats store the zero-centred RMSNorm scale, so norms copy unchanged; lm_head is tied.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from absl import logging

from gemma_jax import paths
from gemma_jax.model.config import FAMILY_DEFAULTS, ModelConfig
from gemma_jax.errors import UserError
from gemma_jax.tokenizer import CHAT_TEMPLATE, CHAT_TEMPLATE_GEMMA3, END_OF_TURN, START_OF_TURN
from gemma_jax.weights import layout

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
          "BOOL": np.dtype(np.bool_)}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HF_VOCAB, OFFICIAL_VOCAB = 256000, 256128
NORMS = {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
QK_NORMS = {"query_norm": "q_norm", "key_norm": "k_norm"}  # Gemma 3, under attn/ and self_attn.


class SafetensorsFile:
    """Header of one .safetensors file and memory-mapped views of its tensors."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = os.path.getsize(self.path)
            if n > size - 8:
                raise ValueError(f"{self.path}: header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors = header
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            want = math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize
            if end - begin != want or self.data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name} spans bytes [{begin}, {end}) but its "
                                 f"shape {info['shape']} needs {want} bytes")

    def shape(self, name) -> tuple[int, ...]:
        """Stored shape of tensor `name`."""
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name) -> np.dtype:
        """numpy dtype of tensor `name`."""
        return DTYPES[self.tensors[name]["dtype"]]

    def array(self, name) -> np.ndarray:
        """Read-only memory map of one tensor (nothing is read until it is indexed)."""
        info = self.tensors[name]
        shape = tuple(info["shape"])
        if math.prod(shape) == 0:
            return np.zeros(shape, DTYPES[info["dtype"]])
        return np.memmap(self.path, dtype=DTYPES[info["dtype"]], mode="r",
                         offset=self.data_start + info["data_offsets"][0], shape=shape)


class HFCheckpoint:
    """A Hugging Face checkpoint directory: config.json plus one or several safetensors files."""

    def __init__(self, directory):
        self.dir = Path(directory)
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise ValueError(f"{self.dir}: missing config.json")
        self.config = json.loads(cfg.read_text())
        self.files: dict[str, SafetensorsFile] = {}
        if (self.dir / INDEX).is_file():
            weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise ValueError(f"{self.dir / INDEX} names {fname}, which does not exist")
            self.where = dict(weight_map)
        elif (self.dir / SINGLE).is_file():
            self.where = {k: SINGLE for k in self._file(SINGLE).tensors}
        else:
            raise ValueError(f"{self.dir}: neither {SINGLE} nor {INDEX} found")

    def _file(self, fname) -> SafetensorsFile:
        if fname not in self.files:
            self.files[fname] = SafetensorsFile(self.dir / fname)
        return self.files[fname]

    def __contains__(self, key) -> bool:
        return key in self.where

    def shape(self, key) -> tuple[int, ...]:
        """Stored shape of `key`; a missing key is an error naming it and the checkpoint."""
        if key not in self.where:
            raise ValueError(f"missing tensor {key} in {self.dir} "
                             f"({INDEX if (self.dir / INDEX).is_file() else SINGLE})")
        f = self._file(self.where[key])
        if key not in f.tensors:
            raise ValueError(f"missing tensor {key} in {f.path} (the index maps it there)")
        return f.shape(key)

    def dtype(self, key) -> np.dtype:
        """numpy dtype of `key` (missing keys raise like shape)."""
        self.shape(key)
        return self._file(self.where[key]).dtype(key)

    def tensor(self, key, expected: tuple[int, ...]) -> np.ndarray:
        """Memory-mapped `key` after checking its shape against `expected`."""
        found = self.shape(key)
        if tuple(found) != tuple(expected):
            raise ValueError(f"tensor {key} in {self.where[key]}: expected shape {tuple(expected)}, "
                             f"found {tuple(found)}")
        return self._file(self.where[key]).array(key)


def _get(hf: dict, key: str, default):
    value = hf.get(key)
    return default if value is None else value


# Where a checkpoint keeps the text model: Gemma*ForCausalLM under model.*, transformers 5's
# Gemma3ForConditionalGeneration under model.language_model.*, transformers 4's under
# language_model.model.*; a bare Gemma*Model without prefix.
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
# Top-level modules of a multimodal checkpoint that the text model does not use.
_VISION_PARTS = ("vision_tower", "multi_modal_projector")
# transformers' Gemma3TextConfig defaults: Google's multimodal config.json files leave most text
# fields out (4B: only hidden_size, intermediate_size, num_hidden_layers, sliding_window, rope_scaling).
_GEMMA3_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256,
                        sliding_window=4096, max_position_embeddings=131072, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6)
_GEMMA2_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=HF_VOCAB, query_pre_attn_scalar=256,
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


def _layer_pattern(types: list[str], family: str, where: str) -> tuple[str, ...]:
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


def _rope(text: dict, family: str, where: str) -> dict:
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
    out = dict(rope_base=float(full.get("rope_theta") or text.get("rope_theta") or _GEMMA3_DEFAULTS["rope_theta"]),
               local_rope_base=float(local.get("rope_theta") or text.get("rope_local_base_freq")
                                     or _GEMMA3_DEFAULTS["rope_local_base_freq"]),
               rope_scale=1.0)
    kind = full.get("rope_type", full.get("type", "default"))
    if kind == "linear":
        out["rope_scale"] = float(full["factor"])
    elif kind != "default":
        raise ValueError(f"{where}: global-layer rope_type={kind!r} is not supported (default or linear)")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{where}: local-layer rope scaling {local} is not supported (only default RoPE)")
    return out


def config_from_hf(hf: dict, ck: HFCheckpoint, prefix: str) -> ModelConfig:
    """ModelConfig of a Gemma 2 / Gemma 3 config.json (text_config of a multimodal one), checked
    against the shapes of the stored weights."""
    where = f"{ck.dir / 'config.json'}"
    text, family = text_config(hf, where)
    defaults = _GEMMA3_DEFAULTS if family == "gemma3" else _GEMMA2_DEFAULTS
    act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{where}: hidden_activation={act!r}; Gemma uses gelu_pytorch_tanh")
    if text.get("tie_word_embeddings", hf.get("tie_word_embeddings")) is False:
        raise ValueError(f"{where}: tie_word_embeddings=false; untied output embeddings are not supported")
    if text.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention is not supported (an embedding model, not "
                         "a causal language model)")
    n_layers = _get(text, "num_hidden_layers", defaults["num_hidden_layers"])
    layer_types = text.get("layer_types")
    if layer_types is None:  # transformers 4: every sliding_window_pattern-th layer is global
        every = 2 if family == "gemma2" else int(_get(text, "sliding_window_pattern", 6))
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise ValueError(f"{where}: layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    pattern = _layer_pattern(list(layer_types), family, where)

    d, n, k, h = (_get(text, "hidden_size", defaults["hidden_size"]),
                  _get(text, "num_attention_heads", defaults["num_attention_heads"]),
                  _get(text, "num_key_value_heads", defaults["num_key_value_heads"]),
                  _get(text, "head_dim", defaults["head_dim"]))
    f = _get(text, "intermediate_size", defaults["intermediate_size"])
    v = _get(text, "vocab_size", defaults["vocab_size"])
    emb_key = f"{prefix}embed_tokens.weight"
    rows, cols = ck.shape(emb_key)
    found_layers = sorted({int(m.group(1)) for key in ck.where
                           if (m := re.match(rf"^{re.escape(prefix)}layers\.(\d+)\.", key))})
    if len(found_layers) != n_layers or found_layers != list(range(len(found_layers))):
        shown = f"layers {found_layers[0]}..{found_layers[-1]}" if found_layers else "no layers"
        raise ValueError(f"config/weights disagree: {where} says num_hidden_layers={n_layers} but the "
                         f"weights have {len(found_layers)} layers ({shown})")
    if cols != d:
        raise ValueError(f"config/weights disagree: hidden_size={d} in {where} but {emb_key} has "
                         f"shape {(rows, cols)}")
    if rows != v:
        raise ValueError(f"config/weights disagree: vocab_size={v} in {where} but {emb_key} has {rows} rows")
    p0 = f"{prefix}layers.0."
    for key, dims, value in ((f"{p0}self_attn.q_proj.weight", "num_attention_heads*head_dim", (n, h)),
                             (f"{p0}self_attn.k_proj.weight", "num_key_value_heads*head_dim", (k, h)),
                             (f"{p0}mlp.gate_proj.weight", "intermediate_size", (f, 1))):
        if n_layers and ck.shape(key)[0] != value[0] * value[1]:
            shown = f"{value[0]}*{value[1]} = {value[0] * value[1]}" if value[1] != 1 else f"{value[0]}"
            raise ValueError(f"config/weights disagree: {dims} = {shown} in {where} but {key} has "
                             f"{ck.shape(key)[0]} rows (shape {ck.shape(key)})")
    qk_norm = family == "gemma3"
    if qk_norm and n_layers:
        for key in (f"{p0}self_attn.q_norm.weight", f"{p0}self_attn.k_norm.weight"):
            if ck.shape(key) != (h,):
                raise ValueError(f"config/weights disagree: head_dim={h} in {where} but {key} has shape "
                                 f"{ck.shape(key)}")
    # Absent means the class's default: Gemma 2 caps at 50 / 30, Gemma 3 has no caps; an
    # explicit null disables a cap.
    caps = (50.0, 30.0) if family == "gemma2" else (None, None)
    attn_cap = float(text.get("attn_logit_softcapping", caps[0]) or 0.0)
    if family == "gemma3" and attn_cap:
        # Gemma3Attention never hands the cap to its attention functions, so transformers computes
        # these checkpoints without it; so do we.
        logging.warning("%s: attn_logit_softcapping=%s is ignored, as transformers' Gemma 3 ignores it",
                        where, attn_cap)
        attn_cap = 0.0
    return ModelConfig(
        num_layers=n_layers, embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k, head_dim=h,
        vocab_size=rows, sliding_window=_get(text, "sliding_window", defaults["sliding_window"]),
        query_pre_attn_scalar=float(_get(text, "query_pre_attn_scalar", defaults["query_pre_attn_scalar"])),
        attn_softcap=attn_cap,
        final_softcap=float(text.get("final_logit_softcapping", caps[1]) or 0.0),
        **_rope(text, family, where), family=family, attention_pattern=pattern, qk_norm=qk_norm,
        norm_eps=float(_get(text, "rms_norm_eps", 1e-6)),
        max_seq_len=_get(text, "max_position_embeddings", defaults["max_position_embeddings"]),
        param_dtype=layout.dtype_name(ck.dtype(emb_key)))


def text_prefix(ck: HFCheckpoint) -> str:
    """The key prefix of the text model's weights (see TEXT_PREFIXES); logs once that the
    vision tower of a multimodal checkpoint is skipped."""
    prefix = next((p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in ck), None)
    if prefix is None:
        tried = ", ".join(f"{p}embed_tokens.weight" for p in TEXT_PREFIXES)
        raise ValueError(f"{ck.dir}: no text embedding found (looked for {tried})")
    vision = sorted({part for key in ck.where for part in key.split(".")[:3] if part in _VISION_PARTS})
    if vision:
        skipped = sum(not key.startswith(prefix) for key in ck.where)
        logging.info("%s: loading the text model under %s*; skipping %s (%d tensors: the image side)",
                     ck.dir, prefix or "(no prefix)", " and ".join(vision), skipped)
    return prefix




def read(directory) -> tuple[ModelConfig, dict]:
    """(config, unrolled tree of lazy memory-mapped views) of a HF Gemma 2 / Gemma 3 directory."""
    ck = HFCheckpoint(directory)
    prefix = text_prefix(ck)
    c = config_from_hf(ck.config, ck, prefix)
    d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
    unrolled = {"embedder": {"input_embedding": ck.tensor(f"{prefix}embed_tokens.weight", (c.vocab_size, d))},
                "final_norm": {"scale": ck.tensor(f"{prefix}norm.weight", (d,))}}
    for i in range(c.num_layers):
        p = f"{prefix}layers.{i}."
        t = lambda name, shape: ck.tensor(p + name, shape)  # noqa: E731
        heads_first = lambda w, heads: w.reshape(heads, h, d).transpose(0, 2, 1)  # noqa: E731
        layer = {
            "attn": {
                "q_einsum": {"w": heads_first(t("self_attn.q_proj.weight", (n * h, d)), n)},
                "kv_einsum": {"w": layout.Stacked([
                    heads_first(t("self_attn.k_proj.weight", (k * h, d)), k),
                    heads_first(t("self_attn.v_proj.weight", (k * h, d)), k)])},
                "attn_vec_einsum": {"w": t("self_attn.o_proj.weight", (d, n * h)).reshape(d, n, h).transpose(1, 2, 0)},
            },
            "mlp": {
                "gating_einsum": {"w": layout.Stacked([t("mlp.gate_proj.weight", (f, d)),
                                                           t("mlp.up_proj.weight", (f, d))])},
                "linear": {"w": t("mlp.down_proj.weight", (d, f)).T},
            },
        }
        for ours, theirs in NORMS.items():
            layer[ours] = {"scale": t(f"{theirs}.weight", (d,))}
        if c.qk_norm:
            for ours, theirs in QK_NORMS.items():
                layer["attn"][ours] = {"scale": t(f"self_attn.{theirs}.weight", (h,))}
        unrolled[f"layer_{i}"] = layer
    return c, unrolled


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


def write_safetensors(path, entries, metadata=None) -> None:
    """Streams [(name, shape, numpy dtype, zero-arg producer)] into one safetensors file."""
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    for name, shape, dtype, _ in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(produce(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, got {arr.shape}")
            f.write(arr.tobytes())


def write(path, config: ModelConfig, params, *, max_shard_bytes: int = 5 * 10**9, dtype=None,
          tokenizer=None) -> None:
    """Writes config.json, generation_config.json and model.safetensors (or shards + index) for
    Gemma2ForCausalLM (Gemma3ForCausalLM for family gemma3); with `tokenizer` (a tokenizer.model)
    also the transformers tokenizer files."""
    import jax

    dtype = np.dtype(layout.dtype_name(dtype) or config.param_dtype)
    config = config.replace(param_dtype=dtype.name)
    check_exportable(config)
    src = layout.unrolled_view(config, params, dtype=dtype, host=True)
    d, f, n, k, h, v = (config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads,
                        config.head_dim, config.vocab_size)
    # HF Gemma 2 has exactly the tokenizer's 256000 rows; the official files pad to 256128 so the
    # table shards evenly on TPUs. The padding rows are never produced by the tokenizer, so
    # dropping them leaves every real token's logit unchanged.
    rows = HF_VOCAB if v == OFFICIAL_VOCAB else v
    entries = [("model.embed_tokens.weight", (rows, d), lambda: src["embedder"]["input_embedding"]()[:rows])]
    for i in range(config.num_layers):
        L, p = src[f"layer_{i}"], f"model.layers.{i}."
        entries += [
            (p + "self_attn.q_proj.weight", (n * h, d),
             lambda L=L: L["attn"]["q_einsum"]["w"]().transpose(0, 2, 1).reshape(n * h, d)),
            (p + "self_attn.k_proj.weight", (k * h, d),
             lambda L=L: L["attn"]["kv_einsum"]["w"]()[0].transpose(0, 2, 1).reshape(k * h, d)),
            (p + "self_attn.v_proj.weight", (k * h, d),
             lambda L=L: L["attn"]["kv_einsum"]["w"]()[1].transpose(0, 2, 1).reshape(k * h, d)),
            (p + "self_attn.o_proj.weight", (d, n * h),
             lambda L=L: L["attn"]["attn_vec_einsum"]["w"]().transpose(2, 0, 1).reshape(d, n * h)),
            (p + "mlp.gate_proj.weight", (f, d), lambda L=L: L["mlp"]["gating_einsum"]["w"]()[0]),
            (p + "mlp.up_proj.weight", (f, d), lambda L=L: L["mlp"]["gating_einsum"]["w"]()[1]),
            (p + "mlp.down_proj.weight", (d, f), lambda L=L: L["mlp"]["linear"]["w"]().T),
        ]
        entries += [(f"{p}{theirs}.weight", (d,), lambda L=L, o=ours: L[o]["scale"]())
                    for ours, theirs in NORMS.items()]
        if config.qk_norm:
            entries += [(f"{p}self_attn.{theirs}.weight", (h,), lambda L=L, o=ours: L["attn"][o]["scale"]())
                        for ours, theirs in QK_NORMS.items()]
    entries.append(("model.norm.weight", (d,), lambda: src["final_norm"]["scale"]()))
    entries = [(name, shape, dtype, fn) for name, shape, fn in entries]

    shards, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    writer = jax.process_index() == 0
    out = Path(path)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        special = write_tokenizer_files(out, tokenizer, config.max_seq_len, config.family) if tokenizer else None
        (out / "config.json").write_text(json.dumps(hf_config(config, rows, special), indent=2))
        (out / GENERATION_CONFIG).write_text(json.dumps(generation_config(config, special), indent=2))
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        if writer:
            write_safetensors(out / fname, shard)
        else:  # other processes still take part in gathering sharded arrays
            for *_, produce in shard:
                produce()
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(e[1]) * dtype.itemsize for e in entries)},
                 "weight_map": {e[0]: fname for fname, shard in zip(names, shards) for e in shard}}
        (out / INDEX).write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- tokenizer files
# transformers builds its GemmaTokenizer from tokenizer.model, but takes everything else from
# these files: without them AutoTokenizer adds no BOS, has no chat template, and generate()
# runs past <end_of_turn>.

TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG = (
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Gemma's special pieces and ids (the released tokenizer.model), used when none is exported.
GEMMA_SPECIAL = {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>"),
                 "start_of_turn": (106, START_OF_TURN), "end_of_turn": (107, END_OF_TURN)}
# Gemma 3's 262144-piece tokenizer moved the turn markers one id down.
GEMMA3_SPECIAL = {**GEMMA_SPECIAL, "start_of_turn": (105, START_OF_TURN), "end_of_turn": (106, END_OF_TURN)}
GEMMA3_VOCABS = (262144, 262208)  # the tokenizer; the multimodal checkpoints' embedding rows


def default_special(config: ModelConfig) -> dict:
    """Gemma's special ids for a model of this family, used when no tokenizer is exported."""
    return GEMMA3_SPECIAL if config.family == "gemma3" else GEMMA_SPECIAL


def _piece_types(sp, model_file) -> dict[int, str]:
    """{id: 'control' | 'unknown' | 'user_defined'} of the pieces a tokenizer treats atomically."""
    out = {i: "control" for i in range(sp.vocab_size()) if sp.is_control(i)}
    out.update({i: "unknown" for i in range(sp.vocab_size()) if sp.is_unknown(i)})
    try:
        from sentencepiece import sentencepiece_model_pb2  # protobuf: installed with orbax and grain
    except ImportError:
        return out
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    out.update({i: "user_defined" for i, p in enumerate(proto.pieces) if p.type == user_defined})
    return out


def special_tokens(model_file, name=None) -> dict:
    """Gemma's special pieces of a SentencePiece model: {name: (id, piece)} for pad/eos/bos/unk
    (and start_of_turn/end_of_turn/mask where the vocabulary has them), plus every piece it
    never splits ('atomic': {id: (piece, special)})."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer {name or model_file} is not a SentencePiece model ({e}); the Hugging Face "
                         "export needs Gemma's tokenizer.model") from None
    found = {}
    for name, i in (("pad", sp.pad_id()), ("eos", sp.eos_id()), ("bos", sp.bos_id()), ("unk", sp.unk_id())):
        if i >= 0:
            found[name] = (i, sp.id_to_piece(i))
    for name, piece in (("start_of_turn", START_OF_TURN), ("end_of_turn", END_OF_TURN), ("mask", "<mask>")):
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) == piece:
            found[name] = (i, piece)
    named = {i for i, _ in found.values()}
    found["atomic"] = {i: (sp.id_to_piece(i), kind != "user_defined" or i in named)
                       for i, kind in sorted(_piece_types(sp, model_file).items())}
    return found


def write_tokenizer_files(out: Path, tokenizer, max_length: int, family: str = "gemma2") -> dict | None:
    """Copies `tokenizer` (a tokenizer.model) into `out` and writes tokenizer_config.json and
    special_tokens_map.json beside it; returns special_tokens() of it (None, with a warning,
    if it is not a SentencePiece model)."""
    paths.copy_file(tokenizer, out / "tokenizer.model")
    try:
        special = special_tokens(out / "tokenizer.model", name=tokenizer)
    except ValueError as e:  # the weights are still worth having; transformers just lacks a tokenizer
        logging.warning("%s; the export has tokenizer.model but no tokenizer_config.json", e)
        return None
    token = {k: special[k][1] if k in special else None for k in ("bos", "eos", "pad", "unk", "mask")}
    extra = [special[k][1] for k in ("start_of_turn", "end_of_turn") if k in special]
    decoder = {str(i): {"content": piece, "lstrip": False, "normalized": not is_special and "\u2581" in piece,
                        "rstrip": False, "single_word": False, "special": is_special}
               for i, (piece, is_special) in special["atomic"].items()}
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True, "add_eos_token": False,  # as gemma_jax.Tokenizer.encode
        **{f"{k}_token": v for k, v in token.items()},
        "additional_special_tokens": extra,
        "added_tokens_decoder": decoder,
        # Decoding must give back the text exactly (no " ." -> "." clean-up, no spaces inserted).
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": max_length, "padding_side": "left",
        "chat_template": CHAT_TEMPLATE_GEMMA3 if family == "gemma3" else CHAT_TEMPLATE,
    }
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    tokens_map = {f"{k}_token": v for k, v in token.items() if v is not None}
    tokens_map["additional_special_tokens"] = extra
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(tokens_map, indent=2, ensure_ascii=False))
    return special


def generation_config(config: ModelConfig, special: dict | None) -> dict:
    """generation_config.json: generation stops at EOS or <end_of_turn>, as gemma_jax.generate."""
    if special is None:
        # No tokenizer exported: Gemma's ids if the vocabulary is Gemma's, else only EOS/BOS/PAD.
        gemma = config.vocab_size in (HF_VOCAB, OFFICIAL_VOCAB, *GEMMA3_VOCABS)
        special = {k: v for k, v in default_special(config).items() if gemma or v[0] < 4}
    stop = [special[k][0] for k in ("eos", "end_of_turn") if k in special]
    return {"bos_token_id": special.get("bos", (None,))[0], "eos_token_id": stop,
            "pad_token_id": special.get("pad", (None,))[0]}

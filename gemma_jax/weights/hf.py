"""Hugging Face Gemma 2 / 3 / 4 safetensors directories, read and written without torch.

Read: `Gemma2ForCausalLM` (model_type gemma2), `Gemma3ForCausalLM` (gemma3_text),
`Gemma4ForCausalLM` (gemma4_text) and the text model of `Gemma3ForConditionalGeneration` /
`Gemma4ForConditionalGeneration` (gemma3 / gemma4: text_config, weights under
model.language_model.* or language_model.model.*; the vision and audio towers are skipped).
Written: Gemma2ForCausalLM, or Gemma3ForCausalLM / Gemma4ForCausalLM for a config of family
gemma3 / gemma4.

Safetensors is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw row-major tensor bytes. Reading parses the header and memory-maps
each tensor, so BF16 works through ml_dtypes and a sharded load touches only the slices each
device needs. Writing streams one tensor at a time (the header is computed from the config
first), so exporting never holds more than one tensor on the host.

The tensor names and the tree surgery of each family are in hf_tensors.py.
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
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import CHAT_TEMPLATE, TURN_MARKERS, chat_template
from gemma_jax.weights import hf_tensors, layout
# The config.json side, re-exported here where callers have always found it.
from gemma_jax.weights.hf_config import (GEMMA2_DEFAULTS, GEMMA3_DEFAULTS, GEMMA3_SPECIAL, GEMMA3_VOCABS,  # noqa: F401
                                         GEMMA4_SPECIAL, GEMMA_SPECIAL, MODEL_TYPES, check_exportable, default_special,
                                         gemma4_config, hf_config, layer_pattern, rope_fields, text_config)
from gemma_jax.weights.hf_tensors import NORMS, QK_NORMS  # noqa: F401

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
          "BOOL": np.dtype(np.bool_)}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HF_VOCAB, OFFICIAL_VOCAB = 256000, 256128


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
_VISION_PARTS = ("vision_tower", "multi_modal_projector", "embed_vision", "audio_tower", "embed_audio")


def config_from_hf(hf: dict, ck: HFCheckpoint, prefix: str) -> ModelConfig:
    """ModelConfig of a Gemma 2 / 3 / 4 config.json (text_config of a multimodal one), checked
    against the shapes of the stored weights."""
    where = f"{ck.dir / 'config.json'}"
    text, family = text_config(hf, where)
    if family == "gemma4":
        return _gemma4_from_hf(text, hf, ck, prefix, where)
    defaults = GEMMA3_DEFAULTS if family == "gemma3" else GEMMA2_DEFAULTS
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
    pattern = layer_pattern(list(layer_types), family, where)

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
        **rope_fields(text, family, where), family=family, attention_pattern=pattern, qk_norm=qk_norm,
        norm_eps=float(_get(text, "rms_norm_eps", 1e-6)),
        max_seq_len=_get(text, "max_position_embeddings", defaults["max_position_embeddings"]),
        param_dtype=layout.dtype_name(ck.dtype(emb_key)))


def _gemma4_from_hf(text: dict, hf: dict, ck: HFCheckpoint, prefix: str, where: str) -> ModelConfig:
    """ModelConfig of a Gemma 4 text config, its shapes checked against every stored tensor."""
    act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{where}: hidden_activation={act!r}; Gemma uses gelu_pytorch_tanh")
    if text.get("tie_word_embeddings", hf.get("tie_word_embeddings")) is False:
        raise ValueError(f"{where}: tie_word_embeddings=false; untied output embeddings are not supported")
    emb_key = f"{prefix}embed_tokens.weight"
    rows, cols = ck.shape(emb_key)
    fields = gemma4_config(text, where)
    n_layers = fields["num_layers"]
    found = sorted({int(m.group(1)) for key in ck.where if (m := re.match(rf"^{re.escape(prefix)}layers\.(\d+)\.", key))})
    if found != list(range(n_layers)):
        shown = f"layers {found[0]}..{found[-1]}" if found else "no layers"
        raise ValueError(f"config/weights disagree: {where} says num_hidden_layers={n_layers} but the "
                         f"weights have {len(found)} layers ({shown})")
    if cols != fields["embed_dim"]:
        raise ValueError(f"config/weights disagree: hidden_size={fields['embed_dim']} in {where} but {emb_key} has "
                         f"shape {(rows, cols)}")
    vocab = int(text.get("vocab_size") or 262144)
    if rows != vocab:
        raise ValueError(f"config/weights disagree: vocab_size={vocab} in {where} but {emb_key} has {rows} rows")
    if fields["per_layer_vocab"] == rows:
        fields["per_layer_vocab"] = 0  # as the presets say it: the token table's rows
    try:
        config = ModelConfig(**fields, vocab_size=rows, param_dtype=layout.dtype_name(ck.dtype(emb_key)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None

    def check(name, shape):  # every tensor the model reads, its shape as the config implies
        found = ck.shape(name)
        if tuple(found) != tuple(shape):
            raise ValueError(f"config/weights disagree: {where} implies shape {tuple(shape)} for {name}, "
                             f"which has {tuple(found)}")
        return _Shape(shape)

    hf_tensors.read_embedder(config, lambda n, s: check(prefix + n, s), rows)
    for i in range(n_layers):
        hf_tensors.read_layer(config, i, lambda n, s, i=i: check(f"{prefix}layers.{i}.{n}", s))
    return config


class _Shape:
    """Stands in for a tensor while only shapes are checked (reshape / transpose / T follow numpy)."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape):
        self.shape = tuple(shape)

    def reshape(self, *shape):
        return _Shape(shape)

    def transpose(self, *axes):
        return _Shape(tuple(self.shape[a] for a in axes))

    @property
    def T(self):  # noqa: N802
        return _Shape(self.shape[::-1])


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
    """(config, unrolled tree of lazy memory-mapped views) of a HF Gemma 2 / 3 / 4 directory."""
    ck = HFCheckpoint(directory)
    prefix = text_prefix(ck)
    c = config_from_hf(ck.config, ck, prefix)
    unrolled = {"embedder": hf_tensors.read_embedder(c, lambda name, shape: ck.tensor(prefix + name, shape),
                                                     c.vocab_size),
                "final_norm": {"scale": ck.tensor(f"{prefix}norm.weight", (c.embed_dim,))}}
    for i in range(c.num_layers):
        unrolled[f"layer_{i}"] = hf_tensors.read_layer(
            c, i, lambda name, shape, i=i: ck.tensor(f"{prefix}layers.{i}.{name}", shape))
    return c, unrolled


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
    Gemma2ForCausalLM (Gemma3ForCausalLM / Gemma4ForCausalLM for families gemma3 / gemma4); with `tokenizer` (a tokenizer.model)
    also the transformers tokenizer files."""
    import jax

    dtype = np.dtype(layout.dtype_name(dtype) or config.param_dtype)
    config = config.replace(param_dtype=dtype.name)
    check_exportable(config)
    src = layout.unrolled_view(config, params, dtype=dtype, host=True)
    d, v = config.embed_dim, config.vocab_size
    # HF Gemma 2 has exactly the tokenizer's 256000 rows; the official files pad to 256128 so the
    # table shards evenly on TPUs. The padding rows are never produced by the tokenizer, so
    # dropping them leaves every real token's logit unchanged.
    rows = HF_VOCAB if v == OFFICIAL_VOCAB else v
    entries = [("model." + name, shape, fn) for name, shape, fn in hf_tensors.write_embedder(config, src["embedder"], rows)]
    entries = entries[:1]  # the token table first, as before; the per-layer tables after the layers
    for i in range(config.num_layers):
        entries += [(f"model.layers.{i}.{name}", shape, fn)
                    for name, shape, fn in hf_tensors.write_layer(config, i, src[f"layer_{i}"])]
    entries += [("model." + name, shape, fn) for name, shape, fn in
                hf_tensors.write_embedder(config, src["embedder"], rows)[1:]]
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
    # Gemma 2/3's turn markers, else Gemma 4's (<|turn>, <turn|>).
    markers = next((m for m in TURN_MARKERS if all(sp.id_to_piece(sp.piece_to_id(p)) == p for p in m)), TURN_MARKERS[0])
    for name, piece in (("start_of_turn", markers[0]), ("end_of_turn", markers[1]), ("mask", "<mask>")):
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
    markers = (special["start_of_turn"][1], special["end_of_turn"][1]) if (
        "start_of_turn" in special and "end_of_turn" in special) else TURN_MARKERS[0]
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
        # Gemma 3 and 4 also take content as a list of text parts; the markers are the tokenizer's.
        "chat_template": CHAT_TEMPLATE if family == "gemma2" else chat_template(*markers),
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

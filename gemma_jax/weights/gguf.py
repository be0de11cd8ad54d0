"""GGUF files (llama.cpp, Ollama, LM Studio) of Gemma 2 and Gemma 3, read and written through `gguf`.

Reading: `read(path)` gives the ModelConfig (from the `{arch}.*` metadata) and the unrolled tree
of layout.py, whose leaves are lazy views: each dequantises (gguf.quants.dequantize, every type
the package handles) only the stored rows a device's slice needs, so a load never holds more than
one tensor's worth of float32 beside the result. Writing: `write(dir, ...)` streams one tensor at
a time into `model.gguf` (float32, float16, bfloat16 or q8_0) with the full tokenizer and the chat
template, named and laid out as llama.cpp's converter does, so llama.cpp and transformers
(`gguf_file=`) load it.

llama.cpp's tensors are torch Linear weights [out, in] (numpy order; GGUF lists dims reversed):
  attn_q (N*H, D), attn_k / attn_v (K*H, D) -> q_einsum (N,D,H), kv_einsum (2,K,D,H)
  attn_output (D, N*H)                       -> attn_vec_einsum (N,H,D)
  ffn_gate / ffn_up (F, D), ffn_down (D, F)  -> gating_einsum (2,F,D), linear (F,D)
  token_embd (V, D); no output.weight (tied). No Q/K row permutation (that is llama's only).
Every RMSNorm weight (and Gemma 3's attn_q_norm / attn_k_norm) is stored as 1 + w; we keep w.

What a GGUF does not store is assumed as llama.cpp assumes it (see ASSUMED); `{arch}.attention.scale`
(which we write) overrides the query scale, and `{arch}.attention.sliding_window_pattern` /
`rope.freq_base_swa` the Gemma 3 layer pattern and local RoPE base.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from absl import logging

from gemma_jax import gguf_file
from gemma_jax.errors import UserError
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import CHAT_TEMPLATE, CHAT_TEMPLATE_GEMMA3, END_OF_TURN, Tokenizer, gguf_in
from gemma_jax.weights import layout

ARCHITECTURES = ("gemma2", "gemma3")
FILE_NAME = "model.gguf"
DTYPES = ("float32", "float16", "bfloat16", "q8_0")
# Our layer norm names -> llama.cpp's (blk.N.<name>.weight).
NORMS = {"pre_attention_norm": "attn_norm", "post_attention_norm": "post_attention_norm",
         "pre_ffw_norm": "ffn_norm", "post_ffw_norm": "post_ffw_norm"}
QK_NORMS = {"query_norm": "attn_q_norm", "key_norm": "attn_k_norm"}
# What llama.cpp (llama-model.cpp) assumes for fields a GGUF does not store; documented in docs.
ASSUMED = {
    "gemma2": dict(sliding_window=4096, attn_softcap=50.0, final_softcap=30.0, rope_base=10000.0),
    "gemma3": dict(local_rope_base=10000.0, rope_base=1000000.0, pattern_period=6),
}
# The 27B sizes scale queries by (embed_dim / num_heads)^-0.5; every other size by head_dim^-0.5.
QUERY_SCALE_BY_WIDTH = {"gemma2": 46, "gemma3": 62}  # block_count of the 27B model


def find_file(path) -> Path:
    """The .gguf of `path`: the file itself, or the one .gguf a directory holds."""
    p = Path(path)
    found = gguf_in(p) if p.is_file() else None
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) != 1:
            raise UserError(f"{p} holds {len(files)} .gguf files {[f.name for f in files]}; pass the file itself")
        found = files[0]
    if found is None:
        raise UserError(f"{p} is not a GGUF file")
    return Path(found)


# ----------------------------------------------------------------------------- reading


class Dequantized:
    """A float32 view of one GGUF tensor, reshaped and transposed, read lazily.

    The stored tensor is (R, C) (numpy order; quantisation blocks run along C). The view splits
    R into `rows` and C into `cols`, moves axes by `perm` and subtracts `shift`; indexing it
    dequantises only the stored rows the index touches.
    """

    def __init__(self, gguf, tensor, rows: tuple[int, ...], cols: tuple[int, ...],
                 perm: tuple[int, ...] | None = None, shift: float = 0.0):
        self._gguf, self._tensor = gguf, tensor
        self.rows, self.cols, self.shift = tuple(rows), tuple(cols), shift
        self.perm = tuple(perm) if perm is not None else tuple(range(len(rows) + len(cols)))
        base = self.rows + self.cols
        self.shape = tuple(base[a] for a in self.perm)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(self.shape) - len(index) + 1) + index[at + 1:]
        index = index + (slice(None),) * (len(self.shape) - len(index))
        squeeze = [a for a, i in enumerate(index) if not isinstance(i, slice)]
        index = [slice(i, i + 1 if i != -1 else None) if a in squeeze else i for a, i in enumerate(index)]
        base = [slice(None)] * len(self.shape)
        for out_axis, base_axis in enumerate(self.perm):
            base[base_axis] = index[out_axis]
        nr = len(self.rows)
        row_ids = np.arange(math.prod(self.rows)).reshape(self.rows)[tuple(base[:nr])]
        data = self._tensor.data
        data = data.reshape(math.prod(self.rows), -1) if nr else data.reshape(1, -1)
        if nr and not np.array_equal(row_ids.ravel(), np.arange(data.shape[0])):
            data = data[row_ids.ravel()]
        x = self._gguf.quants.dequantize(np.asarray(data), self._tensor.tensor_type)
        x = x.reshape(row_ids.shape + self.cols)[(slice(None),) * nr + tuple(base[nr:])]
        x = x.transpose(self.perm).astype(np.float32, copy=False)
        if self.shift:
            x = x - np.float32(self.shift)
        return x.reshape([n for a, n in enumerate(x.shape) if a not in squeeze])

    def __array__(self, dtype=None, copy=None):
        out = self[()]
        return out if dtype is None else out.astype(dtype)


def _pattern_from_metadata(value, num_layers: int, where: str) -> tuple[str, ...]:
    """The repeating local/global cycle of `{arch}.attention.sliding_window_pattern`.

    llama.cpp stores either a period n (layers i with i % n < n - 1 slide) or one bool per layer
    (true = sliding window)."""
    if isinstance(value, list):
        if len(value) != num_layers:
            raise UserError(f"{where}: sliding_window_pattern has {len(value)} entries for {num_layers} layers")
        layers = ["local" if v else "global" for v in value]
        for period in range(1, num_layers + 1):
            if all(layers[i] == layers[i % period] for i in range(num_layers)):
                return tuple(layers[:period])
    period = int(value)
    if period < 1:
        raise UserError(f"{where}: sliding_window_pattern={period} must be >= 1")
    return ("local",) * (period - 1) + ("global",)


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _query_scalar(reader, arch: str, layers: int, embed: int, heads: int, head_dim: int) -> float:
    scale = gguf_file.field(reader, f"{arch}.attention.scale", None)
    if scale:
        scalar = 1.0 / float(scale) ** 2
        return float(round(scalar)) if abs(scalar - round(scalar)) < 1e-3 * scalar else scalar
    return float(embed // heads) if layers == QUERY_SCALE_BY_WIDTH[arch] else float(head_dim)


def _model_config(fields: dict, where: str) -> ModelConfig:
    """ModelConfig(**fields); a Gemma 3 file on a build without Gemma 3 fields is a clear error."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = sorted(set(fields) - known)
    if missing:
        raise UserError(f"{where}: a {fields.get('family', 'gemma2')} model needs ModelConfig fields {missing}, "
                        "which this gemma_jax does not have")
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise UserError(f"{where}: its metadata gives an invalid model ({e})") from None


def config_from_metadata(reader, path) -> ModelConfig:
    """The ModelConfig a Gemma 2 / Gemma 3 GGUF describes, checked against its token_embd."""
    arch = gguf_file.field(reader, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not Gemma; gemma_jax reads 'gemma2' and "
                        "'gemma3' files")
    key = lambda name, default=None: gguf_file.field(reader, f"{arch}.{name}", default)  # noqa: E731
    need = {name: key(name) for name in ("block_count", "embedding_length", "feed_forward_length",
                                          "attention.head_count")}
    absent = [f"{arch}.{k}" for k, v in need.items() if v is None]
    if absent:
        raise UserError(f"{path}: metadata {', '.join(absent)} missing; not a complete {arch} GGUF")
    layers, d, f, n = (int(need[k]) for k in need)
    k = int(key("attention.head_count_kv", n))
    h = int(key("attention.key_length", d // n))
    if int(key("attention.value_length", h)) != h:
        raise UserError(f"{path}: attention.value_length={key('attention.value_length')} differs from "
                        f"key_length={h}; Gemma uses one head_dim")
    embed = _tensors(reader).get("token_embd.weight")
    if embed is None:
        raise UserError(f"{path}: no token_embd.weight tensor")
    vocab = int(embed.shape[1]) if len(embed.shape) == 2 else 0
    if len(embed.shape) != 2 or int(embed.shape[0]) != d:
        raise UserError(f"{path}: token_embd.weight has GGUF shape {list(map(int, embed.shape))}, expected "
                        f"[{d}, vocab] for embedding_length {d}")
    assumed = ASSUMED[arch]
    fields = dict(num_layers=layers, embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k, head_dim=h,
                  vocab_size=vocab, norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
                  max_seq_len=int(key("context_length", 8192)),
                  query_pre_attn_scalar=_query_scalar(reader, arch, layers, d, n, h))
    window = key("attention.sliding_window", assumed.get("sliding_window"))
    if window is None:
        raise UserError(f"{path}: metadata {arch}.attention.sliding_window missing")
    fields["sliding_window"] = int(window)
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"{path}: rope.scaling.type={scaling!r}; Gemma uses only linear RoPE scaling")
    if arch == "gemma2":
        fields.update(attn_softcap=_f32(key("attn_logit_softcapping", assumed["attn_softcap"])),
                      final_softcap=_f32(key("final_logit_softcapping", assumed["final_softcap"])),
                      rope_base=_f32(key("rope.freq_base", assumed["rope_base"])))
        if scaling == "linear" and float(key("rope.scaling.factor", 1.0)) != 1.0:
            raise UserError(f"{path}: a gemma2 file with RoPE scaling {key('rope.scaling.factor')}; Gemma 2 has none")
        # Gemma 2 uses one base on every layer; freq_base_swa only where we wrote a different one.
        fields["local_rope_base"] = _f32(key("rope.freq_base_swa", fields["rope_base"]))
    else:
        pattern = key("attention.sliding_window_pattern", assumed["pattern_period"])
        fields.update(family="gemma3", qk_norm=True,
                      attention_pattern=_pattern_from_metadata(pattern, layers, str(path)),
                      # llama.cpp's and transformers' Gemma 3 apply no attention cap, whatever the file says.
                      attn_softcap=0.0, final_softcap=_f32(key("final_logit_softcapping", 0.0) or 0.0),
                      rope_base=_f32(key("rope.freq_base", assumed["rope_base"])),
                      local_rope_base=_f32(key("rope.freq_base_swa", assumed["local_rope_base"])),
                      rope_scale=_f32(key("rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0)
    fields["param_dtype"] = _param_dtype(reader)
    return _model_config(fields, str(path))


def _tensors(reader) -> dict:
    if not hasattr(reader, "_gemma_jax_tensors"):
        reader._gemma_jax_tensors = {t.name: t for t in reader.tensors}
    return reader._gemma_jax_tensors


def _param_dtype(reader) -> str:
    """float16 / bfloat16 when every matrix is stored so, else float32 (quantised types dequantise
    exactly into float32)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(kinds), "float32")


def _check_dequantisable(gguf, tensor, path) -> None:
    """Every tensor type gguf.quants.dequantize handles is read; any other is named."""
    try:
        gguf.quants.dequantize(np.asarray(tensor.data.reshape(-1, tensor.data.shape[-1])[:1]), tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                        f"package {getattr(gguf, '__version__', '')} cannot dequantise; re-quantise the file "
                        "(llama-quantize) to Q8_0, Q4_K, F16 or another supported type") from None


def read(path) -> tuple[ModelConfig, dict]:
    """(config, unrolled tree of lazily dequantised views) of a Gemma 2 / Gemma 3 GGUF file."""
    gguf = gguf_file.require_gguf()
    reader = gguf_file.open_reader(path)
    c = config_from_metadata(reader, path)
    tensors = _tensors(reader)
    d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
    qk_norm = bool(getattr(c, "qk_norm", False))
    if "output.weight" in tensors:
        raise UserError(f"{path}: has an untied output.weight; Gemma ties the output projection to token_embd")
    used = set()

    def view(name, shape, rows, cols, perm=None, shift=0.0):
        t = tensors.get(name)
        if t is None:
            raise UserError(f"{path}: tensor {name} missing (expected numpy shape {shape} for this {c.num_layers}-"
                            f"layer config)")
        stored = tuple(int(x) for x in reversed(t.shape.tolist()))
        if stored != tuple(shape):
            raise UserError(f"{path}: tensor {name} has shape {stored} (numpy order), expected {tuple(shape)} "
                            "from the metadata")
        _check_dequantisable(gguf, t, path)
        used.add(name)
        return Dequantized(gguf, t, rows, cols, perm, shift)

    unrolled = {"embedder": {"input_embedding": view("token_embd.weight", (c.vocab_size, d), (c.vocab_size,), (d,))},
                "final_norm": {"scale": view("output_norm.weight", (d,), (), (d,), shift=1.0)}}
    for i in range(c.num_layers):
        b = f"blk.{i}."
        heads_first = lambda name, heads: view(b + name, (heads * h, d), (heads, h), (d,), (0, 2, 1))  # noqa: E731
        attn = {"q_einsum": {"w": heads_first("attn_q.weight", n)},
                "kv_einsum": {"w": layout.Stacked([heads_first("attn_k.weight", k), heads_first("attn_v.weight", k)])},
                "attn_vec_einsum": {"w": view(b + "attn_output.weight", (d, n * h), (d,), (n, h), (1, 2, 0))}}
        if qk_norm:
            for ours, theirs in QK_NORMS.items():
                attn[ours] = {"scale": view(f"{b}{theirs}.weight", (h,), (), (h,), shift=1.0)}
        layer = {"attn": attn,
                 "mlp": {"gating_einsum": {"w": layout.Stacked([view(b + "ffn_gate.weight", (f, d), (f,), (d,)),
                                                                view(b + "ffn_up.weight", (f, d), (f,), (d,))])},
                         "linear": {"w": view(b + "ffn_down.weight", (d, f), (d,), (f,), (1, 0))}}}
        for ours, theirs in NORMS.items():
            layer[ours] = {"scale": view(f"{b}{theirs}.weight", (d,), (), (d,), shift=1.0)}
        unrolled[f"layer_{i}"] = layer
    extra = sorted(set(tensors) - used)
    if extra:
        logging.warning("%s: ignoring %d tensors gemma_jax's Gemma has no place for: %s", path, len(extra),
                        ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    logging.info("%s: %s GGUF, %d tensors (%s)", path, gguf_file.field(reader, "general.architecture"),
                 len(tensors), ", ".join(f"{kind} {count}" for kind, count in sorted(_type_counts(reader).items())))
    return c, unrolled


def _type_counts(reader) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ----------------------------------------------------------------------------- writing


def _qtype(gguf, dtype: str):
    q = gguf.GGMLQuantizationType
    return {"float32": q.F32, "float16": q.F16, "bfloat16": q.BF16, "q8_0": q.Q8_0}[dtype]


def _encode(gguf, x: np.ndarray, qtype) -> np.ndarray:
    """`x` (float32) as the bytes / values GGUF stores for `qtype`."""
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == q.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)


def _nbytes(gguf, shape, qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def tokenizer_metadata(tokenizer) -> dict:
    """llama.cpp's tokenizer.ggml.* values of a SentencePiece model (a tokenizer.model, a .gguf,
    or a Tokenizer): tokens, scores, types, special ids, flags."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model_file = tokenizer.path if isinstance(tokenizer, Tokenizer) else Tokenizer(os.fspath(tokenizer)).path
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
    # llama.cpp's convention (and the Gemma 3 GGUFs): user-defined pieces carry real spaces, and
    # transformers' Gemma GGUF converter maps whitespace-only ones back to "\u2581".
    tokens = [p.piece.replace("\u2581", " ") if p.type == user_defined else p.piece for p in proto.pieces]
    spec = proto.trainer_spec
    ids = {name: getattr(spec, f"{name}_id") for name in ("bos", "eos", "unk", "pad")}
    out = {"tokens": tokens, "scores": [float(p.score) for p in proto.pieces],
           "types": [int(p.type) for p in proto.pieces],
           "ids": {name: int(i) for name, i in ids.items() if 0 <= i < len(tokens)},
           "add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix)}
    if END_OF_TURN in tokens:
        out["ids"]["eot"] = tokens.index(END_OF_TURN)
    return out


def _add_metadata(w, gguf, config: ModelConfig, arch: str, vocab_rows: int, file_type: int, tok: dict | None) -> None:
    w.add_type("model")
    w.add_name(f"gemma_jax {arch}")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.embed_dim)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_base)
    w.add_sliding_window(config.sliding_window)
    w.add_vocab_size(vocab_rows)
    # Not read by llama.cpp for Gemma (it assumes head_dim, or D/N for 27B): makes our files exact.
    w.add_attention_scale(float(config.query_pre_attn_scalar) ** -0.5)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_softcap)
        w.add_final_logit_softcapping(config.final_softcap)
        if config.local_rope_base != config.rope_base:  # llama.cpp applies rope_base to every Gemma 2 layer
            w.add_rope_freq_base_swa(config.local_rope_base)
    else:
        w.add_rope_freq_base_swa(config.local_rope_base)
        if config.rope_scale != 1.0:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(config.rope_scale)
        pattern = tuple(config.attention_pattern)
        if pattern[-1] == "global" and all(p == "local" for p in pattern[:-1]):
            w.add_sliding_window_pattern(len(pattern))
        else:
            w.add_sliding_window_pattern([config.is_local(i) for i in range(config.num_layers)])
        if config.final_softcap:
            w.add_final_logit_softcapping(config.final_softcap)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tok is None:
        return
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_scores(tok["scores"])
    w.add_token_types(tok["types"])
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id), ("eot", w.add_eot_token_id)):
        if name in tok["ids"]:
            add(tok["ids"][name])
    w.add_add_bos_token(True)  # as gemma_jax.Tokenizer.encode and Gemma's training data
    w.add_add_eos_token(False)
    w.add_add_space_prefix(tok["add_space_prefix"])
    w.add_chat_template(CHAT_TEMPLATE_GEMMA3 if arch == "gemma3" else CHAT_TEMPLATE)  # as the HF export


def write(path, config: ModelConfig, params, *, dtype=None, tokenizer=None) -> None:
    """Writes `path`/model.gguf: the model in `dtype` (float32 | float16 | bfloat16 | q8_0; default
    the params' dtype), with `tokenizer` (tokenizer.model, .gguf or Tokenizer) and chat template."""
    import jax

    gguf = gguf_file.require_gguf()
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise UserError(f"GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    arch = getattr(config, "family", "gemma2")
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF export of a {arch} model: only {', '.join(ARCHITECTURES)} have a llama.cpp layout")
    pattern = tuple(getattr(config, "attention_pattern", ("local", "global")))
    if arch == "gemma2" and (pattern != ("local", "global") or getattr(config, "qk_norm", False)):
        raise UserError(f"GGUF export: a gemma2 config with attention_pattern {pattern} / qk_norm has no llama.cpp "
                        "layout (gemma2 files alternate local/global layers and have no QK-norm)")
    if arch == "gemma3" and config.attn_softcap:
        raise UserError(f"GGUF export: attn_softcap={config.attn_softcap} on a gemma3 model; llama.cpp's and "
                        "transformers' Gemma 3 apply no attention soft-cap, so the file would be another model")
    tok = tokenizer_metadata(tokenizer) if tokenizer else None
    v = config.vocab_size
    rows = len(tok["tokens"]) if tok else v
    if rows > v:
        raise UserError(f"tokenizer {tokenizer} has {rows} pieces but the model only {v} embedding rows")
    if tok is None:
        logging.warning("GGUF export without a tokenizer: llama.cpp and transformers need one to load it")
    # llama.cpp wants exactly one embedding row per token: the padding rows (Gemma 2's official
    # 256128) are never produced by the tokenizer, so dropping them changes no real token's logit.
    src = layout.unrolled_view(config, params, dtype=np.float32, host=True)
    d, f, n, k, h = config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim
    entries = [("token_embd.weight", (rows, d), lambda: src["embedder"]["input_embedding"]()[:rows])]
    for i in range(config.num_layers):
        L, b = src[f"layer_{i}"], f"blk.{i}."
        entries += [
            (b + "attn_q.weight", (n * h, d),
             lambda L=L: L["attn"]["q_einsum"]["w"]().transpose(0, 2, 1).reshape(-1, d)),
            (b + "attn_k.weight", (k * h, d),
             lambda L=L: L["attn"]["kv_einsum"]["w"]()[0].transpose(0, 2, 1).reshape(-1, d)),
            (b + "attn_v.weight", (k * h, d),
             lambda L=L: L["attn"]["kv_einsum"]["w"]()[1].transpose(0, 2, 1).reshape(-1, d)),
            (b + "attn_output.weight", (d, n * h),
             lambda L=L: L["attn"]["attn_vec_einsum"]["w"]().transpose(2, 0, 1).reshape(d, -1)),
            (b + "ffn_gate.weight", (f, d), lambda L=L: L["mlp"]["gating_einsum"]["w"]()[0]),
            (b + "ffn_up.weight", (f, d), lambda L=L: L["mlp"]["gating_einsum"]["w"]()[1]),
            (b + "ffn_down.weight", (d, f), lambda L=L: L["mlp"]["linear"]["w"]().T),
        ]
        if getattr(config, "qk_norm", False):
            entries += [(f"{b}{theirs}.weight", (h,), lambda L=L, o=ours: L["attn"][o]["scale"]() + 1.0)
                        for ours, theirs in QK_NORMS.items()]
        entries += [(f"{b}{theirs}.weight", (d,), lambda L=L, o=ours: L[o]["scale"]() + 1.0)
                    for ours, theirs in NORMS.items()]
    entries.append(("output_norm.weight", (d,), lambda: src["final_norm"]["scale"]() + 1.0))

    q = gguf.GGMLQuantizationType
    wanted = _qtype(gguf, dtype)
    plan = []
    for name, shape, produce in entries:
        # 1-D tensors stay F32, and rows that do not fill whole Q8_0 blocks fall back to F16, as in
        # llama.cpp's converter.
        qtype = q.F32 if len(shape) == 1 else wanted
        if qtype == q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
            logging.info("%s: rows of %d values are not whole Q8_0 blocks; stored as F16", name, shape[-1])
            qtype = q.F16
        plan.append((name, shape, qtype, produce))
    file_type = {q.F32: gguf.LlamaFileType.ALL_F32, q.F16: gguf.LlamaFileType.MOSTLY_F16,
                 q.BF16: gguf.LlamaFileType.MOSTLY_BF16, q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[wanted]

    writer = jax.process_index() == 0
    if not writer:  # other processes still take part in gathering sharded arrays
        for *_, produce in plan:
            produce()
        return
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out / FILE_NAME), arch)
    _add_metadata(w, gguf, config, arch, rows, int(file_type), tok)
    for name, shape, qtype, _ in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(gguf, shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for name, shape, qtype, produce in plan:
            x = np.asarray(produce(), dtype=np.float32)
            if x.shape != tuple(shape):
                raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, got {x.shape}")
            w.write_tensor_data(_encode(gguf, x, qtype))
    finally:
        w.close()

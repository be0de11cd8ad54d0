"""GGUF in and out (gemma_jax.weights.gguf, Tokenizer("x.gguf")), checked against the gguf package
and transformers' GGUF loader, on random small Gemma 2 models and on the real Gemma 3 270M file.

References are built without our GGUF code: random models come from transformers
(helpers.make_hf_model), hand-written files from gguf.GGUFWriter with the tensors' expected
values computed here by gguf.quants and the llama.cpp layout (stated below, independently of
weights/gguf.py), and transformers reads every GGUF we write.
"""

from __future__ import annotations

import random
import types
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest

import gemma_jax
import helpers
from gemma_jax import convert, gguf_file, weights
from gemma_jax.errors import UserError
from gemma_jax.model import ModelConfig
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

Q = gguf.GGMLQuantizationType
WORDS = ("the court shall decide whether a contract clause holds; party user model agreement "
         "hereby café naïve 日本語 🙂 (a) [b] 3.14 it's e-mail").split()
# Ordinary text for the small tokenizer (<bos>/<eos>/<pad>/<unk> as text: SentencePiece spells them
# out, transformers reads the special id; the one documented difference).
TEXTS = ["the court shall decide", "  two leading spaces\n\nand blank lines\t tab", "café naïve 日本語 🙂 ẞ",
         "numbers 1234567 and 3.14", "<start_of_turn>user\nhi<end_of_turn>\n", "", "model\n", "a  b   c",
         "zz qq xx unseen ✓ ☃"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Define tort."},
        {"role": "assistant", "content": " A civil wrong.\n"}, {"role": "user", "content": "Thanks  🙂"}]


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + rng.choice([".", "\n", "\n\n", " 42"])
            for _ in range(n)]


def leaves(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v, np.float32) for k, v in weights.layout.flatten(params).items()}


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random 3-layer Gemma 2 (query scalar 256 and caps 50/30: what transformers assumes for a
    gemma2 GGUF) with a real SentencePiece tokenizer, and its float32 and q8_0 GGUF saves."""
    root = tmp_path_factory.mktemp("gguf_small")
    spm = train_sentencepiece(corpus(), str(root / "spm" / "tokenizer.model"), vocab_size=400)
    tok = Tokenizer(spm)
    config = ModelConfig(num_layers=3, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                         query_pre_attn_scalar=256, vocab_size=tok.vocab_size, sliding_window=8)
    helpers.make_hf_model(config, root / "hf", scale=2.0, seed=1)
    cfg, params = weights.load(root / "hf")
    saved = {dt: weights.save(root / dt, cfg, params, format="gguf", dtype=dt, tokenizer=spm)
             for dt in ("float32", "q8_0")}
    return types.SimpleNamespace(root=root, spm=spm, tok=tok, cfg=cfg, params=params, saved=saved)


# ----------------------------------------------------------------------------- our files, read back


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "q8_0"])
def test_round_trip_in_each_dtype(small, tmp_path, dtype):
    # Every field a GGUF carries, away from its default (query scale through attention.scale).
    cfg = small.cfg.replace(query_pre_attn_scalar=24.0, rope_base=20000.0, local_rope_base=20000.0, sliding_window=12,
                            attn_softcap=40.0, final_softcap=20.0, max_seq_len=1000, norm_eps=1e-5)
    out = weights.save(tmp_path / "m", cfg, small.params, format="gguf", dtype=dtype, tokenizer=small.spm)
    assert sorted(p.name for p in Path(out).iterdir()) == ["model.gguf"]
    stored = tensor_types(Path(out) / "model.gguf")
    want = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert {t for name, t in stored.items() if "norm" not in name} == {want}
    assert {t for name, t in stored.items() if "norm" in name} == {"F32"}  # 1-D tensors stay F32, as llama.cpp
    assert "output.weight" not in stored and len(stored) == 2 + 11 * cfg.num_layers

    loaded_cfg, loaded = weights.load(out)
    expect_dtype = {"q8_0": "float32"}.get(dtype, dtype)
    assert loaded_cfg == cfg.replace(param_dtype=expect_dtype)
    got, orig = leaves(loaded), leaves(small.params)
    assert got.keys() == orig.keys()
    half = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype, np.float32)  # the loaded params' dtype
    for k, w in orig.items():
        if "norm" in k:  # stored as 1 + w in float32
            np.testing.assert_array_equal(got[k], ((w + np.float32(1)) - np.float32(1)).astype(half), err_msg=k)
        elif dtype in ("float32", "float16", "bfloat16"):
            np.testing.assert_array_equal(got[k], w.astype(half).astype(np.float32), err_msg=k)
        else:  # 8-bit blocks: error at most half a step of the block's scale (max|x| / 127), plus its f16 rounding
            assert np.abs(got[k] - w).max() <= 0.6 * np.abs(w).max() / 127, k
            assert not np.array_equal(got[k], w), k


def test_transformers_loads_our_gguf_with_equal_logits(small):
    transformers = pytest.importorskip("transformers")
    import torch

    tokens = np.array([small.tok.encode(" ".join(corpus(3, seed=5)))[:24]])  # past the window of 8
    assert tokens.shape[1] == 24
    for dtype, path in small.saved.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        assert type(hf).__name__ == "Gemma2ForCausalLM"
        cfg, params = weights.load(path)
        ours = np.asarray(gemma_jax.logits(cfg, params, tokens))
        theirs = helpers.hf_logits(hf, tokens)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 1e-4, dtype
    # The float32 file is the model itself: its logits are those of the weights we saved.
    np.testing.assert_allclose(np.asarray(gemma_jax.logits(small.cfg, small.params, tokens)),
                               np.asarray(gemma_jax.logits(*weights.load(small.saved["float32"]), tokens)), atol=1e-5)


def test_transformers_tokenizer_and_chat_template_of_our_gguf(small):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(small.saved["float32"], gguf_file="model.gguf")
    for text in TEXTS + corpus(40, seed=9):
        assert hf(text)["input_ids"] == small.tok.encode(text), repr(text)
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        small.tok.format_chat(CHAT, add_generation_prompt=True)
    assert hf.convert_tokens_to_ids("<end_of_turn>") == small.tok.end_of_turn_id
    # ... and our own Tokenizer of the file encodes as the tokenizer.model it came from.
    from_file = Tokenizer(str(Path(small.saved["q8_0"]) / "model.gguf"))
    assert Tokenizer(small.saved["q8_0"]).path == from_file.path  # a directory holding one .gguf
    assert (from_file.bos_id, from_file.eos_id, from_file.pad_id, from_file.start_of_turn_id) == \
        (small.tok.bos_id, small.tok.eos_id, small.tok.pad_id, small.tok.start_of_turn_id)
    for text in TEXTS:
        assert from_file.encode(text) == small.tok.encode(text), repr(text)
        assert from_file.decode(from_file.encode(text)) == text


# ----------------------------------------------------------------------------- files written by gguf itself

# llama.cpp's Gemma layout, numpy order (see the environment notes): q = attn_q viewed (N, H, D)
# with D moved to the middle; attn_vec = attn_output viewed (D, N, H) with D moved last; gating =
# [ffn_gate, ffn_up]; linear = ffn_down transposed; every norm stored as 1 + w.
D, F, N, K, H, V, LAYERS = 256, 256, 2, 1, 256, 48, 2
# Where each K-quant block keeps its float16 scales (gguf.quants' block layouts).
_F16_FIELDS = {Q.Q2_K: [(-4, -2), (-2, None)], Q.Q3_K: [(-2, None)], Q.Q4_K: [(0, 2), (2, 4)],
               Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(-2, None)]}


def _stored(rng, qtype, rows, cols):
    """(bytes or values as GGUF stores them, float32 values gguf dequantises them to)."""
    x = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
    if qtype in _F16_FIELDS:  # gguf cannot quantise K-types: random blocks with sane scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for a, b in _F16_FIELDS[qtype]:
            raw[..., a:b] = rng.uniform(0.0005, 0.002, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(x, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(rows, cols)


def write_gguf(path, arch, tensors, **meta):
    """A GGUF written with gguf.GGUFWriter: `tensors` [(name, stored array, type)], metadata {key: value}."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)](key.format(arch=arch), value)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _gemma2_meta(**extra):
    return {"{arch}.block_count": LAYERS, "{arch}.embedding_length": D, "{arch}.feed_forward_length": F,
            "{arch}.attention.head_count": N, "{arch}.attention.head_count_kv": K, "{arch}.attention.key_length": H,
            "{arch}.attention.value_length": H, "{arch}.context_length": 512, "{arch}.attention.sliding_window": 16,
            "{arch}.attention.layer_norm_rms_epsilon": 1e-6, "{arch}.rope.freq_base": 10000.0, "{arch}.vocab_size": V,
            **extra}


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """A 2-layer gemma2 GGUF written by gguf itself, one tensor type per role (K-quants included),
    and the float32 values gguf dequantises each tensor to."""
    rng = np.random.default_rng(0)
    plan = {"token_embd.weight": ((V, D), Q.Q8_0), "output_norm.weight": ((D,), Q.F32)}
    kinds = [{"attn_q": Q.Q4_K, "attn_k": Q.Q5_0, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K, "ffn_gate": Q.Q4_0,
              "ffn_up": Q.Q5_1, "ffn_down": Q.Q3_K},
             {"attn_q": Q.Q2_K, "attn_k": Q.BF16, "attn_v": Q.F16, "attn_output": Q.Q4_1, "ffn_gate": Q.Q6_K,
              "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_K}]
    shapes = {"attn_q": (N * H, D), "attn_k": (K * H, D), "attn_v": (K * H, D), "attn_output": (D, N * H),
              "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for i, layer in enumerate(kinds):
        plan.update({f"blk.{i}.{name}.weight": (shapes[name], qtype) for name, qtype in layer.items()})
        plan.update({f"blk.{i}.{name}.weight": ((D,), Q.F32)
                     for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")})
    tensors, values = [], {}
    for name, (shape, qtype) in plan.items():
        if len(shape) == 1:
            stored = rng.normal(0, 0.3, shape).astype(np.float32) + np.float32(1)
            tensors.append((name, stored, Q.F32))
            values[name] = stored - np.float32(1)
            continue
        if qtype == Q.F16:
            x = rng.normal(0, 0.05, shape).astype(np.float16)
            tensors.append((name, x, Q.F16))
            values[name] = x.astype(np.float32)
            continue
        raw, values[name] = _stored(rng, qtype, *shape)
        tensors.append((name, raw, qtype))
    path = write_gguf(tmp_path_factory.mktemp("gguf_q") / "q.gguf", "gemma2", tensors, **_gemma2_meta())
    return types.SimpleNamespace(path=path, values=values, plan=plan)


def test_every_quantised_type_dequantises_as_gguf_does(quantised):
    assert set(tensor_types(quantised.path).values()) >= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1",
                                                          "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32"}
    # On a 4-device mesh too: each device dequantises only the rows of its own slice.
    mesh = jax.make_mesh((1, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    for kwargs in ({}, {"mesh": mesh}):
        cfg, params = weights.load(quantised.path, **kwargs)
        assert (cfg.num_layers, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                cfg.vocab_size, cfg.sliding_window) == (LAYERS, D, F, N, K, H, V, 16)
        # Not stored in the file: llama.cpp's assumptions (query scale head_dim for this size, caps 50/30).
        assert (cfg.query_pre_attn_scalar, cfg.attn_softcap, cfg.final_softcap) == (256.0, 50.0, 30.0)
        v = quantised.values
        np.testing.assert_array_equal(np.asarray(params["embedder"]["input_embedding"]), v["token_embd.weight"])
        np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), v["output_norm.weight"])
        unrolled = weights.layout.unrolled_view(cfg, params)  # the scanned tree back to layer_0 .. layer_1
        for i in range(LAYERS):
            b = f"blk.{i}."
            expect = {
                ("attn", "q_einsum", "w"): v[b + "attn_q.weight"].reshape(N, H, D).transpose(0, 2, 1),
                ("attn", "kv_einsum", "w"): np.stack([v[b + "attn_k.weight"].reshape(K, H, D).transpose(0, 2, 1),
                                                      v[b + "attn_v.weight"].reshape(K, H, D).transpose(0, 2, 1)]),
                ("attn", "attn_vec_einsum", "w"): v[b + "attn_output.weight"].reshape(D, N, H).transpose(1, 2, 0),
                ("mlp", "gating_einsum", "w"): np.stack([v[b + "ffn_gate.weight"], v[b + "ffn_up.weight"]]),
                ("mlp", "linear", "w"): v[b + "ffn_down.weight"].T,
                ("pre_attention_norm", "scale"): v[b + "attn_norm.weight"],
                ("post_attention_norm", "scale"): v[b + "post_attention_norm.weight"],
                ("pre_ffw_norm", "scale"): v[b + "ffn_norm.weight"],
                ("post_ffw_norm", "scale"): v[b + "post_ffw_norm.weight"],
            }
            for path, want in expect.items():
                node = unrolled[f"layer_{i}"]
                for key in path:
                    node = node[key]
                np.testing.assert_array_equal(node(), want, err_msg=f"layer {i} {path} {kwargs}")


def test_transformers_agrees_on_a_gguf_written_by_gguf(quantised):
    """The same hand-written file in transformers (which dequantises with gguf too): equal logits."""
    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(quantised.path).parent), gguf_file="q.gguf",
                                                           dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(1).integers(0, V, (2, 21))
    cfg, params = weights.load(quantised.path)
    ours = np.asarray(gemma_jax.logits(cfg, params, tokens))
    assert np.abs(ours - helpers.hf_logits(hf, tokens)).max() < 1e-4


# ----------------------------------------------------------------------------- Gemma 3 files


@pytest.fixture(scope="module")
def small3(small):
    """A random 8-layer Gemma 3 (5 local + 1 global, then two local layers: a depth ending mid-cycle)
    with transformers' GGUF assumptions (query scale 256, local RoPE base 1e4, no RoPE scaling)."""
    config = ModelConfig.from_preset("gemma3_test", vocab_size=small.tok.vocab_size, query_pre_attn_scalar=256,
                                     rope_scale=1.0)
    helpers.make_hf_gemma3(config, small.root / "hf3", scale=2.0, seed=3)
    cfg, params = weights.load(small.root / "hf3")
    saved = {dt: weights.save(small.root / f"g3_{dt}", cfg, params, format="gguf", dtype=dt, tokenizer=small.spm)
             for dt in ("float32", "q8_0")}
    return types.SimpleNamespace(cfg=cfg, params=params, saved=saved)


def test_gemma3_transformers_loads_our_gguf_with_equal_logits(small, small3):
    transformers = pytest.importorskip("transformers")
    import torch

    assert small3.cfg.family == "gemma3" and small3.cfg.num_layers % len(small3.cfg.attention_pattern) == 2
    stored = tensor_types(Path(small3.saved["float32"]) / "model.gguf")
    assert stored["blk.0.attn_q_norm.weight"] == stored["blk.0.attn_k_norm.weight"] == "F32"
    tokens = np.array([small.tok.encode(" ".join(corpus(3, seed=6)))[:24]])  # window 8, global every 6th layer
    for dtype, path in small3.saved.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        assert type(hf).__name__ == "Gemma3ForCausalLM"
        cfg, params = weights.load(path)
        assert cfg == small3.cfg.replace(param_dtype="float32")
        ours = np.asarray(gemma_jax.logits(cfg, params, tokens))
        assert np.abs(ours - helpers.hf_logits(hf, tokens)).max() < 1e-4, dtype
    got, orig = leaves(weights.load(small3.saved["float32"])[1]), leaves(small3.params)
    for k, w in orig.items():  # float32: exact; norms (QK-norms too) exact in their stored 1 + w form
        np.testing.assert_array_equal(got[k], (w + np.float32(1)) - np.float32(1) if "norm" in k else w, err_msg=k)


@pytest.mark.parametrize("pattern", [("local",) * 5 + ("global",), ("local", "local", "global"),
                                     ("global", "local", "local", "local")])
def test_gemma3_fields_llama_cpp_does_not_store_round_trip(small, small3, tmp_path, pattern):
    """Query scale, layer pattern, local RoPE base and RoPE scaling survive our own save/load."""
    cfg = small3.cfg.replace(attention_pattern=pattern, query_pre_attn_scalar=24.0, local_rope_base=5000.0,
                             rope_base=200000.0, rope_scale=4.0, sliding_window=6, final_softcap=25.0)
    params = weights.layout.from_unrolled(cfg, weights.layout.unrolled_view(small3.cfg, small3.params))
    out = weights.save(tmp_path / "m", cfg, params, format="gguf", dtype="float32", tokenizer=small.spm)
    loaded_cfg, loaded = weights.load(out)
    assert loaded_cfg == cfg.replace(scan_layers=True)
    got, orig = leaves(loaded), leaves(params)
    for k, w in orig.items():
        np.testing.assert_array_equal(got[k], (w + np.float32(1)) - np.float32(1) if "norm" in k else w, err_msg=k)


def test_gemma3_gguf_refuses_an_attention_softcap(small, small3, tmp_path):
    with pytest.raises(UserError, match="attn_softcap"):
        weights.save(tmp_path / "m", small3.cfg.replace(attn_softcap=50.0), small3.params, format="gguf")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- bad input


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_other_architectures_are_named(tmp_path, arch):
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, [("token_embd.weight", np.zeros((8, 32), np.float32), Q.F32)],
                      **{"{arch}.block_count": 1, "{arch}.embedding_length": 32})
    with pytest.raises(UserError) as e:
        weights.load(path)
    assert path in _one_line(e) and repr(arch) in str(e.value) and "gemma2" in str(e.value)


def test_not_a_gguf_file(tmp_path, small):
    for name, data in (("text.gguf", b"hello, this is not a model\n"), ("empty.gguf", b""),
                       ("st.gguf", Path(small.root / "hf" / "model.safetensors").read_bytes()[:4096])):
        (tmp_path / name).write_bytes(data)
        for call in (weights.load, Tokenizer):
            with pytest.raises(UserError) as e:
                call(str(tmp_path / name))
            assert str(tmp_path / name) in _one_line(e) and "not a GGUF file" in str(e.value)


def test_truncated_gguf_is_named_and_nothing_is_written(small, tmp_path):
    data = (Path(small.saved["float32"]) / "model.gguf").read_bytes()
    cuts = [10, 30, 1000, 200_000, len(data) // 2, len(data) - 1]  # header, metadata, vocabulary, tensor data
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        out = tmp_path / f"out{cut}"
        with pytest.raises(UserError) as e:
            convert.convert(str(path), str(out), "hf")
        assert str(path) in _one_line(e) and "truncated" in str(e.value), cut
        assert not out.exists()
        with pytest.raises(UserError, match="truncated"):
            Tokenizer(str(path))
    # The command line: exit 2, one error line, nothing written.
    out = tmp_path / "cli_out"
    with pytest.raises(SystemExit) as e:
        convert.main([f"--input={tmp_path / f'cut{cuts[-2]}.gguf'}", f"--output={out}", "--to=gguf"])
    assert e.value.code == 2 and not out.exists()


@pytest.mark.parametrize("qtype", [Q.Q8_K, Q.I32])
def test_a_tensor_type_gguf_cannot_dequantise_is_named(quantised, tmp_path, qtype):
    tensors = []
    for t in gguf.GGUFReader(quantised.path).tensors:  # the same file, one tensor of another type
        data, kind = np.array(t.data), t.tensor_type
        if t.name == "blk.1.ffn_up.weight":
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data, kind = np.zeros((F, D // block * size) if qtype != Q.I32 else (F, D), data.dtype), qtype
            data = data if qtype != Q.I32 else data.astype(np.int32)
        tensors.append((t.name, data, kind))
    path = write_gguf(tmp_path / "bad.gguf", "gemma2", tensors, **_gemma2_meta())
    assert tensor_types(path)["blk.1.ffn_up.weight"] == qtype.name
    with pytest.raises(UserError) as e:
        weights.load(path)
    assert "blk.1.ffn_up.weight" in _one_line(e) and qtype.name in str(e.value) and path in str(e.value)


def test_unknown_gguf_dtype_and_q8_0_outside_gguf(small, tmp_path):
    with pytest.raises(ValueError, match="q8_0"):
        weights.save(tmp_path / "x", small.cfg, small.params, format="gguf", dtype="q4_k")
    with pytest.raises(SystemExit) as e:
        convert.main([f"--input={small.saved['float32']}", f"--output={tmp_path / 'y'}", "--to=hf",
                      "--dtype=q8_0"])
    assert e.value.code == 2 and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- command line, trainer


def test_convert_cli_to_and_from_gguf(small, tmp_path, capsys):
    assert convert.main([f"--input={small.root / 'hf'}", f"--output={tmp_path / 'g'}", "--to=gguf",
                         "--dtype=q8_0"]) in (0, None)
    assert "embedded the tokenizer" not in capsys.readouterr().out  # the HF dir has no tokenizer.model
    assert set(tensor_types(tmp_path / "g" / "model.gguf").values()) == {"Q8_0", "F32"}
    # The q8_0 file we wrote from the HF dir holds the same values as the module's q8_0 save.
    a, b = leaves(weights.load(tmp_path / "g")[1]), leaves(weights.load(small.saved["q8_0"])[1])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # GGUF in: its own tokenizer travels into the HF export.
    assert convert.main([f"--input={small.saved['float32']}/model.gguf", f"--output={tmp_path / 'hf'}",
                         "--to=hf"]) in (0, None)
    assert "copied tokenizer.model from" in capsys.readouterr().out
    assert Tokenizer(str(tmp_path / "hf")).encode(TEXTS[1]) == small.tok.encode(TEXTS[1])
    got = leaves(weights.load(tmp_path / "hf")[1])
    for k, w in leaves(small.params).items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1.2e-7 * (1 + np.abs(w).max()), err_msg=k)


@pytest.mark.slow
def test_train_from_a_gguf_takes_its_tokenizer_and_exports_gguf(small, tmp_path):
    """model.init_checkpoint=x.gguf with data.tokenizer="" trains with the file's own tokenizer;
    train.export_format=gguf writes WORKDIR/export/model.gguf holding the trained weights."""
    from gemma_jax import train
    from test_train import small_config

    cfg = small_config(steps=1, batch_size=8, seq_len=64)
    cfg.data.tokenizer = ""
    cfg.model.init_checkpoint = str(Path(small.saved["float32"]) / "model.gguf")
    for key in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
                "query_pre_attn_scalar", "sliding_window"):
        cfg.model[key] = None  # the checkpoint's own
    cfg.model.preset, cfg.mesh.fsdp = "", -1
    cfg.train.export_format = "gguf"
    train.run(cfg, str(tmp_path / "w"))
    kept = Tokenizer(str(tmp_path / "w" / "tokenizer.model"))
    for text in TEXTS:
        assert kept.encode(text) == small.tok.encode(text)
    exported = tmp_path / "w" / "export" / "model.gguf"
    assert exported.is_file()
    trained = leaves(weights.load(tmp_path / "w")[1])
    cfg2, params = weights.load(exported)
    assert cfg2.num_layers == small.cfg.num_layers and cfg2.vocab_size == small.cfg.vocab_size
    got = leaves(params)
    for k, w in trained.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1.2e-7 * (1 + np.abs(w).max()), err_msg=k)
    assert any(not np.array_equal(trained[k], w) for k, w in leaves(small.params).items())  # it did train


# ----------------------------------------------------------------------------- the real Gemma 3 270M file

# Published Gemma 3 270M dims (Google's model card / config.json), not read from the file by us.
GEMMA3_270M = dict(num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4, num_kv_heads=1, head_dim=256,
                   vocab_size=262144, sliding_window=512, query_pre_attn_scalar=256.0, rope_base=1e6,
                   local_rope_base=1e4, rope_scale=1.0, attn_softcap=0.0, final_softcap=0.0, qk_norm=True,
                   attention_pattern=("local",) * 5 + ("global",), family="gemma3")
REAL_TEXTS = [
    "The quick brown fox", "Hello, world!", "  two leading spaces", "trailing spaces   ", "a  b   c    d",
    "\n", "\n\n\n\nfour newlines", "tabs\t\tand\ttabs", "\r\nwindows line\r\n", "12345678901234567890 3.14159 1e-9",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n", "<table><tr><td>cell</td></tr></table>",
    "café naïve Ωmega 日本語のテキスト 한국어 हिन्दी العربية עברית", "emoji 🙂👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn><end_of_turn>",
    "<mask> [multimodal] <start_of_image> <unused0>", "ﬁ ligature ＡＢＣ fullwidth ℌ𝔢𝔩𝔩𝔬", "\u200bzero\u200dwidth\u00a0nbsp",
    "\x00\x01 control \x7f", "x" * 80, " " * 33, " " * 70 + "x", "\n" * 40, "\t" * 35, "", "日本", "🦙" * 5,
]


def _fuzz(sp_vocab, n=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):
            c = rng.random()
            if c < 0.55:
                parts.append(rng.choice(sp_vocab))
            elif c < 0.8:
                cp = rng.randint(0x20, 0x2FFFF)
                parts.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "?")
            elif c < 0.92:
                parts.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "   \n", "\u3000", "\xa0", "\n\n",
                                         " " * 33, " " * 47, "\n" * 34, "\t" * 40]))
            else:
                parts.append(rng.choice(["<start_of_turn>", "<end_of_turn>", "<unused7>", "<td>", "0123", "😀"]))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def real():
    return helpers.gemma3_270m_gguf()


@pytest.fixture(scope="module")
def real_tokenizer(real):
    return Tokenizer(real)


@pytest.fixture(scope="module")
def real_loaded(real):
    return weights.load(real)


@pytest.fixture(scope="module")
def hf_real_model(real):
    transformers = pytest.importorskip("transformers")
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(Path(real).parent), gguf_file=Path(real).name, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.slow
def test_real_logits_and_greedy_equal_transformers(real_loaded, real_tokenizer, hf_real_model):
    import torch

    cfg, params = real_loaded
    # Past the 512-token window, so the local layers' window and the global layers both count.
    words = ("the court shall decide whether a contract clause holds when one party fails to deliver goods on time "
             "and the other party claims damages for the loss of profit that followed from the delay").split()
    rng = random.Random(0)
    tokens = np.array([real_tokenizer.encode(" ".join(rng.choice(words) for _ in range(700)))[:530]])
    assert tokens.shape[1] == 530
    ours = np.asarray(gemma_jax.logits(cfg, params, tokens))
    theirs = helpers.hf_logits(hf_real_model, tokens)
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
    assert (ours[0].argmax(-1) == theirs[0].argmax(-1)).mean() > 0.99
    del ours, theirs

    prompt = "The quick brown fox"
    ids = real_tokenizer.encode(prompt)
    stop = [real_tokenizer.eos_id, real_tokenizer.end_of_turn_id]  # where gemma_jax.generate stops
    with torch.no_grad():
        out = hf_real_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=stop)
    new_ids = [i for i in out[0, len(ids):].tolist() if i not in stop]
    want = real_tokenizer.decode(new_ids)
    assert len(new_ids) >= 4 and want.strip()  # transformers wrote text (" jumps over the lazy dog." when checked)
    assert gemma_jax.generate(cfg, params, real_tokenizer, [prompt], max_new_tokens=8, temperature=0.0) == [want]


@pytest.fixture(scope="module")
def hf_real_tokenizer(real):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(Path(real).parent), gguf_file=Path(real).name)


def test_real_file_config_and_tensors_equal_gguf_dequantisation(real, real_loaded):
    cfg, params = real_loaded
    assert {k: getattr(cfg, k) for k in GEMMA3_270M} == GEMMA3_270M
    # gemma_jax's reader subclass only parses the metadata arrays faster (~12 s saved); the tensor
    # table and data offsets are gguf's own code, and the values come from gguf.quants.
    reader = gguf_file.open_reader(real)
    assert type(reader).__mro__[1] is gguf.GGUFReader
    stored = {t.name: t for t in reader.tensors}
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    deq = lambda name: gguf.quants.dequantize(stored[name].data, stored[name].tensor_type)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(params["embedder"]["input_embedding"]), deq("token_embd.weight"))
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), deq("output_norm.weight") - np.float32(1))
    unrolled = weights.layout.unrolled_view(cfg, params)
    n, k, h, d = 4, 1, 256, 640
    for i in (0, 5, 17):  # local, the first global, the last (global)
        b, L = f"blk.{i}.", unrolled[f"layer_{i}"]
        expect = {
            ("attn", "q_einsum", "w"): deq(b + "attn_q.weight").reshape(n, h, d).transpose(0, 2, 1),
            ("attn", "kv_einsum", "w"): np.stack([deq(b + "attn_k.weight").reshape(k, h, d).transpose(0, 2, 1),
                                                  deq(b + "attn_v.weight").reshape(k, h, d).transpose(0, 2, 1)]),
            ("attn", "attn_vec_einsum", "w"): deq(b + "attn_output.weight").reshape(d, n, h).transpose(1, 2, 0),
            ("attn", "query_norm", "scale"): deq(b + "attn_q_norm.weight") - np.float32(1),
            ("attn", "key_norm", "scale"): deq(b + "attn_k_norm.weight") - np.float32(1),
            ("mlp", "gating_einsum", "w"): np.stack([deq(b + "ffn_gate.weight"), deq(b + "ffn_up.weight")]),
            ("mlp", "linear", "w"): deq(b + "ffn_down.weight").T,
            ("pre_attention_norm", "scale"): deq(b + "attn_norm.weight") - np.float32(1),
            ("post_attention_norm", "scale"): deq(b + "post_attention_norm.weight") - np.float32(1),
            ("pre_ffw_norm", "scale"): deq(b + "ffn_norm.weight") - np.float32(1),
            ("post_ffw_norm", "scale"): deq(b + "post_ffw_norm.weight") - np.float32(1),
        }
        for path, want in expect.items():
            node = L
            for key in path:
                node = node[key]
            np.testing.assert_array_equal(node(), want, err_msg=f"layer {i} {path}")


@pytest.mark.slow
def test_real_tokenizer_encodes_as_transformers(real_tokenizer, hf_real_tokenizer):
    tok, hf = real_tokenizer, hf_real_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.start_of_turn_id,
            tok.end_of_turn_id) == (262144, 2, 1, 0, 3, 105, 106)
    # Not <pad>/<eos>/<bos>/<unk> as text: SentencePiece spells them out (the documented difference).
    vocab = [tok.id_to_piece(i).replace("\u2581", " ") for i in range(4, tok.vocab_size, 97)]
    for text in REAL_TEXTS + _fuzz(vocab):
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], repr(text)
        assert tok.decode(ids) == text, repr(text)
        assert hf.decode(ids[1:]) == text, repr(text)

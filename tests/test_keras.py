"""KerasHub Gemma 2 presets: config mapping, H5 weights, and logits against keras-hub itself."""

import importlib
import importlib.util
import io
import json
import os
import shutil
import sys

# keras picks its backend at import time; keras-hub without TensorFlow needs jax.
os.environ["KERAS_BACKEND"] = "jax"

import jax
import numpy as np
import pytest

from gemma_jax import model, sharding, weights
from gemma_jax.weights import keras as keras_format

D, N, K, H, F, V, L, WINDOW = 96, 4, 2, 16, 128, 512, 3, 8  # D // N = 24 != H: scale matters

KERAS_CONFIG = dict(
    vocabulary_size=V, num_layers=L, num_query_heads=N, num_key_value_heads=K, hidden_dim=D,
    intermediate_dim=2 * F, head_dim=H, query_head_dim_normalize=False, use_post_ffw_norm=True,
    use_post_attention_norm=True, final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0,
    use_sliding_window_attention=True, sliding_window_size=WINDOW, layer_norm_epsilon=1e-6)


def _spm_proto():
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog 123\n"] * 50),
        model_writer=buf, model_type="bpe", vocab_size=300, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2)
    return buf.getvalue()


def _backbone(keras_hub, dtype="float32", seed=0):
    backbone = keras_hub.models.GemmaBackbone(**KERAS_CONFIG, dtype=dtype)
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        # Norms are non-zero so the (1 + scale) convention is exercised; q/k are large enough
        # that the attention soft-cap bites, the embedding large enough for the final cap.
        std = 0.5 if "norm" in w.path or "query" in w.path or "key" in w.path else (
            1.0 if "embeddings" in w.path else 0.1)
        w.assign(rng.normal(0.0, std, w.shape).astype("float32"))
    return backbone


@pytest.fixture(scope="module")
def keras_hub():
    # Only the parity tests need keras-hub (CI installs it); the loader itself needs only h5py.
    # Skip only when it is not installed: a broken install must fail, not skip.
    if importlib.util.find_spec("keras_hub") is None:
        pytest.skip("keras-hub is not installed (pip install --no-deps keras-hub)")
    return importlib.import_module("keras_hub")


@pytest.fixture(scope="module")
def preset(keras_hub, tmp_path_factory):
    backbone = _backbone(keras_hub)
    path = str(tmp_path_factory.mktemp("keras") / "preset")
    backbone.save_to_preset(path)
    keras_hub.models.GemmaTokenizer(proto=_spm_proto()).save_to_preset(path)
    return backbone, path


def test_config_mapping():
    config = keras_format.config_from_keras({"class_name": "GemmaBackbone", "config": KERAS_CONFIG})
    assert (config.num_layers, config.embed_dim, config.hidden_dim, config.num_heads) == (L, D, F, N)
    assert (config.num_kv_heads, config.head_dim, config.vocab_size) == (K, H, V)
    assert config.query_pre_attn_scalar == D // N == 24  # query_head_dim_normalize=False
    assert (config.sliding_window, config.attn_softcap, config.final_softcap) == (WINDOW, 50.0, 30.0)
    assert keras_format.config_from_keras({**KERAS_CONFIG, "query_head_dim_normalize": True}).query_pre_attn_scalar == H
    # The 27B preset: (D / N) = 144, not head_dim 128.
    c27 = keras_format.config_from_keras({**KERAS_CONFIG, "hidden_dim": 4608, "num_query_heads": 32,
                                          "num_key_value_heads": 16, "head_dim": 128})
    assert c27.query_pre_attn_scalar == 144
    with pytest.raises(ValueError, match="use_post_ffw_norm=False"):
        keras_format.config_from_keras({**KERAS_CONFIG, "use_post_ffw_norm": False})
    uncapped = keras_format.config_from_keras({**KERAS_CONFIG, "attention_logit_soft_cap": None})
    assert uncapped.attn_softcap == 0.0


def test_missing_h5py_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "GemmaBackbone", "config": KERAS_CONFIG}))
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match=r'pip install "gemma_jax\[keras\]"'):
        keras_format.load(tmp_path)


def test_logits_match_keras(preset):
    backbone, path = preset
    # keras-hub 0.32's GemmaDecoderBlock hard-codes query_head_dim_normalize=True for its
    # attention layer, ignoring the backbone flag (so it scales 27B queries by 128^-0.5, not the
    # official 144^-0.5). Set the flag the layers actually read, so keras computes Gemma 2.
    for block in backbone.transformer_layers:
        block.attention.query_head_dim_normalize = False
    config, params = keras_format.load(path)
    assert config.query_pre_attn_scalar == 24 and config.param_dtype == "float32"
    assert weights.detect_format(path) == "keras"

    tokens = np.random.default_rng(1).integers(0, V, (2, 3 * WINDOW)).astype("int32")
    # predict() runs the keras graph under jit: same numbers as an eager call, 5x faster here.
    hidden = backbone.predict({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}, verbose=0)
    expected = np.asarray(backbone.token_embedding(hidden, reverse=True))
    got = np.asarray(model.logits(config, params, tokens))
    assert got.shape == (2, 3 * WINDOW, V)
    assert np.abs(expected).max() > 25  # the final cap (30) is active
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The comparison means something only if each mapped setting changes the output. Keras's
    # window (band |q - k| <= WINDOW - 1, plus causal) is our 0 <= q - k < WINDOW: WINDOW +- 1 differ.
    for change in (dict(attn_softcap=0.0), dict(sliding_window=WINDOW - 1),
                   dict(sliding_window=WINDOW + 1), dict(query_pre_attn_scalar=float(H))):
        other = np.asarray(model.logits(config.replace(**change), params, tokens))
        assert np.abs(other - expected).max() > 1e-2, change

    # The preset's tokenizer works with gemma_jax's Tokenizer.
    from gemma_jax.tokenizer import Tokenizer

    tok = Tokenizer(weights.find_tokenizer(path))
    assert tok.decode(tok.encode("the lazy fox 42")) == "the lazy fox 42"


def test_bfloat16_and_sharded(keras_hub, tmp_path):
    backbone = _backbone(keras_hub, dtype="bfloat16", seed=2)
    backbone.save_to_preset(str(tmp_path), max_shard_size=0.0002)  # ~200 KB shards
    assert not (tmp_path / "model.weights.h5").exists()
    config, params = keras_format.load(tmp_path)
    assert config.param_dtype == "bfloat16"
    flat = {w.path: np.asarray(w.numpy()) for w in backbone.weights}
    unrolled = model.unstack_layers(config, params)
    np.testing.assert_array_equal(np.asarray(unrolled["layer_2"]["attn"]["kv_einsum"]["w"][1]),
                                  flat["decoder_block_2/attention/value/kernel"])
    np.testing.assert_array_equal(np.asarray(unrolled["layer_1"]["mlp"]["gating_einsum"]["w"][1]),
                                  flat["decoder_block_1/ffw_gating_2/kernel"].T)
    # On a mesh each device reads only its slices (through the transposed gate/up views too).
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    config32, sharded = keras_format.load(tmp_path, dtype="float32", mesh=mesh)
    assert config32.param_dtype == "float32"
    gating = sharded["layers"]["local"]["mlp"]["gating_einsum"]["w"]
    assert gating.dtype == np.float32 and len(gating.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))


def test_errors(preset, tmp_path):
    import h5py

    _, path = preset
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    with h5py.File(bad / "model.weights.h5", "a") as f:
        del f["layers/gemma_decoder_block_1/attention/key_dense/vars/0"]
    with pytest.raises(ValueError, match="missing decoder_block_1/attention/key/kernel"):
        keras_format.load(bad)

    cfg = json.loads((bad / "config.json").read_text())
    cfg["config"]["num_key_value_heads"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"decoder_block_0/attention/value/kernel: preset \(2, 96, 16\), "
                                         r"config.json implies \(4, 96, 16\)"):
        keras_format.load(bad)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        keras_format.load(tmp_path)


def test_save_roundtrip(preset, keras_hub, tmp_path):
    _, path = preset
    config, params = keras_format.load(path)
    params = {**params, "final_norm": {"scale": params["final_norm"]["scale"] + 1.0}}
    keras_format.save(tmp_path, config, params)
    reloaded = keras_hub.models.Backbone.from_preset(str(tmp_path))  # keras-hub reads our files
    flat = {w.path: np.asarray(w.numpy()) for w in reloaded.weights}
    unrolled = model.unstack_layers(config, params)
    np.testing.assert_array_equal(flat["final_normalization/scale"], np.asarray(params["final_norm"]["scale"]))
    np.testing.assert_array_equal(flat["decoder_block_2/ffw_gating/kernel"],
                                  np.asarray(unrolled["layer_2"]["mlp"]["gating_einsum"]["w"][0]).T)
    config2, params2 = keras_format.load(tmp_path)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="query_pre_attn_scalar=20.0"):
        keras_format.save(tmp_path / "x", config.replace(query_pre_attn_scalar=20.0), params)

"""LoRA adapters and the quantised base, at the model level (training is in test_train_lora.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.model import lora
from gemma_jax import model as M
from gemma_jax.config import DEFAULT_LORA_TARGETS
from gemma_jax.model import ModelConfig


@pytest.fixture(scope="module")
def small():
    cfg = ModelConfig.from_preset("gemma2_test", lora_scale=2.0)  # 3 layers: a scanned pair + a tail
    params = jax.jit(functools.partial(M.init_params, cfg))(jax.random.key(0))
    params = jax.tree.map(lambda p: p * 10 if p.ndim > 1 else p + 0.3, params)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    return cfg, params, tokens


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, variables, tokens):
    return M.Transformer(cfg).apply(variables, tokens)


def test_default_targets_cover_attention_and_mlp_of_every_layer(small):
    cfg, params, _ = small
    paths = {"/".join(p) for p in lora.target_paths(params, DEFAULT_LORA_TARGETS)}
    modules = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear")
    for block in ("layers/local", "layers/global", "layer_2"):
        for m in modules:
            assert any(p.startswith(block) and f"/{m}/" in p for p in paths), (block, m)
    assert not any("embedder" in p or "norm" in p for p in paths)


def test_zero_b_is_the_base_model(small):
    cfg, params, tokens = small
    adapters = lora.init(params, 4, DEFAULT_LORA_TARGETS, jax.random.key(2))
    a_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if p[-1].key == "a"]
    b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if p[-1].key == "b"]
    assert all(float(jnp.abs(a).max()) > 0 for a in a_leaves)
    assert all(float(jnp.abs(b).max()) == 0 for b in b_leaves)
    np.testing.assert_array_equal(_apply(cfg, {"params": params, "lora": adapters}, tokens),
                                  _apply(cfg, {"params": params}, tokens))


def test_merged_weights_equal_base_plus_adapters(small):
    cfg, params, tokens = small
    adapters = lora.init(params, 4, DEFAULT_LORA_TARGETS, jax.random.key(2))
    keys = iter(jax.random.split(jax.random.key(3), 100))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    with_adapters = _apply(cfg, {"params": params, "lora": adapters}, tokens)
    base = _apply(cfg, {"params": params}, tokens)
    assert float(jnp.abs(with_adapters - base).max()) > 0.1  # the adapters matter
    merged = _apply(cfg, {"params": lora.merge(cfg, params, adapters)}, tokens)
    np.testing.assert_allclose(merged, with_adapters, atol=2e-4, rtol=1e-4)
    # The scale multiplies the adapter's share, not the base.
    half = _apply(cfg.replace(lora_scale=1.0), {"params": lora.merge(cfg.replace(lora_scale=1.0), params, adapters)},
                  tokens)
    assert float(jnp.abs(half - merged).max()) > 1e-2


def test_adapter_axes_follow_their_base_weight(small):
    cfg = small[0]
    axes = lora.axes(cfg, 4, DEFAULT_LORA_TARGETS)
    q = axes["layers"]["local"]["attn"]["q_einsum"]  # W [layers, heads, embed, head_dim]
    assert tuple(q["a"]) == ("layers", "embed", None)
    assert tuple(q["b"]) == ("layers", None, "heads", "head_dim")
    out = axes["layer_2"]["attn"]["attn_vec_einsum"]  # W [heads, head_dim, embed]
    assert tuple(out["a"]) == ("heads", "head_dim", None) and tuple(out["b"]) == (None, "embed")
    shapes = lora.shapes(M.param_shapes(cfg), 4, DEFAULT_LORA_TARGETS)
    assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))


# Stated tolerances of the quantised base: logit error relative to the logits (RMS over all
# positions and vocabulary) and the share of positions whose top token is unchanged. The test
# model's weights are scaled 10x, which amplifies errors: int8 rounds each weight to 1/254 of
# its channel's range, int4 to 1/14 of its group of 32 inputs.
QUANT_TOLERANCE = {"int8": (0.03, 0.99), "int4": (0.35, 0.9)}


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantised_base_within_tolerance(small, bits):
    cfg, params, tokens = small
    qparams, scales = lora.quantize(params, bits)
    w = qparams["layers"]["local"]["attn"]["q_einsum"]["w"]
    assert w.dtype == {"int8": jnp.int8, "int4": jnp.int4}[bits]
    assert qparams["embedder"]["input_embedding"].dtype == params["embedder"]["input_embedding"].dtype
    base = _apply(cfg, {"params": params}, tokens)
    quant = _apply(cfg, {"params": qparams, "quant": scales}, tokens)
    rel = float(jnp.linalg.norm(quant - base) / jnp.linalg.norm(base))
    agree = float(jnp.mean(quant.argmax(-1) == base.argmax(-1)))
    max_rel, min_agree = QUANT_TOLERANCE[bits]
    assert 0 < rel < max_rel and agree >= min_agree, (rel, agree)
    # Dequantising on the fly is the same as dequantising up front.
    np.testing.assert_allclose(_apply(cfg, {"params": lora.dequantize(qparams, scales)}, tokens), quant,
                               atol=1e-4, rtol=1e-5)
    if bits == "int4":  # grouped: one scale per 32 inputs of the 128-wide MLP projection
        assert scales["layers"]["local"]["mlp"]["linear"]["scale"].shape == (1, 4, 64)


def test_bad_target_regex_names_the_weights(small):
    with pytest.raises(ValueError, match="matches no weight.*q_einsum"):
        lora.target_paths(small[1], "nothing_like_this")

"""Fused attention: which implementation runs, and the splash kernel against the xla path.

The splash kernel is a Pallas TPU kernel; on CPU it runs in Pallas interpret mode, which
executes the same blocked program (block skipping, online softmax, the backward kernels), so
these comparisons check the kernel's numerics and our use of its mask, soft-cap and segment
conventions, though not TPU compilation or speed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.model import kernels as AK
from gemma_jax import model as M
from gemma_jax import sharding
from gemma_jax.model import ModelConfig


def test_choose_picks_splash_only_where_it_fits():
    assert AK.choose("auto", "tpu", 2048, 256) == "splash"
    assert AK.choose("auto", "tpu", 8192, 128) == "splash"  # 27B head dim
    assert AK.choose("auto", "tpu", 2000, 256) == "xla"  # not whole blocks
    assert AK.choose("auto", "tpu", 2048, 32) == "xla"  # head dim off the 128 lanes
    assert AK.choose("auto", "gpu", 2048, 256) == "flash_gpu"  # our GPU kernel (tests/test_flash_gpu.py)
    assert AK.choose("auto", "cpu", 2048, 256) == "xla"
    assert AK.choose("xla", "tpu", 2048, 256) == "xla"
    assert AK.choose("splash", "cpu", 256, 16) == "splash"  # explicit: interpret mode off TPU
    assert AK.choose("splash", "tpu", 1, 256) == "xla"  # init_params' one-token pass
    assert [AK.block_size(t) for t in (128, 256, 384, 1024, 8192)] == [128, 256, 128, 512, 512]


def test_config_validates_attention_impl():
    assert ModelConfig.from_preset("gemma2_test").attention_impl == "auto"
    with pytest.raises(ValueError, match="soft-cap"):
        ModelConfig.from_preset("gemma2_test", attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig.from_preset("gemma2_test", attention_impl="flash")


def _xla_attention(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window, cap):
    """The model's own xla attention: capped logits, dense masks, float32 softmax."""
    cfg = ModelConfig.from_preset("gemma2_test", attn_softcap=cap, sliding_window=window or 10**6)
    local_BTS, global_BTS = M.attention_masks(segment_ids_BT, cfg.sliding_window)
    probs_BKGTS = M.masked_softmax(M.attention_logits(cfg, q_BTKGH, k_BSKH),
                                   local_BTS if window else global_BTS)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH, precision="highest")


@pytest.fixture(scope="module")
def qkv():
    """B=2, T=256, K=2 kv heads of G=2 queries, H=32; logits far past the 50 cap; packed rows."""
    rng = np.random.default_rng(0)
    b, t, k, g, h = 2, 256, 2, 2, 32
    q = jnp.asarray(rng.normal(0, 3, (b, t, k, g, h)), jnp.float32)
    keys = jnp.asarray(rng.normal(0, 3, (b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.normal(0, 1, (b, t, k, h)), jnp.float32)
    # Row 0: three documents then padding (segment 0); row 1: one document.
    seg = np.ones((b, t), np.int32)
    seg[0, 90:200], seg[0, 200:240], seg[0, 240:] = 2, 3, 0
    return q, keys, v, jnp.asarray(seg)


@pytest.mark.parametrize("window", [100, None], ids=["local", "global"])
def test_splash_matches_xla_attention(qkv, window):
    q, k, v, seg = qkv
    ref = _xla_attention(q, k, v, seg, window, 50.0)
    assert float(jnp.abs(jnp.einsum("BTKGH,BSKH->BKGTS", q, k)).max()) > 200  # the cap bites
    fast = jax.jit(lambda q, k, v, s: AK.splash_attention(q, k, v, s, window=window, softcap=50.0, block=128))
    np.testing.assert_allclose(np.asarray(fast(q, k, v, seg)), np.asarray(ref), atol=1e-5, rtol=0)


def _mesh_and_rules():
    """A (2, 2, 2) mesh whose rules split the batch over fsdp only: the kernel then runs per
    shard with heads split over tensor and replicated over data."""
    rules = tuple((name, "fsdp" if name == "batch" else axes) for name, axes in sharding.DEFAULT_RULES)
    return sharding.make_mesh(2, 2, 2), rules


def test_splash_gradients_match_xla_attention_on_a_mesh(qkv):
    """Gradients through the kernel's backward and the shard_map transpose, where a replicated
    mesh axis would show as over-counted gradients."""
    q, k, v, seg = qkv
    w_BTKGH = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * w_BTKGH)

    def splash(q, k, v):
        return AK.splash_attention(q, k, v, seg, window=100, softcap=50.0, block=128)

    mesh, rules = _mesh_and_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fast = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: _xla_attention(q, k, v, seg, 100, 50.0)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def small():
    """gemma2_test: 3 layers (a scanned local/global pair and a trailing local one), K=2, G=2, H=16."""
    cfg = ModelConfig.from_preset("gemma2_test", sliding_window=40)
    rng = np.random.default_rng(0)  # numpy draws: the model's own init takes seconds to compile
    return cfg, jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), M.param_shapes(cfg))


def test_model_splash_path_matches_xla_on_a_mesh(small):
    """The wiring: segment ids and the local flag reach every layer, the trailing one too."""
    cfg, params = small
    rng = np.random.default_rng(2)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 128)), jnp.int32)
    seg = np.ones((4, 128), np.int32)
    seg[1, 50:], seg[2, 100:] = 2, 0
    seg = jnp.asarray(seg)
    run = jax.jit(lambda p, c: M.Transformer(c).apply({"params": p}, toks, None, seg), static_argnums=1)
    mesh, rules = _mesh_and_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        traced = run.trace(params, cfg.replace(attention_impl="splash"))
        assert str(traced.jaxpr).count("pallas_call") == 2  # the scanned pair's two, the tail reuses one
        out = traced.lower().compile()(params)
        ref = run(params, cfg.replace(attention_impl="xla"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)


def test_asking_for_attention_probs_takes_the_xla_path(small):
    cfg, params = small
    cfg = cfg.replace(attention_impl="splash")
    toks = jnp.zeros((1, 128), jnp.int32)

    @jax.jit
    def logits_and_probs(params):
        return M.Transformer(cfg).apply({"params": params}, toks, mutable=["intermediates"])

    out, state = logits_and_probs(params)
    (probs,) = state["intermediates"]["layers"]["local"]["attn"]["attention_probs"]
    assert probs.shape == (1, 1, cfg.num_kv_heads, cfg.num_groups, 128, 128)  # (pairs, B, K, G, T, S)
    ref = M.logits(cfg.replace(attention_impl="xla"), params, toks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6, rtol=0)

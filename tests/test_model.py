"""Model: presets, packing, scan vs unrolled, remat, sharding, masks, dtypes, FLOP count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import model as M
from gemma_jax import sharding
from gemma_jax.model import ModelConfig


@pytest.fixture(scope="module")
def small():
    cfg = ModelConfig.from_preset("gemma2_test")
    params = M.init_params(cfg, jax.random.key(0))
    # Scale weights up so the model is far from uniform and every feature matters.
    params = jax.tree.map(lambda p: p * 10 if p.ndim > 1 else p + 0.3, params)
    return cfg, params


def test_preset_parameter_counts_match_reference():
    # Counts from the reference table (HF vocab of 256000 rows).
    assert ModelConfig.from_preset("gemma2_2b", vocab_size=256000).num_params() == 2_614_341_888
    assert ModelConfig.from_preset("gemma2_9b", vocab_size=256000).num_params() == 9_241_705_984
    assert ModelConfig.from_preset("gemma2_27b", vocab_size=256000).num_params() == 27_227_128_320


def test_preset_numerics_follow_reference():
    c27 = ModelConfig.from_preset("gemma2_27b")
    assert c27.query_pre_attn_scalar == c27.embed_dim / c27.num_heads == 144
    for name in ("gemma2_2b", "gemma2_9b"):
        c = ModelConfig.from_preset(name)
        assert c.query_pre_attn_scalar == 256 and c.head_dim == 256
        assert (c.sliding_window, c.attn_softcap, c.final_softcap, c.vocab_size) == (4096, 50.0, 30.0, 256128)
        assert c.num_heads * c.head_dim != c.embed_dim
    assert [ModelConfig.from_preset("gemma2_2b").is_local(i) for i in range(4)] == [True, False, True, False]


def test_param_tree_matches_shapes_and_axes():
    cfg = ModelConfig.from_preset("gemma2_test")
    shapes, axes = M.param_shapes(cfg), M.param_axes(cfg)
    pairs = cfg.num_layers // 2
    blk = shapes["layers"]["local"]
    assert blk["attn"]["q_einsum"]["w"].shape == (pairs, cfg.num_heads, cfg.embed_dim, cfg.head_dim)
    assert blk["attn"]["kv_einsum"]["w"].shape == (pairs, 2, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim)
    assert blk["mlp"]["gating_einsum"]["w"].shape == (pairs, 2, cfg.hidden_dim, cfg.embed_dim)
    assert f"layer_{cfg.num_layers - 1}" in shapes  # odd layer count: trailing local layer
    assert tuple(axes["layers"]["global"]["attn"]["q_einsum"]["w"]) == ("layers", "heads", "embed", "head_dim")
    assert tuple(axes["embedder"]["input_embedding"]) == ("vocab", "embed")
    leaves = jax.tree.leaves(shapes)
    assert sum(int(np.prod(x.shape)) for x in leaves) == cfg.num_params()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_preset("gemma2_test", num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("gemma3")
    with pytest.raises(ValueError, match="remat"):
        ModelConfig.from_preset("gemma2_test", remat="some")
    cfg = ModelConfig.from_preset("gemma2_test")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_packed_segments_equal_separate_runs(small):
    cfg, params = small
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, cfg.vocab_size, 13), rng.integers(0, cfg.vocab_size, 11)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 13 + [2] * 11])
    out = np.asarray(M.logits(cfg, params, packed, segment_ids=seg))[0]
    alone_a = np.asarray(M.logits(cfg, params, a[None]))[0]
    alone_b = np.asarray(M.logits(cfg, params, b[None]))[0]
    np.testing.assert_allclose(out[:13], alone_a, atol=1e-4)
    np.testing.assert_allclose(out[13:], alone_b, atol=1e-4)
    # Without segment ids the second document would see the first: a real difference.
    assert np.abs(np.asarray(M.logits(cfg, params, packed))[0, 13:] - alone_b).max() > 1e-2


def test_branch_rows_equal_each_sequence_alone(small):
    """Shared-prefix trees (the harness's packed multiple-choice rows): every branch sees its
    trunk and itself only, at its own positions, so its logits are those of trunk + branch run
    alone, also where the sliding window (24 here) reaches back into the trunk and across the
    key blocks of a 288-token row."""
    cfg, params = small
    cfg = cfg.replace(sliding_window=24)
    rng = np.random.default_rng(3)
    trees = [(rng.integers(0, cfg.vocab_size, 20), [rng.integers(0, cfg.vocab_size, n) for n in (130, 60)]),
             (rng.integers(0, cfg.vocab_size, 10), [rng.integers(0, cfg.vocab_size, 50)])]
    tokens, pos, seg, branch = (np.zeros((1, 288), np.int32) for _ in range(4))
    spans, o = [], 0  # (the sequence alone, its slice in the row, the same tokens' slice alone)
    for s, (trunk, branches) in enumerate(trees, 1):
        n = len(trunk)
        tokens[0, o:o + n], pos[0, o:o + n], seg[0, o:o + n] = trunk, np.arange(n), s
        spans.append((trunk, slice(o, o + n), slice(0, n)))
        o += n
        for b, x in enumerate(branches, 1):
            m = len(x)
            tokens[0, o:o + m], pos[0, o:o + m], seg[0, o:o + m], branch[0, o:o + m] = x, n + np.arange(m), s, b
            spans.append((np.concatenate([trunk, x]), slice(o, o + m), slice(n, n + m)))
            o += m
    out = np.asarray(M.Transformer(cfg).apply({"params": params}, tokens, pos, seg, branch_BT=branch))[0]
    for whole, in_row, alone_part in spans:
        alone = np.asarray(M.logits(cfg, params, whole[None]))[0]
        np.testing.assert_allclose(out[in_row], alone[alone_part], atol=1e-4)
    # Without branch ids the second branch would see the first: a real difference.
    plain = np.asarray(M.Transformer(cfg).apply({"params": params}, tokens, pos, seg))[0]
    whole, in_row, alone_part = spans[2]
    assert np.abs(plain[in_row] - np.asarray(M.logits(cfg, params, whole[None]))[0][alone_part]).max() > 1e-2


def test_explicit_positions_match_segment_positions():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(np.asarray(M.segment_positions(seg)), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_sliding_window_mask():
    seg = jnp.ones((1, 6), jnp.int32)
    local, glob = M.attention_masks(seg, 3)
    local, glob = np.asarray(local[0]), np.asarray(glob[0])
    for q in range(6):
        for k in range(6):
            assert glob[q, k] == (k <= q)
            assert local[q, k] == (0 <= q - k < 3)


def test_window_changes_logits_past_it(small):
    cfg, params = small
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 3 * cfg.sliding_window))
    base = np.asarray(M.logits(cfg, params, toks))
    wide = np.asarray(M.logits(cfg.replace(sliding_window=10_000), params, toks))
    w = cfg.sliding_window
    np.testing.assert_allclose(base[:, :w], wide[:, :w], atol=1e-4)  # inside the window: identical
    assert np.abs(base[:, w + 1:] - wide[:, w + 1:]).max() > 1e-2


@pytest.mark.parametrize("cap", [2.0, 0.0], ids=["softcap", "no-cap"])
def test_dense_attention_gradient_matches_autodiff(cap):
    """The hand-written attention backward equals autodiff of the plain formula (softmax of
    the capped, masked logits times v), for windowed and packed masks."""
    b, t, k, g, h = 2, 12, 2, 2, 8
    rq, rk, rv, rw = jax.random.split(jax.random.key(3), 4)
    q = 2 * jax.random.normal(rq, (b, t, k, g, h))
    key, v = 2 * jax.random.normal(rk, (b, t, k, h)), jax.random.normal(rv, (b, t, k, h))
    w = jax.random.normal(rw, (b, t, k, g, h))  # a loss that weighs every output differently
    segments = jnp.array([[1] * 7 + [2] * 5, [1] * 12])
    cfg = ModelConfig(num_layers=2, embed_dim=16, hidden_dim=32, num_heads=4, num_kv_heads=2, head_dim=h,
                      vocab_size=10, attn_softcap=cap)
    for mask in M.attention_masks(segments, sliding_window=5):
        def plain_out(q, key, v):
            return jnp.einsum("BKGTS,BSKH->BTKGH", M.masked_softmax(M.attention_logits(cfg, q, key), mask), v)

        def plain(q, key, v):
            return jnp.sum(plain_out(q, key, v) * w)

        def ours(q, key, v):
            return jnp.sum(M.dense_attention(q, key, v, mask, cap) * w)

        np.testing.assert_allclose(M.dense_attention(q, key, v, mask, cap), plain_out(q, key, v), atol=1e-5)
        for got, want in zip(jax.grad(ours, (0, 1, 2))(q, key, v), jax.grad(plain, (0, 1, 2))(q, key, v)):
            assert float(jnp.abs(want).max()) > 0.1
            np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("t", [512, 256])
def test_causal_blocks_equal_dense_attention(t):
    """Query blocks that skip the keys they cannot see give the full product's values and
    gradients, for global and windowed masks over packed sequences."""
    # The blocks really skip keys: worked out by hand from the causal and window limits.
    if t == 512:
        assert M.causal_blocks(t) == [(0, 128, 0), (128, 256, 0), (256, 384, 0), (384, 512, 0)]
        assert M.causal_blocks(t, 100) == [(0, 128, 0), (128, 256, 29), (256, 384, 157), (384, 512, 285)]
    else:
        assert M.causal_blocks(t, 100) == [(0, 128, 0), (128, 256, 29)]
    b, k, g, h = 1, 1, 2, 8
    rq, rk, rv, rw = jax.random.split(jax.random.key(4), 4)
    q = 2 * jax.random.normal(rq, (b, t, k, g, h))
    key, v = 2 * jax.random.normal(rk, (b, t, k, h)), jax.random.normal(rv, (b, t, k, h))
    w = jax.random.normal(rw, (b, t, k, g, h))
    segments = jnp.repeat(jnp.arange(1, 4), jnp.array([t // 2 + 3, t // 4, t // 4 - 3]))[None]
    local, global_ = M.attention_masks(segments, sliding_window=100)
    for mask, window in ((global_, None), (local, 100)):
        def full(q, key, v):
            return jnp.sum(M.dense_attention(q, key, v, mask, 50.0) * w)

        def blocked(q, key, v):
            return jnp.sum(M.causal_attention(q, key, v, mask, 50.0, window) * w)

        np.testing.assert_allclose(M.causal_attention(q, key, v, mask, 50.0, window),
                                   M.dense_attention(q, key, v, mask, 50.0), atol=1e-5)
        for got, want in zip(jax.grad(blocked, (0, 1, 2))(q, key, v), jax.grad(full, (0, 1, 2))(q, key, v)):
            np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))


def test_scan_equals_unrolled(small):
    cfg, params = small
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 20))
    scanned = np.asarray(M.logits(cfg, params, toks))
    unrolled_cfg = cfg.replace(scan_layers=False)
    unrolled = M.unstack_layers(cfg, params)
    assert jax.tree.structure(unrolled) == jax.tree.structure(M.param_shapes(unrolled_cfg))
    np.testing.assert_allclose(np.asarray(M.logits(unrolled_cfg, unrolled, toks)), scanned, atol=1e-5)
    restacked = M.stack_layers(cfg, unrolled)
    for x, y in zip(jax.tree.leaves(restacked), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("remat", ["full", "dots_no_batch"])
def test_remat_policies_keep_values_and_gradients(small, remat):
    cfg, params = small
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 12)))

    def loss(p, c):
        return jnp.mean(M.Transformer(c).apply({"params": p}, toks) ** 2)

    l0, g0 = jax.value_and_grad(loss)(params, cfg)
    l1, g1 = jax.value_and_grad(loss)(params, cfg.replace(remat=remat))
    np.testing.assert_allclose(l0, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sharded_params_give_same_logits(small):
    cfg, params = small
    cfg = cfg.replace(vocab_size=cfg.vocab_size)
    toks = np.random.default_rng(5).integers(0, cfg.vocab_size, (4, 16))
    ref = np.asarray(M.logits(cfg, params, toks))
    mesh = sharding.make_mesh(1, 4, 2)
    shardings = sharding.param_shardings(cfg, mesh)
    sharded = jax.device_put(params, shardings)
    q = sharded["layers"]["local"]["attn"]["q_einsum"]["w"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp", None)
    assert len({s.device for s in q.addressable_shards}) == 8
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = M.logits(cfg, sharded, jax.device_put(toks, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_bfloat16_compute_is_close_to_float32(small):
    cfg, params = small
    toks = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 16))
    f32 = np.asarray(M.logits(cfg, params, toks))
    bf16 = M.logits(cfg.replace(dtype="bfloat16"), params, toks)
    assert bf16.dtype == jnp.float32  # logits always come back in float32
    # bf16 has ~3 significant digits; after 3 layers expect agreement to a few percent of the range.
    assert np.abs(np.asarray(bf16) - f32).max() < 0.1 * np.abs(f32).max()
    assert np.abs(np.asarray(bf16) - f32).max() > 0  # it really ran in bf16


def test_embedding_scale_is_rounded_to_activation_dtype():
    for d, expected in [(2304, 48.0), (3584, 59.75), (4608, 68.0)]:
        assert float(jnp.asarray(np.sqrt(d), jnp.bfloat16)) == expected
    cfg = ModelConfig.from_preset("gemma2_test", embed_dim=72, num_heads=2, num_kv_heads=1,
                                  dtype="bfloat16", param_dtype="bfloat16")
    emb = M.Embedder(cfg)
    table = jnp.ones((cfg.vocab_size, cfg.embed_dim), jnp.bfloat16)
    x = emb.apply({"params": {"input_embedding": table}}, jnp.zeros((1, 1), jnp.int32), method="encode")
    assert float(x[0, 0, 0]) == float(jnp.asarray(np.sqrt(72), jnp.bfloat16))


def test_softcaps_bound_logits(small):
    cfg, params = small
    big = jax.tree.map(lambda p: p * 50, params)
    out = np.asarray(M.logits(cfg, big, np.arange(16)[None] % cfg.vocab_size))
    assert np.abs(out).max() <= cfg.final_softcap + 1e-3
    assert np.abs(out).max() > 0.9 * cfg.final_softcap  # the cap was actually reached


def test_flops_count_knows_the_window():
    c = ModelConfig.from_preset("gemma2_test")
    short = c.flops_per_token(c.sliding_window, training=False)
    long_ = c.flops_per_token(8 * c.sliding_window, training=False)
    full = c.replace(sliding_window=10**6).flops_per_token(8 * c.sliding_window, training=False)
    assert short < long_ < full
    # By hand for a 1-layer, 1-token case: matmuls + attention over one key + unembedding.
    one = ModelConfig(num_layers=1, embed_dim=4, hidden_dim=8, num_heads=2, num_kv_heads=1, head_dim=2,
                      vocab_size=10)
    matmul = 2 * (2 * 2 * 4 * 2 + 2 * 1 * 4 * 2 + 3 * 4 * 8)
    assert one.flops_per_token(1, training=False) == matmul + 4 * 2 * 2 * 1 + 2 * 4 * 10
    assert one.flops_per_token(1) == 3 * one.flops_per_token(1, training=False)

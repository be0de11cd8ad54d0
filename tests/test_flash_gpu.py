"""The GPU flash kernel (model/flash_gpu.py) against the xla path, through Pallas interpret mode.

Interpret mode runs the kernel's own blocked program on CPU (the key-block walk, the online
softmax, the dq and dk/dv kernels, the GQA sum), so these comparisons check its numerics and
masking, though not Triton compilation or speed.

How exact is exact: with logits pushed far past the cap (|q . k| up to several times 50) the
capped logits sit near 50, which float32 holds to ~4e-6, and the xla path itself is then
~1e-5 (outputs) and ~1e-4 (gradients) away from the same math in float64. So each case takes
the xla path in float64 as the truth and asserts that the kernel is within 1e-5 / 1e-4 of
it, scaled by the xla path's own float32 error where that floor is higher: no less exact
than the xla path. A second assertion compares the kernel with the float32 xla path directly.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import model as M
from gemma_jax import sharding
from gemma_jax.model import ModelConfig
from gemma_jax.model import attention as A
from gemma_jax.model import flash_gpu as F
from gemma_jax.model import kernels as AK

CAP = 50.0


def test_choose_picks_flash_gpu_only_on_gpu_where_it_fits():
    assert AK.choose("auto", "gpu", 2048, 256) == "flash_gpu"  # 2B / 9B
    assert AK.choose("auto", "gpu", 8192, 128) == "flash_gpu"  # 27B
    assert AK.choose("auto", "gpu", 2000, 256) == "xla"  # not whole blocks
    assert AK.choose("auto", "gpu", 2048, 96) == "xla"  # not a power-of-two head dim
    assert AK.choose("auto", "gpu", 2048, 512) == "xla"  # beyond the tiles it is sized for
    assert AK.choose("auto", "cpu", 2048, 256) == "xla"
    assert AK.choose("auto", "tpu", 2048, 256) == "splash"
    assert AK.choose("xla", "gpu", 2048, 256) == "xla"
    assert AK.choose("flash_gpu", "cpu", 64, 16) == "flash_gpu"  # explicit: interpret mode
    assert AK.choose("flash_gpu", "tpu", 48, 128) == "flash_gpu"
    assert AK.choose("flash_gpu", "gpu", 1, 256) == "xla"  # init_params' one-token pass
    assert AK.choose("flash_gpu", "gpu", 2048, 96) == "xla"
    assert ModelConfig.from_preset("gemma2_test", attention_impl="flash_gpu").attention_impl == "flash_gpu"


@pytest.mark.parametrize("bq,bk,window", [(16, 16, 24), (32, 16, 24), (16, 32, 40), (64, 16, 20), (16, 64, None)])
def test_block_walks_cover_exactly_the_blocks_with_visible_keys(bq, bk, window):
    """Each walk visits every block holding a visible (q, k) pair and skips every other one."""
    t = 128
    q_T1, k_1S = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (k_1S <= q_T1) & (True if window is None else q_T1 - k_1S < window)
    blocks = visible.reshape(t // bq, bq, t // bk, bk).any(axis=(1, 3))  # [q block, key block]
    for i in range(t // bq):
        lo, hi = (int(x) for x in F.key_blocks(i, bq, bk, window))
        assert np.flatnonzero(blocks[i]).tolist() == list(range(lo, hi))
    for j in range(t // bk):
        lo, hi = (int(x) for x in F.query_blocks(j, bq, bk, window, t // bq))
        assert np.flatnonzero(blocks[:, j]).tolist() == list(range(lo, hi))
    if window is not None and window + max(bq, bk) < t:
        assert not blocks.all(axis=None)  # some blocks are skipped


def _inputs(g, h, t=64, b=2, k=2, seed=0):
    """Logits far past the cap; row 0 packs three documents and padding (segment 0)."""
    rng = np.random.default_rng(seed)
    scale = 7.0 * h ** -0.25  # q . k ~ N(0, 50^2): most logits at or past the cap
    q = rng.normal(0, scale, (b, t, k, g, h)).astype(np.float32)
    keys = rng.normal(0, scale, (b, t, k, h)).astype(np.float32)
    v = rng.normal(0, 1, (b, t, k, h)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, 20:37], seg[0, 37:50], seg[0, 50:] = 2, 3, 0
    w = rng.normal(0, 1, q.shape).astype(np.float32)  # a random output cotangent
    return q, keys, v, seg, w


def _value_and_grads(attend, q, keys, v, w):
    """(output, (dq, dk, dv)) of sum(attend(q, k, v) * w)."""
    out = attend(q, keys, v)
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2))(q, keys, v)
    return [out, *grads]


def _xla(seg, window):
    """The xla path (dense_attention under the model's masks), in the inputs' dtype."""
    local_BTS, global_BTS = A.attention_masks(jnp.asarray(seg), window or 10**6)
    return lambda q, k, v: A.dense_attention(q, k, v, local_BTS if window else global_BTS, CAP)


CASES = [  # (G, H, window, blocks, on a mesh)
    (1, 128, 24, F.Blocks(16, 16, 16, 16), False),
    (2, 256, None, F.Blocks(32, 16, 16, 32), False),
    (4, 128, 24, F.Blocks(16, 32, 32, 16), False),
    (2, 256, 24, F.Blocks(16, 16, 16, 16), True),
]


@pytest.mark.parametrize("g,h,window,blocks,on_mesh", CASES,
                         ids=[f"G{c[0]}-H{c[1]}-{'local' if c[2] else 'global'}{'-mesh' if c[4] else ''}" for c in CASES])
def test_flash_gpu_matches_xla_attention(g, h, window, blocks, on_mesh):
    q, keys, v, seg, w = _inputs(g, h)
    assert np.abs(np.einsum("BTKGH,BSKH->BKGTS", q, keys)).max() > 3 * CAP  # far past the cap

    def flash(q, k, v):
        return AK.flash_gpu_attention(q, k, v, jnp.asarray(seg), window=window, softcap=CAP, blocks=blocks,
                                      interpret=True)

    if on_mesh:  # per shard: batch over fsdp, kv heads over tensor, replicated over data
        rules = tuple((name, "fsdp" if name == "batch" else axes) for name, axes in sharding.DEFAULT_RULES)
        with jax.set_mesh(sharding.make_mesh(2, 2, 2)), nn.logical_axis_rules(rules):
            fast = jax.jit(lambda *a: _value_and_grads(flash, *a))(q, keys, v, w)
    else:
        fast = jax.jit(lambda *a: _value_and_grads(flash, *a))(q, keys, v, w)
    fast = [np.asarray(x) for x in fast]
    ref32 = [np.asarray(x) for x in _value_and_grads(_xla(seg, window), q, keys, v, w)]
    with jax.enable_x64(True):
        ref64 = [np.asarray(x) for x in _value_and_grads(_xla(seg, window), *(x.astype(np.float64) for x in (q, keys, v, w)))]
    for name, a, r32, r64, tol in zip(("out", "dq", "dk", "dv"), fast, ref32, ref64, (1e-5, 1e-4, 1e-4, 1e-4)):
        assert a.dtype == np.float32
        floor = np.abs(r32 - r64).max()  # the xla path's own float32 error
        err = np.abs(a - r64).max()
        assert err <= max(tol, 1.25 * floor), (name, err, floor)
        np.testing.assert_allclose(a, r32, atol=tol + 2 * floor, rtol=0, err_msg=name)


def test_flash_gpu_bf16_inputs_accumulate_in_float32():
    """bf16 in, bf16 out, float32 inside: as close to the float64 truth as bf16 rounding of the
    output allows, where a bf16 accumulation would be off by far more."""
    q, keys, v, seg, _ = _inputs(2, 128, seed=1)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, keys, v)]
    out = AK.flash_gpu_attention(*bf, jnp.asarray(seg), window=24, softcap=CAP, blocks=F.Blocks(16, 16, 16, 16),
                                 interpret=True)
    assert out.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        ref = _xla(seg, 24)(*(np.asarray(x, np.float64) for x in bf))
    err = np.abs(np.asarray(out, np.float64) - np.asarray(ref)).max()
    assert err <= 2 ** -8 * np.abs(np.asarray(ref)).max()  # within bf16's half ulp of the largest output


def test_model_flash_gpu_path_matches_xla():
    """The wiring: segment ids and the local flag reach every layer, the trailing one too."""
    cfg = ModelConfig.from_preset("gemma2_test", sliding_window=24)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), M.param_shapes(cfg))
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    seg = np.ones((2, 64), np.int32)
    seg[1, 30:], seg[0, 50:] = 2, 0
    run = jax.jit(lambda p, c: M.Transformer(c).apply({"params": p}, toks, None, jnp.asarray(seg)), static_argnums=1)
    traced = run.trace(params, cfg.replace(attention_impl="flash_gpu"))
    assert str(traced.jaxpr).count("pallas_call") == 3  # the scanned local/global pair and the trailing local layer
    out = traced.lower().compile()(params)
    ref = run(params, cfg.replace(attention_impl="xla"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_kernels_lower_to_triton_for_a_gpu(dtype):
    """The Triton lowering (the part that needs no GPU: jaxpr -> Triton IR) accepts all three
    kernels at the 2b head shape with the default tiles, so a GPU run fails only in Triton's
    own compilation, if at all."""
    b, t, k, g, h = 1, 512, 2, 2, 256
    w = jnp.ones((b, t, k, g, h), jnp.float32)

    def step(q, keys, v, seg):
        def f(q, keys, v):
            out = F.flash_attention(q, keys, v, seg, window=128, softcap=CAP, interpret=False)
            return jnp.sum(out.astype(jnp.float32) * w)
        return jax.grad(f, argnums=(0, 1, 2))(q, keys, v)

    shapes = (jax.ShapeDtypeStruct((b, t, k, g, h), dtype), jax.ShapeDtypeStruct((b, t, k, h), dtype),
              jax.ShapeDtypeStruct((b, t, k, h), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32))
    text = jax.jit(step).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 3  # Triton IR, one kernel each
    for name in ("gemma_flash_fwd", "gemma_flash_dq", "gemma_flash_dkv"):
        assert name in text

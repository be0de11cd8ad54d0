"""Attention analysis: sown probabilities respect every mask, and a changed head is found and ranked first."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from gemma_jax import attention, model as model_lib, weights
from gemma_jax.eval import attention as analysis
from gemma_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
ALTERED_HEAD = 1  # kv head 0, group 1: a [K, G] vs [G, K] mix-up would report it as head 2


def random_params(config, *, seed: int = 0):
    """Random float32 params, large enough that attention is far from uniform (the init's std
    0.02 gives nearly flat attention, where a changed head would barely show)."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        std = 1.0 if "input_embedding" in jax.tree_util.keystr(path) else 0.3 if len(s.shape) > 1 else 0.1
        return rng.normal(0.0, std, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, model_lib.param_shapes(config))


def with_altered_head(params, head: int, scale: float):
    """A copy of params with one query head of the first local layer scaled (sharper attention)."""
    out = jax.tree.map(np.array, params)
    out["layers"]["local"]["attn"]["q_einsum"]["w"][0, head] *= scale
    return out


@pytest.fixture(scope="module")
def test_model():
    config = model_lib.ModelConfig.from_preset("gemma2_test", vocab_size=2048)
    assert config.sliding_window == 8 and config.num_layers == 3  # an unpaired last layer too
    return config, random_params(config)


def packed_batch():
    """Row 0: two packed segments of 14 and 10 tokens; row 1: 20 tokens then padding."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 2048, (2, 24)).astype(np.int32)
    segments = np.array([[1] * 14 + [2] * 10, [1] * 20 + [0] * 4], np.int32)
    return tokens, segments


def test_probabilities_respect_causal_window_and_segment_masks(test_model):
    config, params = test_model
    tokens, segments = packed_batch()
    probs = np.asarray(jax.jit(analysis.attention_probs, static_argnames="config")(config, params, tokens, segments))
    L, B, N, T, S = probs.shape
    assert (L, B, N, T, S) == (3, 2, 4, 24, 24)

    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    same = segments[:, :, None] == segments[:, None, :]
    visible_global = same & (s <= t)
    visible_local = visible_global & (t - s < config.sliding_window)
    for layer in range(L):
        visible = (visible_local if config.is_local(layer) else visible_global)[:, None]  # [B, 1, T, S]
        visible = np.broadcast_to(visible, probs[layer].shape)
        assert np.all(probs[layer][~visible] == 0), f"layer {layer}: weight on a masked key"
        assert np.all(probs[layer][visible] > 0), f"layer {layer}: a visible key got no weight"
        np.testing.assert_allclose(probs[layer].sum(-1), 1.0, atol=1e-5)
    # The global layer really sees past the window (so the check above can tell the layers apart).
    far = visible_global & (t - s >= config.sliding_window)
    assert far.any() and np.all(probs[1][np.broadcast_to(far[:, None], probs[1].shape)] > 0)



def test_layer_probs_puts_scanned_pairs_in_layer_order():
    """5 layers: pairs (0, 1) and (2, 3) stacked under local/global, layer 4 outside the scan.

    Each fake probability array is filled with its layer number, and query head n with n / 10,
    so the result shows where every layer and head ended up.
    """
    config = model_lib.ModelConfig.from_preset("gemma2_test", num_layers=5)
    K, G, T = config.num_kv_heads, config.num_groups, 3

    def layer(i):  # [B=1, K, G, T, S]
        head_KG = np.arange(K * G).reshape(K, G) / 10
        return np.broadcast_to((i + head_KG)[None, :, :, None, None], (1, K, G, T, T)).astype(np.float32)

    sown = lambda x: {"attn": {"attention_probs": (x,)}}  # noqa: E731
    scanned = {"intermediates": {
        "layers": {"local": sown(np.stack([layer(0), layer(2)])), "global": sown(np.stack([layer(1), layer(3)]))},
        "layer_4": sown(layer(4))}}
    unrolled = {f"layer_{i}": sown(layer(i)) for i in range(5)}
    want = np.arange(5)[:, None] + np.arange(K * G)[None, :] / 10  # [L, N]
    for cfg, tree in ((config, scanned), (config.replace(scan_layers=False), unrolled)):
        probs = np.asarray(analysis.layer_probs(cfg, tree))
        assert probs.shape == (5, 1, K * G, T, T)
        np.testing.assert_allclose(probs[:, 0, :, 0, 0], want, atol=1e-6)


def test_model_against_itself_changes_nothing(test_model):
    config, params = test_model
    tokens, _ = packed_batch()
    stats = analysis.head_changes(config, params, params, [list(r) for r in tokens], batch_size=2)
    assert stats["js"].shape == (3, 4)
    assert np.all(stats["js"] == 0)
    np.testing.assert_array_equal(stats["entropy_base"], stats["entropy_tuned"])
    np.testing.assert_array_equal(stats["distance_base"], stats["distance_tuned"])
    assert np.all(stats["entropy_base"] > 0) and np.all(stats["distance_base"] > 0)
    assert stats["queries"] == 48


def test_statistics_by_hand():
    """One query over 4 visible keys: uniform -> 2 bits, mean distance 1.5; disjoint halves -> JS 1 bit."""
    p = np.zeros((1, 1, 1, 4, 4), np.float32)
    p[..., 3, :] = 0.25
    p[..., :3, 0] = 1.0  # other queries: all weight on key 0 (entropy 0)
    assert np.asarray(analysis.entropy(p))[0, 0, 0].tolist() == pytest.approx([0, 0, 0, 2])
    assert np.asarray(analysis.mean_distance(p))[0, 0, 0].tolist() == pytest.approx([0, 1, 2, 1.5])
    q = np.zeros_like(p)
    q[..., 3, :2], q[..., :3, 0] = 0.5, 1.0
    r = np.zeros_like(p)
    r[..., 3, 2:], r[..., :3, 0] = 0.5, 1.0
    assert np.asarray(analysis.js_divergence(q, r))[0, 0, 0].tolist() == pytest.approx([0, 0, 0, 1])
    # Uniform vs half: KL terms 0.5*log2(0.25/0.375)*2 + ... computed directly.
    m = (p[0, 0, 0, 3] + q[0, 0, 0, 3]) / 2
    kl = lambda a: sum(x * np.log2(x / y) for x, y in zip(a, m) if x > 0)  # noqa: E731
    want = 0.5 * kl(p[0, 0, 0, 3]) + 0.5 * kl(q[0, 0, 0, 3])
    assert float(np.asarray(analysis.js_divergence(p, q))[0, 0, 0, 3]) == pytest.approx(want, rel=1e-5)


def test_altered_head_ranks_first(test_model):
    config, params = test_model
    tokens, _ = packed_batch()
    altered = with_altered_head(params, ALTERED_HEAD, 4.0)
    stats = analysis.head_changes(config, params, altered, [list(r) for r in tokens], batch_size=2)
    ranked = analysis.rank_heads(config, stats)
    assert (ranked[0]["layer"], ranked[0]["head"], ranked[0]["kind"]) == (0, ALTERED_HEAD, "local")
    # Its layer-mates read the same inputs with unchanged weights: exactly unchanged.
    others = np.delete(stats["js"][0], ALTERED_HEAD)
    assert np.all(others < 1e-7), others
    # Later layers change only through the residual stream: clearly less.
    assert ranked[0]["js"] > 2 * ranked[1]["js"] > 0
    # Larger queries sharpen the head.
    assert ranked[0]["entropy_tuned"] < ranked[0]["entropy_base"]


def test_cli_writes_json_markdown_and_heatmap(tmp_path, test_model, monkeypatch):
    """The command line end to end; loading is stubbed (checkpoint formats have their own tests)."""
    config, params = test_model
    models = {"base": params, "tuned": with_altered_head(params, ALTERED_HEAD, 4.0)}
    loaded = []

    def load(path, *, dtype=None, mesh=None, rules=None):
        loaded.append((path, dtype))
        return config, models[path]

    monkeypatch.setattr(weights, "load", load)
    tok = str(REPO / "data" / "tokenizer.model")
    out = tmp_path / "report"
    rc = attention.main(["--base=base", "--tuned=tuned", f"--tokenizer={tok}",
                         f"--data={REPO / 'data/translation/eval.csv'}", f"--output={out}", "--max_prompts=3",
                         "--seq_len=24", "--batch_size=2", "--top_heads=3",
                         "--mesh=none"])  # the shapes of the tests above: no new compilation
    assert rc == 0
    assert loaded == [("base", "float32"), ("tuned", "float32")]
    report = json.loads((out / "attention.json").read_text())
    assert (report["ranked"][0]["layer"], report["ranked"][0]["head"]) == (0, ALTERED_HEAD)
    assert report["prompts"] == 3 and len(report["grids"]["js"]) == config.num_layers
    heads = report["sample"]["heads"]
    assert len(heads) == 3 and len(heads[0]["base"]) == 5
    # The prompt is chat-formatted as for generation (and cut to --seq_len).
    assert report["sample"]["text"].startswith("<start_of_turn>user\nTranslate this sentence into French:")
    tokenizer = Tokenizer(tok)
    assert all(tokenizer.piece_to_id(t["token"]) != tokenizer.unk_id for t in heads[0]["tuned"])
    md = (out / "attention.md").read_text()
    assert "| 1 | 0 | local | 1 |" in md
    png = (out / "attention_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000

"""Sampling: cached decoding vs the full forward, parity with transformers.generate, sampling
filters, stops, errors, sharded params, and the command line."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from gemma_jax import sharding, weights
from gemma_jax.model import kv_cache
from gemma_jax.model import layers as M
from gemma_jax import sample as S
from gemma_jax.model import ModelConfig
from gemma_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizer.model"


def init(config, seed=0):
    """Random params; jitted, since initialising op by op compiles dozens of small programs."""
    return jax.jit(M.init_params, static_argnums=0)(config, jax.random.key(seed))


def boosted(config, seed=0):
    """Random params whose greedy output is varied: layer outputs outweigh the (tied) input
    embedding, which otherwise makes a random model echo its last token."""
    params = init(config, seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if "post_" in name:
            return x + 30.0
        return x * 50 if x.ndim > 1 and "embedder" not in name else x

    return jax.tree_util.tree_map_with_path(one, params)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def chatty(tokenizer):
    """A tiny model over the shipped tokenizer's vocabulary that writes varied text."""
    config = ModelConfig.from_preset("gemma2_test", vocab_size=tokenizer.vocab_size)
    return config, boosted(config)


def random_prompts(config, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[2] + [int(t) for t in rng.integers(4, config.vocab_size, n - 1)] for n in lengths]


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("scan,few_tokens", [(True, M.FEW_TOKENS), (False, M.FEW_TOKENS), (True, 8)],
                         ids=["scanned", "unrolled", "plain-prefill"])
def test_cached_decoding_matches_full_forward(scan, few_tokens, monkeypatch, request):
    config = ModelConfig.from_preset("gemma2_test")  # window 8, odd layer count, GQA
    params = jax.tree.map(lambda p: p * 10 if p.ndim > 1 else p + 0.3, init(config))
    # The scanned layers decode as they do on accelerators (CPU otherwise unrolls them first).
    monkeypatch.setattr(S, "UNROLL_LAYERS_ON_CPU", not scan)
    if few_tokens != M.FEW_TOKENS:  # prefill (4 x 32 tokens) by per-slice products, decode steps stacked
        monkeypatch.setattr(M, "FEW_TOKENS", few_tokens)
        jax.clear_caches()  # programs traced under the other setting must not be reused, nor leak out
        request.addfinalizer(jax.clear_caches)
    # One prompt inside the window, two longer than it; 30 new tokens wrap the 8-slot ring ~4 times.
    prompts = random_prompts(config, (3, 13, 20))
    out = S.generate_ids(config, params, prompts, max_new_tokens=30, temperature=1.0, seed=3, return_logits=True)
    assert len({tuple(t) for t in out.tokens}) == 3
    seqs = [p + t for p, t in zip(prompts, out.tokens)]
    width = max(map(len, seqs))  # right padding: causal, so the real tokens' logits are unchanged
    full = np.asarray(M.logits(config, params, np.array([s + [0] * (width - len(s)) for s in seqs])))
    assert S.decoding_layout(config, params)[0].scan_layers == scan
    for prompt, tokens, logits, row in zip(prompts, out.tokens, out.logits, full):
        assert len(tokens) == 30
        ref = row[len(prompt) - 1:len(prompt) + 29]
        assert np.abs(ref).max() > 5  # not a near-uniform model
        np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_cache_layout_local_layers_keep_only_the_window():
    config = ModelConfig.from_preset("gemma2_test")
    cache = kv_cache.init_cache(config, batch=2, length=100)
    pairs, k, h = config.num_layers // 2, config.num_kv_heads, config.head_dim
    assert cache["layers"]["local"]["k"].shape == (pairs, 2, k, config.sliding_window, h)
    assert cache["layers"]["global"]["v"].shape == (pairs, 2, k, 100, h)
    assert cache["layer_2"]["k"].shape == (2, k, config.sliding_window, h)  # trailing layer is local
    assert cache["positions"]["global"].shape == (2, 100) and int(cache["positions"]["local"].max()) == -1
    small = kv_cache.init_cache(config, batch=1, length=5)
    assert small["layers"]["local"]["k"].shape[3] == 5  # never more slots than the cache length


def test_ring_buffer_slots():
    # A prefill chunk of 6 tokens (the last one padding) into an empty 4-slot ring: only the last
    # 4 real tokens (positions 3-6) are written, each at position % 4.
    mask, slots, after = kv_cache.cache_update(jnp.full((1, 4), -1), jnp.array([[2, 3, 4, 5, 6, -1]]), 4)
    np.testing.assert_array_equal(np.asarray(slots), [[4, 3, 0, 1, 2, 4]])  # 4 = not written
    np.testing.assert_array_equal(np.asarray(after), [[4, 5, 6, 3]])
    # The chunk attends to itself: position 4 sees 2, 3, 4 (window 4), not later, not padding.
    keys = [2, 3, 4, 5, 6, -1]
    assert [k for k, m in zip(keys, np.asarray(mask)[0, 2]) if m] == [2, 3, 4]
    # One token is written first and sees the updated slots: position 7 replaces 3 (out of its window).
    mask, slots, after = kv_cache.cache_update(jnp.array([[4, 5, 6, 3], [4, 5, 6, 3]]), jnp.array([[7], [-1]]), 4)
    np.testing.assert_array_equal(np.asarray(slots), [[3], [4]])
    np.testing.assert_array_equal(np.asarray(after), [[4, 5, 6, 7], [4, 5, 6, 3]])
    np.testing.assert_array_equal(np.asarray(mask)[:, 0], [[True] * 4, [False] * 4])  # padding sees nothing


def test_greedy_matches_transformers_generate(tmp_path):
    import torch

    config = ModelConfig(num_layers=3, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
                         query_pre_attn_scalar=24, vocab_size=512, sliding_window=8)
    hf = helpers.make_hf_model(config, None, scale=1.0)
    torch.manual_seed(1)
    with torch.no_grad():  # varied greedy text (see `boosted`)
        for name, p in hf.named_parameters():
            if "post_" in name:
                p.normal_(30.0, 1.0)
    hf.save_pretrained(tmp_path)
    cfg, params = weights.load(tmp_path)
    prompts = random_prompts(config, (3, 13, 7), seed=4)
    new = 24  # every row runs well past the 8-token window

    def hf_generate(eos):
        width = max(map(len, prompts))
        ids, mask = np.zeros((len(prompts), width), np.int64), np.zeros((len(prompts), width), np.int64)
        for i, p in enumerate(prompts):  # HF batches with left padding
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        with torch.no_grad():
            out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                              do_sample=False, pad_token_id=0, eos_token_id=list(eos)).numpy()[:, width:]
        rows = []
        for row in out.tolist():
            ends = [j for j, t in enumerate(row) if t in eos]
            rows.append(row[:ends[0] + 1] if ends else row)
        return rows

    free = S.generate_ids(cfg, params, prompts, max_new_tokens=new, stop_ids=(1,)).tokens
    assert free == hf_generate((1,))
    assert all(len(set(row)) > 5 for row in free)
    # A stop token that row 1 produces mid-way: HF and we end that row there, and only that row.
    stop = free[1][10]
    stopped = S.generate_ids(cfg, params, prompts, max_new_tokens=new, stop_ids=(1, stop)).tokens
    assert stopped == hf_generate((1, stop))
    assert len(stopped[1]) == free[1].index(stop) + 1 < new
    for row, full in zip(stopped, free):
        assert row == (full[:full.index(stop) + 1] if stop in full else full)


# ----------------------------------------------------------------------------- sampling


PROBS = np.array([0.3, 0.25, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.006, 0.004])


def draw(n, temperature, top_k, top_p, seed=0, vocab_limit=0):
    sampler = S.Sampler(greedy=temperature == 0, top_k=top_k, top_p=top_p < 1, vocab_limit=vocab_limit)
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, 1))
    fn = jax.jit(S.sample_tokens, static_argnames="sampler")
    return np.asarray(fn(logits, jax.random.key(seed), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                         sampler=sampler))


@pytest.mark.parametrize("temperature,top_k,top_p,allowed", [
    (1.0, 3, 1.0, {0, 1, 2}),
    (1.0, 0, 0.7, {0, 1, 2}),  # mass before token 2 is 0.55 < 0.7, before token 3 it is 0.75
    (1.0, 0, 0.5, {0, 1}),
    (1.0, 0, 0.01, {0}),  # the most likely token always stays
    (1.0, 6, 0.92, {0, 1, 2, 3, 4}),  # top-k, then nucleus over the 6 renormalised: 0.904 before 4
    (0.5, 0, 0.8, {0, 1, 2}),  # temperature first: p^2 renormalised puts 0.43, 0.30, 0.19, ... on 0-2
    (1.0, 0, 1.0, set(range(10))),
])
def test_top_k_top_p_sample_only_the_allowed_set(temperature, top_k, top_p, allowed):
    tokens = draw(4000, temperature, top_k, top_p)
    assert set(tokens.tolist()) == allowed  # nothing outside, and every allowed token shows up
    # Frequencies follow the filtered, renormalised distribution.
    p = PROBS ** (1 / temperature)
    p = np.where(np.isin(np.arange(10), list(allowed)), p, 0)
    p /= p.sum()
    freq = np.bincount(tokens, minlength=10) / len(tokens)
    assert np.abs(freq - p).max() < 0.035


def test_greedy_and_vocab_limit():
    assert set(draw(50, 0.0, 5, 0.5).tolist()) == {0}  # temperature 0: argmax, filters ignored
    assert set(draw(50, 0.0, 0, 1.0, vocab_limit=0).tolist()) == {0}
    assert set(draw(2000, 1.0, 0, 1.0, vocab_limit=4).tolist()) == {0, 1, 2, 3}  # padding ids never drawn
    assert set(draw(50, 0.0, 0, 1.0, vocab_limit=1).tolist()) == {0}


def test_seed_reproducible_and_seeds_differ(chatty, tokenizer):
    config, params = chatty
    prompts = ["The capital of France is", "Once upon a time"]
    kw = dict(max_new_tokens=24, temperature=0.7, top_k=50, top_p=0.95)  # the seed example's settings
    a = S.generate(config, params, tokenizer, prompts, seed=1, **kw)
    assert S.generate(config, params, tokenizer, prompts, seed=1, **kw) == a
    assert S.generate(config, params, tokenizer, prompts, seed=2, **kw) != a
    assert all(a) and a[0] != a[1]
    greedy = S.generate(config, params, tokenizer, prompts, max_new_tokens=24)
    assert greedy != a
    assert S.generate(config, params, tokenizer, prompts, max_new_tokens=24, top_k=5, top_p=0.5, seed=9) == greedy


def test_compilations_are_bucketed(chatty):
    config, params = chatty
    S.generate_ids(config, params, random_prompts(config, (3, 5)), max_new_tokens=5)
    sizes = S._prefill._cache_size(), S._decode._cache_size()
    # Other prompt lengths, batch size and limits in the same buckets reuse both programs.
    S.generate_ids(config, params, random_prompts(config, (7, 4), seed=1), max_new_tokens=7)
    S.generate_ids(config, params, random_prompts(config, (2, 6), seed=2), max_new_tokens=[6, 8])
    assert (S._prefill._cache_size(), S._decode._cache_size()) == sizes
    assert [S.bucket(n) for n in (1, 8, 9, 100, 1024, 1025, 5000)] == [8, 8, 16, 128, 1024, 2048, 5120]


# ----------------------------------------------------------------------------- stops and text


def test_stop_tokens_end_rows_independently(chatty):
    config, params = chatty
    prompts = random_prompts(config, (4, 9, 6), seed=5)
    free = S.generate_ids(config, params, prompts, max_new_tokens=20).tokens
    stop = free[0][6]
    assert stop not in free[0][:6]
    out = S.generate_ids(config, params, prompts, max_new_tokens=20, stop_ids=(stop,)).tokens
    for row, full in zip(out, free):
        assert row == (full[:full.index(stop) + 1] if stop in full else full)
    assert len(out[0]) == 7 and any(len(r) == 20 for r in out)
    # Per-row limits (what max_length becomes) end rows independently too.
    limited = S.generate_ids(config, params, prompts, max_new_tokens=[3, 20, 11]).tokens
    assert limited == [free[0][:3], free[1], free[2][:11]]


def test_stop_strings_and_streaming(chatty, tokenizer):
    config, params = chatty
    prompts = ["The capital of France is", "Once upon a time", "hello"]
    free = S.generate(config, params, tokenizer, prompts, max_new_tokens=30)
    start = next(i for i in range(8, 20) if "\ufffd" not in free[0][i:i + 3] and free[0][i:i + 3].strip()
                 and free[0].index(free[0][i:i + 3]) == i and free[0][i:i + 3] not in free[1])
    stop = free[0][start:start + 3]
    streamed = {i: [] for i in range(3)}
    out = S.generate(config, params, tokenizer, prompts, max_new_tokens=30, stop=[stop, "never-said"],
                     stream=lambda i, text: streamed[i].append(text))
    assert out[0] == free[0][:start]
    assert out[1] == free[1]
    assert out[2] == (free[2][:free[2].index(stop)] if stop in free[2] else free[2])
    for i in range(3):
        assert "".join(streamed[i]) == out[i]
    assert len(streamed[1]) > 5  # streamed in pieces, not in one go at the end
    # A stop id (added to EOS and <end_of_turn>) ends its row before the stop token's text.
    ids = S.generate_ids(config, params, [S.encode_prompt(tokenizer, p, chat=False) for p in prompts],
                         max_new_tokens=30).tokens
    stop_id = ids[1][4]
    cut = S.generate(config, params, tokenizer, prompts, max_new_tokens=30, stop_ids=[stop_id])
    assert cut[1] == tokenizer.decode(ids[1][:ids[1].index(stop_id)])
    assert cut[1] != free[1]


def test_max_length_counts_prompt_and_output(chatty, tokenizer):
    config, params = chatty
    prompts = ["The capital of France is", "hi"]
    n = [len(S.encode_prompt(tokenizer, p, chat=False)) for p in prompts]
    by_length = S.generate(config, params, tokenizer, prompts, max_length=n[0] + 6)
    assert by_length[0] == S.generate(config, params, tokenizer, prompts[:1], max_new_tokens=6)[0]
    assert by_length[1] == S.generate(config, params, tokenizer, prompts[1:], max_new_tokens=n[0] + 6 - n[1])[0]


def test_chat_and_raw_prompts(tokenizer):
    raw = S.encode_prompt(tokenizer, "Hello there", chat=False)
    assert raw == [tokenizer.bos_id] + tokenizer.encode("Hello there", add_bos=False)
    chat = S.encode_prompt(tokenizer, "Hello there", chat=True)
    assert tokenizer.decode(chat) == "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Tell me more"}]
    ids = S.encode_prompt(tokenizer, history, chat=False)  # messages are always a chat
    assert ids == tokenizer.encode(tokenizer.format_chat(history, add_generation_prompt=True)[len("<bos>"):])


def test_errors(chatty, tokenizer):
    config, params = chatty
    gen = lambda **kw: S.generate(config, params, tokenizer, ["hi"], **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="temperature"):
        gen(temperature=-0.1)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="top_p"):
            gen(temperature=1.0, top_p=bad)
    with pytest.raises(ValueError, match="top_k"):
        gen(top_k=-1)
    with pytest.raises(ValueError, match="max_length"):
        gen(max_new_tokens=None, max_length=2)  # BOS + "hi" already fill it
    with pytest.raises(ValueError, match="not both"):
        gen(max_length=50)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen(max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen(max_new_tokens=config.max_seq_len)
    with pytest.raises(ValueError, match="cache holds 8"):
        S.generate_ids(config, params, [[2] * 6], max_new_tokens=3, cache_length=8)
    with pytest.raises(ValueError, match="role"):
        S.generate(config, params, tokenizer, [[{"role": "robot", "content": "x"}]], max_new_tokens=2)
    assert gen(temperature=0.0, top_p=0.3, top_k=3) == gen()  # temperature 0 is greedy, no division


def test_sharded_params_give_the_same_tokens(chatty):
    config, params = chatty
    prompts = random_prompts(config, (3, 11, 6), seed=7)
    ref = S.generate_ids(config, params, prompts, max_new_tokens=12).tokens
    mesh = sharding.make_mesh(1, 4, 2)
    sharded = jax.device_put(params, sharding.param_shardings(config, mesh))
    assert len(sharded["layers"]["local"]["attn"]["q_einsum"]["w"].sharding.device_set) == 8
    assert S.generate_ids(config, params=sharded, prompts=prompts, max_new_tokens=12, mesh=mesh).tokens == ref


# ----------------------------------------------------------------------------- command line


def test_cli_raw_and_chat(tmp_path, chatty, tokenizer, capsys):
    config, params = chatty
    ckpt = weights.save(tmp_path / "ckpt", config, params, format="gemma_jax", tokenizer=str(TOKENIZER))
    # The second run reuses the first one's compiled programs (the suite's compilation cache).
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}

    def cli(*args, stdin=""):
        proc = subprocess.run([sys.executable, "-m", "gemma_jax.sample", f"--checkpoint={ckpt}", *args],
                              input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    raw = S.generate(config, params, tokenizer, ["Once upon a time"], max_new_tokens=12)[0]
    assert raw
    assert cli("--prompt=Once upon a time", "--max_new_tokens=12") == raw + "\n"

    turns = ["Hi there", "What next?"]
    first = S.generate(config, params, tokenizer, [turns[0]], chat=True, max_new_tokens=8)[0]
    history = [{"role": "user", "content": turns[0]}, {"role": "model", "content": first},
               {"role": "user", "content": turns[1]}]
    second = S.generate(config, params, tokenizer, [history], max_new_tokens=8)[0]
    assert first and second
    assert cli("--chat", "--max_new_tokens=8", stdin="\n".join(turns) + "\n") == first + "\n" + second + "\n"

    # A bad sampling setting: one error line, exit 2 (in-process, the same main as the command line).
    from gemma_jax import sample as sample_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main([f"--checkpoint={ckpt}", "--prompt=x", "--top_p=0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "top_p" in err.splitlines()[0], err

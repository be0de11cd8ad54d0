"""Tests for the tokenized cache (gemma_jax.data.cache) and the streamed pipeline over it."""

import contextlib
import io
import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from gemma_jax import data
from gemma_jax import prepare as prepare_lib
from gemma_jax import tokenizer as tokenizer_lib
from gemma_jax.data import cache as cache_lib
from gemma_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGAL = os.path.join(REPO, "data", "legal", "train.jsonl")
LEGAL_EVAL = os.path.join(REPO, "data", "legal", "eval.jsonl")
TOKENIZER = os.path.join(REPO, "data", "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.Tokenizer(TOKENIZER)


def cfg(cache_dir, **kw):
    base = dict(train=LEGAL, eval="", eval_fraction=0.0, seq_len=256, packing=True, overlong="truncate",
                train_on_prompt=False, skip_invalid=False, field_map="", default_instruction="",
                text_split="line", num_epochs=0, tfds_data_dir="", cache_dir=str(cache_dir), num_workers=1)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(data.FIELDS)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if a cache is built (a pass over the data)."""
    def fail(*a, **k):
        raise AssertionError("the cache was built again")
    monkeypatch.setattr(cache_lib, "_write", fail)


# ---------------------------------------------------------------------------------- the cache


def test_cache_reused_and_rebuilt_only_when_inputs_change(tok, tmp_path, monkeypatch):
    src = tmp_path / "t.jsonl"
    src.write_bytes(open(LEGAL, "rb").read())
    c = cfg(tmp_path / "cache", train=str(src))
    first = data.build(c, tok, global_batch_size=8, seed=0).stats["train"]["cache"]
    manifest = json.load(open(os.path.join(first[0], "manifest.json")))
    assert manifest["examples"] == 300 and manifest["tokenizer"] == cache_lib.tokenizer_sha256(TOKENIZER)
    assert manifest["options"]["train_on_prompt"] is False and manifest["sources"][0]["path"] == str(src)
    assert np.load(os.path.join(first[0], "lengths.npy")).shape == (300, 3)

    builds = []
    real_write = cache_lib._write
    monkeypatch.setattr(cache_lib, "_write", lambda *a, **k: (builds.append(a[0]), real_write(*a, **k)))
    # Batch size, seed, seq_len, packing, epochs: read-time choices, the same cache.
    for kw, g, seed in [({}, 8, 0), ({}, 4, 3), ({"seq_len": 128, "packing": False, "num_epochs": 2}, 2, 1)]:
        assert data.build(cfg(tmp_path / "cache", train=str(src), **kw), tok, global_batch_size=g,
                          seed=seed).stats["train"]["cache"] == first
    assert builds == []
    # Touching the source, a formatting option or another tokenizer: a new cache.
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = data.build(c, tok, global_batch_size=8, seed=0).stats["train"]["cache"]
    assert touched != first and len(builds) == 1
    prompt = data.build(cfg(tmp_path / "cache", train=str(src), train_on_prompt=True), tok,
                        global_batch_size=8, seed=0).stats["train"]["cache"]
    assert prompt not in (first, touched) and len(builds) == 2
    other_path = tokenizer_lib.train_sentencepiece(["alpha beta gamma", "delta epsilon"] * 50,
                                                   str(tmp_path / "other.model"), vocab_size=300)
    other = data.build(c, tokenizer_lib.Tokenizer(other_path), global_batch_size=8, seed=0).stats["train"]["cache"]
    assert other not in (first, touched, prompt) and len(builds) == 3


def test_workers_write_the_same_cache_as_one_process(tok, tmp_path, monkeypatch):
    # 300 examples in shards of 32: ten shards, written by two workers (one per process), in order.
    monkeypatch.setattr(cache_lib, "SHARD_EXAMPLES", 32)
    opts = cache_lib.options_of(cfg(tmp_path))
    one = cache_lib.Cache(cache_lib.build(LEGAL, tok, opts, str(tmp_path / "a"), num_workers=1))
    two = cache_lib.Cache(cache_lib.build(LEGAL, tok, opts, str(tmp_path / "b"), num_workers=2))
    assert [s["examples"] for s in two.manifest["shards"]] == [32] * 9 + [12]
    assert one.manifest["shards"] == two.manifest["shards"]
    for s in two.manifest["shards"]:
        assert os.path.getsize(os.path.join(two.dir, s["file"])) > 0
    np.testing.assert_array_equal(one.lengths, two.lengths)
    encoded = data.encode(data.read_examples(LEGAL)[0], tok)
    rng = np.random.default_rng(0)
    order = rng.permutation(300)  # random access across shard boundaries
    for i, (i1, m1), (i2, m2) in zip(order, one.read(order), two.read(order)):
        ids, mask = encoded[i]
        np.testing.assert_array_equal(ids, i1)
        np.testing.assert_array_equal(ids, i2)
        np.testing.assert_array_equal(mask, m1)
        np.testing.assert_array_equal(mask, m2)


def test_killed_build_is_not_reused(tok, tmp_path, monkeypatch):
    c = cfg(tmp_path / "cache")
    key, _ = cache_lib.cache_key(LEGAL, tok, cache_lib.options_of(c))
    final = tmp_path / "cache" / key
    # A build killed half way: shards written, no manifest, the temp dir left behind ...
    real_write = cache_lib._write

    def killed(spec, tokenizer, options, out_dir, *a):
        real_write(spec, tokenizer, options, out_dir, *a)
        os.remove(os.path.join(out_dir, "manifest.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_lib, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        data.build(c, tok, global_batch_size=8, seed=0)
    assert not final.exists()
    # ... and a target dir without its manifest (a remote copy cut off before the manifest).
    final.mkdir()
    (final / "examples-00000.array_record").write_bytes(b"partial")
    monkeypatch.setattr(cache_lib, "_write", real_write)
    d = data.build(c, tok, global_batch_size=8, seed=0)
    assert d.stats["train"]["examples"] == 300 and (final / "manifest.json").exists()
    assert next(d.train)["inputs"].shape == (8, 256)


def test_bad_input_reported_with_file_and_line_before_any_batch(tok, tmp_path):
    good = {"prompt": "p", "completion": "c"}
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"prompt": "p", "completion": ""}\n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:3: field \"completion\": empty response"):
        data.build(cfg(tmp_path / "cache", train=str(p)), tok, global_batch_size=1, seed=0)
    assert not [d for d in os.listdir(tmp_path / "cache") if not d.startswith(".")]  # nothing kept
    d = data.build(cfg(tmp_path / "cache", train=str(p), skip_invalid=True), tok, global_batch_size=1, seed=0)
    assert d.stats["train"]["skipped"] == {"empty_response": 1} and d.stats["train"]["examples"] == 2


# ---------------------------------------------------------------------------------- streaming


def test_first_epoch_rows_are_the_in_memory_packing(tok, tmp_path):
    """The streamed rows of epoch 0 are exactly the rows `pack` makes in memory, shuffled."""
    d = data.build(cfg(tmp_path, num_epochs=1), tok, global_batch_size=1, seed=5)
    streamed = list(d.train)
    rows, stats = data.pack(data.encode(data.read_examples(LEGAL)[0], tok), 256, pad_id=tok.pad_id, seed=5)
    assert len(streamed) == stats["rows"] == d.rows_per_epoch == d.num_batches
    key = lambda b: tuple(np.concatenate([b[k].ravel() for k in data.FIELDS]).tolist())  # noqa: E731
    assert sorted(key(b) for b in streamed) == sorted(key({k: v[i:i + 1] for k, v in rows.items()})
                                                      for i in range(stats["rows"]))
    for k in ("examples", "truncated", "rows", "tokens", "target_tokens"):
        assert d.stats["train"][k] == stats[k], k


def test_one_and_two_processes_see_the_same_global_batches(tok, tmp_path):
    c = cfg(tmp_path)
    full = take(data.build(c, tok, global_batch_size=8, seed=1).train, 20)  # crosses into epoch 1
    parts = [take(data.build(c, tok, global_batch_size=8, seed=1, process_index=p, process_count=2).train, 20)
             for p in range(2)]
    assert_batches_equal(full, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)])
    assert parts[0][0]["inputs"].shape == (4, 256)
    ev = data.build(cfg(tmp_path, eval=LEGAL_EVAL), tok, global_batch_size=8, seed=1).eval
    ev_parts = [data.build(cfg(tmp_path, eval=LEGAL_EVAL), tok, global_batch_size=8, seed=1, process_index=p,
                           process_count=2).eval for p in range(2)]
    assert_batches_equal(list(ev), [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*ev_parts)])


def test_resume_mid_epoch_equals_an_uninterrupted_run(tok, tmp_path, monkeypatch):
    c = cfg(tmp_path)
    d = data.build(c, tok, global_batch_size=8, seed=2)
    per_epoch = d.rows_per_epoch // 8
    straight = take(d.train, per_epoch + 6)
    it = data.build(c, tok, global_batch_size=8, seed=2).train
    take(it, per_epoch - 3)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint keeps it
    assert state["next_index"] == per_epoch - 3
    resumed = data.build(c, tok, global_batch_size=8, seed=2)
    resumed.train.set_state(state)
    assert_batches_equal(take(resumed.train, 9), straight[per_epoch - 3:])
    assert resumed.epoch(per_epoch + 1) == 1 and resumed.epoch(per_epoch - 3) == 0
    # Resuming reads only the examples of the batches it draws (and prefetches): no replay.
    read = []  # (cache, ids): the iterators above still prefetch in their threads
    real_read = cache_lib.Cache.read
    monkeypatch.setattr(cache_lib.Cache, "read", lambda self, idx: (read.append((self, list(idx))),
                                                                     real_read(self, idx))[1])
    early = data.build(cfg(tmp_path, num_epochs=1), tok, global_batch_size=8, seed=2)  # prefetch stays in epoch 0
    early.train.set_state({"next_index": 3})
    take(early.train, 1)
    mine = [int(i) for c, idx in read if c in early.epochs.reader.caches for i in idx]
    rows = early.epochs.plan(0)[0]
    skipped_over = {int(i) for k in range(3 * 8) for i in rows[k]}
    assert mine and not skipped_over & set(mine) and len(mine) < 300 - len(skipped_over)
    # A new epoch is packed afresh: not the first epoch's batches again.
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(straight[per_epoch:], straight))


def test_grain_worker_processes_give_the_same_batches_and_resume(tok, tmp_path):
    import multiprocessing
    d = data.build(cfg(tmp_path), tok, global_batch_size=8, seed=3)
    per_epoch = d.rows_per_epoch // 8
    straight = take(d.train, per_epoch + 3)
    w = data.build(cfg(tmp_path, input_workers=2), tok, global_batch_size=8, seed=3)
    first = take(w.train, 2)
    workers = multiprocessing.active_children()
    assert len(workers) >= 2  # the batches come from grain's worker processes
    assert_batches_equal(first, straight[:2])
    # A state saved by a threaded run resumes with workers (and back): same format, same batches.
    state = {"next_index": per_epoch - 2}
    w.train.set_state(state)
    assert_batches_equal(take(w.train, 5), straight[per_epoch - 2:])
    assert w.train.get_state() == {"next_index": per_epoch + 3}
    w.train.close()
    for p in workers:  # set_state stopped the first workers; close stops the second
        p.join(10)
    assert not any(p.is_alive() for p in workers + multiprocessing.active_children())


def test_gs_data_and_gs_cache_dir(tok, tmp_path, monkeypatch):
    import helpers
    from gemma_jax import paths
    with helpers.fake_gcs(tmp_path / "bucket_root"):
        src = "gs://bkt/legal/train.jsonl"
        paths.Path(src).parent.mkdir(parents=True, exist_ok=True)
        paths.Path(src).write_bytes(open(LEGAL, "rb").read())
        c = cfg("gs://bkt/cache", train=src, eval_fraction=0.1)
        remote = data.build(c, tok, global_batch_size=8, seed=4)
        key, _ = cache_lib.cache_key(src, tok, cache_lib.options_of(c))
        stored = sorted(p.name for p in paths.Path(f"gs://bkt/cache/{key}").iterdir())
        assert stored == ["examples-00000.array_record", "lengths.npy", "manifest.json"]
        assert (tmp_path / "bucket_root" / "bkt" / "cache" / key / "manifest.json").exists()  # in the bucket
        local = data.build(cfg(tmp_path / "local", eval_fraction=0.1), tok, global_batch_size=8, seed=4)
        assert_batches_equal(take(remote.train, 3), take(local.train, 3))
        assert_batches_equal(list(remote.eval), list(local.eval))
        # A second run reuses the bucket's cache without a pass over the data ...
        real_write = cache_lib._write
        monkeypatch.setattr(cache_lib, "_write", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
        again = data.build(c, tok, global_batch_size=8, seed=4)
        local = data.build(cfg(tmp_path / "local", eval_fraction=0.1), tok, global_batch_size=8, seed=4)
        assert_batches_equal(take(again.train, 3), take(local.train, 3))
        # ... and a changed source in the bucket builds a new one.
        monkeypatch.setattr(cache_lib, "_write", real_write)
        paths.Path(src).write_bytes(b"".join(open(LEGAL, "rb").readlines()[:100]))
        assert data.build(c, tok, global_batch_size=8, seed=4).stats["train"]["examples"] == 90


def test_eval_streams_and_equals_in_memory_eval_batches(tok, tmp_path):
    d = data.build(cfg(tmp_path, eval=LEGAL_EVAL), tok, global_batch_size=8, seed=0)
    rows, _ = data.pack(data.encode(data.read_examples(LEGAL_EVAL)[0], tok), 256, pad_id=tok.pad_id, seed=0)
    expected = data.eval_batches(rows, global_batch_size=8, pad_id=tok.pad_id)
    assert isinstance(d.eval, data.EvalBatches) and d.eval and len(d.eval) == len(expected)
    assert_batches_equal(list(d.eval), expected)
    assert_batches_equal([b for _, b in enumerate(d.eval)], expected)  # re-iterable, as the trainer loops


def test_eval_fraction_holds_out_the_same_examples(tok, tmp_path):
    d = data.build(cfg(tmp_path, eval_fraction=0.1, num_epochs=1), tok, global_batch_size=8, seed=0)
    train, held = data.holdout(data.read_examples(LEGAL)[0], 0.1, seed=0)
    rows, _ = data.pack(data.encode(held, tok), 256, pad_id=tok.pad_id, seed=0)
    assert_batches_equal(list(d.eval), data.eval_batches(rows, global_batch_size=8, pad_id=tok.pad_id))
    assert d.stats["train"]["examples"] == len(train) == 270
    assert d.num_batches == len(list(d.train))


# ---------------------------------------------------------------------------------- mixtures


def test_mixture_spec_grammar():
    assert pipeline.parse_mixture("a.jsonl,tfds:billsum:train") == [("a.jsonl,tfds:billsum:train", None)]
    assert pipeline.parse_mixture("a/*.jsonl:0.8, hf:org/x:train:.2") == [("a/*.jsonl", 0.8), ("hf:org/x:train", 0.2)]
    with pytest.raises(data.DataError, match="every part ends in :WEIGHT"):
        pipeline.parse_mixture("a.jsonl:0.8,b.jsonl")
    with pytest.raises(data.DataError, match=r"'a\.jsonl:0': weight '0' is not > 0.*a finite number > 0"):
        pipeline.parse_mixture("a.jsonl:0,b.jsonl:0")


def test_mixture_proportions_deterministic_and_resumable(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"alpha {i}", "completion": "one"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"beta {i}", "completion": "two"} for i in range(160)])
    c = cfg(tmp_path / "cache", train=f"{a}:0.75,{b}:0.25", seq_len=64)
    d = data.build(c, tok, global_batch_size=4, seed=0)
    mix = d.stats["train"]["mixture"]
    assert mix[a] == dict(weight=0.75, examples=40, per_epoch=150) and mix[b]["per_epoch"] == 50
    for e in range(3):
        ex = d.epochs.examples(e)
        assert (ex < 40).sum() == 150 and (ex >= 40).sum() == 50  # a's 40 examples come ~4 times each
        assert np.bincount(ex[ex < 40], minlength=40).min() >= 3
    assert not np.array_equal(d.epochs.examples(0), d.epochs.examples(1))
    first = take(d.train, 30)
    again = data.build(c, tok, global_batch_size=4, seed=0)
    assert_batches_equal(first, take(again.train, 30))
    # The tokens say the same: about 3/4 of the segments are alpha prompts.
    alpha_id = tok.encode("alpha", add_bos=False)[0]
    n_alpha = sum(int(((bt["inputs"] == alpha_id) & (bt["positions"] > 0)).sum()) for bt in first)
    n_seg = sum(int(bt["segment_ids"].max(axis=1).sum()) for bt in first)
    assert 0.6 < n_alpha / n_seg < 0.9
    it = data.build(c, tok, global_batch_size=4, seed=0).train
    it.set_state({"next_index": 17})
    assert_batches_equal(take(it, 13), first[17:])
    other = data.build(c, tok, global_batch_size=4, seed=1)
    assert not np.array_equal(other.epochs.examples(0), d.epochs.examples(0))


# ---------------------------------------------------------------------------------- what was lost


def test_truncation_warning_suggests_seq_len_and_empty_result_names_it(tok, tmp_path, caplog):
    long = [{"prompt": "word " * (20 + i), "completion": "done"} for i in range(50)]
    p = write_jsonl(tmp_path / "long.jsonl", long)
    need = sorted(len(ids) - 1 for ids, _ in data.encode(data.read_examples(p)[0], tok))
    with caplog.at_level(logging.WARNING):
        data.build(cfg(tmp_path / "cache", train=p, seq_len=need[10]), tok, global_batch_size=1, seed=0)
    msg = [r.getMessage() for r in caplog.records if "keeps 95%" in r.getMessage()]
    assert msg, caplog.text
    p95, p99 = (int(np.ceil(np.percentile(need, q))) for q in (95, 99))
    assert f"data.seq_len={p95} keeps 95%" in msg[0] and f"{p99} keeps 99%" in msg[0]
    assert "truncated" in msg[0] and "of 50 examples" in msg[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data.build(cfg(tmp_path / "cache", train=p, seq_len=need[-1]), tok, global_batch_size=1, seed=0)
    assert "keeps 95%" not in caplog.text  # nothing lost, no warning
    # The prompt alone is longer than seq_len: truncation leaves no target, nothing is left.
    with pytest.raises(data.DataError, match=r"nothing left at data\.seq_len=8.*data\.seq_len=\d+ keeps 95%"):
        data.build(cfg(tmp_path / "cache", train=p, seq_len=8), tok, global_batch_size=1, seed=0)


# ---------------------------------------------------------------------------------- prepare


def test_prepare_builds_then_reuses_and_previews_the_loss_mask(tmp_path, monkeypatch, no_build):
    c = ml_collections.ConfigDict(dict(data=cfg(tmp_path, eval=LEGAL_EVAL, tokenizer=TOKENIZER),
                                       model=dict(init_checkpoint="")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prepare_lib.prepare(c, preview=2)
    text = out.getvalue()
    first = data.read_examples(LEGAL)[0][0].turns[1]["content"]
    assert text.count("--- example") == 2 and f"[[{first}<end_of_turn>]]" in text
    assert "[[" not in text.split("<start_of_turn>model")[0]  # the prompt carries no loss
    assert not os.listdir(tmp_path)  # a preview builds nothing
    monkeypatch.undo()
    with contextlib.redirect_stdout(io.StringIO()):
        built = prepare_lib.prepare(c, num_workers=1)
    assert built[LEGAL]["examples"] == 300 and built[LEGAL_EVAL]["examples"] == 40
    # Training then finds both caches: no pass over the data.
    monkeypatch.setattr(cache_lib, "_write", lambda *a, **k: pytest.fail("built again"))
    d = data.build(c.data, tokenizer_lib.Tokenizer(TOKENIZER), global_batch_size=8, seed=0)
    assert d.stats["train"]["cache"] == [built[LEGAL]["cache"]] and len(d.eval) == 3


def test_other_processes_wait_for_process_0_or_build_when_the_dir_is_not_shared(tok, tmp_path, monkeypatch):
    import threading  # pylint: disable=g-import-not-at-top
    c = cfg(tmp_path / "shared")
    built_by = []
    real_write = cache_lib._write
    monkeypatch.setattr(cache_lib, "_write", lambda *a: (built_by.append(threading.current_thread().name),
                                                         real_write(*a))[1])
    key, _ = cache_lib.cache_key(LEGAL, tok, cache_lib.options_of(c))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / f".building-{key}").write_text("{}")  # process 0 is building
    p0 = threading.Thread(name="p0", target=lambda: (__import__("time").sleep(1.5),
                                                    cache_lib.ensure(LEGAL, tok, c, process_count=2)))
    p0.start()
    waited = cache_lib.ensure(LEGAL, tok, c, process_index=1, process_count=2)
    p0.join()
    assert built_by == ["p0"] and len(waited) == 300
    # A cache dir that is not shared (each host its own): no build shows up, process 1 builds.
    monkeypatch.setattr(cache_lib, "_WAIT_FOR_OTHERS_S", 0.5)
    own = cache_lib.ensure(LEGAL, tok, cfg(tmp_path / "local"), process_index=1, process_count=2)
    assert built_by == ["p0", "MainThread"] and own.dir.startswith(str(tmp_path / "local"))

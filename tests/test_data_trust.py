"""The tokenized cache never trains on stale or damaged data (gemma_jax.data.cache, cache_store).

A changed source is never served from an old cache; a damaged cache is found, named and rebuilt
before the first step (or, damaged during a run, named at the failed read, the cache marked, and
rebuilt by the next run); prepare --rebuild replaces a cache; a read-only cache dir, killed
builds and bad mixture weights give clean errors.
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gemma_jax import data
from gemma_jax import prepare as prepare_lib
from gemma_jax.data import cache as cache_lib
from gemma_jax.data import cache_store, fingerprint, pipeline
from gemma_jax.train import workdir as workdir_lib
from test_data_cache import LEGAL, REPO, TOKENIZER, cfg, take, tok  # noqa: F401  (tok: a fixture)

N = 40  # examples in the small source: three shards of 16, 16 and 8


@pytest.fixture
def small(tmp_path, monkeypatch):
    """A 40-example copy of the legal data, cached in shards of 16 under tmp_path/cache."""
    monkeypatch.setattr(cache_lib, "SHARD_EXAMPLES", 16)
    src = tmp_path / "t.jsonl"
    src.write_bytes(b"".join(open(LEGAL, "rb").readlines()[:N]))
    return src


def build(c, tok):
    return data.build(c, tok, global_batch_size=4, seed=0)


def cache_dir_of(d):
    return d.stats["train"]["cache"][0]


def decoded(tok, cache_dir, i):
    ids, mask = cache_lib.Cache(cache_dir).read([i])[0]
    return tok.decode(ids[mask])


def files_match_manifest(d):
    m = json.load(open(os.path.join(d, "manifest.json")))
    return all(hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest() == rec["sha256"]
               for name, rec in m["files"].items())


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------- 1. changed sources


def _edit_keeping_size_and_mtime(path, old, new):
    assert len(old) == len(new)
    st = os.stat(path)
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: size and mtime as before
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_changed_source_with_the_same_size_and_mtime_is_not_served_from_the_old_cache(tok, small, tmp_path):
    c = cfg(tmp_path / "cache", train=str(small))
    first = cache_dir_of(build(c, tok))
    assert decoded(tok, first, 0) == "EUR 73,250 in total.<end_of_turn>"
    _edit_keeping_size_and_mtime(small, '"EUR 73,250 in total."', '"GBP 99,999 in total."')
    again = cache_dir_of(build(c, tok))
    assert decoded(tok, again, 0) == "GBP 99,999 in total.<end_of_turn>"


def test_a_content_change_the_file_identity_misses_rebuilds_the_cache(tok, small, tmp_path, monkeypatch, caplog):
    """A store whose metadata does not move on an edit (coarse times, no generation): the content
    digest recorded at build, the one the trainer's data fingerprint is made of, catches it."""
    real = fingerprint.file_identity
    monkeypatch.setattr(fingerprint, "file_identity",
                        lambda p: {k: v for k, v in real(p).items() if k not in ("ctime_ns", "ino")})
    c = cfg(tmp_path / "cache", train=str(small))
    first = cache_dir_of(build(c, tok))
    recorded = json.load(open(os.path.join(first, "manifest.json")))["source_content"]
    # The cache records exactly what the workdir's data fingerprint hashes.
    h = hashlib.sha256()
    for rec in recorded:
        h.update(rec["source"].encode())
        h.update(rec["digest"].encode())
    assert workdir_lib.data_fingerprint(str(small)) == h.hexdigest()[:16]
    _edit_keeping_size_and_mtime(small, '"EUR 73,250 in total."', '"GBP 99,999 in total."')
    with caplog.at_level(logging.WARNING):
        again = cache_dir_of(build(c, tok))
    assert again == first  # the same key: the identity did not change ...
    assert decoded(tok, again, 0) == "GBP 99,999 in total.<end_of_turn>"  # ... but the cache was rebuilt
    assert any(str(small) in w and "changed since its cache was built" in w for w in warnings_of(caplog))
    assert workdir_lib.data_fingerprint(str(small)) != h.hexdigest()[:16]


def test_verify_cache_full_hashes_sources_whole(tok, small, tmp_path, monkeypatch):
    """An edit in the middle of a large file, metadata unchanged, is beyond the quick digest (its
    first and last MiB); data.verify_cache=full reads every byte and rebuilds."""
    real = fingerprint.file_identity
    monkeypatch.setattr(fingerprint, "file_identity",
                        lambda p: {k: v for k, v in real(p).items() if k not in ("ctime_ns", "ino")})
    monkeypatch.setattr(fingerprint, "QUICK_WHOLE_BELOW", 1024)  # the small file counts as large:
    monkeypatch.setattr(fingerprint, "QUICK_EDGE", 256)  # its first and last 256 bytes are digested
    lines = small.read_text().splitlines(keepends=True)
    middle = N // 2
    assert '"output": "' in lines[middle]
    c = cfg(tmp_path / "cache", train=str(small))
    first = cache_dir_of(build(c, tok))
    old = json.loads(lines[middle])["output"]
    new = old[::-1] if old[::-1] != old else old.upper()
    assert len(new) == len(old) and new != old
    _edit_keeping_size_and_mtime(small, json.dumps(old), json.dumps(new))
    assert decoded(tok, cache_dir_of(build(c, tok)), middle).startswith(old)  # sizes: not seen
    with pytest.raises(data.DataError, match=r"data\.verify_cache='sha'.*sizes \| full"):
        build(cfg(tmp_path / "cache", train=str(small), verify_cache="sha"), tok)
    full = cache_dir_of(build(cfg(tmp_path / "cache", train=str(small), verify_cache="full"), tok))
    assert full == first and decoded(tok, full, middle).startswith(new)


# ---------------------------------------------------------------------------------- 2. damaged caches


def _overwrite(path, offset, n=200):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes((b + 1) % 256 for b in open(path, "rb").read()[offset:offset + n]))
    assert os.path.getsize(path) == size


def _damage(d, kind):
    """Damages cache directory d; returns the file name the warning must name."""
    shard = os.path.join(d, "examples-00001.array_record")
    lengths = os.path.join(d, "lengths.npy")
    manifest = os.path.join(d, "manifest.json")
    if kind.startswith("shard_bytes"):  # 200 bytes changed, the same size
        _overwrite(shard, 100)
    elif kind == "shard_truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif kind == "shard_deleted":
        os.remove(shard)
    elif kind == "lengths_edited":  # the same size, other values: an example's target count
        a = np.load(lengths)
        a[3, 2] = 0
        np.save(lengths, a)
        return "lengths.npy"
    elif kind == "lengths_deleted":
        os.remove(lengths)
        return "lengths.npy"
    elif kind == "manifest_garbage":
        open(manifest, "wb").write(os.urandom(300))
        return "manifest.json"
    elif kind == "manifest_truncated":
        text = open(manifest, "rb").read()
        open(manifest, "wb").write(text[:len(text) // 2])
        return "manifest.json"
    elif kind == "manifest_edited":  # valid JSON, a count changed
        m = json.load(open(manifest))
        m["shards"][0]["examples"] += 1
        json.dump(m, open(manifest, "w"))
        return "manifest.json"
    elif kind == "manifest_deleted":
        os.remove(manifest)
        return "manifest.json"
    elif kind == "shard_appended":
        with open(shard, "ab") as f:
            f.write(b"\0" * 10)
    return "examples-00001.array_record"


DAMAGE = ["shard_truncated", "shard_deleted", "shard_appended", "lengths_edited", "lengths_deleted",
          "manifest_garbage", "manifest_truncated", "manifest_edited", "manifest_deleted"]


@pytest.mark.parametrize("kind", DAMAGE + ["shard_bytes", "shard_bytes_large"])
def test_damaged_cache_is_named_and_rebuilt_before_the_first_batch(tok, small, tmp_path, kind, caplog, monkeypatch):
    # Same-size changed bytes in a shard are found by its checksum: on every open of a small cache,
    # with data.verify_cache=full for a large one; the rest by the size and count checks of every open.
    if kind == "shard_bytes_large":
        monkeypatch.setattr(cache_store, "HASH_ON_OPEN_BYTES", 0)
    c = cfg(tmp_path / "cache", train=str(small), verify_cache="full" if kind == "shard_bytes_large" else "sizes")
    good = build(c, tok)
    d = cache_dir_of(good)
    assert [s["examples"] for s in good.epochs.reader.caches[0].manifest["shards"]] == [16, 16, 8]
    expected = take(good.train, 3)
    name = _damage(d, kind)
    with caplog.at_level(logging.WARNING):
        again = build(c, tok)
    named = [w for w in warnings_of(caplog) if os.path.join(d, name) in w and "damaged" in w]
    assert named and "rebuilding" in named[0], warnings_of(caplog)
    assert cache_dir_of(again) == d and files_match_manifest(d)
    assert cache_lib.Cache(d, verify="full").manifest["examples"] == N
    for a, b in zip(take(again.train, 3), expected):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(d)]  # no temporary dirs left


def test_damaged_cache_with_unreadable_sources_names_the_file_and_the_rebuild_command(tok, small, tmp_path,
                                                                                       monkeypatch):
    c = cfg(tmp_path / "cache", train=str(small))
    d = cache_dir_of(build(c, tok))
    os.remove(os.path.join(d, "lengths.npy"))

    def unreadable(*a, **k):
        raise data.DataError(f"{small}: cannot open (the network is down)")

    monkeypatch.setattr(cache_lib.readers, "examples", unreadable)
    with pytest.raises(data.DataError) as e:
        build(c, tok)
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(d, "lengths.npy") in msg and "missing" in msg
    assert "the network is down" in msg and "python -m gemma_jax.prepare" in msg and "--rebuild" in msg


def test_shard_damaged_during_a_run_is_named_then_rebuilt_and_resumed(tok, small, tmp_path, caplog):
    """Bytes of a shard changed after the run opened the cache (sizes unchanged): the failed read
    names the shard and marks the cache; the next run rebuilds it and the iterator resumes exactly."""
    c = cfg(tmp_path / "cache", train=str(small))
    straight = build(c, tok)
    expected = take(straight.train, 12)
    straight.train.close()
    run = build(c, tok)
    d = cache_dir_of(run)
    done = take(run.train, 2)
    for b, e in zip(done, expected):
        np.testing.assert_array_equal(b["inputs"], e["inputs"])
    shard = os.path.join(d, "examples-00000.array_record")
    _overwrite(shard, 100, n=os.path.getsize(shard) // 2)  # every record of shard 0 unreadable
    with pytest.raises(data.CacheDamaged) as e:
        for _ in range(10):
            next(run.train)
    assert shard in str(e.value) and "run the same command again" in str(e.value)
    assert os.path.exists(os.path.join(d, cache_lib.DAMAGED))
    state = run.train.get_state()  # the batches drawn before the failed one
    run.train.close()
    with caplog.at_level(logging.WARNING):
        resumed = build(c, tok)
    assert any(shard in w and "rebuilding" in w for w in warnings_of(caplog))
    assert not os.path.exists(os.path.join(d, cache_lib.DAMAGED)) and files_match_manifest(d)
    resumed.train.set_state(state)
    n = state["next_index"]
    for a, b in zip(take(resumed.train, 12 - n), expected[n:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_read_failure_is_told_apart_from_an_intact_file(tok, small, tmp_path):
    """A record that decodes to another length than lengths.npy records is refused, not trained on;
    with every file matching its checksum the cache is not marked for rebuilding."""
    d = cache_dir_of(build(cfg(tmp_path / "cache", train=str(small)), tok))
    c = cache_lib.Cache(d)
    c.lengths = c.lengths.copy()
    c.lengths[5, 0] += 1
    with pytest.raises(data.CacheDamaged, match=r"examples-00000\.array_record.*reading example 5 failed.*"
                                                r"although the file matches its sha256"):
        c.read([5])
    assert not os.path.exists(os.path.join(d, cache_lib.DAMAGED))  # intact files: the next run reuses them


# ---------------------------------------------------------------------------------- 3. prepare --rebuild


def test_prepare_rebuild_replaces_a_damaged_cache(tok, small, tmp_path):
    import ml_collections  # pylint: disable=g-import-not-at-top
    c = ml_collections.ConfigDict(dict(data=cfg(tmp_path / "cache", train=str(small), tokenizer=TOKENIZER),
                                       model=dict(init_checkpoint="")))
    with contextlib.redirect_stdout(io.StringIO()):
        d = prepare_lib.prepare(c, num_workers=1)[str(small)]["cache"]
    shard = os.path.join(d, "examples-00001.array_record")
    good = open(shard, "rb").read()
    _overwrite(shard, 100)
    with open(os.path.join(d, "junk-from-the-old-build"), "w") as f:
        f.write("x")
    with contextlib.redirect_stdout(io.StringIO()):
        again = prepare_lib.prepare(c, num_workers=1, rebuild=True)[str(small)]["cache"]
    assert again == d
    assert open(shard, "rb").read() == good  # the damaged bytes are gone ...
    assert not os.path.exists(os.path.join(d, "junk-from-the-old-build"))  # ... with the whole old directory
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(d)] and files_match_manifest(d)
    # Without --rebuild, prepare checks every byte (as data.verify_cache=full) and repairs.
    _overwrite(shard, 100)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_lib.prepare(c, num_workers=1)
    assert open(shard, "rb").read() == good


# ---------------------------------------------------------------------------------- 4. edges


def test_unwritable_cache_dir_is_one_error_naming_the_key(tok, small, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(data.DataError, match=r"^data\.cache_dir='.*a_file/cache': cannot write the tokenized cache"):
        build(cfg(str(blocker / "cache"), train=str(small)), tok)
    # A read-only directory (EROFS; chmod does not stop root, who runs these tests): the CLI's one line.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *a, **k):
        if str(path).startswith(str(ro)):
            raise OSError(30, "Read-only file system", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(SystemExit) as e:
        prepare_lib.run([f"--config={REPO}/configs/legal.py:tiny", f"--cache_dir={ro}",
                         f"--config.data.train={small}", "--config.data.eval=", f"--config.data.tokenizer={TOKENIZER}",
                         "--num_workers=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: data.cache_dir='{ro}': cannot write the tokenized cache there (Read-only file system); "
                     f"set data.cache_dir (or $GEMMA_JAX_DATA_CACHE) to a writable directory"], err
    assert "Traceback" not in err


def test_next_build_removes_killed_builds_temporary_dirs_only(tok, small, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: a killed build's
    host = socket.gethostname()
    key = "0123456789abcdef0123"
    names = dict(dead=f".tmp-{key}-{host}-{dead.pid}-abcdef", dead_swap=f".tmp-{key}-{host}-{dead.pid}-abcdef.old",
                 live=f".tmp-{key}-{host}-{os.getpid()}-fedcba", other_host=f".tmp-{key}-elsewhere-1-123456",
                 not_ours="unrelated")
    for name in names.values():
        (root / name).mkdir()
        (root / name / "examples-00000.array_record").write_bytes(b"partial")
    build(cfg(root, train=str(small)), tok)
    left = set(os.listdir(root))
    assert names["dead"] not in left and names["dead_swap"] not in left
    assert {names["live"], names["other_host"], names["not_ours"]} <= left  # a live build's, another host's
    old = os.path.getmtime(root / names["other_host"]) - cache_lib.STALE_OTHER_HOST_S - 10
    for p in (root / names["other_host"], root / names["other_host"] / "examples-00000.array_record"):
        os.utime(p, (old, old))
    assert cache_lib.remove_stale_builds(str(root)) == [str(root / names["other_host"])]


@pytest.mark.parametrize("weight,rule", [("-1", "is not > 0"), ("abc", "is not a number"), ("nan", "is not finite"),
                                         ("inf", "is not finite"), ("1e400", "is not finite"), ("0", "is not > 0"),
                                         ("", "is not a number"), ("0x10", "is not a number"),
                                         (" 1e-3x", "is not a number")])
def test_bad_mixture_weight_is_named_with_the_rule(tok, small, tmp_path, weight, rule):
    spec = f"{small}:0.5,{small}:{weight}"
    with pytest.raises(data.DataError) as e:
        build(cfg(tmp_path / "cache", train=spec), tok)
    msg = str(e.value)
    assert "no such file" not in msg and "has no weight" not in msg
    assert f"weight {weight!r} {rule}" in msg and "a finite number > 0" in msg and f"{small}:{weight}" in msg


def test_good_mixture_weights_parse():
    assert pipeline.parse_mixture("a.jsonl:1e-9,b.jsonl: 2,c.jsonl:+.5") == [("a.jsonl", 1e-9), ("b.jsonl", 2.0),
                                                                           ("c.jsonl", 0.5)]
    assert pipeline.parse_mixture("gs://b/x.jsonl:3,tfds:billsum:train:1") == [("gs://b/x.jsonl", 3.0),
                                                                               ("tfds:billsum:train", 1.0)]
    assert pipeline.parse_mixture("hf:org/x:train,tfds:billsum:test") == [("hf:org/x:train,tfds:billsum:test", None)]
    with pytest.raises(data.DataError, match=r"'b\.jsonl' has no weight.*a finite number > 0"):
        pipeline.parse_mixture("a.jsonl:0.8,b.jsonl")
    with pytest.raises(data.DataError, match=r"':0\.5' names no data"):
        pipeline.parse_mixture(":0.5,a.jsonl:1")


# ---------------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_trainer_saves_the_last_good_step_then_the_rerun_rebuilds_and_resumes(tmp_path, monkeypatch):
    """A shard damaged while training reads it: the run saves its last step, fails with the file
    named; the same run again rebuilds the cache and ends where an undisturbed run ends."""
    from gemma_jax import train  # pylint: disable=g-import-not-at-top
    from test_train import loss_records, small_config  # pylint: disable=g-import-not-at-top

    src = tmp_path / "t.jsonl"
    src.write_bytes(open(LEGAL, "rb").read())
    cfg = small_config(steps=6, batch_size=8, seq_len=128)
    cfg.data.train, cfg.data.cache_dir = str(src), str(tmp_path / "cache")
    cfg.mesh.fsdp = -1
    straight = train.run(cfg, str(tmp_path / "straight"))
    assert straight["step"] == 6

    real_read, calls = cache_store.Cache.read, []

    def read_then_damage(self, indices):
        calls.append(len(indices))
        if len(calls) == 4:  # a few batches in: every record of the (only) shard becomes unreadable
            shard = os.path.join(self.local_dir, "examples-00000.array_record")
            _overwrite(shard, 0, n=os.path.getsize(shard))
        return real_read(self, indices)

    monkeypatch.setattr(cache_store.Cache, "read", read_then_damage)
    workdir = tmp_path / "damaged"
    with pytest.raises(data.CacheDamaged) as e:
        train.run(cfg, str(workdir))
    msg = str(e.value)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    # Three reads succeeded (two threads read ahead, in any order): the run got through at most three steps.
    assert len(saved) == 1 and 0 <= saved[0] <= 3, saved
    assert "examples-00000.array_record is damaged" in msg and f"step {saved[0]} was saved first" in msg
    assert [r["step"] for r in loss_records(workdir)] == list(range(1, saved[0] + 1))
    monkeypatch.setattr(cache_store.Cache, "read", real_read)
    assert train.run(cfg, str(workdir))["step"] == 6
    resumed, whole = loss_records(workdir), loss_records(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(1, 7))
    for a, b in zip(resumed, whole):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, err_msg=f"step {a['step']}")


def test_gs_cache_damaged_in_the_bucket_or_in_the_local_copy(tok, small, tmp_path, caplog):
    import shutil  # pylint: disable=g-import-not-at-top

    import helpers  # pylint: disable=g-import-not-at-top
    from gemma_jax import paths  # pylint: disable=g-import-not-at-top
    with helpers.fake_gcs(tmp_path / "bucket_root"):
        c = cfg("gs://bkt/cache", train=str(small))
        d = cache_dir_of(build(c, tok))
        in_bucket = tmp_path / "bucket_root" / "bkt" / "cache" / os.path.basename(d)
        local = paths.local_copy(d)
        reference = build(c, tok)
        expected = take(reference.train, 2)
        reference.train.close()  # no read-ahead left running while the files change
        # The local copy damaged: fetched again from the bucket, nothing rebuilt.
        os.remove(os.path.join(local, "lengths.npy"))
        built = os.path.getmtime(in_bucket / "manifest.json")
        again = build(c, tok)
        assert os.path.getmtime(in_bucket / "manifest.json") == built
        assert os.path.exists(os.path.join(local, "lengths.npy"))
        # The bucket's copy damaged (seen by a host without a local copy): named and rebuilt in the bucket.
        shutil.rmtree(local)
        a = np.load(in_bucket / "lengths.npy")
        a[0, 0] += 1
        np.save(in_bucket / "lengths.npy", a)
        with caplog.at_level(logging.WARNING):
            again = build(c, tok)
        assert any(f"{d}/lengths.npy is damaged" in w for w in warnings_of(caplog)), warnings_of(caplog)
        assert files_match_manifest(str(in_bucket)) and not (in_bucket / cache_lib.DAMAGED).exists()
        for x, y in zip(take(again.train, 2), expected):
            np.testing.assert_array_equal(x["inputs"], y["inputs"])

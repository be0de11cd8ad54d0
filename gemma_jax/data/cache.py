"""The tokenized cache: sources -> validated, formatted, tokenized examples in ArrayRecord shards.

A cache is the directory ``CACHE_DIR/<key>``: shards ``examples-NNNNN.array_record`` (record i =
example i in spec order, a uint32 length, then its int32 ids, then its loss mask as packed bits),
``lengths.npy`` (int32 ``[n, 3]``: tokens, first target index, target count; packing plans from it
without reading tokens) and ``manifest.json`` (written last: source identities and content digests,
tokenizer sha256, formatting options, counts, skips, token stats, and the size and sha256 of every
other file of the cache).

The key hashes the sources' identities (gemma_jax.data.fingerprint: a local file's path, size,
mtime, ctime and inode; a gs:// object's size and generation/etag/checksum; a ``save_to_disk``
directory file by file with its datasets fingerprint; ``tfds:``/``hf:`` hub names by name), the
tokenizer's sha256 and the formatting options (``OPTIONS``); seq_len, packing, batch size and seed
are applied when reading, so changing them reuses the cache. A build writes into a temporary
directory beside ``<key>`` and then swaps it in (a remote ``gs://`` cache: old manifest removed,
shards, the manifest last), so a killed build is never used; the next build removes the temporary
directories of builds whose process is gone.

What is checked when a cache is opened (``ensure``), before any step:
  - always: the manifest parses and is complete; every file it lists exists with its recorded
    size; shard counts add up; ``lengths.npy`` (read whole anyway) matches its sha256; the content
    digest of each source file (``fingerprint.quick_digest``, what the trainer's data fingerprint
    is made of) equals the one recorded at build; no earlier run marked the cache damaged; the
    shards' sha256 while they hold at most ``cache_store.HASH_ON_OPEN_BYTES`` (64 MiB) in all;
  - ``data.verify_cache=full`` (and ``prepare``): also the sha256 of every shard and of every
    source file, whole, whatever their size.
A mismatch logs one WARNING naming the file and rebuilds the cache from its sources (where they
cannot be read: one ``error:`` naming the file and the command that rebuilds it). A read that fails
during a run (a shard damaged after it was opened) is diagnosed against the checksums, the cache
marked damaged (``damaged.json``) and ``CacheDamaged`` raised naming the file; the trainer saves
its last good step first, and the next run rebuilds and resumes.

Validation runs in the reading process, in order, so a bad record raises the same
``file:line: field ...`` DataError as the in-memory path (or is counted with ``skip_invalid``);
tokenizing and writing run in ``num_workers`` worker processes (default: all cores, at most 32; 1:
in this process; forked, or spawned once jax is loaded), one shard of SHARD_EXAMPLES examples per
task, each worker writing its own shard files; at most two shards per worker are in flight, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid

import numpy as np
from absl import logging

from gemma_jax import paths
from gemma_jax.data import fingerprint as fingerprint_lib, readers
from gemma_jax.data.cache_store import (  # noqa: F401  (the cache's names, as they always were here)
    DAMAGED, FORMAT_VERSION, MANIFEST, Cache, CacheDamaged, decode_record, encode_record, exchange,
    manifest_checksum, rebuild_command)
from gemma_jax.data.schema import DataError, parse_field_map

# Formatting options: they change the tokens, so they are part of the cache key.
OPTIONS = ("train_on_prompt", "field_map", "default_instruction", "text_split", "skip_invalid", "tfds_data_dir")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "gemma_jax", "data")
CACHE_DIR_ENV = "GEMMA_JAX_DATA_CACHE"  # the default when data.cache_dir is empty (e.g. for test runs)
SHARD_EXAMPLES = 1024  # records per shard = one worker task: 2 workers share 20k examples evenly
MAX_DEFAULT_WORKERS = 32
# One record per chunk: a random read decodes only its record; zstd:1 compresses ids ~2x, cheaply.
_WRITER_OPTIONS = "group_size:1,zstd:1"
_WAIT_FOR_OTHERS_S = 60.0  # a process that is not 0 builds itself when no build shows up in this time
# data.verify_cache: sizes = sizes, counts, lengths.npy and source digests on every open (cheap);
# full = also every shard's and every source file's sha256, whole.
VERIFY_LEVELS = ("sizes", "full")
# A temporary build directory: .tmp-<key>-<host>-<pid>-<hex>[.old]; a dead pid's (this host) is stale.
_TMP_RE = re.compile(r"^\.tmp-[0-9a-f]+-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{6}(\.[a-z]+)?$")
STALE_OTHER_HOST_S = 24 * 3600  # another host's build directory untouched this long is stale


def cache_dir_of(cfg_data) -> str:
    """data.cache_dir, else $GEMMA_JAX_DATA_CACHE, else ~/.cache/gemma_jax/data (not in the workdir:
    runs share it)."""
    d = (cfg_data.get("cache_dir", "") if hasattr(cfg_data, "get") else getattr(cfg_data, "cache_dir", "")) or ""
    d = d or os.environ.get(CACHE_DIR_ENV, "") or DEFAULT_CACHE_DIR
    return d if paths.is_remote(d) else os.path.abspath(os.path.expanduser(d))


def options_of(cfg_data) -> dict:
    """The formatting options of a config's data section, normalised (field_map as a sorted dict)."""
    get = (lambda k, d: cfg_data.get(k, d)) if hasattr(cfg_data, "get") else (lambda k, d: getattr(cfg_data, k, d))
    return dict(train_on_prompt=bool(get("train_on_prompt", False)),
                field_map=dict(sorted(parse_field_map(get("field_map", ""), "data.field_map").items())),
                default_instruction=str(get("default_instruction", "")), text_split=str(get("text_split", "line")),
                skip_invalid=bool(get("skip_invalid", False)), tfds_data_dir=str(get("tfds_data_dir", "")))


def verify_level(cfg_data) -> str:
    """data.verify_cache, checked: 'sizes' (default) or 'full'."""
    v = cfg_data.get("verify_cache", "sizes") if hasattr(cfg_data, "get") else getattr(cfg_data, "verify_cache",
                                                                                         "sizes")
    if v not in VERIFY_LEVELS:
        raise DataError(f"data.verify_cache={v!r}: expected one of {' | '.join(VERIFY_LEVELS)} (sizes: file sizes, "
                        "counts and source digests on every open; full: also every byte of the cache and the sources)")
    return v


# ---------------------------------------------------------------------------------- fingerprints


def fingerprint(source: str, tfds_data_dir: str = "") -> dict:
    """What identifies a source's content without reading it (gemma_jax.data.fingerprint.identity)."""
    return fingerprint_lib.identity(source, tfds_data_dir)


def tokenizer_sha256(path: str) -> str:
    """sha256 of a tokenizer file: part of every cache key and of a workdir's identity."""
    return fingerprint_lib.full_sha256(path)


def cache_key(spec: str, tokenizer, options: dict) -> tuple[str, dict]:
    """(key, the identity it hashes): identities of spec's sources, tokenizer, options."""
    identity = dict(version=FORMAT_VERSION,
                    sources=[fingerprint(s, options["tfds_data_dir"]) for s in readers.sources(spec)],
                    tokenizer=tokenizer_sha256(tokenizer.path), options=options)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20], identity


# ---------------------------------------------------------------------------------- records


def _lengths(ids, mask):
    m = mask[1:]
    return len(ids), (1 + int(np.argmax(m)) if m.any() else len(ids)), int(m.sum())


_worker_tokenizer = None
_worker_train_on_prompt = False


def _init_worker(tokenizer_path, train_on_prompt):
    global _worker_tokenizer, _worker_train_on_prompt  # pylint: disable=global-statement
    from gemma_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    _worker_tokenizer, _worker_train_on_prompt = Tokenizer(tokenizer_path), train_on_prompt


def _encode_chunk(items):
    """[(turns, text)] -> [(record bytes, tokens, first target, targets)] (runs in a worker)."""
    out = []
    for turns, text in items:
        if turns is not None:
            ids, mask = _worker_tokenizer.encode_chat(turns, train_on_prompt=_worker_train_on_prompt)
        else:
            ids, mask = _worker_tokenizer.encode_text(text)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        out.append((encode_record(ids, mask),) + _lengths(ids, mask))
    return out


# ---------------------------------------------------------------------------------- the cache


def _pool(num_workers, tokenizer_path, train_on_prompt):
    # fork starts a worker in milliseconds but is unsafe once jax (its threads) is loaded, as in the
    # trainer; spawn is safe there and costs each worker ~1 s of imports.
    fork = "jax" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    return ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_path, train_on_prompt))


def _shard_inputs(spec, options, skipped, per_source):
    """Validated examples of spec in order, SHARD_EXAMPLES at a time: [(turns, text)] per shard."""
    shard = []
    for source, ex in readers.examples(spec, field_map=options["field_map"],
                                       default_instruction=options["default_instruction"],
                                       text_split=options["text_split"], skip_invalid=options["skip_invalid"],
                                       tfds_data_dir=options["tfds_data_dir"], skipped=skipped):
        per_source[source] += 1
        shard.append((ex.turns, ex.text))
        if len(shard) == SHARD_EXAMPLES:
            yield shard
            shard = []
    if shard:
        yield shard


def _file_record(path) -> dict:
    return dict(size=os.path.getsize(path), sha256=fingerprint_lib.full_sha256(path))


def _write_shard(out_dir, k, items):
    """Tokenizes one shard's examples and writes them as examples-k.array_record (in a worker).

    Workers write their own shards and send back only the lengths: passing every record through
    the reading process would make it (reading, validating, writing) the bottleneck."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    name = f"examples-{k:05d}.array_record"
    writer = ArrayRecordWriter(os.path.join(out_dir, name), _WRITER_OPTIONS)
    lengths = []
    for rec, *lens in _encode_chunk(items):
        writer.write(rec)
        lengths.append(lens)
    writer.close()
    return (dict(file=name, examples=len(lengths)), np.asarray(lengths, np.int32).reshape(-1, 3),
            _file_record(os.path.join(out_dir, name)))


def _write(spec, tokenizer, options, out_dir, num_workers, identity, key):
    """Reads and validates spec here, tokenizes and writes its shards in workers, then the lengths
    and the manifest into out_dir."""
    t0 = time.time()
    # Before the pass over the data: a source edited during the build then no longer matches.
    content = [fingerprint_lib.content(s) for s in readers.sources(spec)]
    skipped, per_source = collections.Counter(), collections.Counter()
    lengths, shards, files = [], [], {}

    def done(result):
        shards.append(result[0])
        lengths.append(result[1])
        files[result[0]["file"]] = result[2]

    inputs = enumerate(_shard_inputs(spec, options, skipped, per_source))
    if num_workers <= 1:
        _init_worker(tokenizer.path, options["train_on_prompt"])
        for k, items in inputs:
            done(_write_shard(out_dir, k, items))
    else:
        with _pool(num_workers, tokenizer.path, options["train_on_prompt"]) as pool:
            window = collections.deque()  # in order; two shards per worker in flight bound the memory
            for k, items in inputs:
                window.append(pool.apply_async(_write_shard, (out_dir, k, items)))
                if len(window) >= 2 * num_workers:
                    done(window.popleft().get())
            while window:
                done(window.popleft().get())
    if skipped:
        logging.warning("%s: skipped %d invalid records: %s", spec, sum(skipped.values()), dict(skipped))
    if not lengths:
        raise DataError(f"{spec}: no valid examples (skipped: {dict(skipped)})")
    lens = np.concatenate(lengths)
    np.save(os.path.join(out_dir, "lengths.npy"), lens)
    files["lengths.npy"] = _file_record(os.path.join(out_dir, "lengths.npy"))
    q = np.percentile(lens[:, 0], [50, 95, 99]).tolist()
    manifest = dict(
        key=key, spec=spec, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.time() - t0, 2), num_workers=num_workers, **identity, source_content=content,
        tokenizer_path=os.path.abspath(tokenizer.path), examples=len(lens), skipped=dict(skipped),
        examples_per_source=dict(per_source), tokens=int(lens[:, 0].sum()), target_tokens=int(lens[:, 2].sum()),
        length_p50=q[0], length_p95=q[1], length_p99=q[2], length_max=int(lens[:, 0].max()),
        shards=shards, lengths="lengths.npy", files=files)
    manifest["checksum"] = manifest_checksum(manifest)
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    logging.info("data cache %s: %d examples, %d tokens, %d skipped, %.1f s with %d workers", key, len(lens),
                 manifest["tokens"], sum(skipped.values()), time.time() - t0, num_workers)


def default_workers() -> int:
    """All the cores this process may use, at most MAX_DEFAULT_WORKERS (a TPU host has hundreds)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_WORKERS))


def _complete(directory) -> bool:
    return paths.exists(paths.join(directory, MANIFEST))


# ---------------------------------------------------------------------------------- building


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _newest_mtime(path: str) -> float:
    times = [os.path.getmtime(path)]
    for r, ds, fs in os.walk(path):
        times += [os.path.getmtime(os.path.join(r, x)) for x in ds + fs if os.path.exists(os.path.join(r, x))]
    return max(times)


def remove_stale_builds(parent: str) -> list[str]:
    """Removes the temporary directories in parent of builds that were killed: on this host those
    whose process is gone, another host's untouched for STALE_OTHER_HOST_S. A live build's stay."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    host = socket.gethostname()
    for name in names:
        m = _TMP_RE.match(name)
        path = os.path.join(parent, name)
        if not m or not os.path.isdir(path):
            continue
        try:
            stale = (not _pid_alive(int(m["pid"])) if m["host"] == host else
                     time.time() - _newest_mtime(path) > STALE_OTHER_HOST_S)
        except OSError:  # removed by someone else meanwhile
            continue
        if stale:
            logging.info("removing %s, left by a cache build that was killed", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _not_writable(cache_dir: str, e: OSError) -> DataError:
    return DataError(f"data.cache_dir={cache_dir!r}: cannot write the tokenized cache there ({e.strerror or e}); "
                     f"set data.cache_dir (or ${CACHE_DIR_ENV}) to a writable directory", "cache_dir")


def _new_tmp(cache_dir: str, key: str) -> str:
    """A fresh temporary build directory (beside the cache, or local staging for a remote one),
    after removing killed builds' ones; DataError naming data.cache_dir when it cannot be written."""
    name = f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    parent = os.path.join(tempfile.gettempdir(), "gemma_jax_cache_staging") if paths.is_remote(cache_dir) else cache_dir
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_builds(parent)
        os.mkdir(os.path.join(parent, name))
        if paths.is_remote(cache_dir):
            paths.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(cache_dir, e) from None
    return os.path.join(parent, name)


def _publish_local(tmp: str, final: str, replace: bool) -> None:
    """Moves the finished build onto final; an existing final (partial, damaged or replaced) is
    swapped out and ends up in tmp, which the caller removes."""
    if os.path.isdir(final):
        if _complete(final) and not replace:  # another process finished the same cache first: keep theirs
            return
        if not exchange(tmp, final):
            old = f"{tmp}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same cache first: keep theirs
        if not _complete(final):
            raise


def _publish_remote(tmp: str, final: str) -> None:
    """Uploads the build: the old manifest (and damage mark) removed first, so the cache reads as
    incomplete until the new manifest, uploaded last, lands; files of an old build removed."""
    dst = paths.Path(final)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, DAMAGED):
        if (dst / name).exists():
            (dst / name).unlink()
    names = sorted(os.listdir(tmp), key=lambda n: n == MANIFEST)
    for name in names:
        with open(os.path.join(tmp, name), "rb") as f:
            (dst / name).write_bytes(f.read())
    for p in dst.iterdir():
        if p.name not in names:
            p.unlink()


def build(spec, tokenizer, options, cache_dir, *, num_workers=0, key=None, identity=None, replace=False) -> str:
    """Builds the cache of spec into cache_dir/<key> (atomically) and returns that directory.

    A complete cache already there is kept (another process built it meanwhile) unless replace:
    then the new build is swapped in and the old one removed (prepare --rebuild, a damaged cache)."""
    if key is None:
        key, identity = cache_key(spec, tokenizer, options)
    final = paths.join(cache_dir, key)
    num_workers = num_workers or default_workers()
    tmp = _new_tmp(cache_dir, key)
    try:
        logging.info("building the data cache of %s in %s (%d workers)", spec, final, num_workers)
        _write(spec, tokenizer, options, tmp, num_workers, identity, key)
        if paths.is_remote(cache_dir):
            _publish_remote(tmp, final)
        else:
            _publish_local(tmp, final, replace)
    except OSError as e:
        if str(getattr(e, "filename", "") or "").startswith((tmp, cache_dir)):
            raise _not_writable(cache_dir, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------- opening


def _marked(c: Cache) -> str | None:
    """Why an earlier run marked the cache damaged (DAMAGED), or None."""
    marker = paths.Path(paths.join(c.dir, DAMAGED))
    if not marker.exists():
        return None
    try:
        info = json.loads(marker.read_text())
        return f"data cache file {info['file']} is damaged: {info['problem']} (found by an earlier run)"
    except (ValueError, KeyError, TypeError, OSError):
        return f"{marker} marks the cache damaged"


def _changed(c: Cache, verify: str) -> str | None:
    """Why an intact cache no longer stands for its sources (a content digest, a hub revision), or None."""
    for i, rec in enumerate(c.manifest["source_content"]):
        source = rec.get("source", "")
        if fingerprint_lib.is_file(source):
            if verify == "full" and rec.get("sha256") and fingerprint_lib.full_sha256(source) != rec["sha256"]:
                return f"{source} changed since its cache was built (its sha256 differs)"
            if i < fingerprint_lib.MAX_DIGESTED_FILES and fingerprint_lib.quick_digest(source) != rec.get("digest"):
                return (f"{source} changed since its cache was built (its content digest differs, although its "
                        "size and times look unchanged)")
        elif rec.get("revision"):
            now = fingerprint_lib.hub_revision(source)
            if now and now != rec["revision"]:
                return f"{source} moved from revision {rec['revision']} to {now} since its cache was built"
    return None


def _open_checked(final: str, verify: str) -> tuple[Cache | None, str | None, bool]:
    """(the cache at final if it is intact and current, else None; why not, None if never built;
    whether the why is damage, as opposed to changed sources)."""
    if not _complete(final):
        if paths.exists(final):
            return None, (f"data cache file {paths.join(final, MANIFEST)} is damaged: missing (an interrupted build, "
                          "or deleted)"), True
        return None, None, False
    try:
        c = Cache(final, verify=verify)
    except CacheDamaged as e:
        return None, str(e), True
    marked = _marked(c)
    if marked:
        return None, marked, True
    changed = _changed(c, verify)
    return (None, changed, False) if changed else (c, None, False)


def ensure(spec, tokenizer, cfg_data, *, num_workers=0, process_index=0, process_count=1,
           rebuild=False, verify: str | None = None) -> Cache:
    """The cache of spec for these options: reused when intact and current, else built (process 0).

    `verify` (default data.verify_cache) says how much is checked on open (module docstring); a
    damaged or stale cache is named in a WARNING and rebuilt. Processes other than 0 wait for
    process 0's cache; when none shows up (and no build of process 0 is visible) within a minute,
    the cache dir is not shared and they build their own.
    """
    options, cache_dir = options_of(cfg_data), cache_dir_of(cfg_data)
    verify = verify or verify_level(cfg_data)
    key, identity = cache_key(spec, tokenizer, options)
    final = paths.join(cache_dir, key)
    why, damaged = None, False
    if not rebuild:
        c, why, damaged = _open_checked(final, verify)
        if c is not None:
            logging.info("data cache of %s: %s (reused)", spec, final)
            if c.manifest["skipped"]:
                logging.warning("%s: %d invalid records were skipped when its cache was built: %s", spec,
                                sum(c.manifest["skipped"].values()), c.manifest["skipped"])
            return c
        if why:
            logging.warning("%s; rebuilding the cache of %s from its sources", why, spec)
    if process_index != 0 and process_count > 1:
        t0, marker = time.time(), paths.join(cache_dir, f".building-{key}")
        while time.time() - t0 <= _WAIT_FOR_OTHERS_S or paths.exists(marker):
            c = _open_checked(final, verify)[0]
            if c is not None:
                return c
            time.sleep(1.0)
    marker = paths.join(cache_dir, f".building-{key}")
    if process_count > 1:
        try:
            paths.write_text_atomic(marker, json.dumps(dict(host=socket.gethostname(), pid=os.getpid())))
        except OSError as e:
            raise _not_writable(cache_dir, e) from None
    try:
        try:
            built = build(spec, tokenizer, options, cache_dir, num_workers=num_workers, key=key, identity=identity,
                          replace=bool(rebuild or why))
        except (DataError, OSError) as e:
            if not damaged:  # a first build, or changed sources: their own error says it all
                raise
            if getattr(e, "reason", "") == "cache_dir":
                raise DataError(f"{why}; rebuilding it failed: {e}", "cache_dir") from None
            raise DataError(f"{why}, and rebuilding it from {spec} failed: {e}; make the sources readable and run "
                            f"`{rebuild_command()}`", "damaged_cache") from None
        return Cache(built)
    finally:
        if process_count > 1:
            try:
                paths.Path(marker).unlink()
            except OSError:
                pass


# ---------------------------------------------------------------------------------- preview


def preview(spec, tokenizer, cfg_data, n: int) -> str:
    """The first n examples of spec, formatted and tokenized as training sees them, with the
    tokens that carry loss (the loss mask) between [[ and ]]."""
    options = options_of(cfg_data)
    _init_worker(tokenizer.path, options["train_on_prompt"])
    out, skipped = [], collections.Counter()
    for shard in _shard_inputs(spec, options, skipped, collections.Counter()):
        for item in shard[:n - len(out)]:
            ids, mask = decode_record(_encode_chunk([item])[0][0])
            text = []
            for start, stop, on in _runs(mask):
                piece = tokenizer.decode(ids[start:stop])
                text.append(f"[[{piece}]]" if on else piece)
            out.append(f"--- example {len(out) + 1}: {len(ids)} tokens, {int(mask[1:].sum())} trained\n" + "".join(text))
        if len(out) == n:
            break
    return "\n".join(out)


def _runs(mask):
    """[(start, stop, value)] of the runs of equal values of a bool array."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(mask)]
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

"""The tokenized cache: sources -> validated, formatted, tokenized examples in ArrayRecord shards.

A cache is the directory ``CACHE_DIR/<key>``: shards ``examples-NNNNN.array_record`` (record i =
example i in spec order, a uint32 length, then its int32 ids, then its loss mask as packed bits),
``lengths.npy`` (int32 ``[n, 3]``: tokens, first target index, target count; packing plans from it
without reading tokens) and ``manifest.json`` (written last: source fingerprints, tokenizer sha256,
formatting options, counts, skips, token stats, shard sizes).

The key hashes the source fingerprints (path, size, mtime; a ``save_to_disk`` directory file by
file; ``tfds:``/``hf:`` hub names by name), the tokenizer's sha256 and the formatting options
(``OPTIONS``); seq_len, packing, batch size and seed are applied when reading, so changing them
reuses the cache. A build writes into a temporary directory renamed onto ``<key>`` at the end (a
remote ``gs://`` cache: shards first, the manifest last), so a killed build is never reused.

Validation runs in the reading process, in order, so a bad record raises the same
``file:line: field ...`` DataError as the in-memory path (or is counted with ``skip_invalid``);
tokenizing and writing run in ``num_workers`` worker processes (default: all cores, at most 32; 1:
in this process; forked, or spawned once jax is loaded), one shard of SHARD_EXAMPLES examples per
task, each worker writing its own shard files; at most two shards per worker are in flight, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

import numpy as np
from absl import logging

from gemma_jax import paths
from gemma_jax.data import readers
from gemma_jax.data.schema import DataError, parse_field_map

FORMAT_VERSION = 1
# Formatting options: they change the tokens, so they are part of the cache key.
OPTIONS = ("train_on_prompt", "field_map", "default_instruction", "text_split", "skip_invalid", "tfds_data_dir")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "gemma_jax", "data")
CACHE_DIR_ENV = "GEMMA_JAX_DATA_CACHE"  # the default when data.cache_dir is empty (e.g. for test runs)
SHARD_EXAMPLES = 1024  # records per shard = one worker task: 2 workers share 20k examples evenly
MAX_DEFAULT_WORKERS = 32
# One record per chunk: a random read decodes only its record; zstd:1 compresses ids ~2x, cheaply.
_WRITER_OPTIONS = "group_size:1,zstd:1"
_WAIT_FOR_OTHERS_S = 60.0  # a process that is not 0 builds itself when no build shows up in this time


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


# ---------------------------------------------------------------------------------- fingerprints


def _file_fingerprint(path):
    if paths.is_remote(path):
        st = paths.Path(path).stat()
        return dict(path=path, size=int(st.length), mtime=float(st.mtime))
    st = os.stat(path)
    return dict(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def fingerprint(source: str, tfds_data_dir: str = "") -> dict:
    """What identifies a source's content without reading it: files by path, size and mtime."""
    if source.startswith("tfds:"):
        return dict(tfds=source, data_dir=os.path.abspath(os.path.expanduser(tfds_data_dir)) if tfds_data_dir else "")
    if source.startswith("hf:"):
        name, _, split, local = readers.hf_parts(source)
        if not local:  # a hub dataset: its name (a new revision on the hub is not noticed)
            return dict(hf=source)
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(name) for f in fs)
        return dict(hf_dir=os.path.abspath(name), split=split,
                    files=[[os.path.relpath(f, name), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files])
    return _file_fingerprint(source)


def tokenizer_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(spec: str, tokenizer, options: dict) -> tuple[str, dict]:
    """(key, the identity it hashes): fingerprints of spec's sources, tokenizer, options."""
    identity = dict(version=FORMAT_VERSION,
                    sources=[fingerprint(s, options["tfds_data_dir"]) for s in readers.sources(spec)],
                    tokenizer=tokenizer_sha256(tokenizer.path), options=options)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20], identity


# ---------------------------------------------------------------------------------- records


def encode_record(ids, mask) -> bytes:
    """(ids, bool mask) -> bytes: uint32 n, n int32 ids, ceil(n/8) bytes of packed mask bits."""
    ids = np.asarray(ids, "<i4")
    return np.uint32(len(ids)).astype("<u4").tobytes() + ids.tobytes() + np.packbits(np.asarray(mask, bool)).tobytes()


def decode_record(b: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of encode_record: (int32 ids, bool mask)."""
    n = int(np.frombuffer(b, "<u4", 1)[0])
    ids = np.frombuffer(b, "<i4", n, 4)
    mask = np.unpackbits(np.frombuffer(b, np.uint8, offset=4 + 4 * n), count=n).astype(bool)
    return ids, mask


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


@dataclasses.dataclass
class _Shard:  # array_record's FileInstruction protocol: opening needs no pass over the file
    filename: str
    skip: int
    take: int
    examples_in_shard: int


class Cache:
    """A built cache: manifest, lengths ``[n, 3]``, and random access to examples by index."""

    def __init__(self, directory: str):
        self.dir = directory
        self.local_dir = paths.local_copy(directory)  # gs://: a local copy (disk, not RAM)
        with open(os.path.join(self.local_dir, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.lengths = np.load(os.path.join(self.local_dir, "lengths.npy"))
        self._source = None

    def __len__(self):
        return len(self.lengths)

    def __getstate__(self):  # pickled into grain workers without an open reader
        return {**self.__dict__, "_source": None}

    def source(self):
        if self._source is None:
            import grain  # pylint: disable=g-import-not-at-top  (imports jax)
            shards = [_Shard(os.path.join(self.local_dir, s["file"]), 0, s["examples"], s["examples"])
                      for s in self.manifest["shards"]]
            self._source = grain.sources.ArrayRecordDataSource(shards)
        return self._source

    def read(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """Examples by index: [(ids, mask)]; only these records are read."""
        src, indices = self.source(), [int(i) for i in indices]
        raw = src.__getitems__(indices) if hasattr(src, "__getitems__") else [src[i] for i in indices]
        return [decode_record(b) for b in raw]


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
    return dict(file=name, examples=len(lengths)), np.asarray(lengths, np.int32).reshape(-1, 3)


def _write(spec, tokenizer, options, out_dir, num_workers, identity, key):
    """Reads and validates spec here, tokenizes and writes its shards in workers, then the lengths
    and the manifest into out_dir."""
    t0 = time.time()
    skipped, per_source = collections.Counter(), collections.Counter()
    lengths, shards = [], []

    def done(result):
        shards.append(result[0])
        lengths.append(result[1])

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
    q = np.percentile(lens[:, 0], [50, 95, 99]).tolist()
    manifest = dict(
        key=key, spec=spec, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.time() - t0, 2), num_workers=num_workers, **identity,
        tokenizer_path=os.path.abspath(tokenizer.path), examples=len(lens), skipped=dict(skipped),
        examples_per_source=dict(per_source), tokens=int(lens[:, 0].sum()), target_tokens=int(lens[:, 2].sum()),
        length_p50=q[0], length_p95=q[1], length_p99=q[2], length_max=int(lens[:, 0].max()),
        shards=shards, lengths="lengths.npy")
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
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
    return paths.exists(paths.join(directory, "manifest.json"))


def build(spec, tokenizer, options, cache_dir, *, num_workers=0, key=None, identity=None) -> str:
    """Builds the cache of spec into cache_dir/<key> (atomically) and returns that directory."""
    if key is None:
        key, identity = cache_key(spec, tokenizer, options)
    final = paths.join(cache_dir, key)
    num_workers = num_workers or default_workers()
    remote = paths.is_remote(cache_dir)
    if not remote:
        os.makedirs(cache_dir, exist_ok=True)
    # Local: a temp dir beside the target, renamed onto it; remote: staged locally, manifest last.
    tmp = (tempfile.mkdtemp(prefix=f"gemma_jax_cache_{key}_") if remote else
           os.path.join(cache_dir, f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"))
    os.makedirs(tmp, exist_ok=True)
    try:
        logging.info("building the data cache of %s in %s (%d workers)", spec, final, num_workers)
        _write(spec, tokenizer, options, tmp, num_workers, identity, key)
        if remote:
            dst = paths.Path(final)
            dst.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(tmp), key=lambda n: n == "manifest.json"):  # manifest last
                (dst / name).write_bytes(open(os.path.join(tmp, name), "rb").read())
        else:
            if os.path.isdir(final) and not _complete(final):  # a partial copy, never a finished build
                stale = f"{tmp}.stale"
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same cache first: keep theirs
                if not _complete(final):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure(spec, tokenizer, cfg_data, *, num_workers=0, process_index=0, process_count=1,
           rebuild=False) -> Cache:
    """The cache of spec for these options: reused when complete, else built (process 0).

    Processes other than 0 wait for process 0's manifest; when none shows up (and no build of
    process 0 is visible) within a minute, the cache dir is not shared and they build their own.
    """
    options, cache_dir = options_of(cfg_data), cache_dir_of(cfg_data)
    key, identity = cache_key(spec, tokenizer, options)
    final = paths.join(cache_dir, key)
    if _complete(final) and not rebuild:
        c = Cache(final)
        logging.info("data cache of %s: %s (reused)", spec, final)
        if c.manifest["skipped"]:
            logging.warning("%s: %d invalid records were skipped when its cache was built: %s", spec,
                            sum(c.manifest["skipped"].values()), c.manifest["skipped"])
        return c
    if process_index != 0 and process_count > 1:
        t0, marker = time.time(), paths.join(cache_dir, f".building-{key}")
        while not _complete(final):
            if time.time() - t0 > _WAIT_FOR_OTHERS_S and not paths.exists(marker):
                break
            time.sleep(1.0)
        if _complete(final):
            return Cache(final)
    marker = paths.join(cache_dir, f".building-{key}")
    if process_count > 1:
        paths.write_text_atomic(marker, json.dumps(dict(host=socket.gethostname(), pid=os.getpid())))
    try:
        return Cache(build(spec, tokenizer, options, cache_dir, num_workers=num_workers, key=key, identity=identity))
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

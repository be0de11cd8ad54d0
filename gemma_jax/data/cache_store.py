"""A built tokenized cache on disk: its record format, its checks, random reads by index.

gemma_jax.data.cache builds caches and decides when one is reused; this module is what a run
holds: ``Cache(directory)`` checks the manifest and the files it lists (see ``Cache``) and
reads examples; a failed read becomes ``CacheDamaged`` naming the file, and marks the cache
(``damaged.json``) so the next open rebuilds it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import json
import os
import shlex
import shutil
import socket
import sys
import time
import uuid

import numpy as np
from absl import logging

from gemma_jax import paths
from gemma_jax.data import fingerprint
from gemma_jax.data.schema import DataError

FORMAT_VERSION = 2  # 2: file checksums, source content digests and ctime/inode in the key
MANIFEST = "manifest.json"
DAMAGED = "damaged.json"  # written by a run whose read of the cache failed: the next open rebuilds
# Shards are hashed on every open while they hold this little in all (~0.1 s, less than a
# training step); a larger cache's shards are hashed with data.verify_cache=full, by prepare, and
# when a read fails.
HASH_ON_OPEN_BYTES = 64 << 20


def rebuild_command() -> str:
    """The prepare command that rebuilds this run's caches (its --config flags, from sys.argv)."""
    argv, args = sys.argv[1:], []
    for i, a in enumerate(argv):
        if a.startswith("--config"):
            args.append(a if "=" in a or i + 1 >= len(argv) else f"{a}={argv[i + 1]}")
    return "python -m gemma_jax.prepare " + (" ".join(shlex.quote(a) for a in args) or "--config=YOUR_CONFIG") + \
        " --rebuild"


def encode_record(ids, mask) -> bytes:
    """(ids, bool mask) -> bytes: uint32 n, n int32 ids, ceil(n/8) bytes of packed mask bits."""
    ids = np.asarray(ids, "<i4")
    return np.uint32(len(ids)).astype("<u4").tobytes() + ids.tobytes() + np.packbits(np.asarray(mask, bool)).tobytes()


def decode_record(b: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of encode_record: (int32 ids, bool mask); ValueError for bytes of another size."""
    n = int(np.frombuffer(b, "<u4", 1)[0]) if len(b) >= 4 else -1
    if n < 0 or len(b) != 4 + 4 * n + (n + 7) // 8:
        raise ValueError(f"a record of {len(b)} bytes is no encoded example")
    ids = np.frombuffer(b, "<i4", n, 4)
    mask = np.unpackbits(np.frombuffer(b, np.uint8, offset=4 + 4 * n), count=n).astype(bool)
    return ids, mask


class CacheDamaged(DataError):
    """A cache file that is missing, or does not match its manifest, or cannot be read."""

    def __init__(self, path: str, problem: str, hint: str = ""):
        super().__init__(f"data cache file {path} is damaged: {problem}{hint}", "damaged_cache")
        self.path, self.problem, self.hint = path, problem, hint

    def __reduce__(self):  # raised in grain worker processes, re-raised in the trainer
        return (type(self), (self.path, self.problem, self.hint))


def manifest_checksum(m: dict) -> str:
    """sha256 of a manifest's content (all but its own "checksum" entry): an edit is damage too."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_manifest(local_dir: str, shown: str) -> dict:
    """The manifest, checked to be complete: CacheDamaged (naming it) when it is not."""
    where = paths.join(shown, MANIFEST)
    try:
        with open(os.path.join(local_dir, MANIFEST), "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CacheDamaged(where, "missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheDamaged(where, f"not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("version") != FORMAT_VERSION:
        raise CacheDamaged(where, f"not a format-{FORMAT_VERSION} cache manifest")
    if m.get("checksum") != manifest_checksum(m):
        raise CacheDamaged(where, "its content does not match its checksum (edited or corrupted)")
    kinds = dict(key=str, examples=int, shards=list, files=dict, lengths=str, skipped=dict, tokens=int,
                 sources=list, source_content=list)
    for k, kind in kinds.items():
        if not isinstance(m.get(k), kind):
            raise CacheDamaged(where, f"its {k!r} entry is missing or not a {kind.__name__}")
    for s in m["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("examples"), int)):
            raise CacheDamaged(where, f"bad shard entry {s!r}")
    for name in [s["file"] for s in m["shards"]] + [m["lengths"]]:
        rec = m["files"].get(name)
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str)):
            raise CacheDamaged(where, f"no size and sha256 recorded for {name}")
        if os.path.basename(name) != name:
            raise CacheDamaged(where, f"file name {name!r} is not a name in the cache directory")
    if m["key"] != os.path.basename(shown.rstrip("/")):
        raise CacheDamaged(where, f"it belongs to the cache {m['key']}, not to {os.path.basename(shown.rstrip('/'))}")
    return m


@dataclasses.dataclass
class _Shard:  # array_record's FileInstruction protocol: opening needs no pass over the file
    filename: str
    skip: int
    take: int
    examples_in_shard: int


class Cache:
    """A built cache: manifest, lengths ``[n, 3]``, and random access to examples by index.

    Opening it checks the manifest, every file's size, the counts and lengths.npy's sha256, and
    every shard's sha256 with verify="full" or when the shards are small (HASH_ON_OPEN_BYTES in
    all): CacheDamaged names the first file that is wrong."""

    def __init__(self, directory: str, *, verify: str = "sizes"):
        self.dir = directory
        for attempt in (0, 1):
            self.local_dir = _local_copy(directory, fresh=attempt == 1)
            try:
                self.manifest = _read_manifest(self.local_dir, directory)
                self.lengths = self._load_lengths()
                shard_bytes = sum(self.manifest["files"][sh["file"]]["size"] for sh in self.manifest["shards"])
                self.check(full=verify == "full" or shard_bytes <= HASH_ON_OPEN_BYTES)
                break
            except CacheDamaged:
                if attempt or not paths.is_remote(directory):
                    raise  # else the local copy of a remote cache may be the damaged one: fetch it again
        self._starts = np.cumsum([0] + [s["examples"] for s in self.manifest["shards"]])
        self._source = None

    def _path(self, name: str) -> str:
        return paths.join(self.dir, name)

    def _load_lengths(self) -> np.ndarray:
        name = self.manifest["lengths"]
        rec, n = self.manifest["files"][name], self.manifest["examples"]
        try:
            with open(os.path.join(self.local_dir, name), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CacheDamaged(self._path(name), "missing") from None
        if len(raw) != rec["size"]:
            raise CacheDamaged(self._path(name), f"{len(raw)} bytes, the manifest records {rec['size']}")
        if hashlib.sha256(raw).hexdigest() != rec["sha256"]:  # read whole anyway: hashing it is cheap
            raise CacheDamaged(self._path(name), "its sha256 differs from the manifest's (changed values)")
        try:
            lengths = np.load(io.BytesIO(raw))
        except ValueError as e:
            raise CacheDamaged(self._path(name), f"not an array ({e})") from None
        if lengths.shape != (n, 3) or lengths.dtype != np.int32:
            raise CacheDamaged(self._path(name), f"holds {lengths.dtype}{list(lengths.shape)}, not int32[{n}, 3]")
        return lengths

    def check(self, *, full: bool = False) -> None:
        """Every shard present with its recorded size, counts that add up; with full, shard sha256s."""
        m, n = self.manifest, len(self.lengths)
        total = sum(s["examples"] for s in m["shards"])
        if total != n:
            raise CacheDamaged(self._path(MANIFEST), f"its shards hold {total} examples, lengths.npy {n}")
        for s in m["shards"]:
            self._check_file(s["file"], full=full)

    def _check_file(self, name: str, *, full: bool) -> None:
        rec, local = self.manifest["files"][name], os.path.join(self.local_dir, name)
        if not os.path.isfile(local):
            raise CacheDamaged(self._path(name), "missing")
        size = os.path.getsize(local)
        if size != rec["size"]:
            raise CacheDamaged(self._path(name), f"{size} bytes, the manifest records {rec['size']}")
        if full and fingerprint.full_sha256(local) != rec["sha256"]:
            raise CacheDamaged(self._path(name), "its sha256 differs from the manifest's (changed bytes)")

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
        """Examples by index: [(ids, mask)]; only these records are read. A failed read raises
        CacheDamaged naming the file (found by its checksum) and marks the cache for rebuilding."""
        indices = [int(i) for i in indices]
        try:
            src = self.source()
            raw = src.__getitems__(indices) if hasattr(src, "__getitems__") else [src[i] for i in indices]
            out = []
            for i, b in zip(indices, raw):
                ids, mask = decode_record(b)
                if len(ids) != self.lengths[i, 0]:
                    raise ValueError(f"record {i} holds {len(ids)} tokens, lengths.npy says {self.lengths[i, 0]}")
                out.append((ids, mask))
            return out
        except Exception as e:  # noqa: BLE001  riegeli, array_record, decoding: all mean unreadable
            raise self._damaged(indices, e) from None

    def _damaged(self, indices, exc) -> CacheDamaged:
        """The file a failed read points at: the shards holding the indices, checked against the
        manifest's sha256. One that differs (or is gone) marks the cache damaged, so the next
        open rebuilds it; intact ones mean the read itself failed (the file system): not marked."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        shown = ", ".join(map(str, indices[:3])) + (", ..." if len(indices) > 3 else "")
        what = f"reading example{'s' if len(indices) > 1 else ''} {shown} failed: {first}"
        shards = self.manifest["shards"]
        near = list(dict.fromkeys(int(k) for k in np.searchsorted(self._starts, indices, side="right") - 1
                                  if 0 <= k < len(shards)))
        for k in near:
            try:
                self._check_file(shards[k]["file"], full=True)
            except CacheDamaged as e:
                _mark_damaged(self.dir, self.local_dir, e)
                return CacheDamaged(e.path, f"{e.problem} ({what})", ". The cache is marked for rebuilding: run the "
                                    "same command again to rebuild it from its sources and resume (or "
                                    f"`{rebuild_command()}`)")
        name = shards[near[0]]["file"] if near else self.manifest["lengths"]
        return CacheDamaged(self._path(name), f"{what}, although the file matches its sha256 in the manifest",
                            " (a read error of the disk or file system?); run the same command again to resume")


def _local_copy(directory: str, *, fresh: bool = False) -> str:
    """The cache itself when local; else a local copy, fetched again when the bucket's manifest
    differs from the copy's (the cache was rebuilt) or when asked (the copy may be damaged). A
    new copy is fetched beside the old one and swapped in: another run of this host reading the
    old copy keeps its open files."""
    if not paths.is_remote(directory):
        return directory
    local = paths.local_copy(directory)
    if not fresh:
        try:
            with open(os.path.join(local, MANIFEST), "rb") as f:
                fresh = f.read() != paths.Path(paths.join(directory, MANIFEST)).read_bytes()
        except OSError:
            fresh = True
    if fresh:
        new = f"{local}.new-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        paths.copy_tree(directory, new)
        if not exchange(new, local):
            _set_aside(local)
            os.rename(new, local)
        shutil.rmtree(new, ignore_errors=True)  # the old copy, after the exchange
    return local


def _set_aside(path: str) -> None:
    """Renames a directory out of the way, then removes it (open files stay readable meanwhile)."""
    aside = f"{path}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def exchange(a: str, b: str) -> bool:
    """Swaps two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _mark_damaged(directory: str, local_dir: str, err: CacheDamaged) -> None:
    """Writes DAMAGED into the cache (best effort: a read-only cache is rebuilt elsewhere anyway)."""
    text = json.dumps(dict(file=err.path, problem=err.problem, host=socket.gethostname(), pid=os.getpid(),
                           time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    try:
        paths.write_text_atomic(paths.join(directory, DAMAGED), text)
    except OSError as e:
        logging.warning("could not mark %s as damaged (%s)", directory, e)
    if local_dir != directory:  # the next open fetches the bucket's copy again
        _set_aside(local_dir)

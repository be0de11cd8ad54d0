"""What identifies a data source, and the digests of its content: the tokenized cache's key and checks.

Identity (part of the cache key; costs one stat per file, read on every open):
  - a local file: path, size, mtime_ns, ctime_ns and inode. An edit that restores the mtime
    (``touch -r``) still moves the ctime, which no user call can set back; a file replaced by a
    rename has a new inode;
  - a gs:// (any fsspec) file: size and what the store's ``info()`` offers: generation, etag,
    md5/crc32c checksum, update time (gcsfs), mtime/ctime/inode (a local-backed store);
  - ``hf:DIR`` (a ``save_to_disk`` directory): every file as a local file, plus the datasets
    fingerprints its ``state.json`` files record;
  - ``tfds:NAME``: name, data_dir and the prepared ``dataset_info.json`` files' identity;
  - ``hf:org/name`` on the hub: its name (its revision is a check, ``hub_revision``, since it
    needs the network).
Content (recorded in the cache manifest at build, compared when a cache is opened):
  - ``quick_digest``: sha256 of a file, of its size and first and last MiB beyond 8 MiB; the
    trainer's data fingerprint (train/workdir.py) is made of the same digests;
  - ``full_sha256``: every byte (``data.verify_cache=full``).
Neither is memoized: they are there for the changes an identity misses.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os

from gemma_jax import paths
from gemma_jax.data import readers

# fsspec info() fields that change when an object's content does (gcsfs, s3fs, local-backed stores).
_INFO_KEYS = ("generation", "etag", "ETag", "md5Hash", "crc32c", "checksum", "VersionId", "updated",
              "LastModified", "mtime", "created", "ino")
QUICK_WHOLE_BELOW = 8 << 20  # quick_digest reads files up to this size whole
QUICK_EDGE = 1 << 20  # ... and larger ones' first and last this many bytes
MAX_DIGESTED_FILES = 64  # a spec's first 64 files are digested (the trainer's fingerprint does the same)


def _jsonable(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def file_identity(path: str) -> dict:
    """What the file system says about a file without reading it (see the module docstring)."""
    if paths.is_remote(path):
        import fsspec  # pylint: disable=g-import-not-at-top  (installed with etils' gcs support)
        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
        return dict(path=path, size=int(info.get("size") or 0),
                    **{k: _jsonable(info[k]) for k in _INFO_KEYS if info.get(k) is not None})
    st = os.stat(path)
    return dict(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                ino=st.st_ino)


def _tfds_identity(source: str, data_dir: str) -> dict:
    name = source[len("tfds:"):].split(":")[0].split("/")[0]
    root = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
    infos = []
    if not paths.is_remote(root):  # prepared versions of the dataset: re-preparing rewrites these
        for f in sorted(glob.glob(os.path.join(root, name, "**", "dataset_info.json"), recursive=True)):
            st = os.stat(f)
            infos.append([os.path.relpath(f, root), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return dict(tfds=source, data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else "",
                prepared=infos)


def _hf_dir_identity(name: str, split: str) -> dict:
    files, fingerprints = [], []
    for f in sorted(os.path.join(r, x) for r, _, fs in os.walk(name) for x in fs):
        st = os.stat(f)
        files.append([os.path.relpath(f, name), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        if os.path.basename(f) == "state.json":
            try:
                with open(f) as fh:
                    fingerprints.append([os.path.relpath(f, name), json.load(fh).get("_fingerprint")])
            except (OSError, ValueError):
                fingerprints.append([os.path.relpath(f, name), None])
    return dict(hf_dir=os.path.abspath(name), split=split, files=files, fingerprints=fingerprints)


def identity(source: str, tfds_data_dir: str = "") -> dict:
    """A source's identity for the cache key: files by stat, datasets by name and their files."""
    if source.startswith("tfds:"):
        return _tfds_identity(source, tfds_data_dir)
    if source.startswith("hf:"):
        name, _, split, local = readers.hf_parts(source)
        return _hf_dir_identity(name, split) if local else dict(hf=source)
    return file_identity(source)


def is_file(source: str) -> bool:
    """A file source (local or remote), as opposed to a tfds: or hf: dataset."""
    return not source.startswith(("tfds:", "hf:"))


def quick_digest(path: str) -> str:
    """sha256 of a file (of its size and first and last MiB when it is larger than 8 MiB).

    Cheap: at most 64 files of a spec, at most 8 MiB each, are digested when a cache is opened."""
    h = hashlib.sha256()
    with paths.Path(path).open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        if size <= QUICK_WHOLE_BELOW:
            h.update(f.read())
        else:
            h.update(f.read(QUICK_EDGE))
            f.seek(size - QUICK_EDGE)
            h.update(f.read())
    h.update(str(size).encode())
    return h.hexdigest()


def full_sha256(path: str) -> str:
    """sha256 of every byte of a file (local or remote): data.verify_cache=full's sources, the
    cache's own files against its manifest, tokenizers."""
    h = hashlib.sha256()
    with paths.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def hub_revision(source: str) -> str | None:
    """The commit a hf:org/name dataset's hub repo is at now, or None when that cannot be asked
    (offline, no huggingface_hub): then the cache is trusted by name, as before."""
    if any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None
    try:
        from huggingface_hub import HfApi  # pylint: disable=g-import-not-at-top
        return HfApi().dataset_info(readers.hf_parts(source)[0], timeout=5).sha
    except Exception:  # noqa: BLE001  no network, no such repo, no package: not checkable
        return None


# info() fields that are a checksum of the whole object, computed by the store (gcsfs: md5Hash, crc32c).
_STORE_CHECKSUMS = ("md5Hash", "crc32c", "checksum")


def content(source: str) -> dict:
    """What a cache records of a source's content at build: the quick digest and full sha256 of
    a file, the hub revision of a hub dataset (None where there is none). A remote file whose
    store keeps a checksum of it has that in its identity (the cache key) instead of a sha256:
    no second download of the corpus."""
    if is_file(source):
        stored = paths.is_remote(source) and any(k in file_identity(source) for k in _STORE_CHECKSUMS)
        return dict(source=source, digest=quick_digest(source), sha256=None if stored else full_sha256(source))
    if source.startswith("hf:") and not readers.hf_parts(source)[3]:
        return dict(source=source, revision=hub_revision(source))
    return dict(source=source)

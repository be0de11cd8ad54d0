"""Local and cloud (gs://, s3://) paths for workdirs, checkpoints, tokenizers and data.

Orbax checkpoints and TFDS read and write gs:// natively. Everything else a run touches is
small (config.json, model.json, lora.json, metrics.jsonl, plots, tokenizer.model) and goes
through etils.epath, which reaches GCS through gcsfs (the `tpu` extra installs it). Two things
object stores cannot do are handled here: appending to a file (metrics are rewritten whole,
at most every few seconds) and memory-mapping (safetensors, SentencePiece): those formats are
written to / read from a local staging copy that is uploaded / downloaded in one piece.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time

from etils import epath


def is_remote(path) -> bool:
    """True for URLs such as gs://bucket/run (anything with a scheme)."""
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """An absolute local path, or the URL unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(path, *parts) -> str:
    return os.path.join(os.fspath(path), *parts)


def Path(path) -> epath.Path:  # noqa: N802 (a constructor, like pathlib.Path)
    return epath.Path(os.fspath(path))


def exists(path) -> bool:
    return Path(path).exists()


def copy_file(src, dst) -> None:
    Path(dst).write_bytes(Path(src).read_bytes())


def write_bytes_atomic(path, data: bytes) -> None:
    """Writes `data` under a temporary name, then renames it onto `path`: a kill leaves the old
    file or the new one, never half of one (object stores write whole objects anyway)."""
    path = os.fspath(path)
    if is_remote(path):
        Path(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path, text: str) -> None:
    """write_bytes_atomic for text (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def copy_tree(src, dst) -> None:
    """Copies a directory tree file by file (local <-> remote)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_dir():
            copy_tree(p, dst / p.name)
        else:
            (dst / p.name).write_bytes(p.read_bytes())


def local_copy(path) -> str:
    """`path` itself when local; else a local copy of the file or directory (cached by URL)."""
    path = os.fspath(path)
    if not is_remote(path):
        return path
    cache = os.path.join(tempfile.gettempdir(), "gemma_jax_remote", hashlib.sha1(path.encode()).hexdigest()[:16])
    local = os.path.join(cache, os.path.basename(path.rstrip("/")))
    if not os.path.exists(local):
        tmp = local + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(cache, exist_ok=True)
        if Path(path).is_dir():
            copy_tree(path, tmp)
        else:
            copy_file(path, tmp)
        os.replace(tmp, local)
    return local


@contextlib.contextmanager
def staged_dir(path):
    """Yields a local directory to write into; `path` receives its files at the end.

    Locally each file is renamed into place (a kill leaves the old file or the new one under
    each name, never half of one); a remote `path` receives whole objects by upload."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".staged-", dir=path)
        try:
            yield tmp
            for root, _, files in os.walk(tmp):
                rel = os.path.relpath(root, tmp)
                os.makedirs(os.path.join(path, rel), exist_ok=True)
                for name in files:
                    os.replace(os.path.join(root, name), os.path.join(path, rel, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="gemma_jax_stage_") as tmp:
        yield tmp
        copy_tree(tmp, path)


class JsonlWriter:
    """Appends lines to a local file; for a remote file keeps every line and rewrites it whole.

    Object stores have no append, so the remote file is rewritten at most every `interval`
    seconds and on flush(force=True) / close(); lines written before (a resumed run) are kept.
    """

    def __init__(self, path, interval: float = 10.0):
        self.path, self.interval = os.fspath(path), interval
        self.remote = is_remote(self.path)
        self._written = -float("inf")  # the first write goes out at once (monotonic() may be small)
        if self.remote:
            p = Path(self.path)
            self.lines = p.read_text().splitlines(keepends=True) if p.exists() else []
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, "a")

    def write(self, line: str) -> None:
        if self.remote:
            self.lines.append(line)
            self.flush()
        else:
            self.file.write(line)
            self.file.flush()

    def flush(self, force: bool = False) -> None:
        if self.remote and (force or time.monotonic() - self._written >= self.interval):
            Path(self.path).write_text("".join(self.lines))
            self._written = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        else:
            self.file.close()

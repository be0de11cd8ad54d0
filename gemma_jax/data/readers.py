"""Sources -> records: files, TFDS and Hugging Face datasets, each record with its place.

A ``spec`` is comma-separated paths or globs (local or ``gs://``), by extension ``.jsonl``,
``.json`` (an array of records, or ``{"data": [...]}``), ``.csv``, ``.tsv`` (header row),
``.txt`` (one document per line, or per blank-line-separated block with
``text_split="paragraph"``), ``.parquet`` (rows, read in batches with pyarrow), and any of the
text formats compressed as ``.gz`` or ``.zst`` (``train.jsonl.gz``); TFDS datasets as
``tfds:name[/config][:version]:split`` (e.g. ``tfds:billsum:train``), read record by record with
``tfds.data_source`` so TensorFlow is not needed for datasets prepared as array_record; Hugging
Face datasets as ``hf:org/name[:config]:split`` (streamed) or ``hf:/path/to/dir[:split]`` for a
``save_to_disk`` directory (the ``hf`` extra installs ``datasets``). Records stream: nothing
here holds a whole source in memory except a ``.json`` array.
File-level problems (missing file, unreadable JSON array, bad CSV header, TFDS) always raise.
"""

from __future__ import annotations

import collections
import csv
import glob
import io
import json
import os
from collections.abc import Mapping

import numpy as np
from absl import logging

from gemma_jax import paths
from gemma_jax.data.schema import EXTENSIONS, LOGGED_SKIPS, DataError, Example, parse_field_map, to_example

COMPRESSIONS = (".gz", ".zst")

# ---------------------------------------------------------------------------------- readers
# Each reader yields (where, record) or (where, DataError) for a bad record it can step over.


def _kind(path):
    """(format extension, compression) of a file name: 'x.jsonl.gz' -> ('.jsonl', '.gz')."""
    name = path.lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    return os.path.splitext(name[:len(name) - len(comp)])[1], comp


def _open(path):
    """A binary file object for a local or gs:// path, decompressed by its .gz/.zst suffix."""
    f = paths.Path(path).open("rb") if paths.is_remote(path) else open(path, "rb")
    comp = _kind(path)[1]
    if comp == ".gz":
        import gzip  # pylint: disable=g-import-not-at-top
        return gzip.GzipFile(fileobj=f)
    if comp == ".zst":
        try:
            import zstandard  # pylint: disable=g-import-not-at-top
        except ImportError:
            raise DataError(f"{path}: .zst files need zstandard (`pip install zstandard`)") from None
        # Buffered: the stream reader itself cannot iterate lines.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True))
    return f


def _around(line: str, colno: int, width: int = 40) -> str:
    """The text of `line` around 1-based column `colno`, the column marked with >>> and control
    characters escaped, so the error stays one line: '...", "output": >>>"the court'."""
    i = max(colno - 1, 0)
    before, after = line[max(i - width, 0):i], line[i:i + width]
    esc = lambda t: "".join(ch if ch >= " " else repr(ch)[1:-1] for ch in t)  # noqa: E731
    return f"{'...' if i > width else ''}{esc(before)}>>>{esc(after)}{'...' if i + width < len(line) else ''}"


def _json_error(where: str, e: json.JSONDecodeError, line: str, lineno: int) -> str:
    """file:line:column, Python's whole message, and the text around the column."""
    return f"{where}:{lineno}:{e.colno}: malformed JSON: {e}; the line around column {e.colno}: {_around(line, e.colno)}"


def _read_jsonl(path):
    with _open(path) as f:
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape")
            if i == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            where = f"{path}:{i}"
            # Without its line ending: a string cut short then reads as unterminated where it
            # starts, not as a "control character" (the newline) at the end of the line.
            line = line.rstrip("\r\n")
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(_json_error(str(path), e, line, i), "malformed")


def _read_json(path):
    with _open(path) as f:
        text = f.read().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1] if text.splitlines() else ""
        raise DataError(_json_error(str(path), e, line, e.lineno), "malformed") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records or {{\"data\": [...]}}, got "
                        f"{type(obj).__name__}", "malformed")
    for i, rec in enumerate(obj):
        yield f"{path}[{i}]", rec


def _read_csv(path, delimiter):
    csv.field_size_limit(2**31 - 1)  # the default 128 KB cell limit is too small for documents
    with io.TextIOWrapper(_open(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header, prev = None, 0
        try:
            for row in reader:
                start, prev = prev + 1, reader.line_num  # a quoted cell may span lines
                if not any(c.strip() for c in row):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    if "" in header or len(set(header)) != len(header):
                        raise DataError(f"{path}:{start}: bad header {row!r}: column names must be "
                                        "non-empty and distinct", "malformed")
                    continue
                where = f"{path}:{start}"
                if len(row) != len(header):
                    yield where, DataError(f"{where}: malformed row: {len(row)} columns, the header "
                                           f"has {len(header)}", "malformed")
                    continue
                yield where, dict(zip(header, row))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}", "malformed") from None


def _read_txt(path, text_split):
    with _open(path) as f:
        block, start = [], 0
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if i == 1:
                line = line.lstrip("\ufeff")
            if text_split == "line":
                if line.strip():
                    yield f"{path}:{i}", {"text": line}
            elif line.strip():
                start = start if block else i
                block.append(line)
            elif block:
                yield f"{path}:{start}", {"text": "\n".join(block)}
                block = []
        if block:
            yield f"{path}:{start}", {"text": "\n".join(block)}


def _from_tfds(x):
    if isinstance(x, bytes):
        return x.decode("utf-8", "surrogateescape")
    if isinstance(x, Mapping):
        return {k: _from_tfds(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _from_tfds(x.tolist()) if x.ndim else _from_tfds(x.item())
    if isinstance(x, (list, tuple)):
        return [_from_tfds(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def _read_tfds(spec, data_dir):
    parts = spec[len("tfds:"):].split(":")
    name, split = (parts[0], "train") if len(parts) == 1 else (":".join(parts[:-1]), parts[-1])
    prepare = (f"tfds.builder({name!r}, data_dir=DIR, file_format='array_record')"
               f".download_and_prepare() (or `tfds build {name} --file_format=array_record`)")
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataError(f"{spec}: TFDS sources need tensorflow-datasets: `pip install "
                        "tensorflow-datasets` (TensorFlow itself is not needed for datasets prepared "
                        "as array_record)", "tfds") from None
    try:
        # data_source prepares missing data as array_record only when given no data_dir.
        source = tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir) or None,
                                  builder_kwargs={"file_format": "array_record"})
    except ModuleNotFoundError as e:
        raise DataError(f"{spec}: preparing or reading this dataset needs {e.name} "
                        f"(`pip install {e.name}`), or prepare it elsewhere as array_record: "
                        f"{prepare}", "tfds") from None
    except Exception as e:  # noqa: BLE001  tfds raises many types; the first line says enough
        first = (str(e).strip().splitlines() or [""])[0]
        if "tfrecord" in str(e).lower():  # NotImplementedError, or a file-format clash
            raise DataError(f"{spec}: this dataset is prepared as tfrecord, which needs TensorFlow "
                            f"(`pip install tensorflow`); or prepare it as array_record: {prepare} "
                            f"[{first}]", "tfds") from None
        raise DataError(f"{spec}: cannot open TFDS dataset {name!r} split {split!r} "
                        f"(data_dir={data_dir or 'default'}): {type(e).__name__}: {first}",
                        "tfds") from None
    for i in range(len(source)):
        yield f"{spec}[{i}]", _from_tfds(source[i])


def _present(rec):
    # Columnar sources give every row every column, None where a row has no value.
    return {k: v for k, v in rec.items() if v is not None} if isinstance(rec, Mapping) else rec


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataError(f"{path}: .parquet files need pyarrow (`pip install pyarrow`)") from None
    with _open(path) as f:
        try:
            pf = pq.ParquetFile(f)
            i = 0
            for batch in pf.iter_batches(batch_size=1024):  # a row group at a time, not the file
                for rec in batch.to_pylist():
                    yield f"{path}[{i}]", _present(rec)
                    i += 1
        except Exception as e:  # noqa: BLE001  pyarrow's errors (ArrowInvalid, OSError) say enough
            raise DataError(f"{path}: unreadable parquet file: {type(e).__name__}: {e}", "malformed") from None


def hf_parts(spec):
    """'hf:org/name[:config]:split' -> (name, config, split, is_local_dir); 'hf:DIR[:split]' too."""
    body = spec[len("hf:"):]
    head, _, tail = body.rpartition(":")
    for d, split in ((body, ""), (head, tail)):
        if d and os.path.isdir(os.path.expanduser(d)):
            return os.path.expanduser(d), None, split, True
    parts = body.split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec}: expected hf:org/name[:config]:split or hf:/path/to/saved/dataset[:split]")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train", False


def _read_hf(spec):
    try:
        import datasets  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install datasets` "
                        "(or `pip install gemma_jax[hf]`)", "hf") from None
    name, config, split, local = hf_parts(spec)
    try:
        if local:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if (split or "train") not in ds:
                    raise DataError(f"{spec}: no split {split or 'train'!r} (splits: {', '.join(ds)})", "hf")
                ds = ds[split or "train"]
        else:  # streamed: records arrive as they download, nothing is materialised
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  datasets raises many types; the first line says enough
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{spec}: cannot open Hugging Face dataset: {type(e).__name__}: {first}", "hf") from None
    for i, rec in enumerate(ds):
        yield f"{spec}[{i}]", _present(rec)


def _supported(path):
    return _kind(path)[0] in EXTENSIONS and not (_kind(path)[0] == ".parquet" and _kind(path)[1])


def sources(spec):
    """A spec's sources in order: file paths (globs expanded), tfds: and hf: names."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}: name files, globs, tfds:name:split or hf:name:split")
    out = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if part.startswith(("tfds:", "hf:")):
            out.append(part)
            continue
        remote = paths.is_remote(part)
        path = part if remote else os.path.expanduser(part)
        if any(c in path for c in "*?["):
            if remote:
                root, _, pattern = path.partition("://")[2].partition("/")
                base = paths.Path(path.split("://")[0] + "://" + root)
                matches = sorted(str(p) for p in base.glob(pattern) if p.is_file())
            else:
                matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{part}: no files match this pattern")
        elif remote:
            if not paths.exists(path):
                raise DataError(f"{part}: no such file")
            matches = [path]
        elif os.path.isdir(path):
            raise DataError(f"{part}: is a directory; name files or a glob like {part}/*.jsonl "
                            f"(a Hugging Face save_to_disk directory: hf:{part})")
        elif not os.path.isfile(path):
            raise DataError(f"{part}: no such file (cwd {os.getcwd()})")
        else:
            matches = [path]
        for m in matches:
            if not _supported(m):
                raise DataError(f"{m}: unsupported file type (use {', '.join(EXTENSIONS)}, the text "
                                f"formats compressed as {' or '.join(COMPRESSIONS)}, tfds: or hf:)")
        out += matches
    return out


def records(source, text_split, tfds_data_dir):
    """(where, record) pairs of one source, or (where, DataError) for a record it can step over."""
    if source.startswith("tfds:"):
        return _read_tfds(source, tfds_data_dir)
    if source.startswith("hf:"):
        return _read_hf(source)
    ext = _kind(source)[0]
    if ext == ".jsonl":
        return _read_jsonl(source)
    if ext == ".json":
        return _read_json(source)
    if ext in (".csv", ".tsv"):
        return _read_csv(source, "\t" if ext == ".tsv" else ",")
    if ext == ".parquet":
        return _read_parquet(source)
    return _read_txt(source, text_split)


def converted(spec, convert, *, what: str = "record", counted: str = "examples", text_split="line",
              skip_invalid=False, tfds_data_dir="", skipped=None):
    """Streams (source, convert(record, where)) for every valid record of spec, in order. A record
    the reader or `convert` rejects raises its DataError, or with skip_invalid is counted by reason
    into `skipped` (a Counter) and logged as an invalid `what` (the first LOGGED_SKIPS of them).
    SFT examples, preference pairs and RL prompts all read through here."""
    if text_split not in ("line", "paragraph"):
        raise DataError(f"text_split: expected 'line' or 'paragraph', got {text_split!r}")
    skipped = collections.Counter() if skipped is None else skipped
    for source in sources(spec):
        n, s0 = 0, sum(skipped.values())
        for where, rec in records(source, text_split, tfds_data_dir):
            try:
                if isinstance(rec, DataError):
                    raise rec
                item = convert(rec, where)
            except DataError as e:
                if not skip_invalid:
                    raise
                skipped[e.reason] += 1
                if sum(skipped.values()) <= LOGGED_SKIPS:
                    logging.warning("skipping invalid %s: %s", what, e)
                continue
            n += 1
            yield source, item
        logging.info("%s: %d %s, %d invalid skipped", source, n, counted, sum(skipped.values()) - s0)


def examples(spec, *, field_map=None, default_instruction="", text_split="line", skip_invalid=False,
             tfds_data_dir="", skipped=None):
    """Streams (source, Example) of every valid record of spec, in order; counts skips by reason
    into `skipped` (a Counter) when skip_invalid, else raises the first DataError."""
    fmap = parse_field_map(field_map)
    return converted(spec, lambda rec, where: to_example(rec, where, fmap, default_instruction),
                     text_split=text_split, skip_invalid=skip_invalid, tfds_data_dir=tfds_data_dir, skipped=skipped)


def read_examples(spec: str, *, field_map="", default_instruction: str = "",
                  text_split: str = "line", skip_invalid: bool = False,
                  tfds_data_dir: str = "") -> tuple[list[Example], collections.Counter]:
    """Reads every record of spec into Examples; returns them and the skipped counts by reason."""
    skipped = collections.Counter()
    out = [ex for _, ex in examples(spec, field_map=field_map, default_instruction=default_instruction,
                                    text_split=text_split, skip_invalid=skip_invalid,
                                    tfds_data_dir=tfds_data_dir, skipped=skipped)]
    if skipped:
        logging.warning("%s: skipped %d invalid records: %s", spec, sum(skipped.values()),
                        dict(skipped))
    if not out:
        raise DataError(f"{spec}: no valid examples (skipped: {dict(skipped)})")
    return out, skipped

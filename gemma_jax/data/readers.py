"""Sources -> records: files (jsonl, json, csv, tsv, txt) and TFDS, each record with its place.

A ``spec`` is comma-separated paths or globs, by extension ``.jsonl``, ``.json`` (an array of
records, or ``{"data": [...]}``), ``.csv``, ``.tsv`` (header row), ``.txt`` (one document per
line, or per blank-line-separated block with ``text_split="paragraph"``), and TFDS datasets as
``tfds:name[/config][:version]:split`` (e.g. ``tfds:billsum:train``), read with
``tfds.data_source`` so TensorFlow is not needed for datasets prepared as array_record.
File-level problems (missing file, unreadable JSON array, bad CSV header, TFDS) always raise.
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
from collections.abc import Mapping

import numpy as np
from absl import logging

from gemma_jax.data.schema import EXTENSIONS, LOGGED_SKIPS, DataError, Example, parse_field_map, to_example

# ---------------------------------------------------------------------------------- readers
# Each reader yields (where, record) or (where, DataError) for a bad record it can step over.


def _read_jsonl(path):
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape")
            if i == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON line (column {e.colno}): {e.msg}",
                                       "malformed")


def _read_json(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON (column {e.colno}): {e.msg}",
                        "malformed") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records or {{\"data\": [...]}}, got "
                        f"{type(obj).__name__}", "malformed")
    for i, rec in enumerate(obj):
        yield f"{path}[{i}]", rec


def _read_csv(path, delimiter):
    csv.field_size_limit(2**31 - 1)  # the default 128 KB cell limit is too small for documents
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
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
    with open(path, "rb") as f:
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


def sources(spec):
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}: name files, globs or tfds:name:split")
    out = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if part.startswith("tfds:"):
            out.append(part)
            continue
        path = os.path.expanduser(part)
        if any(c in path for c in "*?["):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{part}: no files match this pattern")
        elif os.path.isdir(path):
            raise DataError(f"{part}: is a directory; name files or a glob like {part}/*.jsonl")
        elif not os.path.isfile(path):
            raise DataError(f"{part}: no such file (cwd {os.getcwd()})")
        else:
            matches = [path]
        for m in matches:
            if os.path.splitext(m)[1].lower() not in EXTENSIONS:
                raise DataError(f"{m}: unsupported file type (use {', '.join(EXTENSIONS)} or tfds:)")
        out += matches
    return out


def records(source, text_split, tfds_data_dir):
    if source.startswith("tfds:"):
        return _read_tfds(source, tfds_data_dir)
    ext = os.path.splitext(source)[1].lower()
    if ext == ".jsonl":
        return _read_jsonl(source)
    if ext == ".json":
        return _read_json(source)
    if ext in (".csv", ".tsv"):
        return _read_csv(source, "\t" if ext == ".tsv" else ",")
    return _read_txt(source, text_split)


def read_examples(spec: str, *, field_map="", default_instruction: str = "",
                  text_split: str = "line", skip_invalid: bool = False,
                  tfds_data_dir: str = "") -> tuple[list[Example], collections.Counter]:
    """Reads every record of spec into Examples; returns them and the skipped counts by reason."""
    fmap = parse_field_map(field_map)
    if text_split not in ("line", "paragraph"):
        raise DataError(f"text_split: expected 'line' or 'paragraph', got {text_split!r}")
    examples, skipped = [], collections.Counter()
    for source in sources(spec):
        n0, s0 = len(examples), sum(skipped.values())
        for where, rec in records(source, text_split, tfds_data_dir):
            try:
                if isinstance(rec, DataError):
                    raise rec
                examples.append(to_example(rec, where, fmap, default_instruction))
            except DataError as e:
                if not skip_invalid:
                    raise
                skipped[e.reason] += 1
                if sum(skipped.values()) <= LOGGED_SKIPS:
                    logging.warning("skipping invalid record: %s", e)
        logging.info("%s: %d examples, %d invalid skipped", source, len(examples) - n0,
                     sum(skipped.values()) - s0)
    if skipped:
        logging.warning("%s: skipped %d invalid records: %s", spec, sum(skipped.values()),
                        dict(skipped))
    if not examples:
        raise DataError(f"{spec}: no valid examples (skipped: {dict(skipped)})")
    return examples, skipped


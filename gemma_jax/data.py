"""Training data: files or TFDS -> examples -> tokens and loss mask -> packed rows -> grain batches.

Host side only: numpy, grain and absl. This module never imports jax; grain does, so it is imported
only when a train iterator is made.

Sources (a ``spec``): comma-separated paths or globs, by extension ``.jsonl``, ``.json`` (an array
of records, or ``{"data": [...]}``), ``.csv``, ``.tsv`` (header row), ``.txt`` (one document per
line, or per blank-line-separated block with ``text_split="paragraph"``), and TFDS datasets as
``tfds:name[/config][:version]:split`` (e.g. ``tfds:billsum:train``), read with
``tfds.data_source`` so TensorFlow is not needed for datasets prepared as array_record.

Schemas, detected per record after ``field_map`` renames columns (``"input=text,output=summary"``):
  {"instruction", "input", "output"} -> user ``instruction + "\\n\\n" + input`` (or whichever is
      non-empty; ``default_instruction`` fills a missing instruction), model ``output``;
  {"prompt", "completion"}          -> user ``prompt``, model ``completion``;
  {"messages": [{"role", "content"}, ...]} -> ``tokenizer.normalize_turns`` (system folded into the
      first user turn, ``assistant`` is the model role);
  {"text"}                          -> raw document, loss on every token.

Bad records raise ``DataError`` naming file, line (jsonl/csv/tsv/txt, 1-based) or record index
(json/tfds, ``path[i]``, 0-based) and field, e.g. ``data/legal/train.jsonl:17: field "output": empty
response``. With ``skip_invalid=True`` they are skipped and counted by ``DataError.reason``
(malformed, missing_field, wrong_type, empty_prompt, empty_response, empty_text, bad_encoding,
bad_roles); file-level problems (missing file, unreadable JSON array, bad CSV header, TFDS) always
raise.

Rows and batches: each example's ids[0..n) give inputs ids[:-1], targets ids[1:], loss mask
mask[1:]; examples are packed greedily (first fit, seeded order) into ``seq_len`` rows with
``segment_ids`` 1, 2, ... (0 = padding) and ``positions`` restarting at 0 per segment, or one per row
with ``packing=False``. Overlong examples are truncated or dropped (counted either way); a
truncation that leaves no target token drops the example (``dropped_no_target``). A batch is a dict
of ``[batch, seq_len]`` arrays: ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32) and
``loss_mask`` (float32). Padding: inputs/targets pad_id, everything else 0.

Pipeline: rows (identical on every process, deterministic from the seed) -> grain MapDataset ->
shuffle per epoch -> repeat -> global batch -> this process's rows ``[p*local:(p+1)*local]``, so any
number of processes sees the same global batches. The iterator's ``get_state()``/``set_state()``
resume exactly (``state["next_index"]`` is the number of batches drawn); grain's
``PyGrainCheckpointHandler`` saves it with Orbax.

``build(config.data, tokenizer, ...)`` reads keys: train, eval, eval_fraction, seq_len, packing,
overlong, train_on_prompt, skip_invalid, field_map, default_instruction, text_split, num_epochs,
tfds_data_dir.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from gemma_jax.tokenizer import normalize_turns

CANONICAL = ("instruction", "input", "output", "prompt", "completion", "messages", "text")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt")
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_SCHEMAS = '{"instruction","input","output"}, {"prompt","completion"}, {"messages"} or {"text"}'
_PACK_WINDOW = 128  # first fit looks at the last rows only, so packing stays O(examples)
_LOGGED_SKIPS = 10


class DataError(ValueError):
    """Bad data or data config; the message names the file, line or record, and field."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Example:
    """One example: chat turns (user/model alternating) or a raw text document."""
    source: str
    turns: list | None = None
    text: str | None = None


def parse_field_map(field_map, key: str = "field_map") -> dict[str, str]:
    """'canonical=column,...' or a dict canonical->column -> validated dict."""
    if not field_map:
        return {}
    if isinstance(field_map, str):
        items = []
        for part in filter(str.strip, field_map.split(",")):
            if "=" not in part:
                raise DataError(f"{key}: entry {part.strip()!r} is not canonical=column "
                                "(e.g. 'instruction=question,output=answer')")
            items.append(tuple(s.strip() for s in part.split("=", 1)))
    elif hasattr(field_map, "items"):
        items = list(field_map.items())
    else:
        raise DataError(f"{key}: expected a string like 'output=answer' or a dict, got {field_map!r}")
    for canon, col in items:
        if canon not in CANONICAL:
            raise DataError(f"{key}: {canon!r} is not a schema field (one of {', '.join(CANONICAL)})")
        if not isinstance(col, str) or not col:
            raise DataError(f"{key}: column for {canon!r} must be a non-empty string, got {col!r}")
    return dict(items)


# ---------------------------------------------------------------------------------- records


def _err(where, field, message, reason):
    return DataError(f"{where}: field {json.dumps(field)}: {message}", reason)


def _check_utf8(s, where, field):
    # Readers decode with surrogateescape so a bad byte is reported here, with its field.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _err(where, field, f"undecodable text: not valid UTF-8 at character {e.start}",
                   "bad_encoding") from None


def _string(rec, key, where, name, schema, *, required=True):
    v = rec.get(key)
    if v is None:
        if required:
            raise _err(where, name, f"missing (expected schema {schema}; record has fields "
                       f"{sorted(rec)})", "missing_field")
        return ""
    if not isinstance(v, str):
        raise _err(where, name, f"expected a string, got {type(v).__name__} {str(v)[:40]!r}",
                   "wrong_type")
    _check_utf8(v, where, name)
    return v


def _chat(msgs, where, name):
    if not isinstance(msgs, list):
        raise _err(where, name, f"expected a list of {{role, content}} messages, got "
                   f"{type(msgs).__name__}", "wrong_type")
    for i, m in enumerate(msgs):
        f = f"{name}[{i}]"
        if not isinstance(m, Mapping):
            raise _err(where, f, f"expected a {{role, content}} object, got {type(m).__name__}",
                       "wrong_type")
        for key in ("role", "content"):
            if key not in m:
                raise _err(where, f"{f}.{key}", "missing", "missing_field")
            if not isinstance(m[key], str):
                raise _err(where, f"{f}.{key}", f"expected a string, got {type(m[key]).__name__}",
                           "wrong_type")
            _check_utf8(m[key], where, f"{f}.{key}")
        if m["role"] in ("assistant", "model") and not m["content"].strip():
            raise _err(where, f"{f}.content", "empty response", "empty_response")
    try:
        turns = normalize_turns(msgs)
    except ValueError as e:
        raise _err(where, name, f"bad message roles: {e}", "bad_roles") from None
    if not any(t["role"] == "model" for t in turns):
        raise _err(where, name, "no assistant/model message: nothing to learn", "empty_response")
    return turns


def to_example(rec, where: str, field_map: Mapping[str, str] | None = None,
               default_instruction: str = "") -> Example:
    """One record (dict) -> Example, by schema; raises DataError naming where and the field."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}",
                        "wrong_type")
    field_map = field_map or {}
    rec = dict(rec)
    for canon, col in field_map.items():
        if col in rec:
            rec[canon] = rec.pop(col)
    name = lambda k: field_map.get(k, k)  # noqa: E731  errors name the user's column
    if "messages" in rec:
        return Example(where, turns=_chat(rec["messages"], where, name("messages")))
    if any(k in rec for k in ("instruction", "input", "output")):
        schema = '{"instruction","input","output"}'
        use_default = rec.get("instruction") is None and default_instruction
        instr = default_instruction if use_default else _string(
            rec, "instruction", where, name("instruction"), schema, required=not rec.get("input"))
        inp = _string(rec, "input", where, name("input"), schema, required=False)
        user = (f"{instr}\n\n{inp}" if inp.strip() else instr) if instr.strip() else inp
        user_key, model_key = "instruction", "output"
        model = _string(rec, "output", where, name("output"), schema)
    elif "prompt" in rec or "completion" in rec:
        schema, user_key, model_key = '{"prompt","completion"}', "prompt", "completion"
        user = _string(rec, "prompt", where, name("prompt"), schema)
        model = _string(rec, "completion", where, name("completion"), schema)
    else:
        user_key = None
    if user_key:
        if not user.strip():
            raise _err(where, name(user_key), "empty prompt", "empty_prompt")
        if not model.strip():
            raise _err(where, name(model_key), "empty response", "empty_response")
        return Example(where, turns=[{"role": "user", "content": user},
                                     {"role": "model", "content": model}])
    if "text" in rec:
        text = _string(rec, "text", where, name("text"), '{"text"}')
        if not text.strip():
            raise _err(where, name("text"), "empty text", "empty_text")
        return Example(where, text=text)
    raise DataError(f"{where}: no known schema: expected fields {_SCHEMAS} (or set data.field_map); "
                    f"record has fields {sorted(rec)}", "missing_field")


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


def _sources(spec):
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


def _records(source, text_split, tfds_data_dir):
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
    for source in _sources(spec):
        n0, s0 = len(examples), sum(skipped.values())
        for where, rec in _records(source, text_split, tfds_data_dir):
            try:
                if isinstance(rec, DataError):
                    raise rec
                examples.append(to_example(rec, where, fmap, default_instruction))
            except DataError as e:
                if not skip_invalid:
                    raise
                skipped[e.reason] += 1
                if sum(skipped.values()) <= _LOGGED_SKIPS:
                    logging.warning("skipping invalid record: %s", e)
        logging.info("%s: %d examples, %d invalid skipped", source, len(examples) - n0,
                     sum(skipped.values()) - s0)
    if skipped:
        logging.warning("%s: skipped %d invalid records: %s", spec, sum(skipped.values()),
                        dict(skipped))
    if not examples:
        raise DataError(f"{spec}: no valid examples (skipped: {dict(skipped)})")
    return examples, skipped


# ---------------------------------------------------------------------------------- tokens


def encode(examples, tokenizer, *, train_on_prompt: bool = False):
    """Examples -> list of (int32 ids, bool loss mask) via the tokenizer's Gemma chat format."""
    out = []
    for ex in examples:
        if ex.turns is not None:
            ids, mask = tokenizer.encode_chat(ex.turns, train_on_prompt=train_on_prompt)
        else:
            ids, mask = tokenizer.encode_text(ex.text)
        out.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
    return out


def pack(encoded, seq_len: int, *, pad_id: int, packing: bool = True, overlong: str = "truncate",
         seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """(ids, mask) pairs -> rows {inputs, targets, loss_mask, segment_ids, positions} and stats."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"overlong: expected 'truncate' or 'drop', got {overlong!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len: expected a positive integer, got {seq_len!r}")
    stats = dict(examples=len(encoded), truncated=0, dropped_overlong=0, dropped_no_target=0)
    items = []
    for k in np.random.default_rng(seed).permutation(len(encoded)):
        ids, mask = encoded[k]
        truncated = len(ids) - 1 > seq_len
        if truncated and overlong == "drop":
            stats["dropped_overlong"] += 1
            continue
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if len(ids) < 2 or not mask[1:].any():  # e.g. the response was cut off entirely
            stats["dropped_no_target"] += 1
            continue
        stats["truncated"] += truncated
        items.append((ids, mask))
    caps = np.zeros(len(items), np.int64)
    row_of, nrows = [], 0
    for ids, _ in items:
        n = len(ids) - 1
        lo = max(0, nrows - _PACK_WINDOW) if packing else nrows
        fits = np.flatnonzero(caps[lo:nrows] >= n)
        r = lo + int(fits[0]) if fits.size else nrows
        if r == nrows:
            caps[r], nrows = seq_len, nrows + 1
        caps[r] -= n
        row_of.append(r)
    rows = {k: np.zeros((nrows, seq_len), np.float32 if k == "loss_mask" else np.int32)
            for k in FIELDS}
    rows["inputs"][:] = pad_id
    rows["targets"][:] = pad_id
    offset, nseg = np.zeros(nrows, np.int64), np.zeros(nrows, np.int32)
    for (ids, mask), r in zip(items, row_of):
        n, o = len(ids) - 1, offset[r]
        nseg[r] += 1
        rows["inputs"][r, o:o + n] = ids[:-1]
        rows["targets"][r, o:o + n] = ids[1:]
        rows["loss_mask"][r, o:o + n] = mask[1:]
        rows["segment_ids"][r, o:o + n] = nseg[r]
        rows["positions"][r, o:o + n] = np.arange(n)
        offset[r] += n
    tokens = int(offset.sum())
    stats.update(rows=nrows, tokens=tokens, target_tokens=int(rows["loss_mask"].sum()),
                 fill=tokens / max(1, nrows * seq_len))
    return rows, stats


# ---------------------------------------------------------------------------------- batches


def _local_slice(global_batch_size, process_index, process_count):
    if global_batch_size < 1 or process_count < 1 or global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} must be a positive multiple of the "
                        f"process count {process_count}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, {process_count})")
    local = global_batch_size // process_count
    return process_index * local, (process_index + 1) * local


def _gather(rows, lo, hi, indices):
    # Only this process's rows of the global batch are materialised.
    return {k: v[indices[lo:hi]] for k, v in rows.items()}


def train_iterator(rows, *, global_batch_size: int, seed: int, num_epochs: int = 0,
                   process_index: int = 0, process_count: int = 1):
    """Grain iterator of this process's slice of shuffled global batches (0 epochs = forever)."""
    import grain  # pylint: disable=g-import-not-at-top  (imports jax)

    lo, hi = _local_slice(global_batch_size, process_index, process_count)
    n = len(rows["inputs"])
    if n == 0 or (num_epochs and n * num_epochs < global_batch_size):
        raise DataError(f"{n} packed rows x {num_epochs} epochs do not fill one global batch of "
                        f"{global_batch_size}")
    ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs or None)
          .batch(global_batch_size, drop_remainder=True)
          .map(functools.partial(_gather, rows, lo, hi)))
    # A small prefetch: grain's default buffer (500 batches) would hold gigabytes of rows.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(rows, *, global_batch_size: int, pad_id: int = 0, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """All rows in order as this process's slices of global batches; the last is padded (mask 0)."""
    lo, hi = _local_slice(global_batch_size, process_index, process_count)
    n, out = len(rows["inputs"]), []
    for start in range(0, n, global_batch_size):
        idx = np.arange(start, start + global_batch_size)[lo:hi]
        real = idx[idx < n]
        b = {k: v[real] for k, v in rows.items()}
        if len(real) < len(idx):
            pad = len(idx) - len(real)
            for k, v in b.items():
                fill = pad_id if k in ("inputs", "targets") else 0
                b[k] = np.concatenate([v, np.full((pad,) + v.shape[1:], fill, v.dtype)])
        out.append(b)
    return out


@dataclasses.dataclass
class Data:
    """What build returns: the train iterator, eval batches and counts."""
    train: Any  # grain DatasetIterator: next() -> local batch dict; get_state()/set_state()
    eval: list  # local eval batches (finite, in order, padded rows have loss_mask 0); [] if none
    stats: dict  # {"train": {...}, "eval": {...}}: examples, skipped, truncated, dropped_*, rows, tokens, fill
    rows_per_epoch: int
    global_batch_size: int
    num_batches: int | None  # None when num_epochs is 0 (forever)

    def epoch(self, batches_done: int) -> int:
        """0-based epoch of the next batch after batches_done batches."""
        return batches_done * self.global_batch_size // self.rows_per_epoch


def holdout(examples, fraction: float, *, seed: int):
    """Deterministically splits off round(fraction * n) examples (at least 1): (train, eval)."""
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} leaves no training examples "
                        f"({len(examples)} in total)")
    held = set(np.random.default_rng(seed).permutation(len(examples))[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def _option(cfg, key, default, ok, expected):
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    if not ok(v):
        raise DataError(f"data.{key}: invalid value {v!r} (expected {expected})")
    return v


def build(cfg_data, tokenizer, *, global_batch_size: int, seed: int, process_index: int = 0,
          process_count: int = 1) -> Data:
    """config.data -> Data(train iterator, eval batches, stats); identical rows on every process."""
    o = functools.partial(_option, cfg_data)
    is_str = lambda v: isinstance(v, str)  # noqa: E731
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    train_spec = o("train", "", lambda v: is_str(v) and v.strip(), "files, globs or tfds:name:split")
    eval_spec = o("eval", "", is_str, "a string, empty for none")
    frac = o("eval_fraction", 0.0, lambda v: (is_int(v) or isinstance(v, float)) and 0 <= v < 1,
             "a number in [0, 1)")
    seq_len = o("seq_len", 1024, lambda v: is_int(v) and v >= 2, "an integer >= 2")
    packing = o("packing", True, lambda v: isinstance(v, bool), "True or False")
    overlong = o("overlong", "truncate", lambda v: v in ("truncate", "drop"), "'truncate' or 'drop'")
    train_on_prompt = o("train_on_prompt", False, lambda v: isinstance(v, bool), "True or False")
    num_epochs = o("num_epochs", 0, lambda v: is_int(v) and v >= 0, "an integer >= 0, 0 = forever")
    read = functools.partial(
        read_examples,
        field_map=parse_field_map(o("field_map", "", lambda v: True, ""), "data.field_map"),
        default_instruction=o("default_instruction", "", is_str, "a string"),
        text_split=o("text_split", "line", lambda v: v in ("line", "paragraph"),
                     "'line' or 'paragraph'"),
        skip_invalid=o("skip_invalid", False, lambda v: isinstance(v, bool), "True or False"),
        tfds_data_dir=o("tfds_data_dir", "", is_str, "a directory, empty for the TFDS default"))
    if eval_spec and frac:
        raise DataError("data.eval and data.eval_fraction are both set; use one")
    train_ex, train_skipped = read(train_spec)
    eval_ex, eval_skipped = [], collections.Counter()
    if eval_spec:
        eval_ex, eval_skipped = read(eval_spec)
    elif frac:
        train_ex, eval_ex = holdout(train_ex, frac, seed=seed)
    pk = functools.partial(pack, seq_len=seq_len, pad_id=tokenizer.pad_id, packing=packing,
                           overlong=overlong)
    rows, train_stats = pk(encode(train_ex, tokenizer, train_on_prompt=train_on_prompt), seed=seed)
    train_stats["skipped"] = dict(train_skipped)
    stats = {"train": train_stats}
    evals = []
    if eval_ex:
        eval_rows, stats["eval"] = pk(encode(eval_ex, tokenizer, train_on_prompt=train_on_prompt),
                                      seed=0)
        stats["eval"]["skipped"] = dict(eval_skipped)
        evals = eval_batches(eval_rows, global_batch_size=global_batch_size,
                             pad_id=tokenizer.pad_id, process_index=process_index,
                             process_count=process_count)
    nrows = train_stats["rows"]
    num_batches = nrows * num_epochs // global_batch_size if num_epochs else None
    if num_epochs:
        train_stats["unused_remainder_rows"] = nrows * num_epochs % global_batch_size
    for split, s in stats.items():
        logging.info("data %s: %s", split, ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    train = train_iterator(rows, global_batch_size=global_batch_size, seed=seed,
                           num_epochs=num_epochs, process_index=process_index,
                           process_count=process_count)
    return Data(train=train, eval=evals, stats=stats, rows_per_epoch=nrows,
                global_batch_size=global_batch_size, num_batches=num_batches)

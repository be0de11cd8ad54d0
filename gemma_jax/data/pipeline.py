"""Packed rows -> batches: the shuffled, resumable train iterator, eval batches, `build`.

Rows (identical on every process, deterministic from the seed) -> grain MapDataset -> shuffle per
epoch -> repeat -> global batch -> this process's rows ``[p*local:(p+1)*local]``, so any number of
processes sees the same global batches. The iterator's ``get_state()``/``set_state()`` resume
exactly (``state["next_index"]`` is the number of batches drawn). A batch is a dict of
``[batch, seq_len]`` arrays: ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32) and
``loss_mask`` (float32).

``build(config.data, tokenizer, ...)`` reads keys: train, eval, eval_fraction, seq_len, packing,
overlong, train_on_prompt, skip_invalid, field_map, default_instruction, text_split, num_epochs,
tfds_data_dir.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import numpy as np
from absl import logging

from gemma_jax.data.packing import encode, pack
from gemma_jax.data.readers import read_examples
from gemma_jax.data.schema import DataError, parse_field_map


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

"""The input pipeline: the tokenized cache -> per-epoch packing plans -> this process's batches.

``build(config.data, tokenizer, ...)`` makes (or reuses) the tokenized cache of data.train and
data.eval (gemma_jax.data.cache), then streams: for epoch e the examples of the epoch (all train
examples, or a mixture's draw) are planned into rows from their cached lengths alone
(``packing.plan``, seed ``seed`` for epoch 0 and ``[seed, e]`` after, then the rows shuffled), the
epochs' rows are concatenated and cut into global batches, and batch b gives this process rows
``[b*G + p*local, b*G + (p+1)*local)``: only their examples are read from the cache. So any number
of processes sees the same global batches, nothing holds the corpus in memory (lengths arrays
only), and the iterator's ``get_state()``/``set_state()`` (``state["next_index"]``: batches drawn)
resume exactly without replaying data. A batch is a dict of ``[batch, seq_len]`` arrays:
``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32).

Mixtures: ``data.train="legal/*.jsonl:0.8,general.jsonl:0.2"``: when any comma-separated part ends
in ``:WEIGHT`` (a finite number > 0), every part must, and each part (a file, glob, tfds: or hf: name) is
a component. An epoch then draws as many examples as all components hold together, component i
contributing ``round(w_i / sum(w) * total)``, each component walking its own reshuffled passes
(small ones repeat, large ones are subsampled), deterministic from the seed.

``build`` reads keys: train, eval, eval_fraction, seq_len, packing, overlong, train_on_prompt,
skip_invalid, field_map, default_instruction, text_split, num_epochs, tfds_data_dir, cache_dir,
verify_cache, num_workers, input_workers (``cfg.get``: absent keys take their defaults).
``train_iterator``/``eval_batches`` over in-memory rows stay for preference data.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import math
import os
import re
import threading
from typing import Any

import numpy as np
from absl import flags, logging

from gemma_jax.data import cache as cache_lib
from gemma_jax.data.packing import fill_rows, plan
from gemma_jax.data.schema import DataError, parse_field_map

LOSS_WARN_FRACTION = 0.02  # warn when more examples than this are truncated or dropped


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
    train: Any  # TrainIterator (or grain's for preference rows): next() -> local batch; get_state()/set_state()
    eval: Any  # local eval batches, re-iterable (finite, in order, padded rows have loss_mask 0); [] if none
    stats: dict  # {"train": {...}, "eval": {...}}: examples, skipped, truncated, dropped_*, rows, tokens, fill
    rows_per_epoch: int  # of epoch 0 (later epochs are planned afresh and may differ by a few rows)
    global_batch_size: int
    num_batches: int | None  # None when num_epochs is 0 (forever)
    epochs: Any = dataclasses.field(default=None, repr=False)  # _Epochs of the streamed pipeline

    def epoch(self, batches_done: int) -> int:
        """0-based epoch of the next batch after batches_done batches."""
        if self.epochs is not None:
            return self.epochs.locate(batches_done * self.global_batch_size)[0]
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


# A weight as written: a plain decimal number (signs, exponents, inf and nan are read to be named).
_NUMBER = re.compile(r"^[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)
_NUMBERISH = re.compile(r"^\s*([-+]|\d|\.\d|inf|nan|$)", re.IGNORECASE)  # a tfds:/hf: part's weight
WEIGHT_RULE = "a mixture weight is a finite number > 0 (e.g. legal.jsonl:0.8,general.jsonl:0.2)"


def _split_weight(part: str) -> tuple[str, str | None]:
    """(source, the text after its last ':' when that is a weight, else None)."""
    body = part.split("://", 1)[1] if "://" in part else part
    if ":" not in body or os.path.exists(os.path.expanduser(part)):
        return part, None
    head, _, tail = part.rpartition(":")
    if part.startswith(("tfds:", "hf:")):  # their own fields are ':'-separated: only a number-like tail
        return (head, tail) if _NUMBERISH.match(tail) else (part, None)
    return (part, None) if "/" in tail else (head, tail)


def _weight(text: str, part: str, key: str) -> float:
    t = text.strip()
    if not _NUMBER.match(t):
        raise DataError(f"{key}: {part!r}: weight {text!r} is not a number; {WEIGHT_RULE}")
    w = float(t)
    if not math.isfinite(w):
        raise DataError(f"{key}: {part!r}: weight {text!r} is not finite; {WEIGHT_RULE}")
    if w <= 0:
        leave = " (to leave a part out, remove it from the mixture)" if w == 0 else ""
        raise DataError(f"{key}: {part!r}: weight {text!r} is not > 0{leave}; {WEIGHT_RULE}")
    return w


def parse_mixture(spec: str, key: str = "data.train") -> list[tuple[str, float | None]]:
    """'a.jsonl:0.8,b/*.jsonl:0.2' -> [(part, weight)]; a spec without weights -> [(spec, None)].
    A bad weight (not a number, not finite, not > 0) raises DataError naming it and the rule."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    split = [_split_weight(p) for p in parts]
    if all(w is None for _, w in split):
        return [(spec, None)]
    bad = next((p for p, (_, w) in zip(parts, split) if w is None), None)
    if bad is not None:
        raise DataError(f"{key}: {bad!r} has no weight; in a mixture every part ends in :WEIGHT, and {WEIGHT_RULE}")
    out = []
    for p, (source, w) in zip(parts, split):
        if not source.strip():
            raise DataError(f"{key}: {p!r} names no data before its weight; {WEIGHT_RULE}")
        out.append((source.strip(), _weight(w, p, key)))
    return out


class _Reader:
    """Examples by global id over several caches (ids are offset cache by cache, in spec order)."""

    def __init__(self, caches):
        self.caches = caches
        self.offsets = np.cumsum([0] + [len(c) for c in caches])
        self.lengths = np.concatenate([c.lengths for c in caches]).astype(np.int64)

    def read(self, ids):
        ids = np.asarray(ids, np.int64)
        out = [None] * len(ids)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        for c in np.unique(which):
            pos = np.flatnonzero(which == c)
            for p, ex in zip(pos, self.caches[c].read(ids[pos] - self.offsets[c])):
                out[p] = ex
        return out


def _rows(reader, ids, seq_len, packing, overlong, seed):
    """Plans ids (global example ids) into rows: (kept ids in row order, row_start, plan stats)."""
    lens = reader.lengths[ids]
    items, row_start, stats = plan(lens[:, 0], lens[:, 1], seq_len, packing=packing, overlong=overlong, seed=seed)
    kept = ids[items]
    k = lens[items]
    stats["target_tokens"] = int(np.minimum(k[:, 2], np.minimum(k[:, 0], seq_len + 1) - k[:, 1]).sum())
    stats["fill"] = stats["tokens"] / max(1, stats["rows"] * seq_len)
    return kept, row_start, stats


class _Rows:
    """Rows as example ids: row i is kept[row_start[order[i]]:row_start[order[i] + 1]] (three arrays,
    not one small array per row: 100k rows would cost ~10 MB of array headers)."""

    def __init__(self, kept, row_start, order):
        self.kept, self.row_start, self.order = kept, row_start, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        r = self.order[i]
        return self.kept[self.row_start[r]:self.row_start[r + 1]]


class _Epochs:
    """Per-epoch row plans of the train split, computed from lengths when first needed (thread-safe)."""

    def __init__(self, reader, components, *, seq_len, packing, overlong, seed, num_epochs):
        self.reader, self.components, self.seed = reader, components, seed
        self.pk = dict(seq_len=seq_len, packing=packing, overlong=overlong)
        self.num_epochs = num_epochs
        self.cum = [0]  # cumulative rows before epoch e
        self._plans, self._lock, self._ahead = collections.OrderedDict(), threading.Lock(), set()
        total = sum(len(ids) for ids, _ in components)
        w = np.array([wt for _, wt in components], np.float64)
        # Largest-remainder rounding: the draws per epoch add up to the total.
        raw = w / w.sum() * total
        counts = np.floor(raw).astype(np.int64)
        counts[np.argsort(-(raw - counts), kind="stable")[:total - counts.sum()]] += 1
        self.counts = counts

    def __getstate__(self):  # pickled into grain worker processes: locks and planner threads stay here
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_ahead")}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock(), _ahead=set())

    def examples(self, e):
        """Global example ids of epoch e, before packing shuffles them."""
        if len(self.components) == 1:
            return self.components[0][0]
        out = []
        for i, ((ids, _), c) in enumerate(zip(self.components, self.counts)):
            k = np.arange(e * c, (e + 1) * c)  # positions in component i's endless stream
            passes = {}
            for j in np.unique(k // len(ids)):
                passes[j] = np.random.default_rng([self.seed, 7919, i, int(j)]).permutation(len(ids))
            out.append(ids[np.array([passes[j][r] for j, r in zip(k // len(ids), k % len(ids))], np.int64)]
                       if c else np.zeros(0, np.int64))
        return np.concatenate(out)

    def plan(self, e):
        with self._lock:
            if e in self._plans:
                self._plans.move_to_end(e)
                return self._plans[e]
        kept, row_start, stats = _rows(self.reader, self.examples(e), seed=self.seed if e == 0 else [self.seed, e],
                                       **self.pk)
        order = np.random.default_rng([self.seed, e, 1]).permutation(len(row_start) - 1)
        rows = _Rows(kept, row_start, order)
        with self._lock:
            self._plans[e] = (rows, stats)
            while len(self._plans) > 3:
                self._plans.popitem(last=False)
        return rows, stats

    def plan_ahead(self, e):
        """Plans epoch e in a background thread (once), so the epoch boundary does not stall a step."""
        with self._lock:
            if e in self._ahead or e in self._plans or (self.num_epochs and e >= self.num_epochs):
                return
            self._ahead.add(e)
        threading.Thread(target=self.plan, args=(e,), daemon=True).start()

    def _extend(self, e):
        with self._lock:
            known = len(self.cum) - 1
        for k in range(known, e + 1):
            n = len(self.plan(k)[0])
            with self._lock:
                if len(self.cum) == k + 1:
                    self.cum.append(self.cum[-1] + n)

    def locate(self, row):
        """Global row position -> (epoch, row within the epoch)."""
        e = 0
        while True:
            self._extend(e)
            if row < self.cum[e + 1]:
                return e, row - self.cum[e]
            e += 1

    def total_rows(self):
        self._extend(self.num_epochs - 1)
        return self.cum[self.num_epochs]


class _Batch:
    """Batch index -> this process's rows of that global batch, read from the cache and filled."""

    def __init__(self, epochs, global_batch_size, lo, hi, pad_id):
        self.epochs, self.g, self.lo, self.hi, self.pad_id = epochs, global_batch_size, lo, hi, pad_id

    def __call__(self, b):
        rows = []
        for pos in range(int(b) * self.g + self.lo, int(b) * self.g + self.hi):
            e, r = self.epochs.locate(pos)
            plan = self.epochs.plan(e)[0]
            rows.append(plan[r])
            if 2 * r > len(plan):
                self.epochs.plan_ahead(e + 1)
        return _fill(self.epochs.reader, rows, self.epochs.pk["seq_len"], self.pad_id)


class TrainIterator:
    """This process's train batches from batch ``next_index`` on, read ahead by grain: in 2 threads
    of this process, or in ``workers`` grain worker processes (grain deals the batch indices out
    to the workers and returns the batches in order).

    The state is ``{"next_index": batches drawn}`` whatever the workers, so a run can resume with
    another data.input_workers; set_state starts a fresh read-ahead at that batch without making
    the batches before it.
    """

    def __init__(self, batch_fn, num_batches, workers):
        self.batch_fn, self.num_batches, self.workers = batch_fn, num_batches, workers
        self.next_index, self._it = 0, None

    def _start(self):
        import grain  # pylint: disable=g-import-not-at-top  (imports jax)
        ds = grain.MapDataset.range(self.next_index, self.num_batches or 2**62).map(self.batch_fn)
        # A small read-ahead: grain's default buffer (500 batches) would hold gigabytes of rows.
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
        if self.workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (library use, tests)
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=2))
        self._it = iter(it)
        if self.workers:  # workers left running at interpreter exit make grain print tracebacks
            atexit.register(self.close)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.next_index += 1
        if self.workers:  # out of grain's shared memory at once: a block alive at exit makes noise
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict):
        self.close()
        self.next_index = int(state["next_index"])

    def close(self):
        """Stops the read-ahead (and the worker processes); a next() afterwards starts it again."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def _fill(reader, rows, seq_len, pad_id):
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    examples = iter(reader.read(flat))
    return fill_rows([[next(examples) for _ in r] for r in rows], seq_len, pad_id=pad_id)


class EvalBatches:
    """The eval split as this process's slices of global batches, in order, read when iterated.

    Re-iterable and list-like (len, bool, [i]); the last batch is padded with rows of loss_mask 0.
    """

    def __init__(self, reader, rows, *, seq_len, global_batch_size, pad_id, lo, hi):
        self.reader, self.rows, self.seq_len, self.g, self.pad_id = reader, rows, seq_len, global_batch_size, pad_id
        self.lo, self.hi = lo, hi

    def __len__(self):
        return -(-len(self.rows) // self.g)

    def __getitem__(self, k):
        if not 0 <= k < len(self):
            raise IndexError(k)
        idx = np.arange(k * self.g, (k + 1) * self.g)[self.lo:self.hi]
        real = idx[idx < len(self.rows)]
        b = _fill(self.reader, [self.rows[i] for i in real], self.seq_len, self.pad_id)
        if len(real) < len(idx):
            pad = fill_rows([[]] * (len(idx) - len(real)), self.seq_len, pad_id=self.pad_id)
            b = {key: np.concatenate([v, pad[key]]) for key, v in b.items()}
        return b

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def check_lost(split: str, need, stats: dict, seq_len: int, *, unit: str = "examples") -> None:
    """WARNING when more than 2% of the examples are cut or dropped by data.seq_len, naming the
    seq_len that keeps 95% / 99% of them whole; DataError naming data.seq_len when no row is left.

    Generic over what an example is: `need` holds each example's length in tokens as a row must
    fit it (tokens - 1; a preference pair: its longer side); `stats` the packer's counts
    (truncated, dropped_overlong, dropped_no_target, rows, and the example count under `unit`)."""
    lost = stats["truncated"] + stats["dropped_overlong"] + stats["dropped_no_target"]
    total = stats[unit]
    if not lost and stats["rows"]:
        return
    need = np.asarray(need, np.int64)
    p95, p99 = (int(np.ceil(np.percentile(need, q))) for q in (95, 99)) if len(need) else (0, 0)
    what = (f"{stats['truncated']} truncated, {stats['dropped_overlong']} dropped as overlong, "
            f"{stats['dropped_no_target']} dropped with no target token left of {total} {unit}")
    if stats["rows"] == 0:
        raise DataError(f"data {split}: nothing left at data.seq_len={seq_len}: {what}; "
                        f"data.seq_len={p95} keeps 95% whole, {p99} keeps 99%")
    if lost > LOSS_WARN_FRACTION * total:
        logging.warning("data %s: %s (%.1f%%) at data.seq_len=%d; data.seq_len=%d keeps 95%% of the %s "
                        "whole, %d keeps 99%%", split, what, 100 * lost / total, seq_len, p95, unit, p99)


def _skipped(caches):
    out = collections.Counter()
    for c in caches:
        out.update(c.manifest["skipped"])
    return dict(out)


def build(cfg_data, tokenizer, *, global_batch_size: int, seed: int, process_index: int = 0,
          process_count: int = 1) -> Data:
    """config.data -> Data(train iterator, eval batches, stats), streamed from the tokenized cache."""
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
    o("train_on_prompt", False, lambda v: isinstance(v, bool), "True or False")
    num_epochs = o("num_epochs", 0, lambda v: is_int(v) and v >= 0, "an integer >= 0, 0 = forever")
    parse_field_map(o("field_map", "", lambda v: True, ""), "data.field_map")
    o("default_instruction", "", is_str, "a string")
    o("text_split", "line", lambda v: v in ("line", "paragraph"), "'line' or 'paragraph'")
    o("skip_invalid", False, lambda v: isinstance(v, bool), "True or False")
    o("tfds_data_dir", "", is_str, "a directory, empty for the TFDS default")
    o("cache_dir", "", is_str, "a local or gs:// directory, empty for ~/.cache/gemma_jax/data")
    cache_lib.verify_level(cfg_data)
    workers = o("num_workers", 0, lambda v: is_int(v) and v >= 0, "an integer >= 0, 0 = all cores")
    input_workers = o("input_workers", 0, lambda v: is_int(v) and v >= 0, "an integer >= 0, 0 = threads")
    if eval_spec and frac:
        raise DataError("data.eval and data.eval_fraction are both set; use one")
    lo, hi = _local_slice(global_batch_size, process_index, process_count)
    ensure = functools.partial(cache_lib.ensure, tokenizer=tokenizer, cfg_data=cfg_data, num_workers=workers,
                               process_index=process_index, process_count=process_count)
    mixture = parse_mixture(train_spec)
    caches = [ensure(part) for part, _ in mixture]
    reader = _Reader(caches)
    ids = [np.arange(reader.offsets[i], reader.offsets[i + 1]) for i in range(len(caches))]
    eval_reader = eval_ids = None
    if eval_spec:
        if parse_mixture(eval_spec, "data.eval")[0][1] is not None:
            raise DataError("data.eval: weights are for data.train mixtures; name the eval files without :WEIGHT")
        eval_cache = ensure(eval_spec)
        eval_reader, eval_ids = _Reader([eval_cache]), np.arange(len(eval_cache))
        eval_skipped = dict(eval_cache.manifest["skipped"])
    elif frac:  # the same split as holdout(read_examples(train), frac, seed)
        n = int(reader.offsets[-1])
        n_eval = max(1, round(frac * n))
        if n_eval >= n:
            raise DataError(f"data.eval_fraction={frac} leaves no training examples ({n} in total)")
        held = np.zeros(n, bool)
        held[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
        eval_reader, eval_ids, eval_skipped = reader, np.flatnonzero(held), {}
        ids = [i[~held[i]] for i in ids]
    components = [(i, 1.0 if w is None else w) for i, (_, w) in zip(ids, mixture)]
    empty = [part for (part, w), i in zip(mixture, ids) if w and not len(i)]
    if empty:
        raise DataError(f"data.train: mixture part {empty[0]!r} has no training examples left")
    if sum(len(i) for i, _ in components) == 0:
        raise DataError(f"{train_spec}: no training examples")
    epochs = _Epochs(reader, components, seq_len=seq_len, packing=packing, overlong=overlong, seed=seed,
                     num_epochs=num_epochs)
    train_stats = dict(epochs.plan(0)[1])
    train_stats["skipped"] = _skipped(caches)
    check_lost("train", reader.lengths[epochs.examples(0)][:, 0] - 1, train_stats, seq_len)
    if len(mixture) > 1:
        train_stats["mixture"] = {part: dict(weight=w, examples=len(i), per_epoch=int(c))
                                  for (part, w), i, c in zip(mixture, ids, epochs.counts)}
    train_stats["cache"] = [c.dir for c in caches]
    stats = {"train": train_stats}
    evals = []
    if eval_ids is not None and len(eval_ids):
        kept, row_start, stats["eval"] = _rows(eval_reader, eval_ids, seq_len, packing, overlong, seed=0)
        stats["eval"]["skipped"] = eval_skipped
        check_lost("eval", eval_reader.lengths[eval_ids][:, 0] - 1, stats["eval"], seq_len)
        evals = EvalBatches(eval_reader, [kept[a:b] for a, b in zip(row_start[:-1], row_start[1:])],
                            seq_len=seq_len, global_batch_size=global_batch_size, pad_id=tokenizer.pad_id,
                            lo=lo, hi=hi)
    nrows = train_stats["rows"]
    num_batches = None
    if num_epochs:
        total = epochs.total_rows()
        if total < global_batch_size:
            raise DataError(f"{total} packed rows x {num_epochs} epochs do not fill one global batch of "
                            f"{global_batch_size}")
        num_batches = total // global_batch_size
        train_stats["unused_remainder_rows"] = total % global_batch_size
    for split, s in stats.items():
        logging.info("data %s: %s", split, ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    train = TrainIterator(_Batch(epochs, global_batch_size, lo, hi, tokenizer.pad_id), num_batches, input_workers)
    return Data(train=train, eval=evals, stats=stats, rows_per_epoch=nrows, global_batch_size=global_batch_size,
                num_batches=num_batches, epochs=epochs)

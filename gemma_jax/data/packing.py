"""Examples -> token ids and loss masks -> packed rows.

Each example's ids[0..n) give inputs ids[:-1], targets ids[1:], loss mask mask[1:]; examples are
packed greedily (first fit, seeded order) into ``seq_len`` rows with ``segment_ids`` 1, 2, ...
(0 = padding) and ``positions`` restarting at 0 per segment, or one per row with
``packing=False``. Overlong examples are truncated or dropped (counted either way); a truncation
that leaves no target token drops the example (``dropped_no_target``). Padding: inputs/targets
pad_id, everything else 0.
"""

from __future__ import annotations

import numpy as np

from gemma_jax.data.schema import FIELDS, DataError

_PACK_WINDOW = 128  # first fit looks at the last rows only, so packing stays O(examples)


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


def lengths_of(encoded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask) pairs -> per example: token count, first target index (len if none), targets."""
    n = np.array([len(ids) for ids, _ in encoded], np.int64)
    first = np.array([1 + int(np.argmax(m[1:])) if m[1:].any() else len(m) for _, m in encoded], np.int64)
    targets = np.array([int(m[1:].sum()) for _, m in encoded], np.int64)
    return n, first, targets


def check_options(seq_len, overlong):
    """Raises DataError for a bad seq_len or overlong."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"overlong: expected 'truncate' or 'drop', got {overlong!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise DataError(f"seq_len: expected a positive integer, got {seq_len!r}")


def plan(lengths, first_target, seq_len: int, *, packing: bool = True, overlong: str = "truncate",
         seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Which examples go in which row, from their lengths alone: (items, row_start, stats).

    Row r holds examples ``items[row_start[r]:row_start[r + 1]]`` as segments 1, 2, ... in that
    order. The same first-fit as always, so `pack` and the streamed pipeline make the same rows.
    """
    check_options(seq_len, overlong)
    lengths, first_target = np.asarray(lengths, np.int64), np.asarray(first_target, np.int64)
    stats = dict(examples=len(lengths), truncated=0, dropped_overlong=0, dropped_no_target=0)
    order = np.random.default_rng(seed).permutation(len(lengths))
    over = lengths[order] - 1 > seq_len
    if overlong == "drop":
        stats["dropped_overlong"] = int(over.sum())
        order, over = order[~over], over[~over]
    kept_len = np.minimum(lengths[order], seq_len + 1)
    # e.g. the response was cut off entirely
    ok = (kept_len >= 2) & (first_target[order] < kept_len)
    stats["dropped_no_target"] = int((~ok).sum())
    stats["truncated"] = int(over[ok].sum())
    order, need = order[ok], (kept_len[ok] - 1).tolist()
    caps = np.zeros(len(order), np.int64)
    row_of, nrows = np.zeros(len(order), np.int64), 0
    for k, n in enumerate(need):
        lo = max(0, nrows - _PACK_WINDOW) if packing else nrows
        r = nrows
        if nrows > lo:  # argmax finds the first True: one C call per example (plan is O(examples))
            fits = caps[lo:nrows] >= n
            j = int(fits.argmax())
            if fits[j]:
                r = lo + j
        if r == nrows:
            caps[r], nrows = seq_len, nrows + 1
        caps[r] -= n
        row_of[k] = r
    by_row = np.argsort(row_of, kind="stable")  # placement order within a row
    row_start = np.zeros(nrows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=nrows), out=row_start[1:])
    stats.update(rows=nrows, tokens=int(sum(need)))
    return order[by_row], row_start, stats


def fill_rows(rows_examples, seq_len: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """[[(ids, mask), ...] per row] -> {inputs, targets, loss_mask, segment_ids, positions}."""
    rows = {k: np.zeros((len(rows_examples), seq_len), np.float32 if k == "loss_mask" else np.int32)
            for k in FIELDS}
    rows["inputs"][:] = pad_id
    rows["targets"][:] = pad_id
    for r, segs in enumerate(rows_examples):
        o = 0
        for s, (ids, mask) in enumerate(segs, 1):
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            n = len(ids) - 1
            rows["inputs"][r, o:o + n] = ids[:-1]
            rows["targets"][r, o:o + n] = ids[1:]
            rows["loss_mask"][r, o:o + n] = mask[1:]
            rows["segment_ids"][r, o:o + n] = s
            rows["positions"][r, o:o + n] = np.arange(n)
            o += n
    return rows


def pack(encoded, seq_len: int, *, pad_id: int, packing: bool = True, overlong: str = "truncate",
         seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """(ids, mask) pairs -> rows {inputs, targets, loss_mask, segment_ids, positions} and stats."""
    check_options(seq_len, overlong)
    lengths, first, _ = lengths_of(encoded)
    items, row_start, stats = plan(lengths, first, seq_len, packing=packing, overlong=overlong, seed=seed)
    rows = fill_rows([[encoded[i] for i in items[a:b]] for a, b in zip(row_start[:-1], row_start[1:])],
                     seq_len, pad_id=pad_id)
    nrows = len(row_start) - 1
    stats.update(target_tokens=int(rows["loss_mask"].sum()), fill=stats["tokens"] / max(1, nrows * seq_len))
    return rows, stats

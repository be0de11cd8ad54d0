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



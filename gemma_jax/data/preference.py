"""Preference pairs: records -> (prompt turns, chosen, rejected) -> token pairs -> packed pair rows.

Schemas (any source gemma_jax.data.readers reads: jsonl, json, csv, tsv, tfds):
  {"prompt": str, "chosen": str, "rejected": str}: prompt the user turn, chosen/rejected model turns;
  {"prompt": [messages], "chosen": ..., "rejected": ...}: the prompt as a conversation ending with
      a user message; chosen/rejected a string or one assistant message in a list;
  {"chosen": [messages], "rejected": [messages]}: whole conversations that share every message
      but the last, an assistant message (the prompt is implicit). A "prompt" string or list
      given beside them must equal that shared prefix.
`data.field_map` may rename prompt, chosen and rejected ("chosen=response_a,rejected=response_b").
Bad pairs raise DataError naming file, line and field: an empty side, identical sides, different
prefixes (skipped and counted with data.skip_invalid).

Rows hold pairs: every array is [rows, 2, seq_len], index 0 the chosen sequence and 1 the
rejected one, with the fields of SFT rows (inputs, targets, loss_mask, segment_ids, positions).
The loss mask covers the final response and its <end_of_turn> only. With packing, several pairs
share a row: pair k has segment id k in both the chosen and the rejected half, so each pair's
two sequences stay together (one row and one batch shard). The train iterator, eval batches
and resume (get_state/set_state) are gemma_jax.data.pipeline's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Mapping

import numpy as np
from absl import logging

from gemma_jax.data.pipeline import Data, check_lost, eval_batches, holdout, train_iterator
from gemma_jax.data.readers import converted
from gemma_jax.data.schema import FIELDS, DataError, parse_fields_map, to_example

PAIR_FIELDS = ("prompt", "chosen", "rejected")
_PACK_WINDOW = 128  # as packing.py: first fit over the last rows only


@dataclasses.dataclass
class Pair:
    """One preference pair: the conversation so far (ends with a user turn) and two responses."""
    source: str
    prompt: list  # normalised turns
    chosen: str
    rejected: str


def _err(where, field, message, reason="invalid"):
    return DataError(f"{where}: field {json.dumps(field)}: {message}", reason)


def parse_pair_field_map(field_map) -> dict[str, str]:
    """'chosen=col,rejected=col,prompt=col' (or a dict) -> validated dict canonical -> column."""
    return parse_fields_map(field_map, PAIR_FIELDS, " (e.g. 'chosen=response_a,rejected=response_b')")


def _messages(v, where, name):
    """A message list, checked to hold {role, content} strings (roles are checked later)."""
    for i, m in enumerate(v):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _err(where, f"{name}[{i}]", "expected a {role, content} object with string values", "wrong_type")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _response(msgs, where, name):
    """The final assistant message of a side."""
    last = msgs[-1] if msgs else None
    if last is None or last["role"] not in ("assistant", "model"):
        raise _err(where, name, "must end with an assistant message (the response)", "bad_roles")
    return last["content"]


def to_pair(rec, where: str, field_map: Mapping[str, str] | None = None) -> Pair:
    """One record -> Pair, by schema; raises DataError naming where and the field."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}", "wrong_type")
    fm = dict(field_map or {})
    name = {k: fm.get(k, k) for k in PAIR_FIELDS}
    missing = [name[k] for k in ("chosen", "rejected") if name[k] not in rec]
    if missing:
        raise DataError(f"{where}: no preference schema: expected fields \"prompt\", \"chosen\", \"rejected\" "
                        f"(or data.field_map), missing {missing}; record has fields {sorted(rec)}", "missing_field")
    sides = {}
    for k in ("chosen", "rejected"):
        v = rec[name[k]]
        if not isinstance(v, (str, list)):
            raise _err(where, name[k], f"expected a string or a list of messages, got {type(v).__name__}", "wrong_type")
        sides[k] = v if isinstance(v, str) else _messages(v, where, name[k])
    if isinstance(sides["chosen"], str) != isinstance(sides["rejected"], str):
        raise _err(where, name["rejected"], f"is a {type(rec[name['rejected']]).__name__} but "
                   f"{json.dumps(name['chosen'])} a {type(rec[name['chosen']]).__name__}: give both as strings "
                   "or both as message lists", "wrong_type")
    prompt = rec.get(name["prompt"])
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise _err(where, name["prompt"], f"expected a string or a list of messages, got {type(prompt).__name__}",
                   "wrong_type")
    if isinstance(prompt, list):
        prompt = _messages(prompt, where, name["prompt"])
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(sides["chosen"], str):
        if prompt_msgs is None:
            raise _err(where, name["prompt"], "missing: string responses need a prompt", "missing_field")
        chosen, rejected = sides["chosen"], sides["rejected"]
    else:
        c, r = sides["chosen"], sides["rejected"]
        chosen, rejected = _response(c, where, name["chosen"]), _response(r, where, name["rejected"])
        prefix_c, prefix_r = c[:-1], r[:-1]
        for i in range(max(len(prefix_c), len(prefix_r))):
            if i >= len(prefix_c) or i >= len(prefix_r) or prefix_c[i] != prefix_r[i]:
                raise _err(where, f"{name['rejected']}[{i}]", f"differs from {json.dumps(name['chosen'] + f'[{i}]')}: "
                           "chosen and rejected must share every message before the final response", "bad_prefix")
        if prefix_c and prompt_msgs is not None and prompt_msgs != prefix_c:
            raise _err(where, name["prompt"], f"differs from the conversation that {json.dumps(name['chosen'])} "
                       "starts with", "bad_prefix")
        prompt_msgs = prefix_c or prompt_msgs
        if not prompt_msgs:
            raise _err(where, name["prompt"], "missing: no prompt field and no shared conversation before the "
                       "responses", "missing_field")
    for k, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _err(where, name[k], "empty response", "empty_response")
    if chosen == rejected:
        raise _err(where, name["rejected"], f"identical to {json.dumps(name['chosen'])}: a pair needs two "
                   "different responses", "identical")
    if prompt_msgs[-1]["role"] != "user":
        raise _err(where, name["prompt"], "must end with a user message", "bad_roles")
    # to_example checks the encoding and the roles and folds a system message, as for SFT data.
    turns = {}
    for k, text in (("chosen", chosen), ("rejected", rejected)):
        ex = to_example({"messages": prompt_msgs + [{"role": "assistant", "content": text}]}, where,
                        {"messages": name[k]})
        turns[k] = ex.turns
    return Pair(where, turns["chosen"][:-1], turns["chosen"][-1]["content"], turns["rejected"][-1]["content"])


def read_pairs(spec: str, *, field_map="", skip_invalid: bool = False, text_split: str = "line",
               tfds_data_dir: str = "") -> tuple[list[Pair], collections.Counter]:
    """Every record of spec as a Pair; returns them and the skipped counts by reason."""
    fmap = parse_pair_field_map(field_map)
    skipped = collections.Counter()
    pairs = [pair for _, pair in converted(spec, lambda rec, where: to_pair(rec, where, fmap), what="pair",
                                           counted="pairs", text_split=text_split, skip_invalid=skip_invalid,
                                           tfds_data_dir=tfds_data_dir, skipped=skipped)]
    if not pairs:
        raise DataError(f"{spec}: no valid preference pairs (skipped: {dict(skipped)})")
    return pairs, skipped


def encode_pairs(pairs, tokenizer):
    """Pairs -> list of ((chosen ids, mask), (rejected ids, mask)); masks on the final response only."""
    out = []
    for p in pairs:
        n_prompt = len(tokenizer.encode_chat(p.prompt)[0])
        sides = []
        for text in (p.chosen, p.rejected):
            ids, mask = tokenizer.encode_chat(p.prompt + [{"role": "model", "content": text}])
            mask[:n_prompt] = False  # earlier model turns of a multi-turn prompt are context
            sides.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
        out.append(tuple(sides))
    return out


def pair_lengths(encoded) -> np.ndarray:
    """Tokens a row must hold for each encoded pair (its longer side, less the shifted-out one)."""
    return np.array([max(len(ids) for ids, _ in sides) - 1 for sides in encoded], np.int64)


def pack_pairs(encoded, seq_len: int, *, pad_id: int, packing: bool = True, overlong: str = "truncate",
               seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Encoded pairs -> rows {field: [rows, 2, seq_len]} and stats; a pair's sides share a row."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong: expected 'truncate' or 'drop', got {overlong!r}")
    stats = dict(pairs=len(encoded), truncated=0, dropped_overlong=0, dropped_no_target=0)
    items = []
    for k in np.random.default_rng(seed).permutation(len(encoded)):
        sides = encoded[k]
        long = any(len(ids) - 1 > seq_len for ids, _ in sides)
        if long and overlong == "drop":
            stats["dropped_overlong"] += 1
            continue
        sides = [(ids[:seq_len + 1], mask[:seq_len + 1]) for ids, mask in sides]
        if any(len(ids) < 2 or not mask[1:].any() for ids, mask in sides):
            stats["dropped_no_target"] += 1
            continue
        stats["truncated"] += long
        items.append(sides)
    caps = np.zeros((len(items), 2), np.int64)
    row_of, nrows = [], 0
    for sides in items:
        need = np.array([len(ids) - 1 for ids, _ in sides])
        lo = max(0, nrows - _PACK_WINDOW) if packing else nrows
        fits = np.flatnonzero((caps[lo:nrows] >= need).all(axis=1))
        r = lo + int(fits[0]) if fits.size else nrows
        if r == nrows:
            caps[r], nrows = seq_len, nrows + 1
        caps[r] -= need
        row_of.append(r)
    rows = {f: np.zeros((nrows, 2, seq_len), np.float32 if f == "loss_mask" else np.int32) for f in FIELDS}
    rows["inputs"][:] = pad_id
    rows["targets"][:] = pad_id
    offset, nseg = np.zeros((nrows, 2), np.int64), np.zeros(nrows, np.int32)
    for sides, r in zip(items, row_of):
        nseg[r] += 1
        for s, (ids, mask) in enumerate(sides):
            n, o = len(ids) - 1, offset[r, s]
            rows["inputs"][r, s, o:o + n] = ids[:-1]
            rows["targets"][r, s, o:o + n] = ids[1:]
            rows["loss_mask"][r, s, o:o + n] = mask[1:]
            rows["segment_ids"][r, s, o:o + n] = nseg[r]
            rows["positions"][r, s, o:o + n] = np.arange(n)
            offset[r, s] += n
    tokens = int(offset.sum())
    stats.update(rows=nrows, tokens=tokens, target_tokens=int(rows["loss_mask"].sum()),
                 fill=tokens / max(1, 2 * nrows * seq_len))
    return rows, stats


def build(cfg_data, tokenizer, *, global_batch_size: int, seed: int, process_index: int = 0,
          process_count: int = 1, extra_fields=None) -> Data:
    """config.data -> Data of pair rows (train iterator, eval batches, stats), as pipeline.build.

    `extra_fields(train_rows, eval_rows)` (optional) returns more per-token arrays {name: (train
    [rows, 2, T], eval or None)} that travel with the rows (DPO's precomputed reference)."""
    get = lambda k, d: cfg_data.get(k, d) if hasattr(cfg_data, "get") else getattr(cfg_data, k, d)  # noqa: E731
    if get("train_on_prompt", False):
        raise DataError("data.train_on_prompt does not apply to preference pairs: the objectives score the "
                        "responses only; set it to False")
    read = functools.partial(read_pairs, field_map=get("field_map", ""), skip_invalid=bool(get("skip_invalid", False)),
                             text_split=get("text_split", "line"), tfds_data_dir=get("tfds_data_dir", ""))
    eval_spec, frac = get("eval", ""), float(get("eval_fraction", 0.0))
    if eval_spec and frac:
        raise DataError("data.eval and data.eval_fraction are both set; use one")
    train_pairs, train_skipped = read(get("train", ""))
    eval_pairs = []
    if eval_spec:
        eval_pairs, _ = read(eval_spec)
    elif frac:
        train_pairs, eval_pairs = holdout(train_pairs, frac, seed=seed)
    seq_len = get("seq_len", 1024)
    if not (isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len >= 2):
        raise DataError(f"data.seq_len: invalid value {seq_len!r} (expected an integer >= 2)")
    pk = functools.partial(pack_pairs, seq_len=seq_len, pad_id=tokenizer.pad_id,
                           packing=bool(get("packing", True)), overlong=get("overlong", "truncate"))
    encoded = encode_pairs(train_pairs, tokenizer)
    rows, train_stats = pk(encoded, seed=seed)
    check_lost("train", pair_lengths(encoded), train_stats, seq_len, unit="pairs")  # SFT data's warning and error
    train_stats["skipped"] = dict(train_skipped)
    stats, evals, eval_rows = {"train": train_stats}, [], None
    if eval_pairs:
        encoded = encode_pairs(eval_pairs, tokenizer)
        eval_rows, stats["eval"] = pk(encoded, seed=0)
        check_lost("eval", pair_lengths(encoded), stats["eval"], seq_len, unit="pairs")
    if extra_fields is not None:
        for name, (train_field, eval_field) in extra_fields(rows, eval_rows).items():
            rows[name] = train_field
            if eval_rows is not None:
                eval_rows[name] = eval_field
    if eval_rows is not None:
        evals = eval_batches(eval_rows, global_batch_size=global_batch_size, pad_id=tokenizer.pad_id,
                             process_index=process_index, process_count=process_count)
    num_epochs = int(get("num_epochs", 0))
    nrows = train_stats["rows"]
    for split, s in stats.items():
        logging.info("pairs %s: %s", split, ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    train = train_iterator(rows, global_batch_size=global_batch_size, seed=seed, num_epochs=num_epochs,
                           process_index=process_index, process_count=process_count)
    return Data(train=train, eval=evals, stats=stats, rows_per_epoch=nrows, global_batch_size=global_batch_size,
                num_batches=nrows * num_epochs // global_batch_size if num_epochs else None)

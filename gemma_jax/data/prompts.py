"""RL prompts: records -> (prompt turns, columns) -> prompt token ids -> a resumable prompt order.

Schemas (any source gemma_jax.data.readers reads: jsonl, json, csv, tsv, parquet, tfds, hf):
  {"prompt": str, ...}: the prompt is one user turn;
  {"prompt": [messages], ...} or {"messages": [messages], ...}: a conversation that ends with a
      user message (no final model turn: the policy writes it); a system message is folded into
      the first user turn, as everywhere.
Every other field of a record is a column: the reward functions receive it by name (TRL's
convention), e.g. {"prompt": "What is 2 + 3?", "answer": "5"} gives `answer=[..., "5", ...]`.
`data.field_map` may rename prompt or messages ("prompt=question"). Bad records raise DataError
naming file, line and field (skipped and counted with data.skip_invalid).

Prompt ids are BOS + the turns + the opened model turn (`<start_of_turn>model\\n`), as sampling's
chat prompts. The order is a seeded permutation per epoch; `PromptOrder` hands out global
batches of prompt indices and keeps its position as {"next_index"} for checkpoints.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from gemma_jax.data.readers import converted
from gemma_jax.data.schema import DataError, parse_fields_map, to_example

PROMPT_FIELDS = ("prompt", "messages")
LOSS_WARN_FRACTION = 0.02  # as the SFT pipeline: warn when more prompts than this are cut or dropped


@dataclasses.dataclass
class Prompt:
    """One RL prompt: where it came from, its normalised turns, the prompt as the data gave it
    (a string or a message list: what reward functions see) and the record's other fields."""

    source: str
    turns: list
    raw: Any
    columns: dict

    @property
    def conversational(self) -> bool:
        """Whether the data gave messages (then completions reach the rewards as messages too)."""
        return not isinstance(self.raw, str)


def parse_prompt_field_map(field_map) -> dict[str, str]:
    """'prompt=question' (or a dict) -> validated dict canonical -> column."""
    return parse_fields_map(field_map, PROMPT_FIELDS, " for RL prompts (e.g. 'prompt=question')")


def _err(where, field, message, reason="invalid"):
    return DataError(f"{where}: field {json.dumps(field)}: {message}", reason)


def to_prompt(rec, where: str, field_map: Mapping[str, str] | None = None) -> Prompt:
    """One record -> Prompt; raises DataError naming where and the field."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}", "wrong_type")
    fm = dict(field_map or {})
    name = {k: fm.get(k, k) for k in PROMPT_FIELDS}
    key = next((name[k] for k in PROMPT_FIELDS if name[k] in rec), None)
    if key is None:
        raise DataError(f"{where}: no prompt schema: expected a field \"prompt\" (a string or messages) or "
                        f"\"messages\" (or data.field_map), record has fields {sorted(rec)}", "missing_field")
    raw = rec[key]
    if isinstance(raw, str):
        if not raw.strip():
            raise _err(where, key, "empty prompt", "empty_prompt")
        msgs = [{"role": "user", "content": raw}]
    elif isinstance(raw, list):
        for i, m in enumerate(raw):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _err(where, f"{key}[{i}]", "expected a {role, content} object with string values", "wrong_type")
        msgs = [{"role": m["role"], "content": m["content"]} for m in raw]
        if not msgs or msgs[-1]["role"] in ("assistant", "model"):
            raise _err(where, key, "must end with a user message: an RL prompt has no final model turn "
                       "(the policy writes it)", "bad_roles")
        raw = msgs
    else:
        raise _err(where, key, f"expected a string or a list of messages, got {type(raw).__name__}", "wrong_type")
    # to_example checks the encoding and the roles and folds a system message, as for SFT data; a
    # placeholder model turn makes the conversation complete for its checks.
    ex = to_example({"messages": msgs + [{"role": "assistant", "content": "."}]}, where, {"messages": key})
    columns = {k: v for k, v in rec.items() if k != key}
    return Prompt(where, ex.turns[:-1], raw, columns)


def read_prompts(spec: str, *, field_map="", skip_invalid: bool = False, text_split: str = "line",
                 tfds_data_dir: str = "") -> tuple[list[Prompt], collections.Counter]:
    """Every record of spec as a Prompt; returns them and the skipped counts by reason."""
    fmap = parse_prompt_field_map(field_map)
    skipped = collections.Counter()
    out = [prompt for _, prompt in converted(spec, lambda rec, where: to_prompt(rec, where, fmap), what="prompt",
                                             counted="prompts", text_split=text_split, skip_invalid=skip_invalid,
                                             tfds_data_dir=tfds_data_dir, skipped=skipped)]
    if not out:
        raise DataError(f"{spec}: no valid RL prompts (skipped: {dict(skipped)})")
    return out, skipped


def columns_of(prompts: list[Prompt]) -> set[str]:
    """Fields every prompt has (what a reward function may require by name)."""
    names = [set(p.columns) for p in prompts]
    return set.intersection(*names) if names else set()


def encode_prompts(prompts: list[Prompt], tokenizer, *, max_len: int, overlong: str = "truncate",
                   split: str = "train") -> tuple[list[Prompt], list[np.ndarray], dict]:
    """Prompt ids (BOS, turns, opened model turn) of at most `max_len` tokens, the prompts kept,
    and stats. An overlong prompt is dropped (data.overlong=drop) or keeps BOS and its last
    max_len - 1 tokens (truncate: the question and the turn header usually sit at the end)."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong: expected 'truncate' or 'drop', got {overlong!r}")
    kept, ids_out, lengths = [], [], []
    stats = dict(prompts=len(prompts), truncated=0, dropped_overlong=0)
    for p in prompts:
        ids, _ = tokenizer.encode_chat(p.turns, add_generation_prompt=True)
        lengths.append(len(ids))
        if len(ids) > max_len:
            if overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            ids = np.concatenate([ids[:1], ids[len(ids) - max_len + 1:]])
            stats["truncated"] += 1
        kept.append(p)
        ids_out.append(np.asarray(ids, np.int32))
    lost = stats["truncated"] + stats["dropped_overlong"]
    what = (f"{stats['truncated']} truncated, {stats['dropped_overlong']} dropped as overlong of "
            f"{stats['prompts']} prompts")
    if lost:
        p95, p99 = (int(np.ceil(np.percentile(lengths, q))) for q in (95, 99))
        hint = (f"data.seq_len - grpo.max_new_tokens = {max_len} tokens are left for a prompt; prompts of "
                f"{p95} tokens keep 95% whole, {p99} keep 99%")
        if not kept:
            raise DataError(f"RL prompts {split}: nothing left: {what}; {hint}")
        if lost > LOSS_WARN_FRACTION * stats["prompts"]:
            logging.warning("RL prompts %s: %s (%.1f%%); %s", split, what, 100 * lost / stats["prompts"], hint)
    stats["tokens"] = int(sum(len(i) for i in ids_out))
    return kept, ids_out, stats


class PromptOrder:
    """Global batches of prompt indices: a seeded permutation per epoch, position in checkpoints.

    Every process sees the same indices (rollouts are sampled on the whole mesh); num_epochs > 0
    ends the order (StopIteration) after that many passes.
    """

    def __init__(self, n: int, batch: int, *, seed: int, num_epochs: int = 0):
        self.n, self.batch, self.seed, self.num_epochs = n, batch, seed, num_epochs
        self.next_index = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def __next__(self) -> np.ndarray:
        start, stop = self.next_index, self.next_index + self.batch
        if self.num_epochs and stop > self.num_epochs * self.n:
            raise StopIteration
        out = [self._perm(i // self.n)[i % self.n] for i in range(start, stop)]
        self.next_index = stop
        return np.asarray(out, np.int64)

    def get_state(self) -> dict:
        """{"next_index": prompts handed out so far}."""
        return {"next_index": int(self.next_index)}

    def set_state(self, state: dict) -> None:
        """Moves to a position from get_state."""
        self.next_index = int(state["next_index"])

    @property
    def num_batches(self) -> int | None:
        """Batches before the order ends (None: never)."""
        return self.num_epochs * self.n // self.batch if self.num_epochs else None

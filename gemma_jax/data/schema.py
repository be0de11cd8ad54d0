"""Records -> Examples: schema detection, field renames, and errors that name file, line, field.

Schemas, detected per record after ``field_map`` renames columns (``"input=text,output=summary"``):
  {"instruction", "input", "output"} -> user ``instruction + "\\n\\n" + input`` (or whichever is
      non-empty; ``default_instruction`` fills a missing instruction), model ``output``;
  {"prompt", "completion"}          -> user ``prompt``, model ``completion``;
  {"messages": [{"role", "content"}, ...]} -> ``tokenizer.normalize_turns`` (system folded into the
      first user turn, ``assistant`` is the model role);
  {"conversations": [{"from", "value"}, ...]} (ShareGPT) -> as messages, with ``from`` human ->
      user, gpt -> assistant, system -> system;
  {"text"}                          -> raw document, loss on every token.

Bad records raise ``DataError`` naming file, line (jsonl/csv/tsv/txt, 1-based) or record index
(json/tfds, ``path[i]``, 0-based) and field, e.g. ``data/legal/train.jsonl:17: field "output": empty
response``. With ``skip_invalid=True`` they are skipped and counted by ``DataError.reason``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from gemma_jax.errors import UserError
from gemma_jax.tokenizer import normalize_turns

CANONICAL = ("instruction", "input", "output", "prompt", "completion", "messages", "conversations", "text")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
SCHEMAS = ('{"instruction","input","output"}, {"prompt","completion"}, {"messages"}, {"conversations"} '
           '(ShareGPT) or {"text"}')
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
LOGGED_SKIPS = 10


class DataError(UserError, ValueError):
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


def parse_fields_map(field_map, fields, hint: str) -> dict[str, str]:
    """'field=column,...' (or a dict) -> validated dict for data whose own fields are `fields`
    (preference pairs, RL prompts); `hint` ends the error line (what the fields are for, an example)."""
    if not field_map:
        return {}
    items = (field_map.items() if hasattr(field_map, "items")
             else [tuple(s.strip() for s in part.split("=", 1)) for part in str(field_map).split(",") if part.strip()])
    out = {}
    for item in items:
        if len(item) != 2 or item[0] not in fields or not item[1]:
            raise DataError(f"data.field_map: entry {'='.join(map(str, item))!r} is not one of "
                            f"{'|'.join(fields)}=column{hint}")
        out[item[0]] = item[1]
    return out


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


def _sharegpt(convs, where, name):
    # ShareGPT turns -> {role, content} messages; the checks of _chat then apply, with these names.
    if not isinstance(convs, list):
        raise _err(where, name, f"expected a list of {{from, value}} turns, got {type(convs).__name__}",
                   "wrong_type")
    msgs = []
    for i, m in enumerate(convs):
        f = f"{name}[{i}]"
        if not isinstance(m, Mapping):
            raise _err(where, f, f"expected a {{from, value}} object, got {type(m).__name__}", "wrong_type")
        for key in ("from", "value"):
            if key not in m:
                raise _err(where, f"{f}.{key}", "missing", "missing_field")
            if not isinstance(m[key], str):
                raise _err(where, f"{f}.{key}", f"expected a string, got {type(m[key]).__name__}",
                           "wrong_type")
        role = SHAREGPT_ROLES.get(m["from"].lower())
        if role is None:
            raise _err(where, f"{f}.from", f"unknown speaker {m['from']!r} (expected human, gpt or "
                       "system)", "bad_roles")
        _check_utf8(m["value"], where, f"{f}.value")
        if role == "assistant" and not m["value"].strip():
            raise _err(where, f"{f}.value", "empty response", "empty_response")
        msgs.append({"role": role, "content": m["value"]})
    return _chat(msgs, where, name)


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
    if "conversations" in rec:
        return Example(where, turns=_sharegpt(rec["conversations"], where, name("conversations")))
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
    raise DataError(f"{where}: no known schema: expected fields {SCHEMAS} (or set data.field_map); "
                    f"record has fields {sorted(rec)}", "missing_field")



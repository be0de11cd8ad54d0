"""Value rules of config keys: what each key accepts, checked before a command does any work.

Every key of `gemma_jax.config.base_config()` is declared there as `key=(default, RULE)`, the
rule beside the default and its comment; this module holds the rule types and the checker.
A rule has a short text ("> 0", "in [0, 1)", "one of cosine, linear, constant") that
`--show_config` prints beside the key and that the error of a bad value quotes:

  error: --config.opt.lr=-1e-3: must be > 0 (opt.lr: peak learning rate)

Cross-key rules (batch_size divisible by grad_accum, ...) are `Cross` entries over several keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from gemma_jax.errors import UserError


class ConfigValueError(UserError, ValueError):
    """A config value outside its key's rule; the message names the key, the value and the rule."""


class Rule:
    """What one key accepts: `text` for people, `check(value) -> bool` for the machine."""

    def __init__(self, text: str, check: Callable[[Any], bool]):
        self.text, self._check = text, check

    def ok(self, value) -> bool:
        """Whether `value` is allowed."""
        return self.problem(value) is None

    def problem(self, value) -> str | None:
        """None for an allowed value, else "must be <text>" (with the check's own reason when it
        raised one, as a data spec's parser does)."""
        try:
            if self._check(value):
                return None
            detail = ""
        except (TypeError, ValueError, re.error) as e:
            detail = str(e).strip()
        finite = " and finite" if _is_number(value) and not math.isfinite(value) else ""
        return f"must be {self.text}{finite}" + (f" ({detail})" if detail else "")

    def __repr__(self):
        return f"Rule({self.text!r})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def number(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Rule:
    """A finite number (an integer if `integer`) within [lo, hi], ends open where asked."""
    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        text = f"{'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        text = "any finite number"
    if integer:
        text = "an integer " + text if lo is not None or hi is not None else "an integer"

    def check(v):
        if not (_is_int(v) if integer else _is_number(v)) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True

    return Rule(text, check)


def one_of(*choices: str) -> Rule:
    """One of the given strings."""
    shown = ", ".join(repr(c) if c == "" else c for c in choices)
    return Rule(f"one of {shown}", lambda v: isinstance(v, str) and v in choices)


def optional(rule: Rule) -> Rule:
    """None (unset: the preset's or the checkpoint's value) or what `rule` accepts."""
    return Rule(f"None or {rule.text}", lambda v: v is None or rule.ok(v))


def custom(text: str, check: Callable[[Any], bool]) -> Rule:
    """A rule of its own; `check` returns False or raises TypeError/ValueError for a bad value."""
    return Rule(text, check)


def _regex(v) -> bool:
    re.compile(v)
    return isinstance(v, str)


POSITIVE = number(0, lo_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, hi_open=True)  # [0, 1): dropout, betas, held-out shares
POSITIVE_INT = number(1, integer=True)
NON_NEGATIVE_INT = number(0, integer=True)
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
TEXT = Rule("any text", lambda v: isinstance(v, str))  # free text: checked where it is used
PATH = Rule("a path, or '' for none", lambda v: isinstance(v, str) and "\n" not in v and "\0" not in v)
REGEX = Rule("a regular expression", _regex)


class Cross:
    """A rule over several keys: `check({key: value}) -> None` when they agree, else the problem
    (a string, or (string, the keys to name in the error))."""

    def __init__(self, keys: Sequence[str], check: Callable[[dict], Any]):
        self.keys, self.check = tuple(keys), check


# ----------------------------------------------------------------------------- checking


def _get(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def _has(cfg, key: str) -> bool:
    try:
        _get(cfg, key)
        return True
    except (KeyError, AttributeError, TypeError):
        return False


def raw_overrides(argv: Sequence[str] | None, name: str = "config") -> dict[str, str]:
    """{key: text as typed} of --NAME.KEY=TEXT arguments (the last one wins, as absl's does)."""
    out = {}
    for arg in argv or ():
        m = re.match(rf"^--?{re.escape(name)}\.([^=]+)=(.*)$", arg, re.S)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def shown(value) -> str:
    """A value as the error shows it: strings quoted, numbers as Python writes them."""
    return repr(value) if isinstance(value, (str, tuple, list)) or value is None else str(value)


def _name(key: str, value, raw: dict[str, str], flag: str) -> str:
    """`--config.KEY=TEXT` when the command line set the key (the value too if it reads differently), else KEY=VALUE."""
    if key in raw:
        text = raw[key]
        parsed = "" if text == shown(value) or text == str(value) else f" (read as {shown(value)})"
        return f"--{flag}.{key}={text}{parsed}"
    return f"{key}={shown(value)}"


def check(cfg, rules: dict[str, Rule], cross: Sequence[Cross] = (), *, argv: Sequence[str] | None = None,
          flag: str = "config") -> None:
    """Raises ConfigValueError for the first value of `cfg` outside its rule, then for the first
    broken cross-key rule. Keys `cfg` lacks are skipped; `argv` lets the error quote the flag
    as typed."""
    raw = raw_overrides(argv, flag)
    for key, rule in rules.items():
        if not _has(cfg, key):
            continue
        value = _get(cfg, key)
        if isinstance(value, list):  # a recorded config (JSON) holds lists where the default is a tuple
            value = tuple(value)
        problem = rule.problem(value)
        if problem:
            raise ConfigValueError(f"{_name(key, value, raw, flag)}: {problem}")
    for rule in cross:
        if not all(_has(cfg, k) for k in rule.keys):
            continue
        values = {k: _get(cfg, k) for k in rule.keys}
        problem = rule.check(values)
        if problem:
            problem, named = problem if isinstance(problem, tuple) else (problem, rule.keys)
            names = ", ".join(_name(k, values[k], raw, flag) for k in named)
            raise ConfigValueError(f"{names}: {problem}")

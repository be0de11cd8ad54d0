"""GRPO reward functions: loaded from grpo.rewards, checked before step 1, called with TRL's signature.

  grpo.rewards="data/rl/rewards.py:correct,my_pkg.scoring:fmt,exact_match"
  grpo.reward_weights="1.0,0.5,1.0"

An entry is `path/to/file.py:fn` (a Python file, loaded as a module of its own), `package.module:fn`
(imported) or the name of a built-in:

  exact_match  1.0 when the completion, stripped, equals the example's grpo.answer_field, else 0.0
  regex        1.0 when the whole completion (stripped) matches grpo.format_regex, else 0.0
  code_tests   1.0 when the completion's program (the first ```python block, else all of it) passes
               the example's grpo.tests_field asserts in gemma_jax.eval.sandbox, else 0.0

The contract is TRL's GRPOTrainer's: `fn(prompts, completions, **columns) -> list[float | None]`,
one value per completion, called by keyword. `prompts` holds each completion's prompt as the data
gave it (a string, or a message list) and `completions` the generated text (for message-list
prompts a list holding one {"role": "assistant", "content": text} message, as TRL passes them);
`completion_ids` and every other field of the prompt records come by name, so a function either
takes **kwargs or names the fields it needs (checked against the data before training). None
means the function does not apply to that example (left out of the weighted sum; a completion no
function applies to gets advantage 0). NaN skips the whole group of that prompt (counted and
warned about); an exception stops the run with an error naming the function and the example.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np

from gemma_jax.errors import UserError
from gemma_jax.eval import metrics as eval_metrics, sandbox

BUILTINS = ("exact_match", "regex", "code_tests")
# Always passed when the function accepts them; the record fields come beside them.
STANDARD_ARGS = ("prompts", "completions", "completion_ids")


@dataclasses.dataclass(frozen=True)
class Reward:
    """One loaded reward function: its spec entry, display name and what it accepts."""

    entry: str  # as written in grpo.rewards
    name: str  # the function's name (metrics are rewards/<name>/mean)
    fn: Callable
    accepts_any: bool  # takes **kwargs: gets every column
    params: tuple[str, ...]  # keyword parameters it names
    required: tuple[str, ...]  # ... of which these have no default


def parse_weights(text: str, n: int) -> list[float]:
    """grpo.reward_weights -> n floats ("" -> all 1.0)."""
    if not str(text).strip():
        return [1.0] * n
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise UserError(f"grpo.reward_weights={text!r}: expected comma separated numbers, e.g. '1.0,0.5'") from None
    if len(weights) != n:
        raise UserError(f"grpo.reward_weights={text!r} gives {len(weights)} weights for {n} reward functions "
                        "in grpo.rewards: give one per function (or '' for all 1.0)")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"grpo.reward_weights={text!r}: every weight must be finite")
    return weights


def _load_file(path: str, entry: str):
    if not os.path.isfile(path):
        raise UserError(f"grpo.rewards: no such file {path!r} (entry {entry!r}; paths are relative to the "
                        "directory the command runs in)")
    name = "_gemma_jax_reward_" + re.sub(r"\W", "_", os.path.abspath(path))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  the user's file: any error means "fix the file"
        del sys.modules[name]
        raise UserError(f"grpo.rewards: loading {path} failed: {type(e).__name__}: {e} (entry {entry!r})") from e
    return module


def _load_module(name: str, entry: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise UserError(f"grpo.rewards: no module named {name!r} (entry {entry!r}; a file is written "
                            "path/to/file.py:fn)") from None
        raise UserError(f"grpo.rewards: importing {name} failed: {type(e).__name__}: {e} (entry {entry!r})") from e
    except Exception as e:  # noqa: BLE001
        raise UserError(f"grpo.rewards: importing {name} failed: {type(e).__name__}: {e} (entry {entry!r})") from e


def _inspect(fn, entry: str, name: str) -> Reward:
    """Checks fn against the contract; returns what it accepts."""
    if not callable(fn):
        raise UserError(f"grpo.rewards: {entry!r} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise UserError(f"grpo.rewards: the signature of {entry!r} cannot be read; write a Python function "
                        "fn(prompts, completions, **columns)") from None
    kinds = inspect.Parameter
    accepts_any = any(p.kind == kinds.VAR_KEYWORD for p in sig.parameters.values())
    named = [p for p in sig.parameters.values() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    positional_only = [p.name for p in sig.parameters.values() if p.kind == kinds.POSITIONAL_ONLY
                       and p.default is p.empty]
    missing = [a for a in ("prompts", "completions") if a not in {p.name for p in named}]
    if positional_only or (missing and not accepts_any):
        raise UserError(f"grpo.rewards: {entry!r} has the signature {name}{sig}; a reward function is called "
                        "by keyword as fn(prompts, completions, **columns) -> list[float | None] (TRL's "
                        f"GRPOTrainer contract){': it takes no ' + ' or '.join(missing) if missing else ''}")
    required = tuple(p.name for p in named if p.default is p.empty and p.name not in ("prompts", "completions"))
    return Reward(entry, name, fn, accepts_any, tuple(p.name for p in named), required)


def builtin(name: str, grpo_cfg) -> Callable:
    """The built-in reward `name`, set up from the grpo config section."""
    if name == "exact_match":
        return _exact_match(str(grpo_cfg.answer_field))
    if name == "regex":
        pattern = str(grpo_cfg.format_regex)
        if not pattern:
            raise UserError("grpo.rewards: the built-in 'regex' needs grpo.format_regex, the pattern a whole "
                            "completion must match (e.g. '<answer>\\d+</answer>')")
        try:
            return _regex(re.compile(pattern, re.DOTALL))
        except re.error as e:
            raise UserError(f"grpo.format_regex={pattern!r} is not a valid regular expression: {e}") from None
    if name == "code_tests":
        timeout = float(grpo_cfg.code_timeout)
        if not timeout > 0:
            raise UserError(f"grpo.code_timeout={grpo_cfg.code_timeout} must be > 0 (seconds per program)")
        return _code_tests(str(grpo_cfg.tests_field), timeout)
    raise ValueError(name)


def _text(completion) -> str:
    """A completion's text: itself, or the content of its message list."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def _exact_match(field: str):
    def exact_match(prompts, completions, **columns):
        """1.0 where the stripped completion equals the answer field, else 0.0."""
        return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, columns[field])]

    exact_match.__signature__ = inspect.Signature([
        inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("completions", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY)])
    return exact_match


def _regex(pattern):
    def regex(prompts, completions, **_):
        """1.0 where the whole stripped completion matches grpo.format_regex, else 0.0."""
        return [float(pattern.fullmatch(_text(c).strip()) is not None) for c in completions]

    return regex


def _code_tests(field: str, timeout: float):
    def code_tests(prompts, completions, **columns):
        """1.0 where the completion's program passes the example's asserts (sandboxed), else 0.0."""
        jobs = []
        for c, tests in zip(completions, columns[field]):
            tests = [tests] if isinstance(tests, str) else list(tests)
            jobs.append((eval_metrics.extract_code(_text(c)), tests))
        workers = max(1, min(len(jobs), os.cpu_count() or 1, 8))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda job: sandbox.run_tests(*job, timeout=timeout), jobs))
        return [float(r == "passed") for r in results]

    code_tests.__signature__ = inspect.Signature([
        inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("completions", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY)])
    return code_tests


def load(spec: str, grpo_cfg=None) -> list[Reward]:
    """grpo.rewards -> the reward functions, each loaded and its signature checked (UserError
    naming the entry otherwise)."""
    entries = [e.strip() for e in str(spec).split(",") if e.strip()]
    if not entries:
        raise UserError("train.objective=grpo needs grpo.rewards: comma separated path/to/file.py:fn, "
                        f"package.module:fn or built-ins ({', '.join(BUILTINS)})")
    out = []
    for entry in entries:
        if ":" not in entry:
            if entry not in BUILTINS:
                raise UserError(f"grpo.rewards: {entry!r} is not a built-in reward ({', '.join(BUILTINS)}); "
                                "a function is written path/to/file.py:fn or package.module:fn")
            out.append(_inspect(builtin(entry, grpo_cfg), entry, entry))
            continue
        where, _, name = entry.rpartition(":")
        if not name.isidentifier() or not where:
            raise UserError(f"grpo.rewards: {entry!r} is not file.py:fn or module:fn")
        module = _load_file(where, entry) if where.endswith(".py") else _load_module(where, entry)
        if not hasattr(module, name):
            found = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
            raise UserError(f"grpo.rewards: {where} defines no {name!r} (entry {entry!r}; its functions: "
                            f"{', '.join(found) or 'none'})")
        out.append(_inspect(getattr(module, name), entry, name))
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # metrics are keyed by name: rewards/<name>/mean
        raise UserError(f"grpo.rewards: {', '.join(dup)} appears twice; each reward function once")
    return out


def check_columns(rewards: Sequence[Reward], columns: set[str], spec: str) -> None:
    """Raises UserError when a function requires a field the prompt data does not have."""
    for r in rewards:
        missing = [p for p in r.required if p not in columns and p not in STANDARD_ARGS]
        if missing:
            raise UserError(f"grpo.rewards: {r.entry} requires {', '.join(repr(m) for m in missing)}, which "
                            f"the prompt data ({spec}) does not have in every record (fields: "
                            f"{', '.join(sorted(columns)) or 'none'})")


def _kwargs(r: Reward, args: dict) -> dict:
    return dict(args) if r.accepts_any else {k: v for k, v in args.items() if k in r.params}


def _values(r: Reward, out, n: int, where: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """A function's output -> (float64 [n] with NaN for None, bool [n] where it returned NaN);
    UserError on anything else."""
    if isinstance(out, (str, bytes)) or not isinstance(out, (Sequence, np.ndarray)):
        raise UserError(f"grpo.rewards: {r.entry} returned a {type(out).__name__}; it must return a list of "
                        f"{n} numbers (or None), one per completion")
    out = list(out)
    if len(out) != n:
        raise UserError(f"grpo.rewards: {r.entry} returned {len(out)} rewards for {n} completions; it must "
                        "return one per completion")
    vals, nan = np.full(n, np.nan), np.zeros(n, bool)
    for i, v in enumerate(out):
        if v is None:
            continue
        if not isinstance(v, (bool, int, float, np.integer, np.floating)):
            raise UserError(f"grpo.rewards: {r.entry} returned {v!r} ({type(v).__name__}) for {where(i)}; a "
                            "reward is a number or None")
        if math.isnan(float(v)):
            nan[i] = True
        elif math.isinf(float(v)):
            raise UserError(f"grpo.rewards: {r.entry} returned {v} for {where(i)}; a reward must be finite "
                            "(None: not applicable, NaN: skip the group)")
        else:
            vals[i] = float(v)
    return vals, nan


def score(rewards: Sequence[Reward], args: dict, n: int, where: Callable[[int], str]):
    """Calls every function on the n completions; returns (values [n, F] float64, NaN where a
    function returned None or NaN; nan_by [n, F] bool where it returned NaN). A function that
    raises is called again one completion at a time to name the example: UserError."""
    values = np.zeros((n, len(rewards)), np.float64)
    nan_by = np.zeros((n, len(rewards)), bool)
    for j, r in enumerate(rewards):
        try:
            out = r.fn(**_kwargs(r, args))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  the user's code
            raise UserError(_raised(r, e, args, n, where)) from e
        values[:, j], nan_by[:, j] = _values(r, out, n, where)
    return values, nan_by


def total(values, weights) -> np.ndarray:
    """Weighted sums [n] of values [n, F] over the functions that applied (NaN where none did)."""
    applicable = ~np.isnan(values)
    summed = np.sum(np.where(applicable, values, 0.0) * np.asarray(weights, np.float64), axis=1)
    return np.where(applicable.any(axis=1), summed, np.nan)


def _raised(r: Reward, e: Exception, args: dict, n: int, where: Callable[[int], str]) -> str:
    """The error line for a function that raised: the first example it raises on alone."""
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in args.items()}
        try:
            r.fn(**_kwargs(r, one))
        except Exception as e1:  # noqa: BLE001
            return f"grpo.rewards: {r.entry} raised {type(e1).__name__}: {e1} on {where(i)}"
    return f"grpo.rewards: {r.entry} raised {type(e).__name__}: {e} on a batch of {n} completions"

"""What every command line shares: absl flags, `--config` with overrides, quiet logs, one-line errors.

Each CLI module defines `define_flags(flag_values)` and `main(flag_values, args) -> int`, and
runs them with `cli.run`: under `python -m` through absl's `app.run` (so `--help`, `--helpfull`
with defaults and `--verbosity` work everywhere), or in-process from Python and tests with a
list of flags (`evaluate.main(["--checkpoint=...", ...])`), on a private FlagValues so several
commands can run in one process. Flags are defined only when a command runs, never on import:
importing `gemma_jax.sample` as a library must not claim `--checkpoint` in someone's program.
The `--config` flag itself (experiment file or workdir, with overrides) is
`gemma_jax.config.define_config_flag`.

A user error (bad flag, unknown config key, missing file) prints one `error:` line and exits 2
(gemma_jax.errors); `--debug` shows the traceback.
"""

from __future__ import annotations

import sys

from absl import app, flags

from gemma_jax import errors, logs


def require(flag_values: flags.FlagValues, *names: str) -> None:
    """Marks flags required, saying so in their help (absl's help shows no default for them)."""
    flags.mark_flags_as_required(list(names), flag_values=flag_values)
    for name in names:
        flag_values[name].help += " (required)"


def _say_unset_defaults(flag_values: flags.FlagValues, names) -> None:
    """A flag whose default is None gets "(default: unset)" unless its help says what happens."""
    for name in names:
        flag = flag_values[name]
        if flag.default is None and "default" not in flag.help and "(required)" not in flag.help:
            flag.help += " (default: unset)"


def define_common(flag_values: flags.FlagValues) -> None:
    """--debug on every command (errors.debug_requested reads it from sys.argv)."""
    if "debug" not in flag_values:
        flags.DEFINE_bool("debug", False, f"show the traceback of user errors (or set {errors.DEBUG_ENV}=1)",
                          flag_values=flag_values)


def _define(define_flags, flag_values: flags.FlagValues) -> None:
    before = set(flag_values)
    define_flags(flag_values)
    define_common(flag_values)
    _say_unset_defaults(flag_values, sorted(set(flag_values) - before))


def _user_message(exc: BaseException) -> str:
    text = errors.message(exc) if not isinstance(exc, AttributeError) else str(exc).strip("'\"")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


_PARSE_ERRORS = (flags.Error, errors.UserError, OSError, AttributeError, KeyError, ValueError, TypeError)


def _parse(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parses argv; a bad flag or config becomes one `error:` line and exit 2 (unless --debug)."""
    try:
        return flag_values(argv)
    except _PARSE_ERRORS as exc:
        if errors.debug_requested(argv):
            raise
        print(f"error: {_user_message(exc)}", file=sys.stderr, flush=True)
        print("(--helpfull lists every flag; --debug shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(errors.EXIT_USER_ERROR) from None


def _call(main, flag_values, rest: list[str], *, python_warnings: bool) -> int:
    def body():
        logs.setup(python_warnings=python_warnings)
        return main(flag_values, list(rest[1:]))

    return int(errors.run_cli(body) or 0)


def run(main, define_flags, argv: list[str] | None = None, *, prog: str = "gemma_jax") -> int:
    """Runs a command: argv None means the process's own command line (absl's app.run, which
    exits); a list of flags runs it in-process and returns its exit status."""
    if argv is None:
        _define(define_flags, flags.FLAGS)
        app.run(lambda rest: _call(main, flags.FLAGS, rest, python_warnings=True),
                flags_parser=lambda a: _parse(flags.FLAGS, a))
        return 0  # not reached: app.run exits
    fv = flags.FlagValues()
    _define(define_flags, fv)
    full = [prog, *argv]
    saved = sys.argv
    sys.argv = full  # config overrides and errors.debug_requested read sys.argv
    try:
        rest = _parse(fv, full)
        return _call(main, fv, rest, python_warnings=False)
    finally:
        sys.argv = saved


def help_text(define_flags) -> str:
    """The flag help of a command, as --helpfull prints it for its own flags (with defaults)."""
    fv = flags.FlagValues()
    _define(define_flags, fv)
    return fv.get_help()


def rounded(value, significant: int = 6):
    """`value` with every float (in dicts, lists, tuples) cut to `significant` digits, for the
    summaries commands print: 147.1, not 147.10000000000002; integers and strings unchanged."""
    if isinstance(value, float):
        return float(f"{value:.{significant}g}") if value == value and abs(value) != float("inf") else value
    if isinstance(value, dict):
        return {k: rounded(v, significant) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(v, significant) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return rounded(value.item(), significant)
    return value


def no_positional(args: list[str]) -> None:
    """Raises UserError for stray positional arguments (a forgotten `--`, a quoted space)."""
    if args:
        raise errors.UserError(f"unexpected arguments {args}: every option is a --flag=VALUE (see --helpfull)")

"""User errors and how the command lines report them: one line, exit status 2.

A user error is something the person running the command fixes: a bad config value, bad data,
a missing path, a refused re-run. Those print `error: <message>` on stderr and exit 2, without
a traceback; `--debug` on any command line (or GEMMA_JAX_DEBUG=1) shows the traceback as well.
Anything else (a bug, an out-of-memory) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

DEBUG_ENV = "GEMMA_JAX_DEBUG"
EXIT_USER_ERROR = 2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem the user fixes (config, data, paths, a refused re-run); printed without a traceback."""


class WorkdirError(UserError):
    """A workdir that cannot be used as asked: another run holds it, or the re-run changes it."""


# Raised by the standard library for a path the user gave.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """UserError, a path error, or a ValueError / KeyError that gemma_jax itself raised while
    checking an input (the innermost frame is ours), as opposed to one deep inside a library."""
    if isinstance(exc, (UserError,) + _PATH_ERRORS):
        return True
    if isinstance(exc, (ValueError, KeyError)) and exc.__traceback__ is not None:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return os.path.abspath(last.filename).startswith(_PACKAGE_DIR + os.sep)
    return False


def debug_requested(argv=None) -> bool:
    """--debug among the arguments, or GEMMA_JAX_DEBUG set to anything but '' or '0'."""
    argv = sys.argv if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def message(exc: BaseException) -> str:
    """The one line printed for a user error."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.strip() or type(exc).__name__


def run_cli(main, *args, **kwargs):
    """Calls main(*args); a user error becomes `error: ...` on stderr and SystemExit(2)."""
    try:
        return main(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (classified below; anything else re-raised)
        if debug_requested() or not is_user_error(exc):
            raise
        print(f"error: {message(exc)}", file=sys.stderr, flush=True)
        print(f"(pass --debug or set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None

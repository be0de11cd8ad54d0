"""Console output of the command lines: third-party chatter hidden, our own warnings prominent.

Orbax, jax, absl, etils and grain log INFO and WARNING lines about their internals on every run
(a checkpoint save is a dozen of them); next to those, the one warning that matters to the user
(forgetting past the threshold, a non-finite step) is easy to miss. `setup()` (every CLI calls
it once flags are parsed) keeps third-party records below ERROR off the console unless
--verbosity is raised above 0, and prints gemma_jax's own warnings as `WARNING gemma_jax: ...`,
in colour when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import os
import sys
import warnings

from absl import flags, logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_YELLOW, _RED, _RESET = "\033[33m", "\033[31m", "\033[0m"


def is_ours(record: logging_std.LogRecord) -> bool:
    """A record logged from gemma_jax's own source (or a logger named gemma_jax...)."""
    return (os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)
            or record.name.split(".")[0] == "gemma_jax")


def verbose() -> bool:
    """--verbosity above 0 (absl's DEBUG and beyond): show everything."""
    try:
        return flags.FLAGS.is_parsed() and int(flags.FLAGS["verbosity"].value) > 0
    except (KeyError, flags.Error):
        return False


class QuietLibraries(logging_std.Filter):
    """Drops third-party records below ERROR (unless --verbosity > 0); gemma_jax's always pass."""

    def filter(self, record):
        if is_ours(record) or record.levelno >= logging_std.ERROR or verbose():
            return True
        return False


class OwnWarnings(logging_std.Formatter):
    """`WARNING gemma_jax: message` for our warnings and errors (coloured on a terminal);
    everything else keeps the formatter it had."""

    def __init__(self, fallback: logging_std.Formatter | None, stream=None):
        super().__init__()
        self.fallback = fallback or logging_std.Formatter("%(levelname)s %(name)s: %(message)s")
        self.stream = stream

    def format(self, record):
        if record.levelno < logging_std.WARNING or not is_ours(record):
            return self.fallback.format(record)
        level = "ERROR" if record.levelno >= logging_std.ERROR else "WARNING"
        text = f"{level} gemma_jax: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        stream = self.stream or sys.stderr
        if _isatty(stream) and not os.environ.get("NO_COLOR"):
            text = f"{_RED if level == 'ERROR' else _YELLOW}{text}{_RESET}"
        return text


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def console_handlers() -> list:
    """The handlers that write the console: absl's Python handler, or plain stream handlers on root."""
    out = []
    absl_handler = logging.get_absl_handler()
    for h in logging_std.getLogger().handlers:
        if h is absl_handler:
            out.append(h.python_handler)
        elif isinstance(h, logging_std.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
            out.append(h)
    return out


def setup(*, python_warnings: bool = True) -> None:
    """Quiet third-party logs and prominent own warnings on the console handlers (idempotent);
    `python_warnings` also hides library `warnings.warn` output (not in-process: the caller's)."""
    quiet = QuietLibraries()
    targets = [logging.get_absl_handler()] + [h for h in logging_std.getLogger().handlers
                                              if h is not logging.get_absl_handler()]
    for h in targets:
        if any(isinstance(f, QuietLibraries) for f in h.filters):
            continue
        h.addFilter(quiet)
    for h in console_handlers():
        if not isinstance(h.formatter, OwnWarnings):
            h.setFormatter(OwnWarnings(h.formatter, getattr(h, "stream", None)))
    if python_warnings and not verbose():
        # Python warnings from libraries (deprecations, "unclosed file"): ours still show.
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"gemma_jax(\.|$)")


@contextlib.contextmanager
def quiet_libraries():
    """Within the block, third-party log records below ERROR stay off every handler (as `setup`
    does for the command lines); for library entry points such as gemma_jax.load called from a
    user's own program, whose logging is otherwise left as it was before and after."""
    quiet = QuietLibraries()
    # The absl and root loggers themselves (a handler a library adds meanwhile, such as the one
    # logging.basicConfig makes on a first module-level warning, is covered too), and the
    # handlers records of other loggers propagate to.
    targets = {logging_std.getLogger("absl"), logging_std.getLogger(), logging.get_absl_handler(),
               logging_std.lastResort, *logging_std.getLogger().handlers}
    targets = [t for t in targets if t is not None]
    for t in targets:
        t.addFilter(quiet)
    try:
        yield
    finally:
        for t in targets:
            t.removeFilter(quiet)


def warning(text: str, *args) -> None:
    """A user-facing warning (same as absl logging.warning from gemma_jax code)."""
    logging.warning(text, *args)

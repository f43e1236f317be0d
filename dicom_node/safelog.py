"""Log lines without patient data, whoever writes them.

The node's own log calls name things by UID and id; libraries make no such promise.
highdicom warns about an odd Patient's Name by quoting it, pydicom's value warnings quote
the value, SQLAlchemy's errors quote a statement's parameters, pynetdicom at DEBUG dumps
whole data sets. So every record on the node's handlers passes :class:`PhiSafeFilter`:

* text written by a library (an installed package other than the node's own:
  ``dicom_node``, ``policies``, ``pipelines``, ``models``, ``audit``) is replaced by its
  level, logger and source line: "where to look", never "what it said"; records from
  the node's own code and the standard library keep their text;
* an exception's message is withheld (its type and frames stay) when a library raised it:
  when the deepest frame that is not the standard library's is a library's;
* a Python warning is logged (``py.warnings``) as its category and the code that warned,
  its text withheld: the node's own code logs, it does not warn;
* an uncaught exception, in any thread, is logged through the same filter instead of
  being printed to stderr verbatim;
* one record is one line: the filter folds a record's traceback into its message and
  escapes every control character (C0, DEL, C1, and the Unicode line and paragraph
  separators) as ``\\xNN`` / ``\\uNNNN``. AE titles, host names and other text a peer sends
  cannot forge a log line (read a traceback with ``sed 's/\\\\x0a/\\n/g'``).

:func:`route_warnings_and_crashes` and the filter are installed by
``runtime.setup_logging``, which ``serve`` and every worker process call.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import sysconfig
import threading
import traceback
import warnings
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

_NODE_PACKAGES = ("dicom_node", "policies", "pipelines", "models", "audit")
_ROOT = Path(__file__).resolve().parents[1]
_NODE_ROOTS = tuple(str(_ROOT / name) + os.sep for name in _NODE_PACKAGES)
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep
_LIBRARY_DIRS = frozenset({"site-packages", "dist-packages"})

Origin = Literal["node", "library", "other"]

log = logging.getLogger(__name__)

#: What :func:`escape_controls` escapes: C0, DEL, C1, and U+2028 / U+2029 (line breaks to
#: ``str.splitlines`` and to some log viewers).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\u2028`` for the
    Unicode separators): printable, and always one line."""
    return _CONTROL.sub(_escaped, text)


def _escaped(found: re.Match[str]) -> str:
    code = ord(found[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@functools.lru_cache(maxsize=4096)
def origin_of(filename: str) -> Origin:
    """Who wrote the code in ``filename``: the node, a library (an installed package), or
    other code (the standard library, a script, a test)."""
    real = os.path.realpath(filename)
    if real.startswith(_NODE_ROOTS):
        return "node"
    return "other" if _LIBRARY_DIRS.isdisjoint(Path(real).parts) else "library"


def short_path(filename: str) -> str:
    """``highdicom/base.py`` for ``.../site-packages/highdicom/base.py``: enough to look it up."""
    real = os.path.realpath(filename)
    parts = Path(real).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _LIBRARY_DIRS:
            return "/".join(parts[i + 1 :])
    for base in (str(_ROOT) + os.sep, _STDLIB):
        if real.startswith(base):
            return real[len(base) :]
    return Path(filename).name


def _raised_in(exc: BaseException) -> str | None:
    """The library (top-level package) that raised an exception, or None when the node's
    code (or the standard library on its behalf) did."""
    frames = [frame.f_code.co_filename for frame, _line in traceback.walk_tb(exc.__traceback__)]
    for filename in reversed(frames):  # deepest first: the stdlib carries out others' work
        where = origin_of(filename)
        if where == "library":
            return short_path(filename).split("/")[0]
        if where == "node":
            return None
    if frames:
        return None
    package = type(exc).__module__.split(".")[0]
    if package in _NODE_PACKAGES or package == "builtins" or package in sys.stdlib_module_names:
        return None
    return package


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, or ``Type (message withheld: raised in pydicom)`` when a library
    raised it: library messages may quote data set values."""
    name = type(exc).__name__
    library = _raised_in(exc)
    if library is not None:
        return f"{name} (message withheld: raised in {library})"
    text = str(exc)
    return f"{name}: {text}" if text else name


def format_exception(exc: BaseException) -> str:
    """A traceback like Python's (the chain, oldest first), with library messages withheld."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    blocks = []
    for link in reversed(chain):
        frames = "".join(traceback.format_tb(link.__traceback__))
        blocks.append(f"Traceback (most recent call last):\n{frames}{describe_exception(link)}")
    return "\n\nwhich led to:\n\n".join(blocks)


class PhiSafeFilter(logging.Filter):
    """Attach to every handler: withholds library text and library exception messages, and
    makes the record one line (traceback folded in, control characters escaped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "phi_safe", False):  # one record, several handlers
            return True
        record.__dict__["phi_safe"] = True
        if origin_of(record.pathname) == "library" and record.name.split(".")[0] not in _NODE_PACKAGES:
            record.msg = (
                f"{record.levelname.lower()} from {record.name} at {short_path(record.pathname)}:"
                f"{record.lineno} (library text withheld: it may quote patient data)"
            )
            record.args = ()
        else:
            if isinstance(record.msg, BaseException):
                record.msg = describe_exception(record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(
                    describe_exception(a) if isinstance(a, BaseException) else a for a in record.args
                )
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = format_exception(record.exc_info[1])
        # the message's template, before its arguments are folded in: what a JSON log's
        # "event" groups by (for a library's record, the withheld-text line)
        record.__dict__["event"] = escape_controls(str(record.msg))
        _one_line(record)
        return True


def _one_line(record: logging.LogRecord) -> None:
    """Fold the record's message, arguments, traceback and stack into one escaped line."""
    try:
        text = record.getMessage()
    except Exception:  # arguments that do not fit the format: keep both, as logging would fail
        text = f"{record.msg!r} % {record.args!r}"
    for extra in (record.exc_text, record.stack_info):
        if extra:
            text = f"{text}\n{extra}"
    record.msg = escape_controls(text)
    record.args = ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None


def log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the node: the category, the code that warned and the
    line the warning is about (its ``stacklevel``); the text is withheld."""
    about = f"{short_path(filename)}:{lineno}"
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (warnings.__file__, __file__):
        frame = frame.f_back  # through the warnings machinery to whoever called warn()
    by = f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else about
    logging.getLogger("py.warnings").warning(
        "%s from %s%s (warning text withheld: it may quote patient data)",
        category.__name__,
        by,
        "" if by == about else f", about {about}",
    )


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    log.critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    log.critical(
        "uncaught %s in thread %s",
        args.exc_type.__name__,
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def route_warnings_and_crashes() -> None:
    """Send Python warnings and uncaught exceptions to the log (and so through the filter)."""
    warnings.showwarning = log_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


#: Marks the handler :func:`protect_stderr` adds (``setup_logging`` replaces it).
CLI_HANDLER = "_dicom_node_cli_stderr"


def protect_stderr() -> None:
    """For every CLI command: warnings and library log records reach stderr only through
    :class:`PhiSafeFilter` (``dicom-node run`` builds the same objects a worker does)."""
    root = logging.getLogger()
    if not any(getattr(h, CLI_HANDLER, False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        # What Python's last-resort handler printed before (our own warnings, bare), plus
        # warnings; libraries' log records stay as quiet as their NullHandlers keep them.
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda r: r.name == "py.warnings" or r.name.split(".")[0] in _NODE_PACKAGES)
        handler.addFilter(PhiSafeFilter())
        setattr(handler, CLI_HANDLER, True)
        root.addHandler(handler)
    warnings.showwarning = log_warning

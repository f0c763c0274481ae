"""The run's log file, `WORKDIR/llmjax.log`: the full detail that the terminal does not show.

Once a command knows its workdir it calls `attach(workdir)`: from then on the warnings and
errors of the libraries (orbax and absl log whole tracebacks when a save or restore fails),
exceptions in background threads (orbax's save threads) and in callbacks (unraisable ones),
and the traceback of any failure are appended there, while the terminal gets one line per
problem.
Before a workdir is known (or when it cannot be written) a temporary file is used. For a
`gs://` workdir the log is written locally and copied next to the run by `detach`.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import tempfile
import threading
import traceback
from typing import Any

LOG_NAME = "llmjax.log"


class _State:
    path: str | None = None  # the local file written to
    upload_to: Any = None  # a remote path to copy it to at detach
    handler: _FileHandler | None = None  # (defined below; annotations are not evaluated)
    removed: list[logging.Handler] = []


def _fallback_path() -> str:
    return os.path.join(tempfile.gettempdir(), f"llmjax-{os.getpid()}.log")


def current_path() -> str:
    """The file detail goes to (a temporary one until `attach`)."""
    return _State.path or _fallback_path()


def _append(text: str) -> str:
    path = current_path()
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    except OSError:
        if path != _fallback_path():
            _State.path = None
            return _append(text)
    return path


def record(message: str) -> str:
    """Append a time-stamped line; returns the log file's path."""
    return _append(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}")


def record_exception(e: BaseException, context: str = "") -> str:
    """Append the full traceback of `e`; returns the log file's path."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return record(f"{context or 'failure'}:\n{tb}")


class _FileHandler(logging.FileHandler):
    """A log file that never prints "--- Logging error ---" pages when its disk is full: the record is
    written to the temporary fallback file instead, or dropped."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        try:
            _append(f"{self.format(record)}")
        except Exception:  # noqa: BLE001 - nowhere left to write
            pass


class _RecordHandler(logging.Handler):
    """Into whatever file `current_path` names at the time (the run's log, else the temporary one)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _append(self.format(record))
        except Exception:  # noqa: BLE001 - nowhere left to write
            pass


def _route_asyncio() -> None:
    """asyncio logs "Task exception was never retrieved" with a traceback when it garbage-collects a failed
    task, which for orbax's aborted saves (a full disk) can happen after `detach`, even at interpreter exit:
    its logger always writes to the log file, never to the terminal."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(h, _RecordHandler) for h in logger.handlers):
        handler = _RecordHandler(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    path = record_exception(args.exc_value, f"exception in thread {name}") if args.exc_value else current_path()
    print(f"llmjax: a background thread ({name}) failed: {args.exc_type.__name__}: "
          f"{str(args.exc_value).splitlines()[0] if args.exc_value and str(args.exc_value) else ''} "
          f"(details in {path})", file=sys.stderr, flush=True)


def _unraisable_hook(args: Any) -> None:
    """Exceptions nothing can catch (raised in callbacks, e.g. tensorstore completing a future on an event loop
    orbax already closed after a failed save): into the log, not as tracebacks on the terminal."""
    exc = args.exc_value or (args.exc_type() if args.exc_type else None)
    if exc is not None:
        record_exception(exc, f"unraisable exception ({args.err_msg or 'ignored'} in {args.object!r})")


def _excepthook(exc_type: type, exc: BaseException, tb: Any) -> None:
    """sys.excepthook: extension modules report errors in their callbacks through it (tensorstore completing
    a future on an event loop orbax already closed after a failed save); into the log, not the terminal."""
    if issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
        sys.__excepthook__(exc_type, exc, tb)
        return
    exc.__traceback__ = tb
    record_exception(exc, "exception reported by a library callback")


def attach(workdir: Any) -> str:
    """Send library logs and thread failures to `workdir/llmjax.log` (None: a temporary file, for commands
    that must not write into their workdir); returns the local path written."""
    from llmjax.storage import is_url

    if workdir is None:
        _State.path, _State.upload_to = _fallback_path(), None
    elif is_url(workdir):
        from llmjax.storage import as_path

        _State.path, _State.upload_to = _fallback_path(), workdir
        try:  # keep the earlier runs' log: it is uploaded whole again at detach
            with open(_State.path, "wb") as f:
                f.write((as_path(workdir) / LOG_NAME).read_bytes())
        except OSError:
            pass
    else:
        _State.path, _State.upload_to = os.path.join(os.path.abspath(os.fspath(workdir)), LOG_NAME), None
    record(f"llmjax {' '.join(sys.argv[1:])}")  # falls back to a temporary file when the workdir's fails
    _State.path = current_path()
    if _State.handler is not None and _State.handler.baseFilename != os.path.abspath(_State.path):
        detach_handler()
    if _State.handler is None:
        handler = _FileHandler(_State.path, encoding="utf-8", delay=True)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        # absl's handler (or a basicConfig one some library installs) prints library warnings, with
        # tracebacks, to stderr: the file takes them instead.
        _State.removed = [h for h in root.handlers if type(h).__name__ == "ABSLHandler"
                          or (type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout))]
        for h in _State.removed:
            root.removeHandler(h)
        root.addHandler(handler)
        _State.handler = handler
    _route_asyncio()
    threading.excepthook = _thread_hook
    # Kept after `detach`: such callbacks also fire while the interpreter shuts down (then into the temp file).
    sys.unraisablehook, sys.excepthook = _unraisable_hook, _excepthook
    return current_path()


def detach_handler() -> None:
    """Stop routing library logs to the file (give absl its stderr handler back)."""
    if _State.handler is not None:
        root = logging.getLogger()
        root.removeHandler(_State.handler)
        _State.handler.close()
        for h in _State.removed:
            root.addHandler(h)
        _State.handler, _State.removed = None, []


def upload() -> None:
    """Copy the log next to a remote workdir (no-op for a local one)."""
    if _State.upload_to is not None and _State.path and os.path.exists(_State.path):
        from llmjax.storage import as_path

        try:
            with open(_State.path, "rb") as f:
                (as_path(_State.upload_to) / LOG_NAME).write_bytes(f.read())
        except Exception:  # noqa: BLE001 - OSError, a missing gs:// backend: the local copy stays, never a crash
            pass


def detach() -> None:
    """Stop routing logs here; copy the log next to a remote workdir."""
    detach_handler()
    threading.excepthook = threading.__excepthook__
    upload()
    _State.path = _State.upload_to = None

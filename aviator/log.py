"""Structured logging setup (structlog), done once by the CLI, never at import time.

Everything that logs goes through the same renderer, so that ``aviator --log-json`` writes
one JSON object per line to stderr and nothing else (issue 14):

- structlog's own loggers (all of Aviator);
- the standard library's ``logging`` (gRPC, aiohttp, asyncio, the Kubernetes client, urllib3),
  through one root handler with structlog's ``ProcessorFormatter``: same keys (``event``,
  ``level``, ``timestamp``, plus ``logger``), same renderer;
- warnings (``logging.captureWarnings``), and with JSON an exception nobody caught, in the
  main thread, another thread or a finaliser (``sys.excepthook``, ``threading.excepthook``,
  ``sys.unraisablehook``): one line with the traceback as a string field.

Tracebacks stay for bugs (``exception`` field, one JSON line); errors that are the client's
(a bad request, a refused stream) are logged without one where they are caught.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any

import structlog


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time of the call, so a logger cached
    before stderr was swapped (pytest's capture, a daemoniser) never writes to a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs (recognised, to be replaced, on reconfiguring)."""


_configured: tuple[str, bool] = ("info", False)


def configured() -> tuple[str, bool]:
    """The level and JSON flag of the last :func:`configure` (a child process copies them)."""
    return _configured


def configure(level: str = "info", *, json: bool = False) -> None:
    """Route structlog and stdlib logging to stderr as key=value lines or JSON lines."""
    global _configured
    _configured = (level, json)
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    # JSON: a traceback is one string field of the line; the console renderer prints its own.
    tracebacks: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if json else []
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = _Handler(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tracebacks,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    if json:
        _catch_uncaught()


def _catch_uncaught() -> None:
    """Exceptions nobody caught become one JSON line each (Python would print a traceback
    of many lines to stderr)."""
    log = structlog.get_logger("aviator.uncaught")

    def excepthook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        log.error(
            "uncaught exception in a thread",
            thread=args.thread.name if args.thread is not None else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def unraisable_hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        log.error(
            unraisable.err_msg or "exception ignored",
            object=repr(unraisable.object),
            exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc else False,
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook

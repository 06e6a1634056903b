"""The parse worker: a child process that turns manifest bytes into objects.

YAML parsing is CPU-bound Python (libyaml composes, PyYAML's constructor and Aviator's
decoding are Python), and under the GIL a thread doing it still takes the interpreter from
the event loop that serves xDS, the admin port and the probes for as long as it runs; a
separate process does not. One long-lived worker serves the directory source, one file at a
time: it starts with the source, so a first parse does not wait for an interpreter to start.

- Started with the ``spawn`` method: the control plane runs gRPC's threads, and a forked
  child of a threaded process may deadlock (or abort in gRPC's fork handlers; see
  docs/design.md, "Processes").
- :meth:`ParseWorker.close` kills the worker, abandoning a parse in progress: a SIGTERM
  during a parse stops the control plane at once instead of waiting for the parse.
- A worker that dies while parsing (killed, out of memory, a crash in libyaml) is reported as
  that file's problem and replaced for the next file; nothing is retried until the file
  changes.
- The worker exits by itself when the control plane goes away (its end of the pipe closes),
  after the parse in progress, if any.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from aviator.k8s.state import Problem
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits, Parsed, parse_file

__all__ = ["ParseWorker", "WorkerClosedError"]


class WorkerClosedError(Exception):
    """The worker was closed (the source is stopping): the parse was abandoned."""


def _serve(conn: Connection, limits: Limits) -> None:
    """The worker's main loop: one (source, bytes) request, one answer, until EOF."""
    while True:
        try:
            source, data = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed its end, or is gone
        # Parsing allocates hundreds of thousands of objects that all stay alive until the
        # end: the cyclic collector's passes over them are pure cost (several times slower).
        gc.disable()
        try:
            result: Parsed | Problem = parse_file(source, data, limits)
        except Exception as exc:  # parse_file reports bad input; this is a bug, not a crash
            result = Problem(source, f"cannot be read: internal error {type(exc).__name__}: {exc}")
        finally:
            gc.enable()
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return
        del result, data
        gc.collect()


class ParseWorker:
    """A child process running :func:`~aviator.source.yamlfiles.parse_file`.

    :meth:`parse` blocks (call it from a thread, never from the event loop); one call at a
    time. :meth:`close` may be called from any thread, also while a parse is running.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._lock = threading.Lock()  # one request at a time
        self._closed = False
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.parses = 0  # files parsed by the worker (answers received)
        self.started = 0  # worker processes started

    @property
    def pid(self) -> int | None:
        """The worker process's pid, while it runs."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def start(self) -> None:
        """Start the worker now (else the first :meth:`parse` does)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> Connection:
        if self._closed:
            raise WorkerClosedError("the parse worker is closed")
        if self._conn is not None:
            return self._conn
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=_serve, args=(child, self.limits), name="aviator-yaml-parser", daemon=True
        )
        process.start()
        child.close()  # else the parent holds the pipe open and never sees the worker die
        self._process, self._conn = process, parent
        self.started += 1
        return parent  # close() during the start kills it once it has the lock

    def parse(self, source: str, data: bytes) -> Parsed | Problem:
        """Parse one file in the worker. Raises :class:`WorkerClosedError` after :meth:`close`."""
        with self._lock:
            conn = self._ensure()
            try:
                conn.send((source, data))
                result: Parsed | Problem = conn.recv()
            except (EOFError, OSError) as exc:
                code = self._discard()
                if self._closed:
                    raise WorkerClosedError("the parse worker was closed while parsing") from exc
                how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                return Problem(
                    source,
                    f"the YAML parser process died while reading this file ({how}: out of "
                    "memory?); not parsed, it is read again when it changes",
                )
            self.parses += 1
            return result

    def _discard(self) -> int | None:
        """Forget the current process (killing it if it still runs); its exit code."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if process.is_alive():
            process.kill()
        process.join(5)
        return process.exitcode

    def close(self) -> None:
        """Kill the worker, abandoning a parse in progress; later parses raise. Idempotent."""
        self._closed = True
        process = self._process
        if process is not None and process.is_alive():
            process.kill()  # a blocked parse() sees EOF and raises WorkerClosedError
        if self._lock.acquire(timeout=5):  # parse() has given up by now
            try:
                self._discard()
            finally:
                self._lock.release()

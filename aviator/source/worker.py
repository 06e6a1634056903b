"""The parse worker: a child process that turns manifest bytes into objects.

YAML parsing is CPU-bound Python (libyaml composes, PyYAML's constructor and Aviator's
decoding are Python). In a thread it would share the interpreter with the event loop that
serves xDS, the admin port and the probes (measured with 10,000 pods: the loop ran half as
many ticks while it lasted), it could not be stopped half-way (a SIGTERM would wait for it),
and its peak memory would be the control plane's. A separate process has none of these. One
long-lived worker serves the directory source, one file at a time; it starts with the source,
so later parses do not wait for an interpreter to start.

- Started as a fresh interpreter (``python -c``, this process's ``sys.path``), not forked:
  the control plane runs gRPC's threads, and a forked child of a threaded process may
  deadlock (or abort in gRPC's fork handlers; see docs/design.md, "Processes"). Not through
  ``multiprocessing``'s ``spawn`` either, which re-runs the parent's ``__main__`` script in the
  child (a script without a ``__main__`` guard would start a second control plane there) and
  starts a resource-tracker process. Requests and answers are pickled over two pipes
  (:class:`multiprocessing.connection.Connection`).
- :meth:`ParseWorker.close` kills the worker, abandoning a parse in progress: a SIGTERM
  during a parse stops the control plane at once instead of waiting for the parse.
- A worker that dies while parsing (killed, out of memory, a crash in libyaml) is reported as
  that file's problem and replaced for the next file; nothing is retried until the file
  changes.
- The worker exits by itself when the control plane goes away (its end of the pipe closes),
  after the parse in progress, if any.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from aviator.k8s.state import Problem
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits, Parsed, parse_file

__all__ = ["ParseWorker", "WorkerClosedError"]


class WorkerClosedError(Exception):
    """The worker was closed (the source is stopping): the parse was abandoned."""


_CHILD = "from aviator.source.worker import _main; _main()"


def _main() -> None:
    """The worker process: ``python -c _CHILD READ_FD WRITE_FD LIMITS_JSON``."""
    read_fd, write_fd, limits = sys.argv[1:4]
    _serve(
        Connection(int(read_fd), writable=False),
        Connection(int(write_fd), readable=False),
        Limits(**json.loads(limits)),
    )


def _serve(requests: Connection, answers: Connection, limits: Limits) -> None:
    """The worker's main loop: one (source, bytes) request, one answer, until EOF."""
    while True:
        try:
            source, data = requests.recv()
        except (EOFError, OSError):
            return  # the parent closed its end, or is gone
        # Parsing allocates hundreds of thousands of objects that all stay alive until the
        # end: the cyclic collector's passes over them are pure cost (several times slower).
        gc.disable()
        try:
            try:
                result: Parsed | Problem = parse_file(source, data, limits)
            except Exception as exc:  # parse_file reports bad input: this would be a bug
                result = Problem(source, f"cannot be read: internal error {exc!r}")
            answers.send(result)
        except OSError:
            return  # the parent is gone
        finally:
            gc.enable()
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
        self._process: subprocess.Popen[bytes] | None = None
        self._requests: Connection | None = None
        self._answers: Connection | None = None
        self.parses = 0  # files parsed by the worker (answers received)
        self.started = 0  # worker processes started

    @property
    def pid(self) -> int | None:
        """The worker process's pid, while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the worker now (else the first :meth:`parse` does)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> tuple[Connection, Connection]:
        if self._closed:
            raise WorkerClosedError("the parse worker is closed")
        if self._requests is not None and self._answers is not None:
            return self._requests, self._answers
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or "." for p in sys.path)}
        limits = json.dumps(dataclasses.asdict(self.limits))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(from_parent), str(to_parent), limits],
                stdin=subprocess.DEVNULL,
                pass_fds=(from_parent, to_parent),
                env=env,
            )
        except OSError:
            for fd in (to_child, from_child):
                os.close(fd)
            raise
        finally:
            # The child's ends: else the parent holds them open and never sees it die.
            os.close(from_parent)
            os.close(to_parent)
        self._requests = Connection(to_child, readable=False)
        self._answers = Connection(from_child, writable=False)
        self.started += 1
        return self._requests, self._answers  # close() during the start kills it afterwards

    def parse(self, source: str, data: bytes) -> Parsed | Problem:
        """Parse one file in the worker. Raises :class:`WorkerClosedError` after :meth:`close`."""
        with self._lock:
            requests, answers = self._ensure()
            try:
                requests.send((source, data))
                result: Parsed | Problem = answers.recv()
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
        process, requests, answers = self._process, self._requests, self._answers
        self._process = self._requests = self._answers = None
        for conn in (requests, answers):
            if conn is not None:
                conn.close()
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        try:
            return process.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill the worker, abandoning a parse in progress; later parses raise. Idempotent."""
        self._closed = True
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()  # a blocked parse() sees EOF and raises WorkerClosedError
        if self._lock.acquire(timeout=5):  # parse() has given up by now
            try:
                self._discard()
            finally:
                self._lock.release()

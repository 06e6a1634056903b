"""The line protocol between ``aviator bench xds`` and its child processes.

The benchmark runs the ADS server and the simulated clients each in a process of its own
(``python -m aviator.bench.xds_server`` / ``python -m aviator.bench.xds_clients``), so the
server's CPU time and resident memory are its own. The coordinator talks to a child over its
stdin and stdout, one JSON object per line:

- the child reads commands (``{"op": ...}``) from stdin; end of input means stop;
- the child writes replies and events to the stdout it was started with. Its file descriptor 1
  is then pointed at stderr, so nothing else (a stray ``print``, a library's output) can
  corrupt the protocol; stderr goes to a log file whose tail is quoted when a child fails.

Replies come in the order of the commands; a child may also send events on its own (the
clients report "held" when every stream holds a change). The coordinator reads continuously,
so a child never blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

_LINE_LIMIT = 64 * 1024 * 1024  # a "held" event carries one timestamp per stream


class ChildError(RuntimeError):
    """A child process failed, answered with an error, or did not answer in time."""


# -- the child's end -----------------------------------------------------------------------------


class ParentLink:
    """The child's end: commands from stdin, replies to the original stdout.

    Create it with :meth:`open` inside the child's event loop, before anything can write to
    fd 1.
    """

    def __init__(self, reader: asyncio.StreamReader, out_fd: int) -> None:
        self._reader = reader
        self._out = out_fd

    @classmethod
    async def open(cls) -> ParentLink:
        out_fd = os.dup(1)
        os.dup2(2, 1)  # from now on fd 1 is stderr: only send() reaches the parent
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return cls(reader, out_fd)

    async def commands(self) -> AsyncIterator[dict[str, Any]]:
        """Commands until end of input or ``{"op": "stop"}``."""
        while True:
            line = await self._reader.readline()
            if not line:
                return
            command: dict[str, Any] = json.loads(line)
            if command.get("op") == "stop":
                return
            yield command

    def send(self, message: dict[str, Any]) -> None:
        """Write one message (blocking: messages are small and the parent always reads)."""
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self._out, view)
            view = view[written:]


# -- the coordinator's end -----------------------------------------------------------------------


class Child:
    """A child process speaking the line protocol, started with ``python -m module``."""

    def __init__(self, module: str, log_path: Path, *, name: str) -> None:
        self.module = module
        self.log_path = log_path
        self.name = name
        self._proc: asyncio.subprocess.Process | None = None
        self._inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    async def start(self) -> None:
        with self.log_path.open("wb") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                limit=_LINE_LIMIT,
            )
        self._pump = asyncio.create_task(self._read(), name=f"{self.name}-read")

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        try:
            while line := await self._proc.stdout.readline():
                self._inbox.put_nowait(json.loads(line))
        finally:
            self._inbox.put_nowait(None)  # end of output: the child exited

    def send(self, command: dict[str, Any]) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise ChildError(f"{self.name} is not running")
        self._proc.stdin.write((json.dumps(command, separators=(",", ":")) + "\n").encode())

    async def recv(self, within: float) -> dict[str, Any]:
        """The next message; raises :class:`ChildError` (with the log tail) on exit, on an
        ``{"error": ...}`` message, or after ``within`` seconds."""
        try:
            message = await asyncio.wait_for(self._inbox.get(), within)
        except TimeoutError:
            raise ChildError(
                f"{self.name} did not answer within {within:.0f} s; log tail:\n{self.log_tail()}"
            ) from None
        if message is None:
            self._inbox.put_nowait(None)  # later calls see the exit too
            code = await self._proc.wait() if self._proc is not None else None
            raise ChildError(f"{self.name} exited (code {code}); log tail:\n{self.log_tail()}")
        if "error" in message:
            raise ChildError(f"{self.name}: {message['error']}; log tail:\n{self.log_tail()}")
        return message

    async def call(self, command: dict[str, Any], within: float) -> dict[str, Any]:
        self.send(command)
        return await self.recv(within)

    async def stop(self, within: float = 10.0) -> None:
        """Ask the child to stop (end of input); kill it if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None and not proc.stdin.is_closing():
                with contextlib.suppress(OSError):
                    proc.stdin.write(b'{"op":"stop"}\n')
                    proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), within)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled while waiting
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if self._pump is not None:
                self._pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._pump
            self._proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def proc_usage() -> dict[str, float]:
    """This process's CPU seconds (user + system, all threads), resident and peak resident
    memory (MB, from ``/proc/self/status`` on Linux, else peak only from ``getrusage``)."""
    import resource
    import time

    usage: dict[str, float] = {"cpu_s": time.process_time()}
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        usage["rss_mb"] = usage["peak_rss_mb"] = peak / 1024
        return usage
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kb = float(value.split()[0])
            usage["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = kb / 1024
    return usage


def raise_nofile_limit() -> None:
    """Lift the soft limit on open files to the hard one (one socket per stream)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

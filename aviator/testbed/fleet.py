"""Run a fleet of backends in one child process, change their phases, always stop it.

The backends get their own process so that their event loop does not compete with the load
generator's (or the control plane's) for the same thread. The child is
``python -m aviator.testbed.fleetserver --spec JSON --exit-on-stdin-eof``: it prints one JSON
``ready`` line, then serves until its stdin closes or it gets SIGTERM. The parent holds the
child's stdin pipe, so the child also stops if the parent dies without cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp
import structlog

from aviator.testbed.backend import BackendStats
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.profile import Phase, Profile

log = structlog.get_logger(__name__)


class FleetError(Exception):
    """The fleet process did not start, or its control API refused a request."""


class Fleet:
    """A running fleet process. Use as ``async with Fleet(spec) as fleet: ...``.

    Invariant: after :meth:`stop` (or leaving the ``async with``, also on error) the child
    process has exited and been reaped.
    """

    def __init__(
        self,
        spec: FleetSpec,
        *,
        python: str = sys.executable,
        ready_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.spec = spec
        self._python = python
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._control_url: str | None = None
        self._backend_urls: dict[str, str] = {}

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("fleet not started")
        return self._proc.pid

    @property
    def control_url(self) -> str:
        if self._control_url is None:
            raise RuntimeError("fleet not started")
        return self._control_url

    @property
    def backend_urls(self) -> Mapping[str, str]:
        """``{name: "http://host:port"}`` with the ports the backends actually bound."""
        return dict(self._backend_urls)

    async def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("fleet already started")
        self._proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "aviator.testbed.fleetserver",
            "--spec",
            json.dumps(self.spec.to_json()),
            "--exit-on-stdin-eof",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            info = await self._read_ready()
        except BaseException:
            await self.stop()
            raise
        self._control_url = str(info["control"])
        self._backend_urls = {str(k): str(v) for k, v in info["backends"].items()}
        log.info("fleet started", pid=self._proc.pid, backends=len(self._backend_urls))

    async def _read_ready(self) -> Mapping[str, Any]:
        assert self._proc is not None
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                line = await self._proc.stdout.readline()
        except TimeoutError:
            raise FleetError(
                f"fleet process did not report ready within {self._ready_timeout_s} s"
            ) from None
        if not line:
            code = await self._proc.wait()
            raise FleetError(f"fleet process exited with code {code} before it was ready")
        try:
            info = json.loads(line)
        except ValueError as exc:
            raise FleetError(f"fleet process wrote an unreadable ready line: {line!r}") from exc
        if not isinstance(info, dict) or info.get("event") != "ready":
            raise FleetError(f"fleet process wrote an unexpected first line: {line!r}")
        return info

    async def stop(self) -> None:
        """Close the child's stdin (it stops itself), then SIGTERM, then SIGKILL; reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        for escalate in (None, proc.terminate, proc.kill):
            if escalate is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    escalate()
            try:
                async with asyncio.timeout(self._stop_timeout_s):
                    await proc.wait()
                break
            except TimeoutError:
                log.warning("fleet process slow to stop", pid=proc.pid, escalating=True)
        if proc.returncode is None:  # SIGKILL cannot be ignored: this wait always ends
            await proc.wait()
        self._proc = None
        self._control_url = None
        log.info("fleet stopped", pid=proc.pid, returncode=proc.returncode)

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- control API ----------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        url = self.control_url + path
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp,
        ):
            data = await resp.json()
            if resp.status != 200:
                raise FleetError(f"{method} {path}: {resp.status} {data.get('error', data)}")
            return data

    async def stats(self) -> dict[str, BackendStats]:
        """Every backend's own counters, read from the fleet process."""
        raw = await self._call("GET", "/testbed/stats")
        return {name: _stats_from_json(s) for name, s in raw.items()}

    async def set_phases(
        self, phases: Profile | Sequence[Phase], *, backend: str | None = None
    ) -> None:
        """Make ``backend`` (or every backend) follow ``phases`` from now on."""
        profile = phases if isinstance(phases, Profile) else Profile.of(phases)
        body: dict[str, Any] = {"phases": profile.to_json()}
        if backend is not None:
            body["backend"] = backend
        await self._call("POST", "/testbed/phase", body)

    async def restart_clock(self) -> None:
        """Every backend restarts its profile from now (line the schedule up with the load)."""
        await self._call("POST", "/testbed/clock")


def _stats_from_json(data: Mapping[str, Any]) -> BackendStats:
    fields = dict(data)
    fields["phase"] = Phase.from_json(fields["phase"])
    return BackendStats(**fields)

"""The demo's running system: backends, control plane and Envoy gateway, started in order and
always stopped in reverse (:class:`DemoStack`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
import structlog

from aviator.controlplane import ControlPlane, Settings
from aviator.demo.scenario import HOST_HEADER, WORKLOAD
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.errors import EnvoyAdminError, EnvoyError
from aviator.envoy.process import EnvoyProcess
from aviator.testbed.backend import BACKEND_HEADER, BackendSpec
from aviator.testbed.fleet import Fleet, FleetError
from aviator.testbed.fleetserver import FleetSpec
from aviator.xds.resources import GatewayConfig

log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 30.0


class DemoError(Exception):
    """The demo cannot start or keep running (a component failed); one line for the user."""


class DemoStack:
    """Backends, control plane and Envoy gateway, as ``async with DemoStack(...) as stack``.

    Invariant: leaving the ``async with`` (normally, on an error or on cancellation) stops
    Envoy, then the control plane, then the backends' process, and waits for each.
    ``source_dir`` must exist and hold the objects
    (:func:`~aviator.demo.scenario.write_objects`). ``envoy_dir``: where
    Envoy's config and log go (kept); None: a temporary directory removed on stop.
    """

    def __init__(
        self,
        backends: Sequence[BackendSpec],
        *,
        source_dir: Path,
        gateway_port: int,
        envoy_dir: Path | None = None,
    ) -> None:
        self.backends = tuple(backends)
        self.source_dir = source_dir
        self.gateway_port = gateway_port
        self.envoy_dir = envoy_dir
        self._exit = contextlib.AsyncExitStack()
        self._fleet: Fleet | None = None
        self._control_plane: ControlPlane | None = None
        self._cp_task: asyncio.Task[None] | None = None
        self._envoy: EnvoyProcess | None = None
        self.pids: dict[str, int] = {}

    @property
    def fleet(self) -> Fleet:
        assert self._fleet is not None, "not started"
        return self._fleet

    @property
    def control_plane(self) -> ControlPlane:
        assert self._control_plane is not None, "not started"
        return self._control_plane

    @property
    def envoy(self) -> EnvoyProcess:
        assert self._envoy is not None, "not started"
        return self._envoy

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def aviator_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.control_plane.admin_port}"

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._exit.aclose()

    async def _start(self) -> None:
        fleet = Fleet(FleetSpec(backends=self.backends))
        try:
            await self._exit.enter_async_context(fleet)
        except FleetError as exc:
            addresses = ", ".join(f"{b.host}:{b.port}" for b in self.backends)
            raise DemoError(f"cannot start the backends at {addresses}: {exc}") from exc
        self._fleet = fleet
        self.pids["backends"] = fleet.pid

        cp = ControlPlane(
            Settings(
                source=f"dir:{self.source_dir}",
                xds_address="127.0.0.1:0",
                admin_address="127.0.0.1:0",
                gateway=GatewayConfig(port=self.gateway_port, address="127.0.0.1"),
                allow_probe_loopback=True,  # the demo's backends are on 127.0.0.x
            )
        )
        started = asyncio.Event()
        self._control_plane = cp
        self._cp_task = asyncio.create_task(cp.run(started=started), name="demo:control-plane")
        self._exit.push_async_callback(self._stop_control_plane)
        waiter = asyncio.create_task(started.wait())
        try:
            await asyncio.wait([waiter, self._cp_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        self.check_running()
        assert cp.xds_port is not None

        bootstrap = render_bootstrap(
            xds_host="127.0.0.1",
            xds_port=cp.xds_port,
            node_id="aviator-demo-gateway",
            mode="gateway",
            listen_port=self.gateway_port,
            admin_port=0,
        )
        envoy = EnvoyProcess(bootstrap, workdir=self.envoy_dir, log_level="warning")
        try:
            await self._exit.enter_async_context(envoy)
        except EnvoyError as exc:
            raise DemoError(f"cannot start Envoy: {exc}") from exc
        self._envoy = envoy
        self.pids["envoy"] = envoy.pid

    async def _stop_control_plane(self) -> None:
        task = self._cp_task
        if task is None:
            return
        self.control_plane.stop()
        done, _ = await asyncio.wait([task], timeout=10.0)
        if not done:
            log.warning("the control plane did not stop within 10 s; cancelling it")
            task.cancel()
        # Its failure, if any, was reported by check_running() or is already propagating.
        await asyncio.gather(task, return_exceptions=True)

    def check_running(self) -> None:
        """Raise :class:`DemoError` if the control plane or Envoy has stopped on its own."""
        task = self._cp_task
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            raise DemoError(f"the control plane stopped: {_reason(exc)}")
        if self._envoy is not None and self._envoy.returncode is not None:
            code = self._envoy.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            tail = self._envoy.log_tail(10).strip() or "(its log is empty)"
            raise DemoError(f"Envoy {how}; log tail:\n{tail}")

    async def wait_serving(self, within: float = READY_TIMEOUT_S) -> None:
        """Wait until Aviator has measured every backend, Envoy holds them all, and a request
        through the gateway reaches one. Raises :class:`DemoError` after ``within`` seconds."""
        cluster = WORKLOAD.cluster_name
        expected = {f"{b.host}:{b.port}" for b in self.backends}
        last = "nothing checked yet"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                self.check_running()
                last = await self._serving_problem(http, cluster, expected)
                if not last:
                    return
                if loop.time() > deadline:
                    raise DemoError(f"the gateway was not serving after {within:g} s: {last}")
                await asyncio.sleep(0.2)

    async def _serving_problem(
        self, http: aiohttp.ClientSession, cluster: str, expected: set[str]
    ) -> str:
        """What still keeps the system from serving ("" once it serves)."""
        rows = {r["address"]: r for r in self.control_plane.endpoints_view()}
        unmeasured = sorted(a for a in expected if not rows.get(a, {}).get("samples"))
        if unmeasured:
            return f"Aviator has no probe results yet for {', '.join(unmeasured)}"
        try:
            hosts = {h.address: h for h in await self.envoy.admin.hosts(cluster)}
        except EnvoyAdminError as exc:
            return f"Envoy's admin endpoint: {exc}"
        missing = sorted(expected - set(hosts))
        if missing:
            return f"Envoy does not hold {', '.join(missing)} in cluster {cluster} yet"
        try:
            async with http.get(self.gateway_url, headers={"Host": HOST_HEADER}) as response:
                await response.read()
                if response.status != 200 or BACKEND_HEADER not in response.headers:
                    return f"GET {self.gateway_url} (Host: {HOST_HEADER}) → {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return (
                f"GET {self.gateway_url} (Host: {HOST_HEADER}): {type(exc).__name__} {exc} "
                f"(is port {self.gateway_port} busy?)"
            )
        return ""


def _reason(exc: BaseException | None) -> str:
    """The messages of ``exc``, with exception groups (the control plane's TaskGroup) opened."""
    if exc is None:
        return "no reason given"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"

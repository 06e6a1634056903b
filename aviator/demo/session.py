"""``aviator demo``: the whole system on one machine, with a real Envoy and a live table.

What runs, in start order (stopped in reverse order on every way out: the end of the run,
an error, Ctrl-C or SIGTERM):

1. three backends (:mod:`aviator.testbed`, one child process) at 127.0.0.2, .3, .4 port 8080
   (a busy address is skipped for the next one), with different service times; one of them
   serves ``SLOW_FACTOR`` times slower during the middle third of the run;
2. their Deployment, Pods and AviatorPolicy as YAML in a directory (``--workdir`` or a temporary
   one), read by the control plane's directory source;
3. the control plane, in this process (:class:`~aviator.controlplane.ControlPlane`);
4. an Envoy gateway bootstrapped by ``aviator bootstrap``'s renderer, which gets its listener,
   routes, cluster and weighted endpoints over ADS;
5. open-loop Poisson load through Envoy with ``Host: web.shop``, in this process: every request
   is recorded (intended send time, end, the pod that answered), and once per interval the
   table is drawn from those records, Aviator's endpoint view and Envoy's ``/clusters``.

The summary compares each pod's share of traffic before, during and after the slowdown
(:mod:`aviator.demo.view`). ``--json-summary FILE`` writes it as JSON, with the per-interval
frames and the process ids the demo started (all stopped by the time the file is written).

Building blocks other code reuses (the inspect tests do): :func:`demo_backends`,
:func:`write_objects`, :func:`pick_addresses`, :class:`DemoStack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

import aiohttp
import structlog
import yaml

from aviator.controlplane import ControlPlane, Settings
from aviator.demo.view import (
    Completion,
    DemoPod,
    Frame,
    Slowdown,
    build_frame,
    render_frame,
    render_summary,
    summarize,
)
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.errors import EnvoyAdminError, EnvoyError
from aviator.envoy.process import EnvoyProcess
from aviator.model import WorkloadKey
from aviator.testbed.backend import BACKEND_HEADER, BackendSpec, FleetSpec
from aviator.testbed.fleet import Fleet, FleetError
from aviator.testbed.profile import Phase, Profile
from aviator.xds.resources import GatewayConfig

log = structlog.get_logger(__name__)

WORKLOAD = WorkloadKey("shop", "web")
HOST_HEADER = f"{WORKLOAD.name}.{WORKLOAD.namespace}"
DEFAULT_DURATION_S = 40.0
DEFAULT_RATE = 200.0
DEFAULT_INTERVAL_S = 2.0
DEFAULT_FIRST_ADDRESS = "127.0.0.2"
DEFAULT_BACKEND_PORT = 8080
DEFAULT_GATEWAY_PORT = 10000
# Pods and their mean service times. The slowed one is the fastest otherwise, so it starts
# with the largest share and its loss is plain to see. Capacity 8 each: at the default rate
# the fleet runs at ~15% of its capacity, but the slowed pod (100 ms, 80 req/s at most) would
# be overloaded with the share it had before.
PODS: tuple[tuple[str, float], ...] = (("web-a", 0.015), ("web-b", 0.025), ("web-c", 0.010))
SLOWED_POD = "web-c"
SLOW_FACTOR = 10.0
CAPACITY = 8
LATENCY_THRESHOLD = "50ms"
PING_INTERVAL = "500ms"
# A RIF of 1-3 on pods that serve 8 at once is noise, not load: with the default (1), the pod
# with the highest RIF of three is "hot" most of the time and the floor weight rotates between
# the pods (measured: weights swinging 1000 <-> 50 every second before the slowdown).
MIN_HOT_RIF = 3
REQUEST_DEADLINE_S = 5.0
READY_TIMEOUT_S = 30.0
LAST_LOOPBACK = 254


class DemoError(Exception):
    """The demo cannot start or keep running (a component failed); one line for the user."""


# -- plan: addresses, profiles, objects -------------------------------------------------------


def port_free(host: str, port: int) -> bool:
    """True if a server could listen on ``host:port`` now (SO_REUSEADDR, as aiohttp sets it,
    so a socket in TIME_WAIT from an earlier run does not count as busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pick_addresses(
    count: int,
    *,
    first: str = DEFAULT_FIRST_ADDRESS,
    port: int = DEFAULT_BACKEND_PORT,
    is_free: Callable[[str, int], bool] = port_free,
) -> list[str]:
    """``count`` loopback IPs from ``first`` up (127.0.0.N) whose ``port`` is free.

    Busy ones are skipped. Raises ValueError if ``first`` is not a 127.0.0.N address
    or fewer than ``count`` are free up to 127.0.0.254.
    """
    prefix, _, last = first.rpartition(".")
    if prefix != "127.0.0" or not last.isdigit() or not 1 <= int(last) <= LAST_LOOPBACK:
        raise ValueError(f"--first-address must be 127.0.0.N with N in 1..254, got {first!r}")
    found: list[str] = []
    busy: list[str] = []
    for n in range(int(last), LAST_LOOPBACK + 1):
        host = f"127.0.0.{n}"
        if is_free(host, port):
            found.append(host)
            if len(found) == count:
                if busy:
                    log.warning("skipped busy addresses", busy=busy, port=port)
                return found
        else:
            busy.append(host)
    raise ValueError(
        f"need {count} loopback addresses with port {port} free from {first} up; "
        f"busy: {', '.join(busy) or 'none'} (stop what listens there or pass --first-address)"
    )


def demo_backends(
    hosts: Sequence[str],
    *,
    port: int = DEFAULT_BACKEND_PORT,
    slowdown: tuple[float, float] | None = None,
    seed: int = 0,
) -> tuple[BackendSpec, ...]:
    """The demo's backends (``PODS``) at ``hosts``; ``SLOWED_POD`` slows down ``SLOW_FACTOR``
    times from ``slowdown[0]`` to ``slowdown[1]`` seconds after the fleet's clock (re)starts.
    ``slowdown=None``: every backend keeps its speed (the inspect tests want steady weights).
    """
    if len(hosts) != len(PODS):
        raise ValueError(f"need {len(PODS)} hosts, got {len(hosts)}")
    specs = []
    for (name, service_s), host in zip(PODS, hosts, strict=True):
        base = Phase(mean_service_s=service_s, capacity=CAPACITY)
        if name == SLOWED_POD and slowdown is not None:
            profile = Profile.window(
                base, slowdown[0], slowdown[1], mean_service_s=service_s * SLOW_FACTOR
            )
        else:
            profile = Profile((base,))
        specs.append(BackendSpec(name=name, host=host, port=port, profile=profile, seed=seed))
    return tuple(specs)


def demo_objects(backends: Sequence[BackendSpec]) -> dict[str, Any]:
    """File name → YAML document(s): the Deployment, its Pods (one per backend) and the policy."""
    labels = {"app": WORKLOAD.name}
    ports = [{"name": "http", "containerPort": backends[0].port}]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": WORKLOAD.name, "namespace": WORKLOAD.namespace},
        "spec": {
            "replicas": len(backends),
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "demo", "ports": ports}]},
            },
        },
    }
    pods = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": b.name,
                    "namespace": WORKLOAD.namespace,
                    "labels": {**labels, "topology.kubernetes.io/zone": f"zone-{i}"},
                },
                "spec": {
                    "containers": [
                        {"name": "web", "ports": [{"name": "http", "containerPort": b.port}]}
                    ]
                },
                "status": {
                    "phase": "Running",
                    "podIP": b.host,
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
            for i, b in enumerate(backends)
        ],
    }
    policy = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": WORKLOAD.name, "namespace": WORKLOAD.namespace},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKLOAD.name},
            "latencyThreshold": LATENCY_THRESHOLD,
            "pingInterval": PING_INTERVAL,
            "port": "http",
            "weigher": {"minHotRif": MIN_HOT_RIF},
        },
    }
    return {"deployment.yaml": deployment, "pods.yaml": pods, "policy.yaml": policy}


_FILE_COMMENTS = {
    "deployment.yaml": "# The workload the demo balances. Written by `aviator demo`.",
    "pods.yaml": "# The Deployment's pods: their IPs are loopback addresses where the demo's "
    "backends listen.",
    "policy.yaml": "# Latency-aware balancing for shop/web. minHotRif: a RIF of 1-3 on pods that "
    "serve 8 requests\n# at once is noise, not load (the default, 1, makes the busiest of three "
    "pods hot most of the time).",
}


def write_objects(directory: Path, backends: Sequence[BackendSpec]) -> None:
    """Write :func:`demo_objects` into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, doc in demo_objects(backends).items():
        text = yaml.safe_dump(doc, sort_keys=False)
        (directory / name).write_text(f"{_FILE_COMMENTS[name]}\n{text}")


# -- the running system -------------------------------------------------------------------------


class DemoStack:
    """Backends, control plane and Envoy gateway, as ``async with DemoStack(...) as stack``.

    Invariant: leaving the ``async with`` (normally, on an error or on cancellation) stops
    Envoy, then the control plane, then the backends' process, and waits for each.
    ``source_dir`` must exist and hold the objects (:func:`write_objects`). ``envoy_dir``: where
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


# -- load ------------------------------------------------------------------------------------


class OpenLoopLoad:
    """Poisson arrivals at ``rate`` per second for ``duration_s``, each sent at its intended
    time whatever is still outstanding; ``completions`` grows in the order requests end.

    Latency runs from the intended send time, so a generator running late counts against the
    result. A request not answered ``deadline_s`` after its intended time is a ``timeout``.
    """

    def __init__(
        self,
        url: str,
        *,
        host: str,
        rate: float,
        duration_s: float,
        seed: int = 0,
        deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        self.url = url
        self.host = host
        self.rate = rate
        self.duration_s = duration_s
        self.deadline_s = deadline_s
        self._rng = random.Random(f"aviator-demo:{seed}")
        self.completions: list[Completion] = []
        self.sent = 0

    async def run(self, t0: float, stop: asyncio.Event) -> float:
        """Offer the load from loop time ``t0`` until ``duration_s`` or ``stop``; return the
        seconds of load offered. On ``stop``, requests still outstanding are abandoned."""
        loop = asyncio.get_running_loop()
        outstanding: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=800, limit_per_host=0, keepalive_timeout=30)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )
        headers = {"Host": self.host}

        async def one(offset: float) -> None:
            intended = t0 + offset
            error: str | None = None
            backend: str | None = None
            try:
                async with (
                    asyncio.timeout_at(intended + self.deadline_s),
                    session.get(self.url, headers=headers) as response,
                ):
                    await response.read()
                    backend = response.headers.get(BACKEND_HEADER)
                    if not 200 <= response.status < 300:
                        error = f"http_{response.status}"
            except TimeoutError:
                error = "timeout"
            except aiohttp.ClientConnectorError:
                error = "connect"
            except (aiohttp.ClientError, OSError) as exc:
                error = type(exc).__name__
            done = max(loop.time() - t0, offset)
            self.completions.append(Completion(offset, done, backend, error))

        offset = 0.0
        ran = self.duration_s
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while True:
                offset += self._rng.expovariate(self.rate)
                if offset >= self.duration_s:
                    break
                delay = t0 + offset - loop.time()
                if delay > 0:
                    done, _ = await asyncio.wait([stop_wait], timeout=delay)
                    if done:
                        ran = loop.time() - t0
                        break
                elif self.sent % 32 == 0:
                    await asyncio.sleep(0)  # running late: still let responses be read
                task = asyncio.create_task(one(offset))
                self.sent += 1
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            # Every request ends by its deadline; a stop abandons the stragglers.
            while outstanding and not stop.is_set():
                await asyncio.wait([stop_wait, *outstanding], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            for task in outstanding:
                task.cancel()
            await asyncio.gather(*outstanding, stop_wait, return_exceptions=True)
            await session.close()
        return ran


# -- the live view -----------------------------------------------------------------------------

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


class Screen:
    """Where frames go: redrawn in place (under the banner) on a terminal, appended otherwise."""

    def __init__(self, out: TextIO, banner: str) -> None:
        self._out = out
        self._banner = banner
        self.tty = out.isatty()

    def line(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def frame(self, text: str) -> None:
        if self.tty:
            self._out.write(f"{_CLEAR}{self._banner}\n\n{text}\n")
        else:
            self._out.write(text + "\n\n")
        self._out.flush()


async def _envoy_hosts(envoy: EnvoyProcess) -> dict[str, dict[str, Any]]:
    """Envoy's hosts of the demo cluster by address; empty if the admin endpoint fails (the
    table shows '-' for one interval rather than stopping the demo)."""
    try:
        hosts = await envoy.admin.hosts(WORKLOAD.cluster_name)
    except EnvoyAdminError as exc:
        log.warning("cannot read Envoy's clusters", error=str(exc))
        return {}
    return {h.address: {"weight": h.weight, "rq_active": h.rq_active} for h in hosts}


async def _watch(
    stack: DemoStack,
    load: OpenLoopLoad,
    load_task: asyncio.Task[float],
    *,
    t0: float,
    options: DemoOptions,
    pods: Sequence[DemoPod],
    slowdown: Slowdown,
    screen: Screen,
) -> list[Frame]:
    """Draw a frame every ``interval_s`` until the load ends; raise :class:`DemoError` (after
    cancelling the load) if a component stops on its own."""
    loop = asyncio.get_running_loop()
    frames: list[Frame] = []
    cursor = 0
    tick = 1
    try:
        while not load_task.done():
            next_at = t0 + tick * options.interval_s
            await asyncio.wait([load_task], timeout=max(next_at - loop.time(), 0.0))
            if load_task.done():
                break
            stack.check_running()
            ended = load.completions[cursor:]
            cursor += len(ended)
            frame = build_frame(
                t_s=loop.time() - t0,
                duration_s=options.duration_s,
                interval_s=options.interval_s,
                rate=options.rate,
                slowdown=slowdown,
                pods=pods,
                ended=ended,
                aviator=stack.control_plane.endpoints_view(),
                envoy=await _envoy_hosts(stack.envoy),
            )
            frames.append(frame)
            screen.frame(render_frame(frame))
            tick += 1
    finally:
        if not load_task.done():
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
    return frames


# -- the command -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's settings, checked once. ``hosts`` are the backends' loopback IPs."""

    duration_s: float = DEFAULT_DURATION_S
    rate: float = DEFAULT_RATE
    interval_s: float = DEFAULT_INTERVAL_S
    hosts: tuple[str, ...] = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    backend_port: int = DEFAULT_BACKEND_PORT
    gateway_port: int = DEFAULT_GATEWAY_PORT
    workdir: Path | None = None
    json_summary: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 6 <= self.duration_s <= 3600:
            raise ValueError(f"--duration must be in 6..3600 seconds, got {self.duration_s:g}")
        if not 0 < self.rate <= 2000:
            raise ValueError(f"--rate must be in (0, 2000] requests/s, got {self.rate:g}")
        if not 0.2 <= self.interval_s <= self.duration_s:
            raise ValueError(
                f"--interval must be in 0.2..duration seconds, got {self.interval_s:g}"
            )

    @property
    def slowdown(self) -> Slowdown:
        """The middle third of the run."""
        third = round(self.duration_s / 3, 1)
        return Slowdown(SLOWED_POD, third, round(self.duration_s - third, 1), SLOW_FACTOR)


class _Control:
    """What the signal handler and the run share (one event loop: no locking)."""

    def __init__(self, main_task: asyncio.Task[Any]) -> None:
        self.stage = "starting"  # then "loading", then "stopping"
        self.interrupted = False
        self.stop = asyncio.Event()
        self._main_task = main_task

    def on_signal(self) -> None:
        self.interrupted = True
        if self.stage == "starting":
            self._main_task.cancel()
        elif self.stage == "loading":
            self.stop.set()


async def run_demo(options: DemoOptions, *, out: TextIO) -> int:
    """Run the whole demo; 0 when it ran to the end, 130 when interrupted (SIGINT/SIGTERM).

    A signal during the load ends it early (the summary still prints); during start-up it
    cancels the start; during shutdown it is ignored (shutdown is bounded by timeouts).
    Raises :class:`DemoError` when a component fails to start or stops on its own.
    """
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    control = _Control(main_task)
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, control.on_signal)
    try:
        with contextlib.ExitStack() as dirs:
            if options.workdir is not None:
                workdir = options.workdir
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                workdir = Path(
                    dirs.enter_context(tempfile.TemporaryDirectory(prefix="aviator-demo-"))
                )
            return await _run_in(workdir, options, out, control)
    except asyncio.CancelledError:
        if not control.interrupted:
            raise
        print("aviator demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _banner(stack: DemoStack, options: DemoOptions) -> str:
    s = options.slowdown
    return "\n".join(
        [
            f"aviator demo: Deployment {WORKLOAD} ({len(stack.backends)} pods) behind a real "
            f"Envoy; {s.pod} serves {s.factor:g}x slower from t={s.start_s:g}s to "
            f"t={s.end_s:g}s",
            f"  try:     curl -H 'Host: {HOST_HEADER}' {stack.gateway_url}/",
            f"  inspect: aviator inspect --envoy-admin {stack.envoy.admin_url} "
            f"--aviator-admin {stack.aviator_admin_url}",
            f"  objects: {stack.source_dir}",
        ]
    )


async def _run_in(workdir: Path, options: DemoOptions, out: TextIO, control: _Control) -> int:
    loop = asyncio.get_running_loop()
    slowdown = options.slowdown
    backends = demo_backends(
        options.hosts,
        port=options.backend_port,
        slowdown=(slowdown.start_s, slowdown.end_s),
        seed=options.seed,
    )
    pods = [
        DemoPod(b.name, f"{b.host}:{b.port}", b.profile.phases[0].mean_service_s * 1000)
        for b in backends
    ]
    source_dir = workdir / "source"
    write_objects(source_dir, backends)
    envoy_dir = workdir / "envoy" if options.workdir is not None else None
    screen = Screen(out, "")
    screen.line(
        "aviator demo: starting "
        + ", ".join(f"{p.name} at {p.address} ({p.service_ms:g} ms)" for p in pods)
        + ", the control plane and Envoy"
    )
    async with DemoStack(
        backends, source_dir=source_dir, gateway_port=options.gateway_port, envoy_dir=envoy_dir
    ) as stack:
        banner = _banner(stack, options)
        screen = Screen(out, banner)
        screen.line(banner)
        screen.line("waiting until Envoy serves the pods with Aviator's weights...")
        await stack.wait_serving()
        await stack.fleet.restart_clock()  # the slowdown's clock starts with the load
        control.stage = "loading"
        t0 = loop.time()
        load = OpenLoopLoad(
            stack.gateway_url + "/",
            host=HOST_HEADER,
            rate=options.rate,
            duration_s=options.duration_s,
            seed=options.seed,
        )
        load_task = asyncio.create_task(load.run(t0, control.stop), name="demo:load")
        frames = await _watch(
            stack,
            load,
            load_task,
            t0=t0,
            options=options,
            pods=pods,
            slowdown=slowdown,
            screen=screen,
        )
        ran_s = load_task.result()
        control.stage = "stopping"
        pids = dict(stack.pids)
        gateway_url = stack.gateway_url
    summary = summarize(
        load.completions,
        pods=pods,
        slowdown=slowdown,
        duration_s=options.duration_s,
        ran_s=ran_s,
        rate=options.rate,
        interrupted=control.interrupted,
    )
    screen.line("")
    screen.line(render_summary(summary))
    if options.json_summary is not None:
        doc = {
            **summary.to_json(),
            "backends": [
                {"pod": p.name, "address": p.address, "service_ms": p.service_ms} for p in pods
            ],
            "gateway": gateway_url,
            "host": HOST_HEADER,
            "sent": load.sent,
            "processes": pids,  # all stopped before this file is written
            "frames": [f.to_json() for f in frames],
        }
        try:
            options.json_summary.write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as exc:
            raise DemoError(f"cannot write --json-summary {options.json_summary}: {exc}") from exc
    return 130 if control.interrupted else 0

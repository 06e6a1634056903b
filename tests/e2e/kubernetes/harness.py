"""The end-to-end harness of issue 11 ("Show"): Kubernetes → ``aviator run`` → a real Envoy.

Every part is the real one, started the way a user starts it:

- the API server is the session's :class:`~aviator.testbed.kubeapi.KubeTestEnv` (kube-apiserver
  1.20.2, etcd, the controller-manager that turns Deployments and StatefulSets into Pods), with
  ``dist/crd.yaml`` and ``dist/operator.yaml`` applied (``aviator_install``);
- Aviator is ``python -m aviator run --source kubernetes --kubeconfig K`` as a subprocess, K
  holding the token of the ServiceAccount ``operator.yaml`` makes (so the RBAC that ships is
  what is tested), on free loopback ports, with ``--allow-probe-loopback`` (the pods' IPs are
  127.x.y.z). Its server address is an :class:`ApiProxy` in front of the API server, so a test
  can kill Aviator's connections (watches included) without touching the server;
- the gateway is a real Envoy whose bootstrap is ``aviator bootstrap --mode gateway`` output;
- the pods' applications are testbed backends (:mod:`aviator.testbed.backend`, with the probing
  agent, as users' apps run it) on distinct 127.x.y.z addresses, fast and slow ones, each
  listening on the pod template's two container ports (``http`` and ``alt``), counting the
  probes they answer (:class:`BackendPool`);
- the kubelet's part (an IP, Running, Ready) is :meth:`KubeTestEnv.set_pod_status`;
  :class:`App` assigns each pod the controller made a free backend address;
- the traffic is the testbed's open loop (:func:`aviator.testbed.openloop.offer`: Poisson
  arrivals sent at their intended time whatever is outstanding, a deadline each: Envoy's
  route timeout, 15 s), through the gateway, recording for every request the backend that
  answered or how it failed, and when this process's loop stalled (:class:`Traffic`). The
  backends run in the test's process (not a fleet process) so that they can count probes.

The user's own changes (Deployments, StatefulSets, policies, ``kubectl scale``) go through the
machine's kubectl as admin, with a kubeconfig whose context namespace is the test's (the
policies name no namespace, as the product's example does not). Real processes need real
time: every wait polls a condition against a deadline (:func:`until`), and how long Envoy took
to follow a change is measured by polling its admin ``/clusters`` and ``/config_dump``.

Start everything with :func:`stack` (an async context manager), or take the ``k8s_stack``
fixture (``k8s_stack = harness.k8s_stack`` in a test module). On teardown ``aviator run``
must exit 0 on SIGTERM with no traceback in its log, and Envoy must have rejected no CDS or
LDS update. Figures are printed as ``[e2e-k8s] ...`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import socket
import struct
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web
from aviator_agent import DEFAULT_PROBE_PATH, LoadTracker, aiohttp_middleware

from aviator.envoy.process import EnvoyProcess, free_port
from aviator.testbed.backend import Backend, BackendSpec
from aviator.testbed.fleet import Fleet
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.kubeapi import KubeTestEnv
from aviator.testbed.loadspec import LoadSpec
from aviator.testbed.openloop import offer
from aviator.testbed.profile import Profile
from tests.kubeapi.fixtures import AviatorInstall

__all__ = [
    "ALT",
    "HTTP",
    "SHARE_PING_INTERVAL",
    "SHARE_WINDOW_S",
    "WARMUP_S",
    "ApiProxy",
    "App",
    "AviatorRun",
    "BackendPool",
    "Gateway",
    "Stack",
    "Traffic",
    "fast_share",
    "k8s_stack",
    "policy_yaml",
    "stack",
    "took",
    "until",
]

ROOT = Path(__file__).resolve().parents[3]
HTTP, ALT = "http", "alt"  # the pod template's two container port names
FAST_S, SLOW_S = 0.002, 0.150  # mean service times of the fast and the slow backends
T = TypeVar("T")


async def until(
    check: Callable[[], Awaitable[T]], what: str, *, within: float = 20.0, every: float = 0.02
) -> tuple[T, float]:
    """Poll ``check`` until it returns a truthy value; that value and the seconds it took.
    Fails the test, naming ``what`` and the last value, after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        value = await check()
        if value:
            return value, loop.time() - start
        if loop.time() - start > within:
            raise AssertionError(f"not within {within:g} s: {what}; last value: {value!r}")
        await asyncio.sleep(every)


# --- the pods' applications -------------------------------------------------------------------


@dataclass
class PodAddress:
    """One pod's address: a backend on each of the two ports; ``probes`` counts the probes
    that reached either of them (the agent's probe path)."""

    ip: str
    slow: bool
    name: str
    probes: int = 0


class BackendPool:
    """Testbed backends on distinct loopback addresses ``127.A.B.1``, ``127.A.B.2``, ... (A, B
    random per pool, so concurrent test runs on the machine do not meet), ``fast`` of them
    answering in ~2 ms and ``slow`` in ~150 ms (exponential service times, 32 at once), each
    on :attr:`ports` ``{"http": P, "alt": Q}``. :meth:`take` hands out a free address.

    They run in a fleet process of their own (:class:`~aviator.testbed.fleet.Fleet`), so that
    the test's own loop (traffic, polling) cannot delay their answers: on a loaded machine its
    stalls timed fast pods' probes out. With ``count_probes`` they run in the test's process
    instead, where each :class:`PodAddress` counts the probes it answers.
    """

    def __init__(self, *, fast: int, slow: int, count_probes: bool = False) -> None:
        self.count_probes = count_probes
        self._fleet: Fleet | None = None
        base = f"127.{secrets.randbelow(150) + 100}.{secrets.randbelow(250) + 1}"
        self.addresses = [
            PodAddress(f"{base}.{i + 1}", slow=i >= fast, name=("slow" if i >= fast else "fast"))
            for i in range(fast + slow)
        ]
        for a in self.addresses:
            a.name = f"{a.name}-{a.ip}"
        first = self.addresses[0].ip
        http = free_port(first)
        alt = free_port(first)
        while alt == http:
            alt = free_port(first)
        self.ports = {HTTP: http, ALT: alt}
        self._taken: set[str] = set()
        self._backends: list[Backend] = []

    def by_ip(self, ip: str) -> PodAddress:
        (found,) = [a for a in self.addresses if a.ip == ip]
        return found

    @property
    def fast_names(self) -> set[str]:
        return {a.name for a in self.addresses if not a.slow}

    def take(self, *, slow: bool | None = None) -> PodAddress:
        """A free address (a slow one, a fast one, or either), now taken."""
        for a in self.addresses:
            if a.ip not in self._taken and (slow is None or a.slow == slow):
                self._taken.add(a.ip)
                return a
        raise AssertionError(f"no free {'slow' if slow else 'fast'} address left in the pool")

    def release(self, ip: str) -> None:
        self._taken.discard(ip)

    async def start(self) -> None:
        if not self.count_probes:
            specs = tuple(
                BackendSpec(
                    f"{address.name}:{port}" if port != self.ports[HTTP] else address.name,
                    host=address.ip,
                    port=port,
                    profile=_profile(address),
                )
                for address in self.addresses
                for port in self.ports.values()
            )
            self._fleet = Fleet(FleetSpec(backends=specs))
            await self._fleet.start()
            return
        for address in self.addresses:
            for port in self.ports.values():
                backend = self._backend(address, port)
                await backend.start()
                self._backends.append(backend)

    async def close(self) -> None:
        if self._fleet is not None:
            await self._fleet.stop()
            self._fleet = None
        for backend in self._backends:
            await backend.stop()
        self._backends.clear()

    def _backend(self, address: PodAddress, port: int) -> Backend:
        spec = BackendSpec(address.name, host=address.ip, port=port, profile=_profile(address))
        # As aviator.testbed.backend.agent_backend builds it, with a probe counter outside.
        tracker = LoadTracker(capacity=32)

        @web.middleware
        async def count_probes(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == DEFAULT_PROBE_PATH:
                address.probes += 1
            response: web.StreamResponse = await handler(request)
            return response

        return Backend(
            spec,
            middlewares=[count_probes, web.middleware(aiohttp_middleware(tracker))],
            job_tracker=tracker,
        )


def _profile(address: PodAddress) -> Profile:
    return Profile.constant(SLOW_S if address.slow else FAST_S, capacity=32)


# --- a proxy in front of the API server ---------------------------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0): what a killed connection looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ApiProxy:
    """A TCP proxy to the API server (TLS passes through: the certificate names 127.0.0.1).

    :meth:`cut` resets every connection through it (Aviator's watches die mid-stream) and
    resets each new one at once until :meth:`restore`: the API server runs on and takes
    changes that Aviator cannot see meanwhile. ``connections`` counts those accepted.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self._open = True
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> int:
        """Reset every open connection and refuse new ones; how many were reset."""
        self._open = False
        pairs = list(self._pairs)
        for down, up in pairs:
            _reset(down)
            _reset(up)
        self._pairs.clear()
        return len(pairs)

    def restore(self) -> None:
        self._open = True

    def is_cut(self) -> bool:
        return not self._open

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut():
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:  # the API server is down: so is the proxy's answer
            _reset(writer)
            return
        if self.is_cut():  # cut while connecting
            _reset(writer)
            _reset(up_writer)
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        self._pairs.discard(pair)
        for w in pair:
            w.close()


# --- aviator run ------------------------------------------------------------------------------


@dataclass
class AviatorRun:
    """``aviator run --source kubernetes`` as a subprocess; its output goes to ``log_path``."""

    proc: asyncio.subprocess.Process
    admin_port: int
    xds_port: int
    log_path: Path

    @classmethod
    async def start(
        cls,
        kubeconfig: Path,
        namespaces: Iterable[str],
        workdir: Path,
        *,
        within: float = 60.0,
    ) -> AviatorRun:
        """Start it and wait for ``/readyz`` 200 (every informer synced, xDS listening)."""
        admin, xds = free_port(), free_port()
        log_path = workdir / "aviator-run.log"
        argv = [
            sys.executable, "-m", "aviator", "run", "--source", "kubernetes",
            "--kubeconfig", str(kubeconfig),
            *(arg for ns in namespaces for arg in ("--namespace", ns)),
            "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
            "--allow-probe-loopback",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        run = cls(proc, admin, xds, log_path)
        try:
            await until(run.ready, "aviator run ready (/readyz 200)", within=within, every=0.1)
        except BaseException:
            await run.stop()
            raise
        return run

    async def ready(self) -> bool:
        """``/readyz`` answers 200 (fails the test if the process has exited)."""
        if self.proc.returncode is not None:
            raise AssertionError(f"aviator run exited {self.proc.returncode}:\n{self.log_tail()}")
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r,
            ):
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def view(self, name: str) -> Any:
        """``/debug/<name>`` as JSON (``policies``, ``endpoints``, ``problems``, ``proxies``)."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.admin_port}/debug/{name}") as r,
        ):
            assert r.status == 200, f"/debug/{name}: {r.status}"
            return json.loads(await r.text())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_events(self, event: str) -> list[str]:
        """The log lines of one event (structlog's ``event`` name, e.g. k8s.informer.relist)."""
        return [line for line in self.log_text().splitlines() if event in line]

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL after 20 s; the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


# --- the gateway ------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A real Envoy from ``aviator bootstrap --mode gateway``, listening on 127.0.0.1:port."""

    envoy: EnvoyProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, xds_port: int, workdir: Path) -> AsyncIterator[Gateway]:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aviator", "bootstrap", "--mode", "gateway",
            "--xds", f"127.0.0.1:{xds_port}", "--node-id", f"e2e-gateway-{port}",
            "--listen", str(port), "--listen-address", "127.0.0.1", "--admin", str(free_port()),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, f"aviator bootstrap failed: {err.decode()}"
        path = workdir / "bootstrap.yaml"
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, out)
        async with EnvoyProcess(path, workdir=workdir) as envoy:
            yield cls(envoy, port)

    async def hosts(self, cluster: str) -> frozenset[str]:
        """``ip:port`` of every host Envoy holds for ``cluster`` (``/clusters``)."""
        return frozenset(
            h.address for h in await self.envoy.admin.clusters() if h.cluster == cluster
        )

    async def clusters(self) -> frozenset[str]:
        """The dynamic clusters Envoy holds, active or warming (``/config_dump``)."""
        dump = await self.envoy.admin.config_dump(include_eds=False)
        (clusters,) = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
        names = {
            c["cluster"]["name"]
            for key in ("dynamic_active_clusters", "dynamic_warming_clusters")
            for c in clusters.get(key, [])
        }
        return frozenset(names)

    async def wait_hosts(self, cluster: str, want: set[str], *, within: float = 20.0) -> float:
        """Seconds until Envoy holds exactly ``want`` for ``cluster``."""

        async def holds() -> bool:
            return await self.hosts(cluster) == want

        try:
            _, took = await until(holds, f"Envoy holds {sorted(want)} for {cluster}", within=within)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it holds {sorted(await self.hosts(cluster))}") from None
        return took

    async def serves(self, host: str) -> bool:
        """One request for ``Host: host`` answered 200 (the listener and route are there)."""
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(self.url, headers={"Host": host}) as r,
            ):
                return r.status == 200
        except aiohttp.ClientError:
            return False


# --- traffic ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """One request: when it was meant to go (loop time), who answered, how it failed, and
    how late the generator sent it (a starved test process shows here, not in Envoy)."""

    at: float
    backend: str | None
    error: str | None
    lag: float = 0.0
    latency: float = 0.0  # from the intended send time to the end


@dataclass
class Traffic:
    """Open-loop traffic through the gateway (``async with``), every request recorded.

    A request fails if it is not answered 2xx within ``deadline_s`` of its intended send time.
    The default is Envoy's own route timeout (15 s): what these tests look for is a request
    that the data path fails (Envoy answers 404 or 503 at once when it has no route, cluster
    or host), not one that a starved machine (2 cores, an API server starting, other test
    runs) answers late: on such a machine 5 s was exceeded by a few requests while the API
    server restarted (the slowest that succeeded took 5.2 s), with Envoy's hosts unchanged.
    :meth:`worst_latency` reports how late the slowest answer came.
    """

    url: str
    host: str
    rate: float = 60.0
    seed: int = 0
    deadline_s: float = 15.0
    records: list[Sent] = field(default_factory=list)
    _t0: float = 0.0
    _task: asyncio.Task[int] | None = None
    _monitor: asyncio.Task[None] | None = None
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds)
    _pending: dict[float, float] = field(default_factory=dict)  # offset -> send lag

    async def __aenter__(self) -> Traffic:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        spec = LoadSpec(
            targets=(self.url,), duration_s=3600, rate=self.rate, host=self.host,
            seed=self.seed, deadline_s=self.deadline_s,
        )  # fmt: skip
        self._task = asyncio.create_task(offer(spec, self, t0=self._t0), name="e2e traffic")
        self._monitor = asyncio.create_task(self._watch_loop(), name="e2e loop monitor")
        return self

    async def _watch_loop(self) -> None:
        """Record when this process's event loop (the generator's, and the backends') was
        held up for more than 0.25 s: a machine too busy to run the test, not Envoy."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.05)
            late = loop.time() - before - 0.05
            if late > 0.25:
                self.stalls.append((before - self._t0, late))

    async def __aexit__(self, *exc: object) -> None:
        """Stop sending; every request already sent ends first (by its deadline)."""
        assert self._task is not None
        waiting = set(self._pending)
        deadline = asyncio.get_running_loop().time() + self.deadline_s + 1.0
        while waiting & self._pending.keys() and asyncio.get_running_loop().time() < deadline:
            if self._task.done():
                break
            await asyncio.sleep(0.01)
        for task in (self._task, self._monitor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.records.sort(key=lambda s: s.at)

    # The Observer protocol of aviator.testbed.openloop.
    def on_sent(self, offset: float, lag: float, actual: float) -> None:
        self._pending[offset] = lag

    def on_done(
        self, offset: float, latency: float, error: str | None, backend: str | None
    ) -> None:
        lag = self._pending.pop(offset, 0.0)
        self.records.append(Sent(self._t0 + offset, backend, error, lag, latency))

    def between(self, start: float = 0.0, end: float = float("inf")) -> list[Sent]:
        return [s for s in self.records if start <= s.at < end]

    def failed(self, start: float = 0.0, end: float = float("inf")) -> list[Sent]:
        return [s for s in self.between(start, end) if s.error is not None]

    def failures(self, start: float = 0.0, end: float = float("inf")) -> str:
        """The failed requests, summed up for an assertion message: how many of each kind,
        when (seconds after the first request), and how late the generator sent them."""
        failed = self.failed(start, end)
        if not failed:
            return "no failed request"
        kinds: dict[str, int] = {}
        for f in failed:
            kinds[f.error or ""] = kinds.get(f.error or "", 0) + 1
        stalls = ", ".join(f"{d:.2f} s at {t:.1f} s" for t, d in self.stalls[:10]) or "none"
        return (
            f"{len(failed)} of {len(self.between(start, end))} requests failed {kinds}, "
            f"sent {failed[0].at - self._t0:.1f}-{failed[-1].at - self._t0:.1f} s into the "
            f"traffic, at most {max(f.lag for f in failed):.2f} s late; this process's loop "
            f"stalled: {stalls}"
        )

    def worst_latency(self) -> float:
        return max((s.latency for s in self.records if s.error is None), default=0.0)

    def share(self, names: set[str], start: float, end: float) -> tuple[int, int]:
        """(requests answered by a backend in ``names``, requests) in [start, end)."""
        window = self.between(start, end)
        return sum(1 for s in window if s.backend in names), len(window)


# --- the user's side: workloads and policies, with kubectl -------------------------------------


def policy_yaml(
    name: str,
    target: str,
    *,
    kind: str = "Deployment",
    port: str = HTTP,
    latency_threshold: str = "50ms",
    ping_interval: str = "300ms",
) -> str:
    """An AviatorPolicy with no namespace (it lands in the kubectl context's)."""
    return textwrap.dedent(f"""\
        apiVersion: aviator.io/v1alpha1
        kind: AviatorPolicy
        metadata: {{name: {name}}}
        spec:
          targetRef: {{apiVersion: apps/v1, kind: {kind}, name: {target}}}
          latencyThreshold: {latency_threshold}
          pingInterval: {ping_interval}
          port: {port}
        """)


@dataclass
class App:
    """A Deployment or StatefulSet made with kubectl, and its pods' addresses.

    :meth:`make_ready` plays the kubelet: each pod the controller made gets a free address
    of the pool (``slow`` picks which kind), Running and Ready. ``addresses`` maps pod names
    to their IPs.
    """

    stack: Stack
    name: str
    kind: Literal["Deployment", "StatefulSet"] = "Deployment"
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> str:
        """The Envoy cluster of a policy targeting it: ``<namespace>/<name>``."""
        return f"{self.stack.namespace}/{self.name}"

    @property
    def host(self) -> str:
        """The Host header the gateway routes to it."""
        return f"{self.name}.{self.stack.namespace}"

    def manifest(self, replicas: int) -> str:
        ports = self.stack.pool.ports
        spec: dict[str, Any] = {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": self.name}},
            "template": {
                "metadata": {"labels": {"app": self.name}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": f"example/{self.name}",
                            "ports": [
                                {"name": name, "containerPort": number}
                                for name, number in ports.items()
                            ],
                        }
                    ]
                },
            },
        }
        if self.kind == "StatefulSet":
            spec["serviceName"] = self.name
        doc = {"apiVersion": "apps/v1", "kind": self.kind, "metadata": {"name": self.name}}
        return yaml.safe_dump({**doc, "spec": spec})

    async def create(self, replicas: int) -> None:
        await self.stack.kubectl("apply", "-f", "-", input=self.manifest(replicas))

    async def pods(self, count: int, *, within: float = 30.0) -> list[str]:
        """The names of its live pods, once there are exactly ``count``."""
        found = await asyncio.to_thread(
            self.stack.env.wait_for_pods, self.stack.namespace, f"app={self.name}", count,
            within=within,
        )  # fmt: skip
        live = [p["metadata"]["name"] for p in found]
        for gone in set(self.addresses) - set(live):
            self.stack.pool.release(self.addresses.pop(gone))
        return live

    async def set_ready(self, pod: str, *, ready: bool = True, ip: str | None = None) -> None:
        await asyncio.to_thread(
            functools.partial(
                self.stack.env.set_pod_status, self.stack.namespace, pod, ip=ip, ready=ready
            )
        )

    async def make_ready(self, count: int, *, slow: Iterable[bool] | None = None) -> float:
        """Wait for ``count`` pods; give each new one an address (``slow`` says which kind,
        in pod-name order of the new ones) and make it Running and Ready. For a StatefulSet
        (OrderedReady) the next pod appears only once the one before is Ready, so this goes
        one pod at a time. Returns loop time when the last status was written."""
        kinds = iter(slow) if slow is not None else None
        loop = asyncio.get_running_loop()
        done = loop.time()
        while True:
            live = await self._live()
            new = sorted(set(live) - set(self.addresses))
            for pod in new:
                address = self.stack.pool.take(slow=next(kinds) if kinds is not None else None)
                self.addresses[pod] = address.ip
                await self.set_ready(pod, ip=address.ip)
                done = loop.time()
            if len(live) == count and not new:
                await self.pods(count)  # also forgets pods that went away
                return done
            await asyncio.sleep(0.05)

    async def _live(self) -> list[str]:
        items = await asyncio.to_thread(
            self.stack.env.request,
            "GET",
            f"/api/v1/namespaces/{self.stack.namespace}/pods?labelSelector=app%3D{self.name}",
        )
        return [
            p["metadata"]["name"]
            for p in items["items"]
            if not p["metadata"].get("deletionTimestamp")
        ]

    async def scale(self, replicas: int) -> float:
        """``kubectl scale``; loop time when it returned."""
        kind = self.kind.lower()
        await self.stack.kubectl("scale", f"{kind}/{self.name}", f"--replicas={replicas}")
        return asyncio.get_running_loop().time()

    def endpoints(self, port: str = HTTP, pods: Iterable[str] | None = None) -> set[str]:
        """``ip:port`` of its (or those of ``pods``) addressed pods, on the named port."""
        number = self.stack.pool.ports[port]
        chosen = self.addresses if pods is None else {p: self.addresses[p] for p in pods}
        return {f"{ip}:{number}" for ip in chosen.values()}

    def fast_pods(self) -> set[str]:
        return {p for p, ip in self.addresses.items() if not self.stack.pool.by_ip(ip).slow}


@dataclass
class Stack:
    """Everything of one test: the API server side, Aviator, the gateway, the backends."""

    env: KubeTestEnv
    namespace: str
    user_kubeconfig: Path
    proxy: ApiProxy
    pool: BackendPool
    aviator: AviatorRun
    gateway: Gateway

    async def kubectl(self, *args: str, input: str | None = None) -> str:
        """The machine's kubectl as the user (admin; context namespace: the test's)."""
        proc = await asyncio.to_thread(
            functools.partial(self.env.kubectl, *args, input=input, kubeconfig=self.user_kubeconfig)
        )
        return proc.stdout

    def app(self, name: str, kind: Literal["Deployment", "StatefulSet"] = "Deployment") -> App:
        return App(self, name, kind)

    async def apply_policy(self, text: str) -> float:
        """``kubectl apply`` of a policy; loop time when it returned."""
        await self.kubectl("apply", "-f", "-", input=text)
        return asyncio.get_running_loop().time()

    def traffic(self, app: App, rate: float = 60.0) -> Traffic:
        return Traffic(self.gateway.url, app.host, rate=rate)

    async def ready_for_traffic(self, app: App, want: set[str], *, within: float = 30.0) -> None:
        """Envoy holds ``want`` for the app and a request through the gateway is answered."""
        await self.gateway.wait_hosts(app.cluster, want, within=within)

        async def serves() -> bool:
            return await self.gateway.serves(app.host)

        await until(serves, f"the gateway answering for {app.host}", within=within)


def _through(kubeconfig: Path, port: int, out: Path) -> Path:
    """A copy of ``kubeconfig`` whose server is 127.0.0.1:``port`` (the proxy)."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


@contextlib.asynccontextmanager
async def stack(
    env: KubeTestEnv,
    service_account_kubeconfig: Path,
    namespace: str,
    workdir: Path,
    *,
    fast: int = 3,
    slow: int = 3,
    all_namespaces: bool = False,
    count_probes: bool = False,
) -> AsyncIterator[Stack]:
    """Backends, the proxy, ``aviator run`` (watching ``namespace``, or every namespace) and
    the gateway, started in that order and stopped in reverse; ``aviator run`` must exit 0 on
    SIGTERM, with no traceback in its log."""
    pool = BackendPool(fast=fast, slow=slow, count_probes=count_probes)
    proxy = ApiProxy(env.port)
    user = await asyncio.to_thread(env.admin_kubeconfig, namespace)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    await pool.start()
    try:
        await proxy.start()
        kubeconfig = _through(
            service_account_kubeconfig, proxy.port, workdir / "aviator.kubeconfig"
        )
        aviator = await AviatorRun.start(kubeconfig, [] if all_namespaces else [namespace], workdir)
        try:
            async with Gateway.running(aviator.xds_port, workdir / "envoy") as gateway:
                yield Stack(env, namespace, user, proxy, pool, aviator, gateway)
                # Nothing Aviator sent was rejected (a NACK would leave Envoy on old config).
                stats = await gateway.envoy.admin.stats()
                for kind in ("cluster_manager.cds", "listener_manager.lds"):
                    assert stats[f"{kind}.update_rejected"] == 0, f"Envoy rejected a {kind} update"
        finally:
            code = await aviator.stop()
            text = aviator.log_text()
            assert code == 0, f"aviator run exited {code}:\n{aviator.log_tail()}"
            assert "Traceback" not in text, text[-4000:]
    finally:
        await proxy.close()
        await pool.close()


def took(label: str, seconds: float) -> str:
    """A figure line, printed by tests (``pytest -s`` shows them; the report quotes them)."""
    line = f"[e2e-k8s] {label}: {seconds * 1000:.0f} ms"
    print(line)
    return line


@pytest.fixture
async def k8s_stack(
    aviator_install: AviatorInstall,
    kube_namespace: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Stack]:
    """:func:`stack` on the session's API server, watching the test's fresh namespace. A test
    module makes it visible with ``k8s_stack = harness.k8s_stack``; parametrized indirectly
    with a dict, it passes :func:`stack` its keywords (``all_namespaces``: every namespace, as
    ``aviator run`` does by default; ``count_probes``)."""
    options: dict[str, bool] = getattr(request, "param", {})
    async with stack(
        aviator_install.env, aviator_install.kubeconfig, kube_namespace, tmp_path, **options
    ) as running:
        yield running


# How the fast-half tests measure: policies probe every SHARE_PING_INTERVAL (a probe times out
# after as long); traffic for WARMUP_S first (the slow pods show their latency only once
# traffic reaches them, as their agents report the latency of recent requests, and weights
# move `smoothing` of the way per push), then the share over SHARE_WINDOW_S. Measured on this
# 2-core machine at ~97% CPU pressure (other test runs): 93-95% settled, 90-94% in the 2 s
# after three ping intervals. With the backends in the test's own process, its loop's stalls
# timed fast pods' probes out and the share fell to 75-79% now and then.
SHARE_PING_INTERVAL = "500ms"
WARMUP_S = 3.0
SHARE_WINDOW_S = 4.0
# What the tests allow a change to take to reach Envoy. The goal is 2 s (issue 11); the
# figures printed are what to compare with it.
FOLLOW_BOUND_S = 6.0
_THREE_INTERVALS_S = 1.5


def fast_share(traffic: Traffic, pool: BackendPool, start: float, label: str) -> float:
    """The fast backends' share of the requests sent in [start, start + SHARE_WINDOW_S), and
    of the 2 s from three ping intervals into the traffic (which began at
    ``start - WARMUP_S``), both printed."""
    early_from = start - WARMUP_S + _THREE_INTERVALS_S
    early, early_total = traffic.share(pool.fast_names, early_from, early_from + 2.0)
    fast, total = traffic.share(pool.fast_names, start, start + SHARE_WINDOW_S)
    print(
        f"[e2e-k8s] {label}: {fast}/{total} requests to the fast half after {WARMUP_S:g} s of "
        f"traffic ({early}/{early_total} in the 2 s after three ping intervals)"
    )
    assert total > 0.8 * 80 * SHARE_WINDOW_S, f"only {total} requests in {SHARE_WINDOW_S} s"
    return fast / total

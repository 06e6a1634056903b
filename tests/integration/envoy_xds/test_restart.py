"""A control plane restarted as a new process (``aviator run``): Envoy keeps serving while it is
gone, converges on the new process's content, and no version ever stands for two contents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.process import free_port
from aviator.xds.cache import Cache
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import build_snapshot
from tests.admin_ready import wait_ready
from tests.envoy_fixtures import Backend, BackendFactory, poll_until
from tests.integration.envoy_xds.harness import (
    IDENTIFIER,
    RDS_PREFIX,
    GatewayFactory,
    address,
    cluster_name,
    dynamic_hosts,
    expected_hosts,
    holds,
    manifests,
    rejections,
    sample,
    versions,
    workload,
    write_source,
)

pytestmark = pytest.mark.envoy

WEB = cluster_name("web")
EDS_VERSION = f"cluster.{WEB}.version_text"
CDS_VERSION = "cluster_manager.cds.version_text"
# Envoy retries a lost ADS stream after 0.5 s, doubling up to 30 s (grpc_stream.h), and a new
# process takes seconds to start on a loaded machine: Envoy may wait most of 30 s to retry.
RECONNECT_S = 90.0
KILLS = 4  # changes, each followed by a SIGKILL mid-push and a new process


@contextlib.asynccontextmanager
async def aviator_run(
    source: Path, xds_port: int, gateway_port: int, log: Path, admin_port: int = 0
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``aviator run`` as a child process; killed (if still running) and reaped on exit."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aviator", "run",
            "--source", f"dir:{source}",
            "--xds-address", f"127.0.0.1:{xds_port}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--gateway-port", str(gateway_port),
            "--gateway-address", "127.0.0.1",
            "--allow-probe-loopback",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@dataclass
class Traffic:
    """Requests for ``Host: web.shop`` sent back to back by ``workers`` clients."""

    url: str
    workers: int = 2
    ok: list[tuple[float, str]] = field(default_factory=list)  # (time, backend)
    failed: list[tuple[float, str]] = field(default_factory=list)  # (time, what)

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(*(self._worker(http, stop) for _ in range(self.workers)))

    async def _worker(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with http.get(self.url, headers={"Host": "web.shop"}) as response:
                    body = await response.text()
                    if response.status == 200:
                        self.ok.append((time.monotonic(), body))
                    else:
                        self.failed.append((time.monotonic(), f"HTTP {response.status} {body}"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed.append((time.monotonic(), repr(exc)))
                await asyncio.sleep(0.01)  # do not spin on a refused connection


async def update_counters(admin: EnvoyAdmin) -> tuple[tuple[int, int], tuple[int, int]]:
    """(attempts, successes) of Envoy's CDS subscription and of ``shop/web``'s EDS."""
    stats = await admin.stats()

    def pair(prefix: str) -> tuple[int, int]:
        return stats.get(f"{prefix}.update_attempt", 0), stats.get(f"{prefix}.update_success", 0)

    return pair("cluster_manager.cds"), pair(f"cluster.{WEB}")


@dataclass
class VersionLog:
    """(version, content) pairs Envoy held, for CDS and for the EDS of ``shop/web``.

    A pair is recorded only when no update was applied while it was read (the update
    counters did not move), so content and version belong together."""

    cds: set[tuple[str, frozenset[str]]] = field(default_factory=set)
    eds: set[tuple[str, frozenset[tuple[str, int, str]]]] = field(default_factory=set)
    eds_order: list[str] = field(default_factory=list)
    # (time, version, content) each time the EDS pair changed: what a failure message shows.
    eds_timeline: list[tuple[float, str, frozenset[tuple[str, int, str]]]] = field(
        default_factory=list
    )

    async def sample(self, admin: EnvoyAdmin) -> None:
        # Bracketed by the update counters: if neither moved, no update was applied while
        # the content was read, so the version read with it is its version. (Comparing the
        # version before and after is not enough: weights that flap go V -> W -> V.)
        counters_before = await update_counters(admin)
        held = await admin.text_readouts()
        # The clusters CDS gave Envoy: active and warming (a new cluster warms until its
        # endpoints arrive; one whose endpoints never came is active without hosts, so
        # /clusters, which lists hosts, would not show it).
        dump = await admin.config_dump(include_eds=False)
        hosts = await admin.clusters()
        counters_after = await update_counters(admin)
        cds_still, eds_still = (
            b == a for b, a in zip(counters_before, counters_after, strict=True)
        )
        if (v := held.get(CDS_VERSION)) and cds_still:
            (clusters,) = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
            names = {
                c["cluster"]["name"]
                for key in ("dynamic_active_clusters", "dynamic_warming_clusters")
                for c in clusters.get(key, ())
            }
            self.cds.add((v, frozenset(names)))
        if (v := held.get(EDS_VERSION)) and eds_still:
            content = frozenset(
                (h.address, h.weight, h.eds_health) for h in hosts if h.cluster == WEB
            )
            self.eds.add((v, content))
            if not self.eds_order or self.eds_order[-1] != v:
                self.eds_order.append(v)
            if not self.eds_timeline or self.eds_timeline[-1][1:] != (v, content):
                self.eds_timeline.append((time.monotonic(), v, content))

    async def run(self, admin: EnvoyAdmin, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample(admin)
            await asyncio.sleep(0.05)

    @staticmethod
    def ambiguous(pairs: set[tuple[str, Any]]) -> dict[str, list[Any]]:
        by_version: dict[str, list[Any]] = {}
        for version, content in pairs:
            by_version.setdefault(version, []).append(content)
        return {v: c for v, c in by_version.items() if len(c) > 1}


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_restarted_control_plane_process_converges_without_failed_requests(
    gateways: GatewayFactory, http_backends: BackendFactory, tmp_path: Path, kind: StreamKind
) -> None:
    b1, b2, b3 = [await http_backends(f"b{i}") for i in (1, 2, 3)]
    source = tmp_path / "source"
    write_source(source, [b1, b2])
    xds_port, gateway_port = free_port(), free_port()
    log = tmp_path / "aviator.log"  # both processes' output, kept for a failed test
    gw = await gateways(xds_port, delta=kind is StreamKind.DELTA, port=gateway_port)
    admin = gw.admin

    async def holding(*backends: Backend) -> bool:
        """Envoy holds exactly these hosts of shop/web, and its listener and routes."""
        return await holds(admin, {WEB: {address(b) for b in backends}})

    async def served(at_least: int, backend: str | None = None, since: int = 0) -> bool:
        await asyncio.sleep(0)
        ok = traffic.ok[since:]
        return sum(1 for _, body in ok if backend in (None, body)) >= at_least

    traffic = Traffic(f"http://127.0.0.1:{gateway_port}/")
    versions = VersionLog()
    stop = asyncio.Event()
    async with aviator_run(source, xds_port, gateway_port, log) as first:
        await poll_until(lambda: holding(b1, b2), within=RECONNECT_S)
        status, body = await gw.get("web.shop")
        assert (status, body in {"b1", "b2"}) == (200, True)
        tasks = [
            asyncio.create_task(traffic.run(stop)),
            asyncio.create_task(versions.run(admin, stop)),
        ]
        try:
            await poll_until(lambda: served(50))
            cluster_before = await cluster_version(admin, WEB)
            eds_before = list(versions.eds_order)

            # The control plane dies without a word (no graceful stream close).
            first.send_signal(signal.SIGKILL)
            await first.wait()

            async def disconnected() -> bool:
                return (await admin.stats())["control_plane.connected_state"] == 0

            await poll_until(disconnected)
            served_before = len(traffic.ok)
            # While it is down a pod is added; the new process starts with that content.
            write_source(source, [b1, b2, b3])
            async with aviator_run(source, xds_port, gateway_port, log):
                await poll_until(lambda: holding(b1, b2, b3), within=RECONNECT_S)
                await poll_until(lambda: served(1, "b3", since=served_before))
                settled = len(traffic.ok)
                await poll_until(lambda: served(50, since=settled))

                async def sampled(*backends: Backend) -> bool:
                    # The sampler keeps only reads no update raced; under load the pushes of a
                    # new process can outpace it, so wait for one read of the new content.
                    await asyncio.sleep(0)
                    last = versions.eds_timeline[-1][2] if versions.eds_timeline else ()
                    return {host for host, _, _ in last} == {address(b) for b in backends}

                await poll_until(lambda: sampled(b1, b2, b3), within=RECONNECT_S)
                stats = await admin.stats()
                cluster_after = await cluster_version(admin, WEB)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    print(
        f"{kind} restart: {len(traffic.ok)} requests OK, {len(traffic.failed)} failed; "
        f"EDS versions Envoy held: {len(versions.eds_order)}"
    )
    assert traffic.failed == [], f"{len(traffic.failed)} failed, first: {traffic.failed[:3]}"
    assert stats["control_plane.connected_state"] == 1
    assert set((await rejections(admin, [WEB])).values()) == {0}
    # Content-addressed versions: the unchanged cluster has the same version in both processes
    # (SotW: the version of all clusters; delta: the cluster's own), and the endpoints (a new
    # pod) get a version never seen before the restart.
    assert cluster_after == cluster_before
    assert versions.eds_order[-1] not in eds_before
    # Never an empty state: every CDS Envoy held had the cluster, every EDS a host.
    assert all(WEB in clusters for _, clusters in versions.cds)
    assert all(hosts for _, hosts in versions.eds)
    # No version ever stood for two different contents, across both processes.
    assert VersionLog.ambiguous(versions.cds) == {}
    assert VersionLog.ambiguous(versions.eds) == {}
    assert len(traffic.ok) > served_before > 50


async def cluster_version(admin: EnvoyAdmin, name: str) -> str:
    """The version Envoy's /config_dump gives the active cluster ``name``."""
    dump = await admin.config_dump(include_eds=False)
    (clusters,) = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
    (active,) = [c for c in clusters["dynamic_active_clusters"] if c["cluster"]["name"] == name]
    return str(active["version_info"])


async def connected(admin: EnvoyAdmin, state: int) -> bool:
    return (await admin.stats())["control_plane.connected_state"] == state


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_a_restarted_server_tells_nothing_before_its_first_snapshot(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory, kind: StreamKind
) -> None:
    """A new control-plane process listens before it has read its source. Answering Envoy's
    requests from the empty cache would tell Envoy that no cluster and no listener exist:
    Envoy would drop them all and refuse connections until the first snapshot."""
    web1, web2 = await http_backends("web-1"), await http_backends("web-2")
    gw = await gateways(ads.port, delta=kind is StreamKind.DELTA)
    admin = gw.admin
    before = [workload("web", [web1])]
    ads.cache.publish(build_snapshot(before, gateway=gw.config))
    await poll_until(lambda: holds(admin, expected_hosts(before)))
    port = ads.port
    await ads.stop(0)
    await poll_until(lambda: connected(admin, 0))

    cache = Cache()  # nothing published yet: the source is still being read
    server = AdsServer(cache, identifier=IDENTIFIER, metrics_registry=CollectorRegistry())
    await server.start(f"127.0.0.1:{port}")
    try:

        async def asked_for_everything() -> bool:
            await asyncio.sleep(0)
            asked = {t.type for p in server.proxies() for t in p.types}
            pushes = sum(
                sample(server, "aviator_xds_pushes_total", type=t, kind=str(kind))
                for t in ("cds", "eds", "lds", "rds")
            )
            return asked == {"cds", "eds", "lds", "rds"} or pushes > 0

        await poll_until(lambda: connected(admin, 1))
        await poll_until(asked_for_everything)
        for t in ("cds", "eds", "lds", "rds"):
            assert sample(server, "aviator_xds_pushes_total", type=t, kind=str(kind)) == 0, t
        assert await holds(admin, expected_hosts(before))
        assert await gw.get("web.shop") == (200, "web-1")

        # The first snapshot (with a pod added meanwhile) is answered at once.
        after = [workload("web", [web1, web2])]
        cache.publish(build_snapshot(after, gateway=gw.config))
        await poll_until(lambda: holds(admin, expected_hosts(after)))
        assert set((await rejections(admin, [WEB])).values()) == {0}
        assert server.nacks() == ()
    finally:
        await server.stop(0)


API = cluster_name("api")


def write_state(source: Path, web: list[Backend], api: list[Backend]) -> None:
    """``shop/web`` on ``web`` and, if ``api`` is not empty, a second policy, Deployment and
    pods for ``shop/api`` (its own file: adding it is a new cluster, endpoints and route)."""
    write_source(source, web)
    path = source / "api.yaml"
    if not api:
        path.unlink(missing_ok=True)
        return
    text = json.dumps(manifests(api)).replace('"web"', '"api"').replace('"web-', '"api-')
    tmp = source / ".api.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all(json.loads(text), sort_keys=False))
    tmp.replace(path)


@dataclass
class WebHosts:
    """Envoy's hosts of ``shop/web``, sampled every 20 ms: any sample without the cluster or
    without a host is an empty state Envoy was sent."""

    samples: int = 0
    empty: list[float] = field(default_factory=list)

    async def run(self, admin: EnvoyAdmin, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not (await dynamic_hosts(admin)).get(WEB):
                self.empty.append(time.monotonic())
            self.samples += 1
            await asyncio.sleep(0.02)


@dataclass
class SlowLink:
    """A TCP proxy that delays every byte by ``delay_s`` each way: a control plane one
    ``2 * delay_s`` round trip away from its proxies. Each push of a change then takes round
    trips (CDS, Envoy's ACK and EDS request, EDS, RDS after the clusters' ACKs), so a SIGKILL
    at the first new version Envoy holds lands while the rest is in flight. A connection
    whose upstream is down is closed at once; bytes already on the link are delivered."""

    upstream_port: int
    delay_s: float = 0.15
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return  # the control plane is down: Envoy sees the connection fail
            try:
                await asyncio.gather(self._pipe(down_r, up_w), self._pipe(up_r, down_w))
            finally:
                up_w.transport.abort()
        finally:
            down_w.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:
                    break
            await delivering
        except ConnectionError:
            pass
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await delivering
            writer.transport.abort()  # one side ended: end the other (as a closed socket does)


# What a change of policies moves first: CDS when a cluster is added, RDS when one is removed
# (routes go before their cluster). Endpoint versions move with the weights at any time.
TRIGGERS = (CDS_VERSION, f"{RDS_PREFIX}.version_text")


async def trigger_versions(admin: EnvoyAdmin) -> dict[str, str]:
    held = await versions(admin)
    return {k: held.get(k, "") for k in TRIGGERS}


async def settled_versions(admin: EnvoyAdmin) -> dict[str, str]:
    """CDS and RDS versions once they stayed the same for 0.3 s (a process that just
    connected may still be sending the last of its state)."""
    while True:
        before = await trigger_versions(admin)
        await asyncio.sleep(0.3)
        if await trigger_versions(admin) == before:
            return before


async def changed_versions(admin: EnvoyAdmin, before: dict[str, str]) -> bool:
    return await trigger_versions(admin) != before


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_a_control_plane_killed_mid_push_restarts_without_an_empty_state(
    gateways: GatewayFactory, http_backends: BackendFactory, tmp_path: Path, kind: StreamKind
) -> None:
    """SIGKILL in the middle of the pushes of a change: a policy, its cluster, endpoints and
    route added and the pods of another workload replaced (and back), the process killed the
    moment Envoy holds the first new CDS or RDS version, while the rest of the change (EDS of
    the new cluster, RDS after it; or the cluster's removal after its route's) is still in
    flight over a slow link (:class:`SlowLink`). Each time the next process converges on the
    new content; Envoy never holds an empty state and no request for the other workload
    fails."""
    b1, b2, b3, a1 = [await http_backends(n) for n in ("b1", "b2", "b3", "a1")]
    states = [([b1, b2], []), ([b2, b3], [a1])]
    source = tmp_path / "source"
    write_state(source, *states[0])
    xds_port, gateway_port = free_port(), free_port()
    log = tmp_path / "aviator.log"
    link = SlowLink(xds_port)  # Envoy reaches the control plane over a 0.3 s round trip
    await link.start()
    gw = await gateways(link.port, delta=kind is StreamKind.DELTA, port=gateway_port)
    admin = gw.admin

    def wanted(web: list[Backend], api: list[Backend]) -> dict[str, set[str]]:
        out = {WEB: {address(b) for b in web}}
        if api:
            out[API] = {address(b) for b in api}
        return out

    async def state_held(web: list[Backend], api: list[Backend]) -> bool:
        """Envoy holds these hosts, and routes ``api.shop`` exactly when ``api`` exists."""
        if await dynamic_hosts(admin) != wanted(web, api):
            return False
        status, _ = await gw.get("api.shop")
        return (status == 200) == bool(api)

    traffic = Traffic(f"http://127.0.0.1:{gateway_port}/")
    held_versions = VersionLog()
    web_hosts = WebHosts()
    stop = asyncio.Event()
    landed: list[str] = []  # what Envoy held when each process died: old, partial or new
    converged_s: list[float] = []  # from SIGKILL to Envoy holding the new content
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(link.stop)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        proc = await stack.enter_async_context(aviator_run(source, xds_port, gateway_port, log))
        await poll_until(lambda: holds(admin, wanted(*states[0])), within=RECONNECT_S)
        tasks = [
            asyncio.create_task(traffic.run(stop)),
            asyncio.create_task(held_versions.run(admin, stop)),
            asyncio.create_task(web_hosts.run(admin, stop)),
        ]
        try:
            for i in range(KILLS):
                old, new = states[i % 2], states[(i + 1) % 2]
                before = await settled_versions(admin)
                write_state(source, *new)
                # No sleep between polls: the rest of the pushes takes milliseconds.
                await poll_until(
                    lambda: changed_versions(admin, before),  # noqa: B023
                    within=30,
                    interval=0,
                )
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                killed = time.monotonic()
                await poll_until(lambda: connected(admin, 0))
                landed.append(
                    "new"
                    if await state_held(*new)
                    else "old"
                    if await state_held(*old)
                    else "partial"
                )
                admin_port = free_port()
                proc = await stack.enter_async_context(
                    aviator_run(source, xds_port, gateway_port, log, admin_port)
                )
                # The new process has read the source and published (ready), and Envoy is on
                # its stream (the old one is dead): then the new content, which Envoy may have
                # held already. Only then the next change: it must reach a process serving.
                await wait_ready(http, admin_port, within_s=RECONNECT_S)
                await poll_until(lambda: connected(admin, 1), within=RECONNECT_S)
                await poll_until(lambda: holds(admin, wanted(*new)), within=RECONNECT_S)  # noqa: B023
                await poll_until(lambda: state_held(*new), within=RECONNECT_S)  # noqa: B023
                converged_s.append(time.monotonic() - killed)
                if new[1]:
                    assert await gw.get("api.shop") == (200, "a1")
                sent = len(traffic.ok)
                await poll_until(lambda: served(traffic, 20, since=sent))  # noqa: B023
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    print(
        f"{kind} killed mid-push x{KILLS}: Envoy held {landed} at each kill; "
        f"converged {min(converged_s):.2f}-{max(converged_s):.2f} s after it; "
        f"{len(traffic.ok)} requests OK, {len(traffic.failed)} failed"
    )
    assert traffic.failed == [], f"{len(traffic.failed)} failed, first: {traffic.failed[:3]}"
    assert web_hosts.samples > 20  # it sampled all along (slowly, on a loaded machine)
    assert web_hosts.empty == []
    assert all(WEB in clusters for _, clusters in held_versions.cds)
    assert all(hosts for _, hosts in held_versions.eds)
    assert VersionLog.ambiguous(held_versions.cds) == {}
    assert VersionLog.ambiguous(held_versions.eds) == {}
    assert set((await rejections(admin, [WEB])).values()) == {0}


async def served(traffic: Traffic, at_least: int, since: int = 0) -> bool:
    await asyncio.sleep(0)
    return len(traffic.ok) - since >= at_least

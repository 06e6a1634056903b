"""Two control-plane replicas behind one xDS cluster (issue 14): one SIGKILLed, Envoy goes on.

Two ``aviator run`` processes read the same directory source on two ports; the gateway
Envoy's ``aviator-xds`` cluster holds both (as a headless Service's DNS name gives Envoy each
replica: ``aviator bootstrap --xds <service>:<port>`` makes the cluster STRICT_DNS). The
replica Envoy is connected to is killed; Envoy reconnects to the other and takes the next
change from it. The killed one is started again and the other killed: Envoy comes back to
it. Traffic runs throughout: 0 failed requests, Envoy never holds an empty state, and no
version ever stands for two contents across the replicas (each probes on its own, so their
weights may differ; their versions then differ too).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.bootstrap import XDS_CLUSTER, render_bootstrap
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.xds.protocol import StreamKind
from tests.admin_ready import wait_ready
from tests.envoy_fixtures import Backend, poll_until
from tests.integration.envoy_xds.harness import (
    GatedBackend,
    cluster_name,
    gated_backend,
    holds,
    rejections,
    write_source,
)
from tests.integration.envoy_xds.test_restart import (
    RECONNECT_S,
    Traffic,
    VersionLog,
    WebHosts,
    aviator_run,
    connected,
)

pytestmark = pytest.mark.envoy

WEB = cluster_name("web")


def two_replica_bootstrap(
    node_id: str, ports: tuple[int, int], gateway_port: int, *, delta: bool
) -> dict[str, object]:
    """``aviator bootstrap``'s gateway, its ``aviator-xds`` cluster holding both replicas."""
    bootstrap = render_bootstrap(
        xds_host="127.0.0.1",
        xds_port=ports[0],
        node_id=node_id,
        listen_port=gateway_port,
        listen_address="127.0.0.1",
        admin_port=0,
        delta=delta,
    )
    (xds,) = bootstrap["static_resources"]["clusters"]
    assert xds["name"] == XDS_CLUSTER
    (locality,) = xds["load_assignment"]["endpoints"]
    locality["lb_endpoints"].append(
        {
            "endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports[1]}}
            }
        }
    )
    return bootstrap


async def connected_to(admin: EnvoyAdmin) -> int | None:
    """The port of the replica Envoy's ADS stream is on (None while it has none)."""
    if not await connected(admin, 1):
        return None
    live = [h for h in await admin.clusters() if h.cluster == XDS_CLUSTER and h.cx_active]
    return int(live[0].address.rsplit(":", 1)[1]) if len(live) == 1 else None


def as_pods(*backends: GatedBackend) -> list[Backend]:
    return [Backend(b.name, b.host, b.port) for b in backends]


@contextlib.asynccontextmanager
async def backends(*names: str) -> AsyncIterator[list[GatedBackend]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(gated_backend(n)) for n in names]


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_envoy_moves_to_the_other_replica_when_one_is_killed(
    tmp_path: Path, kind: StreamKind
) -> None:
    ports = (free_port(), free_port())
    gateway_port = free_port()
    source = tmp_path / "source"
    traffic = Traffic(f"http://127.0.0.1:{gateway_port}/")
    versions = VersionLog()
    web_hosts = WebHosts()
    stop = asyncio.Event()
    moved_s: list[float] = []  # from SIGKILL to Envoy's stream on the other replica
    async with backends("b1", "b2", "b3") as (b1, b2, b3), contextlib.AsyncExitStack() as stack:
        write_source(source, as_pods(b1, b2))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        admin_ports = {port: free_port() for port in ports}

        async def replica(port: int) -> asyncio.subprocess.Process:
            """``aviator run`` on xDS ``port``, once it has read the source and published."""
            log = tmp_path / f"aviator-{port}.log"
            proc = await stack.enter_async_context(
                aviator_run(source, port, gateway_port, log, admin_ports[port])
            )
            await wait_ready(http, admin_ports[port], within_s=RECONNECT_S)
            return proc

        procs = {port: await replica(port) for port in ports}
        bootstrap = two_replica_bootstrap(
            f"gw-{kind}", ports, gateway_port, delta=kind is StreamKind.DELTA
        )
        envoy = await stack.enter_async_context(EnvoyProcess(bootstrap, workdir=tmp_path / "envoy"))
        admin = envoy.admin

        async def holding(*pods: GatedBackend) -> bool:
            return await holds(admin, {WEB: {f"{p.host}:{p.port}" for p in pods}})

        await poll_until(lambda: holding(b1, b2), within=RECONNECT_S)
        tasks = [
            asyncio.create_task(traffic.run(stop)),
            asyncio.create_task(versions.run(admin, stop)),
            asyncio.create_task(web_hosts.run(admin, stop)),
        ]
        try:
            # Round 1: kill the replica Envoy is on; the next change comes from the other.
            # Round 2: that one is started again, the other killed; Envoy comes back to it.
            for change in ((b1, b2, b3), (b2, b3)):
                on = await poll_until(lambda: connected_to(admin), within=RECONNECT_S)
                assert on is not None
                first = on
                (other,) = [p for p in ports if p != first]
                procs[first].send_signal(signal.SIGKILL)
                await procs[first].wait()
                killed = time.monotonic()

                async def on_other() -> bool:
                    return await connected_to(admin) == other  # noqa: B023

                await poll_until(on_other, within=RECONNECT_S)
                moved_s.append(time.monotonic() - killed)
                write_source(source, as_pods(*change))
                await poll_until(lambda: holding(*change), within=RECONNECT_S)  # noqa: B023
                sent = len(traffic.ok)
                await poll_until(
                    lambda: served(traffic, {change[-1].name}, since=sent),  # noqa: B023
                    within=RECONNECT_S,
                )
                procs[first] = await replica(first)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        stats = await admin.stats()
        rejected = await rejections(admin, [WEB])

    print(
        f"{kind} replicas: Envoy on the other replica {', '.join(f'{s:.2f}' for s in moved_s)}"
        f" s after each SIGKILL; {len(traffic.ok)} requests OK, {len(traffic.failed)} failed"
    )
    assert traffic.failed == [], f"{len(traffic.failed)} failed, first: {traffic.failed[:3]}"
    assert stats["control_plane.connected_state"] == 1
    assert set(rejected.values()) == {0}
    assert web_hosts.samples > 20  # it sampled all along (slowly, on a loaded machine)
    assert web_hosts.empty == []
    assert all(WEB in clusters for _, clusters in versions.cds)
    assert all(hosts for _, hosts in versions.eds)
    assert VersionLog.ambiguous(versions.cds) == {}
    assert VersionLog.ambiguous(versions.eds) == {}, versions.eds_timeline


async def served(traffic: Traffic, names: set[str], since: int) -> bool:
    await asyncio.sleep(0)
    return names <= {body for _, body in traffic.ok[since:]}

"""Several gateways, each on its own port, fed by one control plane: the listener a gateway
receives is built for that node from its bootstrap's metadata (``aviator bootstrap --listen``,
``--listen-address``), never another gateway's, over SotW and delta."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.xds.protocol import StreamKind
from aviator.xds.resources import LISTENER_TYPE, GatewayConfig
from tests.envoy_fixtures import Backend, BackendFactory, EnvoyFactory, poll_until
from tests.integration.envoy_xds.harness import write_source

pytestmark = pytest.mark.envoy

# What a bootstrap's node metadata says (spelled out: this is the interface users write).
META_LISTEN_PORT = "aviator.io/listen-port"
META_LISTEN_ADDRESS = "aviator.io/listen-address"


@contextlib.asynccontextmanager
async def control_plane(source: Path, gateway: GatewayConfig) -> AsyncIterator[ControlPlane]:
    """``aviator run`` in-process: a directory source, ADS and admin on loopback ports."""
    cp = ControlPlane(
        Settings(
            source=f"dir:{source}",
            xds_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            gateway=gateway,
        )
    )
    started = asyncio.Event()
    task = asyncio.create_task(cp.run(started=started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # failed to start: raise its error
    try:
        yield cp
    finally:
        cp.stop()
        await task


def distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


async def get(http: aiohttp.ClientSession, port: int, host: str) -> tuple[int, str]:
    try:
        async with http.get(f"http://127.0.0.1:{port}/", headers={"Host": host}) as response:
            return response.status, await response.text()
    except aiohttp.ClientConnectionError as exc:
        return 0, repr(exc)


async def dynamic_listeners(admin: EnvoyAdmin) -> dict[str, str]:
    """The listeners Envoy took over LDS (active or warming) → ``address:port``."""
    dump = await admin.config_dump(include_eds=False)
    (listeners,) = [c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")]
    out: dict[str, str] = {}
    for listener in listeners.get("dynamic_listeners", []):
        state: dict[str, Any] = listener.get("active_state") or listener.get("warming_state") or {}
        socket = state.get("listener", {}).get("address", {}).get("socket_address", {})
        out[listener["name"]] = f"{socket.get('address')}:{socket.get('port_value')}"
    return out


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_three_gateways_on_three_ports_each_route_with_one_control_plane(
    envoy_factory: EnvoyFactory, http_backends: BackendFactory, tmp_path: Path, kind: StreamKind
) -> None:
    backends: list[Backend] = [await http_backends(f"web-{i}") for i in (1, 2, 3)]
    names = {b.name for b in backends}
    source = tmp_path / "source"
    write_source(source, backends)
    default_port, *ports = distinct_ports(4)
    # The default listener (--gateway-port) is for nodes that name no port: none here.
    async with control_plane(source, GatewayConfig(address="127.0.0.1", port=default_port)) as cp:
        assert cp.xds_port is not None
        envoys: list[EnvoyProcess] = []
        for i, port in enumerate(ports):
            envoys.append(
                await envoy_factory(
                    render_bootstrap(
                        xds_host="127.0.0.1",
                        xds_port=cp.xds_port,
                        node_id=f"gw-{i}",
                        listen_port=port,
                        # The first names its address; the others take --gateway-address.
                        listen_address="127.0.0.1" if i == 0 else None,
                        admin_port=0,
                        delta=kind is StreamKind.DELTA,
                    )
                )
            )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def routes(port: int) -> bool:
                for host in ("web.shop", f"web.shop:{port}", "web.shop.svc.cluster.local"):
                    status, body = await get(http, port, host)
                    if status != 200 or body not in names:
                        return False
                return True

            for port in ports:
                await poll_until(lambda port=port: routes(port), within=30)
            # Each Envoy holds its own listener and no other (it would bind them all).
            for envoy, port in zip(envoys, ports, strict=True):
                assert list((await dynamic_listeners(envoy.admin)).values()) == [
                    f"127.0.0.1:{port}"
                ]
                stats = await envoy.admin.stats()
                assert stats["listener_manager.lds.update_rejected"] == 0
            # Nobody asked for the default port: nothing listens there.
            status, _ = await get(http, default_port, "web.shop")
            assert status == 0
            # Routing is by Host: another name finds no route on any gateway.
            for port in ports:
                assert (await get(http, port, "cart.shop"))[0] == 404

            # Aviator's side: each node is given its own listener; the snapshot holds those
            # and the default one.
            wanted = {f"aviator-gateway-127.0.0.1-{p}" for p in ports}
            given = {p.node_id: (p.listener, p.problems) for p in cp.ads.proxies()}
            assert given == {
                f"gw-{i}": (f"aviator-gateway-127.0.0.1-{p}", ()) for i, p in enumerate(ports)
            }
            assert set(cp.cache.resources(LISTENER_TYPE)) == {
                *wanted,
                f"aviator-gateway-127.0.0.1-{default_port}",
            }
            lds_before = [await lds_version(e.admin) for e in envoys]

            # A gateway leaves: its listener leaves the snapshot; the others see no change.
            await envoys[0].stop()
            gone = f"aviator-gateway-127.0.0.1-{ports[0]}"

            async def withdrawn() -> bool:
                await asyncio.sleep(0)
                return gone not in cp.cache.resources(LISTENER_TYPE)

            await poll_until(withdrawn)
            for envoy, port, before in zip(envoys[1:], ports[1:], lds_before[1:], strict=True):
                assert await routes(port)
                assert await lds_version(envoy.admin) == before
                assert (await envoy.admin.stats())["listener_manager.lds.update_rejected"] == 0


async def lds_version(admin: EnvoyAdmin) -> str:
    return (await admin.text_readouts())["listener_manager.lds.version_text"]


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        (META_LISTEN_PORT, 70000, "aviator.io/listen-port must be a port number in 1..65535"),
        (META_LISTEN_PORT, "http", "got the string 'http'"),
        (META_LISTEN_ADDRESS, "localhost", "aviator.io/listen-address must be an IP address"),
    ],
)
async def test_a_gateway_with_bad_listen_metadata_gets_the_default_listener(
    envoy_factory: EnvoyFactory,
    http_backends: BackendFactory,
    tmp_path: Path,
    field: str,
    value: object,
    problem: str,
) -> None:
    backend = await http_backends("web-1")
    source = tmp_path / "source"
    write_source(source, [backend])
    default_port, asked = distinct_ports(2)
    async with control_plane(source, GatewayConfig(address="127.0.0.1", port=default_port)) as cp:
        assert cp.xds_port is not None
        bootstrap = render_bootstrap(
            xds_host="127.0.0.1",
            xds_port=cp.xds_port,
            node_id="gw-bad",
            listen_port=asked,
            admin_port=0,
        )
        bootstrap["node"]["metadata"][field] = value  # what a hand-written bootstrap may say
        envoy = await envoy_factory(bootstrap)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def routed() -> bool:
                return await get(http, default_port, "web.shop") == (200, "web-1")

            await poll_until(routed, within=30)
            assert list((await dynamic_listeners(envoy.admin)).values()) == [
                f"127.0.0.1:{default_port}"
            ]
            stats = await envoy.admin.stats()
            assert stats["listener_manager.lds.update_rejected"] == 0
            # The admin port's /debug/proxies says why.
            url = f"http://127.0.0.1:{cp.admin_port}/debug/proxies"
            async with http.get(url) as response:
                (proxy,) = (await response.json())["proxies"]
        assert proxy["node_id"] == "gw-bad"
        assert proxy["listener"] == f"aviator-gateway-127.0.0.1-{default_port}"
        assert any(problem in p for p in proxy["problems"]), proxy["problems"]
        assert "this node gets the default gateway listener" in proxy["problems"]


async def test_a_gateway_may_ask_for_an_ipv6_listener(
    envoy_factory: EnvoyFactory, http_backends: BackendFactory, tmp_path: Path
) -> None:
    backend = await http_backends("web-1")
    source = tmp_path / "source"
    write_source(source, [backend])
    port = free_port("::1")
    async with control_plane(source, GatewayConfig(address="127.0.0.1", port=free_port())) as cp:
        assert cp.xds_port is not None
        envoy = await envoy_factory(
            render_bootstrap(
                xds_host="127.0.0.1",
                xds_port=cp.xds_port,
                node_id="gw-v6",
                listen_port=port,
                listen_address="::1",
                admin_port=0,
            )
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def routed() -> bool:
                try:
                    async with http.get(
                        f"http://[::1]:{port}/", headers={"Host": "web.shop"}
                    ) as response:
                        return (response.status, await response.text()) == (200, "web-1")
                except aiohttp.ClientConnectionError:
                    return False

            await poll_until(routed, within=30)
        assert await dynamic_listeners(envoy.admin) == {
            f"aviator-gateway-[::1]-{port}": f"::1:{port}"
        }

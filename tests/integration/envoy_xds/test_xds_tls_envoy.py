"""A real Envoy over mutual TLS (issue 14): the bootstrap ``aviator bootstrap --xds-tls-*``
prints makes Envoy present its certificate and check the server's; an Envoy with the right
certificate is served and routes traffic, one without a certificate, or with one from
another CA, is refused in the handshake and never gets a stream."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.bootstrap import XDS_CLUSTER
from aviator.envoy.process import free_port
from aviator.xds.cache import Cache
from aviator.xds.server import AdsServer, ServerTls
from aviator.xds.snapshot import build_snapshot
from tests.envoy_fixtures import BackendFactory, EnvoyFactory, poll_until
from tests.integration.envoy_xds.harness import (
    IDENTIFIER,
    expected_hosts,
    gateway_config,
    holds,
    workload,
)
from tests.integration.xds.certs import Pair, make_ca, make_leaf

pytestmark = pytest.mark.envoy


async def _bootstrap(*args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "bootstrap", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    config: dict[str, Any] = yaml.safe_load(out)
    return config


async def _tls_attempts(admin: EnvoyAdmin) -> bool:
    stats = await admin.stats()
    return bool(stats.get(f"cluster.{XDS_CLUSTER}.upstream_cx_total", 0) >= 2)


@pytest.mark.parametrize("delta", [False, True])
async def test_envoy_with_its_certificate_is_served_and_others_are_refused(
    tmp_path: Path, envoy_factory: EnvoyFactory, http_backends: BackendFactory, delta: bool
) -> None:
    ca = make_ca(tmp_path, "ca")
    server_pair = make_leaf(tmp_path, "server", ca, server=True)
    client = make_leaf(tmp_path, "gw", ca, server=False)
    stranger = make_leaf(tmp_path, "stranger", make_ca(tmp_path, "other-ca"), server=False)
    ads = AdsServer(
        Cache(),
        identifier=IDENTIFIER,
        metrics_registry=CollectorRegistry(),
        tls=ServerTls(str(server_pair.cert), str(server_pair.key), str(ca.cert)),
    )
    await ads.start("127.0.0.1:0")
    try:
        port = free_port()
        backend = await http_backends("web-1")
        served = [workload("web", [backend])]
        ads.cache.publish(build_snapshot(served, gateway=gateway_config(port)))

        async def envoy(node: str, listen: int, pair: Pair | None) -> Any:
            args = [
                "--xds", f"127.0.0.1:{ads.port}", "--node-id", node, "--listen", str(listen),
                "--listen-address", "127.0.0.1", "--admin", str(free_port()),
                "--xds-tls-ca", str(ca.cert), "--xds-tls-server-name", "127.0.0.1",
            ]  # fmt: skip
            if pair is not None:
                args += ["--xds-tls-cert", str(pair.cert), "--xds-tls-key", str(pair.key)]
            if delta:
                args.append("--delta")
            return await envoy_factory(await _bootstrap(*args))

        good = await envoy("gw-good", port, client)
        bare = await envoy("gw-bare", free_port(), None)
        strange = await envoy("gw-stranger", free_port(), stranger)
        await poll_until(lambda: holds(good.admin, expected_hosts(served)), within=20)
        stats = await good.admin.stats()
        assert stats["control_plane.connected_state"] == 1
        assert stats[f"cluster.{XDS_CLUSTER}.ssl.handshake"] >= 1
        assert stats["cluster_manager.cds.update_success"] >= 1  # what the refused ones lack
        assert stats["listener_manager.lds.update_success"] >= 1
        import aiohttp

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/", headers={"Host": "web.shop"}) as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "web-1")
        for refused in (bare, strange):
            # Envoy retried (two connections or more) and never got through.
            await poll_until(lambda e=refused: _tls_attempts(e.admin), within=20)
            stats = await refused.admin.stats()
            # Not control_plane.connected_state: Envoy sets it to 1 when it opens the gRPC
            # stream, which with TLS 1.3 can be before the server's alert refusing the
            # certificate arrives (seen once in CI). What counts: no handshake, no config.
            assert stats.get(f"cluster.{XDS_CLUSTER}.ssl.handshake", 0) == 0
            assert stats.get("cluster_manager.cds.update_success", 0) == 0
            assert stats.get("listener_manager.lds.update_success", 0) == 0
        assert [p.node_id for p in ads.proxies()] == ["gw-good"]
    finally:
        await ads.stop(0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--xds-tls-cert", "c.pem", "--xds-tls-key", "k.pem"], "need --xds-tls-ca"),
        (["--xds-tls-ca", "ca.pem", "--xds-tls-cert", "c.pem"], "a client certificate needs"),
    ],
)
async def test_bootstrap_tls_flags_are_checked(args: list[str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "bootstrap", "--xds", "127.0.0.1:18000",
        "--node-id", "n", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert message in err.decode()
    assert "Traceback" not in err.decode()


def test_run_tls_settings_are_checked() -> None:
    from aviator.controlplane import Settings

    with pytest.raises(ValueError, match="--xds-tls-cert and --xds-tls-key go together"):
        Settings(source="none", xds_tls_cert="c.pem")
    with pytest.raises(ValueError, match="--xds-tls-client-ca needs --xds-tls-cert"):
        Settings(source="none", xds_tls_client_ca="ca.pem")
    settings = Settings(source="none", xds_tls_cert="c", xds_tls_key="k", xds_tls_client_ca="a")
    assert settings.xds_tls() == ServerTls("c", "k", "a")

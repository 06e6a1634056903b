"""Second opinion: gRPC's own (strict) xDS client resolves a workload through our server.

The client runs in a subprocess because gRPC's xDS client and its bootstrap are process-wide.
It needs LDS (API listener), RDS, CDS and EDS to accept everything before an RPC can succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from aviator.model import EndpointAddress, WeightedEndpoint, WeightedWorkload, WorkloadKey
from aviator.xds.cache import Cache
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import build_snapshot

CLIENT = """
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    say = channel.unary_unary("/test.Echo/Say")
    print(say(b"hello", timeout=30).decode())
"""


@pytest.fixture
async def backend_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(0)


@pytest.mark.parametrize("target", ["xds:///echo.default", "xds:///echo.default:8080"])
async def test_grpc_xds_client_accepts_every_resource(backend_port: int, target: str) -> None:
    cache = Cache()
    echo = WeightedWorkload(
        WorkloadKey("default", "echo"),
        8080,
        (WeightedEndpoint(EndpointAddress("127.0.0.1", backend_port), 3),),
    )
    cache.publish(build_snapshot([echo], grpc_api_listeners=True))
    ads = AdsServer(cache, identifier="aviator-it")
    port = await ads.start("127.0.0.1:0")
    bootstrap = {
        "xds_servers": [
            {
                "server_uri": f"127.0.0.1:{port}",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": "grpc-proxyless"},
    }
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=json.dumps(bootstrap))
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        target,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        assert out.decode().strip() == "echo:hello"
        assert ads.nacks() == ()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await ads.stop(0)

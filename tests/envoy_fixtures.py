"""Reusable pieces for tests that run a real Envoy: import what you need.

Fixtures (make them visible in a test directory with a conftest.py that imports them, as
tests/integration/envoy/conftest.py does):

- ``envoy_factory``: ``await envoy_factory(config, **EnvoyProcess kwargs) -> EnvoyProcess``,
  started, admin endpoint answering; stopped at teardown; its log is kept under ``tmp_path``.
- ``http_backends``: ``await http_backends(name, host="127.0.0.1") -> Backend``, a real aiohttp
  server on a port the OS picked, answering every request with ``200 <name>`` and recording
  the request headers it saw; closed at teardown.

Helpers: ``free_port()`` (re-exported), ``poll_until(check)`` to wait for an Envoy-side value
(stats, clusters) with a deadline, ``static_cluster(name, backends)`` to build a STATIC
cluster, ``loopback_bootstrap(...)`` for a minimal static Envoy config.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from aiohttp import web

from aviator.envoy.bootstrap import duration
from aviator.envoy.process import EnvoyProcess, free_port

__all__ = [
    "Backend",
    "BackendFactory",
    "EnvoyFactory",
    "envoy_factory",
    "free_port",
    "http_backends",
    "loopback_bootstrap",
    "poll_until",
    "static_cluster",
]

T = TypeVar("T")


@dataclass
class Backend:
    """A real HTTP server on loopback; ``seen`` holds the headers of every request it answered."""

    name: str
    host: str
    port: int
    seen: list[dict[str, str]] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return len(self.seen)


class BackendFactory(Protocol):
    async def __call__(self, name: str, host: str = "127.0.0.1") -> Backend: ...


class EnvoyFactory(Protocol):
    async def __call__(self, config: Any, **kwargs: Any) -> EnvoyProcess: ...


async def poll_until(
    check: Callable[[], Awaitable[T]], *, within: float = 10.0, interval: float = 0.05
) -> T:
    """Call ``check`` until it returns a truthy value and return that value.

    Raises AssertionError with the last value after ``within`` seconds. For conditions that
    Envoy reaches asynchronously (a counter updated after the response was sent, an xDS
    update applied); assert on the exact value afterwards.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(interval)


def static_cluster(
    name: str,
    backends: Sequence[Backend],
    *,
    weights: Sequence[int] | None = None,
    health: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A STATIC cluster whose endpoints are ``backends`` (optional per-endpoint weight/health)."""
    endpoints = []
    for i, backend in enumerate(backends):
        lb: dict[str, Any] = {
            "endpoint": {
                "address": {"socket_address": {"address": backend.host, "port_value": backend.port}}
            }
        }
        if weights is not None:
            lb["load_balancing_weight"] = weights[i]
        if health is not None:
            lb["health_status"] = health[i]
        endpoints.append(lb)
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": duration(1),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }


def loopback_bootstrap(
    *, listen_port: int, cluster: dict[str, Any], node_id: str = "test"
) -> dict[str, Any]:
    """A static Envoy: one HTTP listener on 127.0.0.1:listen_port sending all to ``cluster``;
    admin on 127.0.0.1 port 0 (read the real one from ``EnvoyProcess.admin_url``)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster["name"]}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "node": {"id": node_id, "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


@pytest.fixture
async def http_backends() -> AsyncIterator[BackendFactory]:
    runners: list[web.AppRunner] = []

    async def start(name: str, host: str = "127.0.0.1") -> Backend:
        backend = Backend(name=name, host=host, port=0)

        async def handle(request: web.Request) -> web.Response:
            backend.seen.append(dict(request.headers))
            return web.Response(text=name)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, host, 0)  # port 0: the OS picks, no race with others
        await site.start()
        backend.port = runner.addresses[0][1]
        return backend

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def envoy_factory(tmp_path: Path) -> AsyncIterator[EnvoyFactory]:
    async with contextlib.AsyncExitStack() as stack:
        counter = itertools.count(1)

        async def start(config: Any, **kwargs: Any) -> EnvoyProcess:
            kwargs.setdefault("workdir", tmp_path / f"envoy-{next(counter)}")
            return await stack.enter_async_context(EnvoyProcess(config, **kwargs))

        yield start

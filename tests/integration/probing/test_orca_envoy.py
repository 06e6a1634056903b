"""A real Envoy 1.40 uses the agent's ORCA TEXT header: client-side weighted round robin
(weight = qps / application_utilization) shifts traffic to the endpoint reporting less load.
A malformed header, as control, leaves plain round robin."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aviator_agent.orca import ORCA_HEADER, OrcaLoadReport, format_orca_text

from aviator.envoy.process import EnvoyProcess, free_port
from tests.integration.probing.servers import aiohttp_server

pytestmark = pytest.mark.envoy


def _app(name: str, header: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=name, headers={ORCA_HEADER: header})

    app = web.Application()
    app.router.add_get("/", handler)
    return app


def _bootstrap(listen: int, ports: list[int]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "in",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "in",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "backends"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backends",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "backends",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": port,
                                                }
                                            }
                                        }
                                    }
                                    for port in ports
                                ]
                            }
                        ],
                    },
                    "load_balancing_policy": {
                        "policies": [
                            {
                                "typed_extension_config": {
                                    "name": "envoy.load_balancing_policies."
                                    "client_side_weighted_round_robin",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "load_balancing_policies.client_side_weighted_round_robin"
                                        ".v3.ClientSideWeightedRoundRobin",
                                        "blackout_period": "0s",
                                        "weight_update_period": "0.1s",
                                    },
                                }
                            }
                        ]
                    },
                }
            ],
        },
    }


def _agent_header(utilization: float) -> str:
    # What the agent writes for RIF = utilization * capacity (capacity 10 here).
    return format_orca_text(
        OrcaLoadReport(
            application_utilization=utilization,
            rps_fractional=100.0,
            named_metrics={"rif": utilization * 10, "latency_ms": 20.0},
        )
    )


@pytest.mark.parametrize(
    ("busy_header", "idle_header", "idle_share"),
    [
        (_agent_header(0.9), _agent_header(0.1), (0.75, 1.0)),
        ("TEXT bogus:1", "TEXT bogus:1", (0.35, 0.65)),
    ],
    ids=["agent-text-header-weights-traffic", "malformed-header-leaves-round-robin"],
)
async def test_envoy_client_side_wrr_reads_the_agent_header(
    busy_header: str, idle_header: str, idle_share: tuple[float, float]
) -> None:
    async with (
        aiohttp_server(_app("busy", busy_header)) as busy,
        aiohttp_server(_app("idle", idle_header)) as idle,
    ):
        listen = free_port()
        async with EnvoyProcess(_bootstrap(listen, [busy, idle]), log_level="warning") as envoy:
            async with asyncio.timeout(20):
                await envoy.wait_live()
            seen: Counter[str] = Counter()
            async with aiohttp.ClientSession() as client:
                for i in range(300):
                    async with client.get(f"http://127.0.0.1:{listen}/") as r:
                        assert r.status == 200
                        name = await r.text()
                    if i >= 100:  # after weights have been computed from the first reports
                        seen[name] += 1
                    if i % 25 == 0:
                        await asyncio.sleep(0.12)  # let a weight update period pass
    share = seen["idle"] / sum(seen.values())
    assert idle_share[0] <= share <= idle_share[1], seen

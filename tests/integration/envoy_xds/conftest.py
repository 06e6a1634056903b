"""Fixtures of the real-Envoy xDS tests: backends, Envoys (tests/envoy_fixtures.py), an
in-process ADS server on a loopback port the OS picked, and gateway Envoys fed by it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from aviator.xds.cache import Cache
from aviator.xds.server import AdsServer
from tests.envoy_fixtures import EnvoyFactory, envoy_factory, http_backends
from tests.integration.envoy_xds.harness import IDENTIFIER, GatewayFactory, gateway_factory

__all__ = ["ads", "envoy_factory", "gateways", "http_backends"]


@pytest.fixture
async def ads() -> AsyncIterator[AdsServer]:
    """An ADS server over an empty cache (tests publish), with its own metrics registry."""
    server = AdsServer(Cache(), identifier=IDENTIFIER, metrics_registry=CollectorRegistry())
    await server.start("127.0.0.1:0")
    yield server
    await server.stop(0)


@pytest.fixture
async def gateways(envoy_factory: EnvoyFactory) -> AsyncIterator[GatewayFactory]:
    async with gateway_factory(envoy_factory) as start:
        yield start

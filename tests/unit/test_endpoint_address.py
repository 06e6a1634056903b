"""How an endpoint's address is printed: ``IP:PORT``, IPv6 in brackets (``[::1]:8080``) as Envoy
prints it; what Envoy is sent keeps the bare IP and the port apart."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import address_pb2

from aviator.envoy.admin import _format_address
from aviator.model import (
    EndpointAddress,
    WeightedEndpoint,
    WeightedWorkload,
    WorkloadKey,
    parse_host_port,
)
from aviator.xds.resources import build_load_assignment


@pytest.mark.parametrize(
    ("ip", "text"),
    [
        ("10.0.0.7", "10.0.0.7:8080"),
        ("::1", "[::1]:8080"),
        ("fd00:10::7", "[fd00:10::7]:8080"),
        ("::ffff:10.0.0.7", "[::ffff:10.0.0.7]:8080"),
    ],
)
def test_printed_as_envoy_prints_it_and_parsed_back(ip: str, text: str) -> None:
    address = EndpointAddress(ip, 8080)
    assert str(address) == text
    # Envoy's admin (/clusters) names the host the same way: `aviator inspect` joins on it.
    envoy = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=ip, port_value=8080)
    )
    assert _format_address(envoy) == text
    assert parse_host_port(text) == (ip, 8080)


def test_envoy_is_sent_the_bare_ip() -> None:
    workload = WeightedWorkload(
        WorkloadKey("shop", "web"), 8080, (WeightedEndpoint(EndpointAddress("::1", 8080)),)
    )
    cla = build_load_assignment(workload)
    socket = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (socket.address, socket.port_value) == ("::1", 8080)

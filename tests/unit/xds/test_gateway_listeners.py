"""A gateway's listener is built for its node: read from its metadata, resolved against the
server's defaults, and the only gateway listener its wildcard LDS subscription ever gets.

Every response is checked by the fakes, including "never another gateway's listener".
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.snapshot import SnapshotBuilder, build_snapshot
from tests.unit.xds.fakes import DeltaProxy, SotwProxy, workload

GW = r.GatewayConfig(address="0.0.0.0", port=10000)
A, B, C = (r.ListenSpec("0.0.0.0", p) for p in (44639, 44640, 44641))


def gateway_meta(port: int | None = None, address: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {r.META_MODE: "gateway"}
    if port is not None:
        meta[r.META_LISTEN_PORT] = port
    if address is not None:
        meta[r.META_LISTEN_ADDRESS] = address
    return meta


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def _cache(*listeners: r.ListenSpec, gateway: r.GatewayConfig | None = GW) -> Cache:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)], gateway=gateway, listeners=listeners))
    return cache


def _listener_names(proxy: SotwProxy | DeltaProxy, resp: Any) -> list[str]:
    return sorted(proxy.names(resp))


# -- reading the metadata --------------------------------------------------------------------


def test_metadata_without_aviator_keys_asks_for_the_defaults() -> None:
    info = r.read_node_listener(struct({}))
    assert info == r.NodeListener(gateway=True, request=r.ListenRequest(), problems=())
    assert GW.resolve(info.request) == GW.default


def test_metadata_with_port_and_address() -> None:
    info = r.read_node_listener(struct(gateway_meta(44639, "0:0::0")))
    assert info.request == r.ListenRequest("::", 44639)  # canonical form
    assert info.problems == ()
    assert GW.resolve(r.ListenRequest(port=44639)) == r.ListenSpec("0.0.0.0", 44639)
    assert GW.resolve(r.ListenRequest(address="127.0.0.1")) == r.ListenSpec("127.0.0.1", 10000)


def test_a_sidecar_asks_for_no_gateway_listener() -> None:
    info = r.read_node_listener(struct({r.META_MODE: "sidecar", r.META_LISTEN_PORT: 15001}))
    assert (info.gateway, info.problems) == (False, ())


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        (
            {r.META_LISTEN_PORT: 0},
            "aviator.io/listen-port must be a port number in 1..65535, got 0",
        ),
        ({r.META_LISTEN_PORT: 70000}, "in 1..65535, got 70000"),
        ({r.META_LISTEN_PORT: 8080.5}, "in 1..65535, got 8080.5"),
        ({r.META_LISTEN_PORT: -1}, "in 1..65535, got -1"),
        ({r.META_LISTEN_PORT: "44639"}, "got the string '44639'"),
        ({r.META_LISTEN_PORT: True}, "got the boolean true"),
        ({r.META_LISTEN_PORT: None}, "got null"),
        ({r.META_LISTEN_PORT: [1]}, "got a list"),
        ({r.META_LISTEN_ADDRESS: "localhost"}, "aviator.io/listen-address must be an IP address"),
        ({r.META_LISTEN_ADDRESS: "10.0.0.300"}, "got the string '10.0.0.300'"),
        ({r.META_LISTEN_ADDRESS: 5}, "IP address such as 0.0.0.0, 127.0.0.1 or ::, got 5"),
        # A good field next to a bad one is not half-used either.
        ({r.META_LISTEN_PORT: 44639, r.META_LISTEN_ADDRESS: ""}, "got the string ''"),
        ({r.META_LISTEN_PORT: 0, r.META_LISTEN_ADDRESS: "127.0.0.1"}, "got 0"),
    ],
)
def test_bad_listen_metadata_gives_the_default_listener_and_says_why(
    meta: dict[str, Any], problem: str
) -> None:
    info = r.read_node_listener(struct({r.META_MODE: "gateway", **meta}))
    assert info.gateway
    assert info.request == r.ListenRequest()  # the defaults
    assert any(problem in p for p in info.problems), info.problems
    assert info.problems[-1] == "this node gets the default gateway listener"


def test_an_unknown_mode_is_reported_and_read_as_a_gateway() -> None:
    info = r.read_node_listener(struct({r.META_MODE: "ingress", r.META_LISTEN_PORT: 44639}))
    assert info.gateway
    assert info.request == r.ListenRequest(port=44639)
    assert info.problems == (
        "aviator.io/mode must be 'gateway' or 'sidecar', got the string 'ingress': "
        "treated as a gateway",
    )


def test_listener_names_carry_address_and_port() -> None:
    assert r.ListenSpec("0.0.0.0", 44639).listener_name == "aviator-gateway-0.0.0.0-44639"
    assert r.ListenSpec("0::0", 80).listener_name == "aviator-gateway-[::]-80"
    assert str(r.ListenSpec("::1", 80)) == "[::1]:80"
    with pytest.raises(ValueError, match="a listener address must be an IP address, got 'x'"):
        r.ListenSpec("x", 80)
    with pytest.raises(ValueError, match=r"a listener port must be in 1\.\.65535, got 0"):
        r.ListenSpec("0.0.0.0", 0)
    with pytest.raises(ValueError, match="gateway address must be an IP address"):
        r.GatewayConfig(address="gateway.local")


# -- building ----------------------------------------------------------------------------------


def test_snapshot_holds_the_default_listener_and_one_per_distinct_spec() -> None:
    same_as_default = r.ListenSpec("0.0.0.0", 10000)
    snap = build_snapshot([workload("a", 1)], gateway=GW, listeners=[A, B, A, same_as_default])
    listeners = snap.of_type(r.LISTENER_TYPE)
    assert set(listeners) == {GW.listener_name, A.listener_name, B.listener_name}
    for spec in (A, B, GW.default):
        socket = listeners[spec.listener_name].message.address.socket_address  # type: ignore[attr-defined]
        assert (socket.address, socket.port_value) == (spec.address, spec.port)
    # One shared route configuration.
    assert set(snap.of_type(r.ROUTE_TYPE)) == {GW.route_name}
    assert {e.refs for e in listeners.values()} == {frozenset({GW.route_name})}
    snap.check()
    # No gateway: no listener, whatever was asked.
    assert not build_snapshot([workload("a", 1)], listeners=[A]).of_type(r.LISTENER_TYPE)


def test_builder_reuses_unchanged_listeners() -> None:
    builder = SnapshotBuilder()
    first = builder.build([workload("a", 1)], gateway=GW, listeners=[A])
    second = builder.build([workload("a", 2)], gateway=GW, listeners=[A, B])
    for name in (GW.listener_name, A.listener_name):
        assert second.of_type(r.LISTENER_TYPE)[name] is first.of_type(r.LISTENER_TYPE)[name]


# -- serving: SotW -----------------------------------------------------------------------------


def test_sotw_each_gateway_gets_only_its_own_listener() -> None:
    cache = _cache(A, B, C)
    for spec in (A, B, C):
        proxy = SotwProxy(cache, f"gw-{spec.port}", metadata=gateway_meta(spec.port))
        (lds,) = proxy.request(r.LISTENER_TYPE, [])
        assert _listener_names(proxy, lds) == [spec.listener_name]
        (proxy_status,) = [proxy.stream.status()]
        assert proxy_status.listener == spec.listener_name
        # The version names exactly what this node is sent.
        proxy.ack(lds)
        assert lds.version_info != cache.type_version(r.LISTENER_TYPE)
    # A node naming nothing gets the default listener.
    plain = SotwProxy(cache, "plain")
    (lds,) = plain.request(r.LISTENER_TYPE, [])
    assert _listener_names(plain, lds) == [GW.listener_name]


def test_sotw_a_gateway_waits_for_its_listener_and_never_loses_it() -> None:
    cache = _cache()  # the default listener only: the producer has not heard of A yet
    proxy = SotwProxy(cache, "gw-a", metadata=gateway_meta(A.port))
    proxy.ack(proxy.request(r.CLUSTER_TYPE, [])[0])
    # Answering now would say "no listener": Envoy would remove the one it may hold.
    assert proxy.request(r.LISTENER_TYPE, []) == []
    assert proxy.stream.status().listener == A.listener_name
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW, listeners=[A]))
    (lds,) = proxy.flush()  # the owed answer
    assert _listener_names(proxy, lds) == [A.listener_name]
    proxy.ack(lds)
    # The producer drops A while the node holds it: nothing is sent, the node keeps it.
    cache.publish(build_snapshot([workload("a", 2)], gateway=GW))
    assert [x.type_url for x in proxy.flush()] == []
    # It comes back changed (another route name): sent.
    cache.publish(
        build_snapshot(
            [workload("a", 2)],
            gateway=r.GatewayConfig(address=GW.address, port=GW.port, route_name="other"),
            listeners=[A],
        )
    )
    (lds,) = proxy.flush()
    assert _listener_names(proxy, lds) == [A.listener_name]


def test_sotw_another_gateways_listener_wakes_nobody_else() -> None:
    cache = _cache(A)
    proxy = SotwProxy(cache, "gw-a", metadata=gateway_meta(A.port))
    proxy.ack(proxy.request(r.LISTENER_TYPE, [])[0])
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW, listeners=[A, B]))
    assert proxy.stream._dirty == set()
    assert proxy.flush() == []
    assert cache.watcher_count(r.LISTENER_TYPE) == 0  # no wildcard watch on listeners
    assert cache.watcher_count(r.LISTENER_TYPE, A.listener_name) == 1
    proxy.stream.close()
    assert cache.watcher_count(r.LISTENER_TYPE, A.listener_name) == 0


@pytest.mark.parametrize("gateway", [GW, None], ids=["gateway-on", "gateway-off"])
def test_sotw_a_sidecar_and_a_server_without_gateways_give_no_gateway_listener(
    gateway: r.GatewayConfig | None,
) -> None:
    cache = _cache(A)
    meta = {r.META_MODE: "sidecar"} if gateway is not None else gateway_meta(A.port)
    proxy = SotwProxy(cache, "n", metadata=meta, gateway=gateway)
    (lds,) = proxy.request(r.LISTENER_TYPE, [])
    assert list(lds.resources) == []
    assert proxy.stream.status().listener is None


def test_sotw_a_gateway_may_still_name_listeners_it_wants() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW, grpc_api_listeners=True))
    proxy = SotwProxy(cache, "grpc-client", metadata={})
    (lds,) = proxy.request(r.LISTENER_TYPE, ["a.default"])
    assert _listener_names(proxy, lds) == ["a.default"]


def test_sotw_bad_metadata_gets_the_default_listener_and_a_problem() -> None:
    cache = _cache(A)
    proxy = SotwProxy(cache, "gw-bad", metadata=gateway_meta(70000))
    (lds,) = proxy.request(r.LISTENER_TYPE, [])
    assert _listener_names(proxy, lds) == [GW.listener_name]
    status = proxy.stream.status()
    assert status.listener == GW.listener_name
    assert status.problems == (
        "aviator.io/listen-port must be a port number in 1..65535, got 70000",
        "this node gets the default gateway listener",
    )


# -- serving: delta ----------------------------------------------------------------------------


def test_delta_each_gateway_gets_only_its_own_listener() -> None:
    cache = _cache(A, B)
    for spec in (A, B):
        proxy = DeltaProxy(cache, f"gw-{spec.port}", metadata=gateway_meta(spec.port))
        (lds,) = proxy.request(r.LISTENER_TYPE)
        assert [x.name for x in lds.resources] == [spec.listener_name]
        assert list(lds.removed_resources) == []


def test_delta_a_gateway_waits_for_its_listener_and_never_loses_it() -> None:
    cache = _cache()
    proxy = DeltaProxy(cache, "gw-a", metadata=gateway_meta(A.port))
    assert proxy.request(r.LISTENER_TYPE) == []
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW, listeners=[A]))
    (lds,) = proxy.flush()
    assert [x.name for x in lds.resources] == [A.listener_name]
    proxy.ack(lds)
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW))  # A dropped: not removed
    assert proxy.flush() == []


def test_delta_reconnect_keeps_its_listener_and_drops_anothers() -> None:
    """Envoy back with its listener (and, say, one an older control plane sent it): no
    removal of its own before it is in the cache; the foreign one is removed after."""
    cache = _cache(B)
    own = cache.get(r.LISTENER_TYPE, B.listener_name)
    assert own is not None
    held = {A.listener_name: "a-version", GW.listener_name: "x"}  # not its own
    later = build_snapshot([workload("a", 1)], gateway=GW, listeners=[A, B])
    own_a = later.of_type(r.LISTENER_TYPE)[A.listener_name]
    proxy = DeltaProxy(cache, "gw-a", metadata=gateway_meta(A.port))
    assert proxy.request(r.LISTENER_TYPE, initial={**held, A.listener_name: own_a.version}) == []
    cache.publish(later)
    (lds,) = proxy.flush()
    assert list(lds.resources) == []  # it holds its own at this version already
    assert list(lds.removed_resources) == [GW.listener_name]


def test_delta_a_sidecar_gets_an_empty_answer() -> None:
    cache = _cache(A)
    proxy = DeltaProxy(cache, "sc", metadata={r.META_MODE: "sidecar"})
    (lds,) = proxy.request(r.LISTENER_TYPE)
    assert (list(lds.resources), list(lds.removed_resources)) == ([], [])

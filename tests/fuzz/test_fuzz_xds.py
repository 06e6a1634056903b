"""The ADS protocol state machine on arbitrary requests (issue 14).

Sequences of SotW and delta requests whose every field is drawn (type URL, node id, names,
versions, nonces: random, or a nonce the stream did send; NACKs with arbitrary messages),
interleaved with publishes, on small limits so that refusals happen too. The only exception
is :class:`StreamRefusedError`, whose message names a field; every response has a fresh
nonce, a known type, and never a weight of 0; after a refusal the server's other streams are
unaffected (a fresh stream is answered).
"""

from __future__ import annotations

from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.delta import DeltaStream
from aviator.xds.limits import StreamLimits, StreamRefusedError
from aviator.xds.nacks import RejectedVersions
from aviator.xds.snapshot import build_snapshot
from aviator.xds.sotw import SotwStream
from tests.unit.xds.fakes import IDENTIFIER, workload

LIMITS = StreamLimits(max_node_id_bytes=64, max_names=6, max_name_bytes=32, max_unknown_types=3)
TYPES = [r.CLUSTER_TYPE, r.ENDPOINT_TYPE, r.LISTENER_TYPE, r.ROUTE_TYPE]
NAMES = ["default/a", "default/b", "default/c", "*", "", "aviator-gateway-0.0.0.0-10000", "x"]
FIELDS = ("node.id", "resource_names", "type_url")

texts = st.text(max_size=80)
names = st.lists(st.one_of(st.sampled_from(NAMES), st.text(max_size=40)), max_size=9)


@st.composite
def request_fields(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "type_url": draw(st.one_of(st.sampled_from(TYPES), texts)),
        "node": draw(st.one_of(st.none(), st.sampled_from(["gw-1", ""]), texts)),
        "names": draw(names),
        "unsubscribe": draw(names),
        "version": draw(st.one_of(st.just(""), texts)),
        "nonce": draw(st.one_of(st.just(""), st.just("SENT"), texts)),
        "nack": draw(st.one_of(st.none(), st.text(max_size=200))),
        "initial": draw(st.dictionaries(st.sampled_from(NAMES), texts, max_size=3)),
    }


steps = st.lists(
    st.one_of(request_fields(), st.tuples(st.just("publish"), st.integers(1, 1000))),
    min_size=1,
    max_size=25,
)


def _sotw(f: dict[str, Any], nonce: str) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=f["type_url"], resource_names=f["names"], version_info=f["version"],
        response_nonce=nonce,
    )  # fmt: skip
    if f["node"] is not None:
        req.node.id = f["node"]
    if f["nack"] is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=f["nack"]))
    return req


def _delta(f: dict[str, Any], nonce: str) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=f["type_url"], resource_names_subscribe=f["names"],
        resource_names_unsubscribe=f["unsubscribe"], response_nonce=nonce,
        initial_resource_versions=f["initial"],
    )  # fmt: skip
    if f["node"] is not None:
        req.node.id = f["node"]
    if f["nack"] is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=f["nack"]))
    return req


def _check(responses: list[Any], nonces: set[str], sent: dict[str, str]) -> None:
    from tests.unit.xds.fakes import decode

    for resp in responses:
        assert resp.nonce
        assert resp.nonce not in nonces
        nonces.add(resp.nonce)
        assert resp.type_url in TYPES
        sent[resp.type_url] = resp.nonce
        if resp.type_url == r.ENDPOINT_TYPE:
            for packed in resp.resources:
                cla = decode(r.ENDPOINT_TYPE, getattr(packed, "resource", packed))
                for group in cla.endpoints:
                    for lb in group.lb_endpoints:
                        assert lb.load_balancing_weight.value >= 1


def _run(kind: str, plan: list[Any]) -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 2)], gateway=r.GatewayConfig()))
    rejected = RejectedVersions()
    cls = SotwStream if kind == "sotw" else DeltaStream
    stream: Any = cls(cache, identifier=IDENTIFIER, limits=LIMITS, rejected=rejected)
    nonces: set[str] = set()
    sent: dict[str, str] = {}
    refused: StreamRefusedError | None = None
    try:
        for step in plan:
            if isinstance(step, tuple):
                cache.publish(
                    build_snapshot(
                        [workload("a", step[1]), workload("c", 1)], gateway=r.GatewayConfig()
                    )
                )
                _check(stream.flush(), nonces, sent)
                continue
            nonce = sent.get(step["type_url"], "") if step["nonce"] == "SENT" else step["nonce"]
            request = _sotw(step, nonce) if kind == "sotw" else _delta(step, nonce)
            _check(stream.handle(request), nonces, sent)
            stream.status()  # the debug view of any state is defined
    except StreamRefusedError as exc:
        refused = exc
    finally:
        stream.close()
    if refused is not None:
        assert refused.code in {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}
        assert refused.message.startswith(FIELDS), refused.message
    # The refused or finished stream left nothing behind that a new stream notices.
    fresh: Any = cls(cache, identifier=IDENTIFIER, rejected=rejected)
    first = (
        discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE)
        if kind == "sotw"
        else discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE)
    )
    [cds] = fresh.handle(first)
    assert len(cds.resources) == len(cache.resources(r.CLUSTER_TYPE))
    fresh.close()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(steps)
def test_sotw_requests_never_raise_but_a_refusal(plan: list[Any]) -> None:
    _run("sotw", plan)


@FUZZ
@given(steps)
def test_delta_requests_never_raise_but_a_refusal(plan: list[Any]) -> None:
    _run("delta", plan)

"""Fake proxies that play Envoy against a protocol stream and check every response.

Every response a fake receives is checked against the rules a proxy relies on:
- the nonce is non-empty and never seen before on the stream;
- ``control_plane.identifier`` is set;
- the version is not one this proxy has rejected for that type;
- at most one response per type is in flight (the previous one was ACKed or NACKed);
- every resource has the response's type URL;
- a gateway listener (``aviator-gateway-…``) is only ever the node's own (Envoy would bind
  another gateway's);
- make before break: a RouteConfiguration names only clusters the proxy has accepted (or that
  are unknown to the server altogether); a Cluster that an accepted route still names is never
  removed; delta never removes a CLA an accepted cluster uses or a route an accepted listener uses.

The fakes are synchronous: they call ``stream.handle`` / ``stream.flush`` directly and keep the
received responses in ``inbox`` for the test to ACK or NACK, the way Envoy would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from aviator.model import EndpointAddress, Health, WeightedEndpoint, WeightedWorkload, WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.delta import DeltaStream
from aviator.xds.metrics import XdsMetrics
from aviator.xds.nacks import NackJournal, RejectedVersions
from aviator.xds.protocol import DEFAULT_GATEWAY
from aviator.xds.sotw import SotwStream

IDENTIFIER = "aviator-test"


def workload(
    name: str, *weights: int, namespace: str = "default", port: int = 8080
) -> WeightedWorkload:
    """A workload with one endpoint per weight, at 10.0.0.<i+1>:port."""
    return WeightedWorkload(
        WorkloadKey(namespace, name),
        port,
        tuple(
            WeightedEndpoint(EndpointAddress(f"10.0.0.{i + 1}", port), w, Health.HEALTHY)
            for i, w in enumerate(weights)
        ),
    )


def decode(type_url: str, any_msg: Any) -> Message:
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    cls: type[Message] = {
        r.CLUSTER_TYPE: cluster_pb2.Cluster,
        r.ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
        r.LISTENER_TYPE: listener_pb2.Listener,
        r.ROUTE_TYPE: route_pb2.RouteConfiguration,
    }[type_url]
    msg = cls()
    assert any_msg.type_url == type_url, (
        f"resource of type {any_msg.type_url} in a {type_url} response"
    )
    msg.ParseFromString(any_msg.value)
    return msg


class _FakeProxy:
    kind = ""

    def __init__(
        self,
        cache: Cache,
        node_id: str = "proxy-1",
        journal: NackJournal | None = None,
        metrics: XdsMetrics | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        gateway: r.GatewayConfig | None = DEFAULT_GATEWAY,
        rejected: RejectedVersions | None = None,
    ) -> None:
        """``metadata``: the node metadata sent on the first request (as a bootstrap's
        ``node.metadata``); ``gateway``: the server's gateway defaults; ``rejected``: shared
        by fakes that play one node reconnecting."""
        self.cache = cache
        self.node_id = node_id
        self.metadata = metadata or {}
        self.metrics = metrics or XdsMetrics()
        self.journal = journal or NackJournal()
        self.stream_options: dict[str, Any] = {
            "identifier": IDENTIFIER,
            "metrics": self.metrics,
            "journal": self.journal,
            "gateway": gateway,
            "rejected": rejected,
        }
        self.seen_nonces: set[str] = set()
        self.nacked: dict[str, set[str]] = {}
        self.in_flight: dict[str, str] = {}  # type → nonce of the unanswered response
        self.latest_nonce: dict[str, str] = {}
        self.held: dict[str, dict[str, Message]] = {t: {} for t in r.TYPE_ORDER}
        self.inbox: list[Any] = []
        self.received: list[Any] = []
        self.sent_node = False

    # -- checks ------------------------------------------------------------------------------

    def _check_common(self, resp: Any, version: str) -> None:
        assert resp.nonce, "empty nonce"
        assert resp.nonce not in self.seen_nonces, f"nonce {resp.nonce} reused on the stream"
        self.seen_nonces.add(resp.nonce)
        assert resp.control_plane.identifier == IDENTIFIER
        assert version, "empty version"
        assert version not in self.nacked.get(resp.type_url, set()), (
            f"version {version} of {resp.type_url} was rejected before and is sent again"
        )
        assert resp.type_url not in self.in_flight, (
            f"a second {resp.type_url} response while {self.in_flight[resp.type_url]} is unanswered"
        )
        self.in_flight[resp.type_url] = resp.nonce
        self.latest_nonce[resp.type_url] = resp.nonce

    def _check_order(self, type_url: str, new_state: dict[str, Message]) -> None:
        """Make before break, judged on what the proxy would hold after applying."""
        held_clusters = self.held[r.CLUSTER_TYPE]
        known_clusters = self.cache.resources(r.CLUSTER_TYPE)
        if type_url == r.ROUTE_TYPE and self.uses_cds:
            for name, route in new_state.items():
                for cluster in r.references(r.ROUTE_TYPE, route):
                    assert cluster in held_clusters or cluster not in known_clusters, (
                        f"route {name} names cluster {cluster} before the proxy accepted it"
                    )
        if type_url == r.CLUSTER_TYPE:
            used = {
                c for rt in self.held[r.ROUTE_TYPE].values() for c in r.references(r.ROUTE_TYPE, rt)
            }
            for gone in held_clusters.keys() - new_state.keys():
                assert gone not in used, f"cluster {gone} removed while a held route names it"
        if type_url == r.ENDPOINT_TYPE:
            used = {e for c in held_clusters.values() for e in r.references(r.CLUSTER_TYPE, c)}
            for gone in self.held[r.ENDPOINT_TYPE].keys() - new_state.keys():
                assert gone not in used, f"endpoints {gone} removed while a held cluster uses them"
        if type_url == r.ROUTE_TYPE:
            used = {
                n
                for lst in self.held[r.LISTENER_TYPE].values()
                for n in r.references(r.LISTENER_TYPE, lst)
            }
            for gone in self.held[r.ROUTE_TYPE].keys() - new_state.keys():
                assert gone not in used, f"route {gone} removed while a held listener uses it"

    def _check_listeners(self, type_url: str, names: Iterable[str]) -> None:
        if type_url != r.LISTENER_TYPE:
            return
        spec = self.stream.listen_spec
        own = spec.listener_name if spec is not None else None
        for name in names:
            if name.startswith(r.GATEWAY_LISTENER_PREFIX + "-"):
                assert name == own, f"node {self.node_id} (listener {own}) was sent {name}"

    @property
    def uses_cds(self) -> bool:
        return True

    def _receive(self, responses: Iterable[Any]) -> list[Any]:
        out = list(responses)
        for resp in out:
            self.check(resp)
        self.inbox.extend(out)
        self.received.extend(out)
        return out

    def check(self, resp: Any) -> None:
        raise NotImplementedError

    def flush(self) -> list[Any]:
        return self._receive(self.stream.flush())

    def take(self, type_url: str | None = None) -> Any:
        """Pop the oldest unprocessed response (of one type)."""
        for i, resp in enumerate(self.inbox):
            if type_url is None or resp.type_url == type_url:
                return self.inbox.pop(i)
        raise AssertionError(f"no {type_url or 'response'} received; inbox={self.inbox_types()}")

    def _consume(self, resp: Any) -> None:
        """Remove ``resp`` from the inbox (by identity) and from the in-flight table."""
        assert self.in_flight.get(resp.type_url) == resp.nonce, "answer to a response not in flight"
        del self.in_flight[resp.type_url]
        self.inbox = [x for x in self.inbox if x is not resp]

    def node(self) -> base_pb2.Node:
        metadata = struct_pb2.Struct()
        metadata.update(self.metadata)
        return base_pb2.Node(id=self.node_id, metadata=metadata)

    def inbox_types(self) -> list[str]:
        return [r.TYPE_SHORT[x.type_url] for x in self.inbox]

    def names(self, resp: Any) -> list[str]:
        raise NotImplementedError

    stream: Any


class SotwProxy(_FakeProxy):
    """Plays an Envoy on a SotW stream."""

    kind = "sotw"

    def __init__(self, cache: Cache, node_id: str = "proxy-1", **kw: Any) -> None:
        super().__init__(cache, node_id, **kw)
        self.stream = SotwStream(cache, **self.stream_options)
        self.version: dict[str, str] = {}  # accepted version_info per type
        self.subscribed: dict[str, list[str]] = {}

    def check(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        self._check_common(resp, resp.version_info)
        state = {
            r.resource_name(resp.type_url, m): m
            for m in (decode(resp.type_url, a) for a in resp.resources)
        }
        self._check_listeners(resp.type_url, state)
        if resp.type_url in r.FULL_STATE_TYPES:
            self._check_order(resp.type_url, state)
        else:
            self._check_order(resp.type_url, {**self.held[resp.type_url], **state})
            wanted = set(self.subscribed.get(resp.type_url, []))
            assert set(state) <= wanted, f"unrequested {resp.type_url} names {set(state) - wanted}"

    def names(self, resp: discovery_pb2.DiscoveryResponse) -> list[str]:
        return [r.resource_name(resp.type_url, decode(resp.type_url, a)) for a in resp.resources]

    def request(
        self,
        type_url: str,
        names: Iterable[str] | None = None,
        *,
        nonce: str | None = None,
        version: str | None = None,
        error: str | None = None,
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """Send a request; names default to the current subscription, nonce to the latest
        received, version to the accepted one (what Envoy does)."""
        if names is not None:
            self.subscribed[type_url] = list(names)
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=self.subscribed.get(type_url, []),
            version_info=self.version.get(type_url, "") if version is None else version,
            response_nonce=self.latest_nonce.get(type_url, "") if nonce is None else nonce,
        )
        if not self.sent_node:
            req.node.CopyFrom(self.node())
            self.sent_node = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        return self._receive(self.stream.handle(req))

    def ack(
        self, resp: discovery_pb2.DiscoveryResponse, names: Iterable[str] | None = None
    ) -> list[Any]:
        """Accept a response (apply it) and send the ACK."""
        self._consume(resp)
        state = {
            r.resource_name(resp.type_url, m): m
            for m in (decode(resp.type_url, a) for a in resp.resources)
        }
        if resp.type_url in r.FULL_STATE_TYPES:
            self.held[resp.type_url] = state
        else:
            self.held[resp.type_url].update(state)
        self.version[resp.type_url] = resp.version_info
        return self.request(resp.type_url, names, nonce=resp.nonce)

    def nack(self, resp: discovery_pb2.DiscoveryResponse, message: str = "rejected") -> list[Any]:
        self._consume(resp)
        self.nacked.setdefault(resp.type_url, set()).add(resp.version_info)
        return self.request(resp.type_url, nonce=resp.nonce, error=message)

    def ack_all(self, max_rounds: int = 20) -> None:
        """ACK everything (and what the ACKs trigger) until the stream is quiet."""
        for _ in range(max_rounds):
            if not self.inbox:
                return
            resp = self.inbox[0]
            self.ack(resp, self._follow(resp))
        raise AssertionError("stream did not settle")

    def _follow(self, resp: discovery_pb2.DiscoveryResponse) -> list[str] | None:
        return None


class EnvoyLikeSotwProxy(SotwProxy):
    """Also subscribes, like Envoy, to the EDS names of accepted clusters and RDS names of
    accepted listeners (sending those requests after the ACK that caused them)."""

    def ack(
        self, resp: discovery_pb2.DiscoveryResponse, names: Iterable[str] | None = None
    ) -> list[Any]:
        out = super().ack(resp, names)
        if resp.type_url == r.CLUSTER_TYPE:
            eds = sorted(
                {
                    e
                    for c in self.held[r.CLUSTER_TYPE].values()
                    for e in r.references(r.CLUSTER_TYPE, c)
                }
            )
            if eds != sorted(self.subscribed.get(r.ENDPOINT_TYPE, [])):
                self.held[r.ENDPOINT_TYPE] = {
                    n: m for n, m in self.held[r.ENDPOINT_TYPE].items() if n in eds
                }
                out += self.request(r.ENDPOINT_TYPE, eds)
        if resp.type_url == r.LISTENER_TYPE:
            rds = sorted(
                {
                    n
                    for lst in self.held[r.LISTENER_TYPE].values()
                    for n in r.references(r.LISTENER_TYPE, lst)
                }
            )
            if rds != sorted(self.subscribed.get(r.ROUTE_TYPE, [])):
                self.held[r.ROUTE_TYPE] = {
                    n: m for n, m in self.held[r.ROUTE_TYPE].items() if n in rds
                }
                out += self.request(r.ROUTE_TYPE, rds)
        return out

    def start(self) -> None:
        self.request(r.CLUSTER_TYPE, [])
        self.request(r.LISTENER_TYPE, [])


class DeltaProxy(_FakeProxy):
    """Plays an Envoy on a delta stream."""

    kind = "delta"

    def __init__(self, cache: Cache, node_id: str = "proxy-1", **kw: Any) -> None:
        super().__init__(cache, node_id, **kw)
        self.stream = DeltaStream(cache, **self.stream_options)
        self.versions: dict[str, dict[str, str]] = {t: {} for t in r.TYPE_ORDER}
        self.subscribed: dict[str, set[str]] = {}
        self.wildcard: dict[str, bool] = {}

    def check(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        self._check_common(resp, resp.system_version_info)
        state = dict(self.held[resp.type_url])
        names = [res.name for res in resp.resources]
        assert len(set(names)) == len(names), "a name twice in one response"
        self._check_listeners(resp.type_url, names)
        assert not set(names) & set(resp.removed_resources), "a name both sent and removed"
        for res in resp.resources:
            # Per-resource version: hash of the serialised resource.
            assert res.version == hashlib.blake2b(res.resource.value, digest_size=8).hexdigest()
            assert self.wildcard.get(resp.type_url) or res.name in self.subscribed.get(
                resp.type_url, set()
            ), f"unsubscribed {res.name} sent"
            state[res.name] = decode(resp.type_url, res.resource)
        for name in resp.removed_resources:
            state.pop(name, None)
        self._check_order(resp.type_url, state)

    def names(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
        return [res.name for res in resp.resources]

    def request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str | None = None,
        initial: dict[str, str] | None = None,
        error: str | None = None,
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        subscribe, unsubscribe = list(subscribe), list(unsubscribe)
        first = type_url not in self.subscribed
        subs = self.subscribed.setdefault(type_url, set())
        if first and not subscribe and type_url in r.FULL_STATE_TYPES:
            self.wildcard[type_url] = True
        if "*" in subscribe:
            self.wildcard[type_url] = True
        subs |= set(subscribe) - {"*"}
        subs -= set(unsubscribe)
        for name in unsubscribe:
            self.held[type_url].pop(name, None)
            self.versions[type_url].pop(name, None)
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe,
            response_nonce=self.latest_nonce.get(type_url, "") if nonce is None else nonce,
            initial_resource_versions=initial or {},
        )
        if not self.sent_node:
            req.node.CopyFrom(self.node())
            self.sent_node = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        return self._receive(self.stream.handle(req))

    def ack(
        self, resp: discovery_pb2.DeltaDiscoveryResponse, subscribe: Iterable[str] = ()
    ) -> list[Any]:
        self._consume(resp)
        for res in resp.resources:
            self.held[resp.type_url][res.name] = decode(resp.type_url, res.resource)
            self.versions[resp.type_url][res.name] = res.version
        for name in resp.removed_resources:
            self.held[resp.type_url].pop(name, None)
            self.versions[resp.type_url].pop(name, None)
        return self.request(resp.type_url, subscribe, nonce=resp.nonce)

    def nack(
        self, resp: discovery_pb2.DeltaDiscoveryResponse, message: str = "rejected"
    ) -> list[Any]:
        self._consume(resp)
        self.nacked.setdefault(resp.type_url, set()).add(resp.system_version_info)
        return self.request(resp.type_url, nonce=resp.nonce, error=message)

    def ack_all(self, max_rounds: int = 20) -> None:
        for _ in range(max_rounds):
            if not self.inbox:
                return
            self.ack(self.inbox[0])
        raise AssertionError("stream did not settle")

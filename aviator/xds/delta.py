"""The incremental (delta) ADS stream: :class:`DeltaStream`, on the rules of
:class:`~aviator.xds.protocol.ProtocolStream` (see that module for the protocol rules).
"""

from __future__ import annotations

import sys

import structlog
from envoy.service.discovery.v3 import discovery_pb2

from aviator.xds.bodies import Outgoing
from aviator.xds.protocol import (
    DEPENDENTS,
    WILDCARD,
    Held,
    ProtocolStream,
    Sent,
    StreamKind,
    TypeState,
    nack_of,
)
from aviator.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    FULL_STATE_TYPES,
    TYPE_SHORT,
)
from aviator.xds.snapshot import entries_version

log = structlog.get_logger(__name__)


class DeltaStream(
    ProtocolStream[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse]
):
    """Incremental ADS (``DeltaAggregatedResources``)."""

    kind = StreamKind.DELTA

    def _handle(
        self, type_url: str, st: TypeState, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> list[Outgoing[discovery_pb2.DeltaDiscoveryResponse]]:
        nonce = request.response_nonce
        stale = self._is_stale(st, nonce)
        first = not st.requested
        st.requested = True
        # Subscriptions are honoured even when the nonce is stale.
        self._subscribe(type_url, st, request, first)
        resolved = False
        if stale:
            self._log.debug("stale nonce: only subscriptions applied", type=TYPE_SHORT[type_url])
        else:
            error = nack_of(request)
            resolved = self._resolve(type_url, st, nonce, error, "")
            if type_url == ENDPOINT_TYPE and st.warming:
                st.force_names |= {n for n in st.warming if st.in_scope(n)}
                st.warming.clear()
        # A first wildcard request is answered even when empty: the proxy's initial fetch
        # completes instead of waiting for its timeout.
        todo = {type_url: first and st.wildcard}
        # A plain ACK (no subscription change): only what the cache changed can be owed.
        subscription = (
            first
            or len(request.resource_names_subscribe) > 0
            or len(request.resource_names_unsubscribe) > 0
        )
        scoped = () if subscription else (type_url,)
        if resolved:
            for dependent in DEPENDENTS[type_url]:
                todo.setdefault(dependent, False)
        return self._evaluate_all(todo, scoped)

    def _subscribe(
        self,
        type_url: str,
        st: TypeState,
        request: discovery_pb2.DeltaDiscoveryRequest,
        first: bool,
    ) -> None:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        count = len(st.names) + len(subscribe)
        if count > self._limits.max_names:  # exact only when it may matter (O(names))
            count = len((st.names - unsubscribe) | subscribe)
        self._check_names(type_url, count, subscribe)
        if first:
            self._check_names(
                type_url,
                len(request.initial_resource_versions),
                request.initial_resource_versions.keys(),
            )
        subscribe = {sys.intern(n) for n in subscribe}
        wildcard = st.wildcard
        if first and not subscribe and type_url in FULL_STATE_TYPES:
            wildcard = True  # legacy wildcard
        if WILDCARD in subscribe:
            wildcard = True
        if WILDCARD in unsubscribe:
            wildcard = False
        subscribe.discard(WILDCARD)
        unsubscribe.discard(WILDCARD)
        before = st.names
        for name in unsubscribe:
            st.force_names.discard(name)
            st.reported_absent.discard(name)
            if not wildcard:
                # The proxy forgets it; a later subscribe must send it again.
                st.held.pop(name, None)
        if first:
            current = self._cache.resources(type_url)
            for name, version in request.initial_resource_versions.items():
                entry = current.get(name)
                if entry is not None and entry.version == version:
                    st.held[name] = entry
                else:
                    refs = entry.refs if entry is not None else frozenset()
                    st.held[name] = Held(version, refs)
        else:
            for name in subscribe:
                # A re-subscribe (e.g. a cluster re-created) expects the resource again.
                if name in st.held:
                    st.force_names.add(name)
                st.reported_absent.discard(name)
        st.names = (before - unsubscribe) | subscribe
        self._watch_diff(type_url, st, before, st.names)
        if wildcard and not st.wildcard:
            self._set_wildcard(type_url, st, True)
        elif not wildcard and st.wildcard:
            self._set_wildcard(type_url, st, False)

    def _after_send(self, type_url: str, st: TypeState, sent: Sent) -> None:
        super()._after_send(type_url, st, sent)
        eds = self._types.get(ENDPOINT_TYPE)
        if type_url != CLUSTER_TYPE or eds is None:
            return
        # Warming, delta flavour: Envoy does NOT re-request the endpoints of a changed cluster
        # whose EDS name it already subscribes to (the new cluster's watch joins the existing
        # subscription, so nothing goes on the wire: envoyproxy/envoy#47302, go-control-plane
        # #1001/#1035), and it holds the CDS ACK until the cluster is warm. Waiting for a
        # request leaves the cluster warming until initial_fetch_timeout (15 s, seen with Envoy
        # 1.40): resend those endpoints unasked, right after the clusters. Names not
        # subscribed yet (new clusters) are asked for by Envoy and answered as usual.
        resend = {n for n in eds.warming if eds.in_scope(n)}
        if resend:
            eds.force_names |= resend
            eds.warming -= resend
            self._follow_up.add(ENDPOINT_TYPE)

    @staticmethod
    def _claims_state(request: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        return len(request.initial_resource_versions) > 0

    def _apply_ack(self, type_url: str, st: TypeState, sent: Sent) -> None:
        for name, entry in sent.entries.items():
            if st.in_scope(name):
                st.held[name] = entry
        for name in sent.removed:
            st.held.pop(name, None)
        # A removal told the proxy the name is gone: a name it still subscribes to needs no
        # second "does not exist" after it.
        st.reported_absent |= {n for n in sent.absent | sent.removed if n in st.names}

    def _evaluate(
        self, type_url: str, st: TypeState, force: bool, scoped: bool
    ) -> Outgoing[discovery_pb2.DeltaDiscoveryResponse] | None:
        if not st.requested:
            return None
        if st.outstanding is not None:
            self._defer(st, force, scoped)
            return None
        if self._waiting(type_url, st, force):
            return None
        force = force or st.force
        changed = self._take_changes(st, scoped and not force and not st.force_names)
        current = self._cache.resources(type_url)
        if changed is not None and type_url == ENDPOINT_TYPE:
            # Only the names the cache changed can differ from what the proxy holds: the
            # same rules as below, applied to those names alone.
            upserts = {
                n: e
                for n in self._in_scope(st, changed)
                if (e := current.get(n)) is not None
                and ((h := st.held.get(n)) is None or h.version != e.version)
            }
            gone = {n for n in changed if n not in current}
            removed = {n for n in gone if n in st.held}
            if removed:
                removed -= self._protected(type_url)
            absent = {
                n
                for n in gone
                if n in st.names and n not in st.held and n not in st.reported_absent
            }
        else:
            out, kept = self._targets(type_url, st)
            upserts = {
                n: e
                for n, e in out.items()
                if n in st.force_names or (h := st.held.get(n)) is None or h.version != e.version
            }
            protected = self._protected(type_url)
            removed = {n for n in st.held if n not in out and n not in kept and n not in protected}
            absent = {
                n
                for n in st.names
                if n not in current and n not in st.held and n not in st.reported_absent
            }
        if not upserts and not removed and not absent and not force:
            return None
        ordered = sorted(upserts.items())
        version = entries_version(type_url, (e for _, e in ordered), removed | absent)
        if self._suppressed(type_url, st, version):
            st.force = False
            return None

        def body() -> discovery_pb2.DeltaDiscoveryResponse:
            resp = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                type_url=type_url,
                control_plane=self._control_plane(),
            )
            resp.resources.extend(e.delta_resource for _, e in ordered)
            resp.removed_resources.extend(sorted(removed | absent))
            return resp

        nonce = self._next_nonce()
        resp = Outgoing(self._bodies.get((self.kind, type_url, version), body), nonce)
        st.force_names -= upserts.keys()
        self._after_send(
            type_url, st, Sent(nonce, version, upserts, frozenset(removed), frozenset(absent))
        )
        if type_url == ENDPOINT_TYPE:
            st.warming -= upserts.keys()
        return resp

"""The state-of-the-world ADS stream: :class:`SotwStream`, on the rules of
:class:`~aviator.xds.protocol.ProtocolStream` (see that module for the protocol rules).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Set

import structlog
from envoy.service.discovery.v3 import discovery_pb2

from aviator.xds.bodies import Outgoing
from aviator.xds.limits import shown
from aviator.xds.protocol import (
    DEPENDENTS,
    WILDCARD,
    ProtocolStream,
    Sent,
    StreamKind,
    TypeState,
    held_entry,
    nack_of,
)
from aviator.xds.resources import (
    ENDPOINT_TYPE,
    FULL_STATE_TYPES,
    TYPE_SHORT,
)
from aviator.xds.snapshot import entries_version

log = structlog.get_logger(__name__)


class _Subscription(frozenset[str]):
    """The names one SotW request lists (the wildcard aside), shared by every stream whose
    request lists the same ones in the same order: after every change each of 1,000 proxies
    ACKs with the same 1,000 EDS names, and a set and a list of them per stream were 40 MB."""

    __slots__ = ("explicit_wildcard", "listed")
    listed: tuple[str, ...]  # as the request listed them, interned
    explicit_wildcard: bool


# Shared while a stream holds one; an entry goes with its last stream.
_subscriptions: weakref.WeakValueDictionary[tuple[str, ...], _Subscription] = (
    weakref.WeakValueDictionary()
)


def _subscription(listed: tuple[str, ...]) -> _Subscription:
    sub = _subscriptions.get(listed)
    if sub is None:
        # Interned: a name in several subscriptions is one string.
        interned = tuple(sys.intern(n) for n in listed)
        sub = _Subscription(n for n in interned if n != WILDCARD)
        sub.listed = interned
        sub.explicit_wildcard = WILDCARD in interned
        _subscriptions[interned] = sub
    return sub


class SotwStream(ProtocolStream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]):
    """State-of-the-world ADS (``StreamAggregatedResources``)."""

    kind = StreamKind.SOTW

    def _handle(
        self, type_url: str, st: TypeState, request: discovery_pb2.DiscoveryRequest
    ) -> list[Outgoing[discovery_pb2.DiscoveryResponse]]:
        nonce = request.response_nonce
        if self._is_stale(st, nonce):
            # Superseded by a later response of the same type: its answer is already on the way.
            self._log.debug("stale request ignored", type=TYPE_SHORT[type_url], nonce=shown(nonce))
            return []
        error = nack_of(request)
        resolved = self._resolve(type_url, st, nonce, error, request.version_info)
        first = not st.requested
        st.requested = True
        force = self._subscribe(type_url, st, tuple(request.resource_names), first)
        if type_url == ENDPOINT_TYPE and any(st.in_scope(n) for n in st.warming):
            force = True
        todo = {type_url: force or first or st.force}
        # An ACK asking for nothing new: only what the cache changed meanwhile can be owed.
        scoped = () if todo[type_url] else (type_url,)
        if resolved:
            for dependent in DEPENDENTS[type_url]:
                todo.setdefault(dependent, False)
        return self._evaluate_all(todo, scoped)

    def _subscribe(self, type_url: str, st: TypeState, names: tuple[str, ...], first: bool) -> bool:
        """Apply the request's full name list; True if it asks for something new."""
        if not first and names == st.request_names:
            # Every SotW ACK repeats the whole list (1,000 EDS names for 1,000 clusters): the
            # same list as last time changes nothing, skip the set arithmetic.
            return False
        self._check_names(type_url, len(names), names)
        requested = _subscription(names)
        st.request_names = requested.listed
        explicit_wildcard = requested.explicit_wildcard
        legacy = (
            type_url in FULL_STATE_TYPES
            and not requested
            and not explicit_wildcard
            and (first or st.legacy_wildcard)
        )
        st.legacy_wildcard = legacy
        newly_wildcard = self._set_wildcard(type_url, st, explicit_wildcard or legacy)
        added = requested - st.names
        # Watched as one set, shared by the streams subscribing to it (Cache.watch_set).
        self._cache.unwatch_set(self, type_url, st.names)
        self._cache.watch_set(self, type_url, requested)
        st.names = requested
        if not st.wildcard:
            # The proxy dropped these (SotW: the request lists everything it wants).
            st.held = {n: h for n, h in st.held.items() if n in requested}
        return bool(added) or newly_wildcard

    def _watched_by_name(self, st: TypeState) -> Set[str]:
        return frozenset()  # the subscription is watched as a set (see _subscribe)

    @staticmethod
    def _claims_state(request: discovery_pb2.DiscoveryRequest) -> bool:
        return bool(request.version_info)

    def _apply_ack(self, type_url: str, st: TypeState, sent: Sent) -> None:
        # Only names in scope: the proxy dropped the others (``_subscribe`` keeps ``held``
        # within the subscription, so nothing else needs filtering).
        accepted = (
            sent.entries
            if st.scope() is None
            else {n: e for n, e in sent.entries.items() if st.in_scope(n)}
        )
        if type_url in FULL_STATE_TYPES:
            st.held = dict(accepted)  # full state
        else:
            st.held.update(accepted)

    def _evaluate(
        self, type_url: str, st: TypeState, force: bool, scoped: bool
    ) -> Outgoing[discovery_pb2.DiscoveryResponse] | None:
        if not st.requested:
            return None
        if st.outstanding is not None:
            self._defer(st, force, scoped)  # answer once the in-flight response is resolved
            return None
        if self._waiting(type_url, st, force):
            return None
        force = force or st.force
        changed = self._take_changes(st, scoped and not force)
        if changed is not None and type_url == ENDPOINT_TYPE:
            # Only the names the cache changed can differ from what the proxy holds.
            current = self._cache.resources(type_url)
            out = {n: current[n] for n in self._in_scope(st, changed) if n in current}
            kept: set[str] = set()
        else:
            out, kept = self._targets(type_url, st)
        for name in kept:
            if (entry := held_entry(st.held[name])) is not None:
                out[name] = entry
        full_state = type_url in FULL_STATE_TYPES
        if full_state:
            # Make before break: keep a cluster that a route the proxy holds still names.
            for name in self._protected(type_url):
                held = held_entry(st.held.get(name))
                if name not in out and held is not None and st.in_scope(name):
                    out[name] = held
        else:
            if not force:
                # EDS and RDS are answered by name: a response carries only what the proxy
                # does not hold yet, and the names it leaves out stay as they are (xDS
                # protocol, "Grouping resources into responses"; Envoy's SotW mux updates only
                # the watches a response names). A change to one workload is one CLA, not
                # every CLA subscribed. Forced answers (new names, warming) carry them all.
                out = {
                    n: e
                    for n, e in out.items()
                    if (h := st.held.get(n)) is None or h.version != e.version
                }
            if not out:
                # SotW EDS/RDS cannot say "does not exist"; names stay watched until they
                # appear.
                st.force = False
                return None
        ordered = sorted(out.items())
        version = entries_version(type_url, (e for _, e in ordered))
        if not force and full_state and version == st.acked_version:
            return None
        if self._suppressed(type_url, st, version):
            st.force = False
            return None

        def body() -> discovery_pb2.DiscoveryResponse:
            resp = discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=type_url, control_plane=self._control_plane()
            )
            resp.resources.extend(e.any for _, e in ordered)
            return resp

        nonce = self._next_nonce()
        resp = Outgoing(self._bodies.get((self.kind, type_url, version), body), nonce)
        self._after_send(type_url, st, Sent(nonce, version, out))
        if type_url == ENDPOINT_TYPE:
            if force:
                st.warming.clear()  # a forced SotW EDS response carries all subscribed names
            else:
                st.warming -= out.keys()
        return resp

"""The ADS protocol state machine of one stream, SotW and delta, without gRPC: the rules and
the base class; the two variants are :class:`~aviator.xds.sotw.SotwStream` and
:class:`~aviator.xds.delta.DeltaStream`, what proxies rejected is in :mod:`aviator.xds.nacks`,
the stream limits in :mod:`aviator.xds.limits`, the shared bodies in :mod:`aviator.xds.bodies`.

A stream object takes requests (:meth:`ProtocolStream.handle`) and cache wake-ups
(:meth:`ProtocolStream.flush`) and returns the responses to send, in order. The gRPC layer
(``aviator.xds.server``) only moves messages; everything the xDS protocol asks of a server is
decided here, per stream and per type URL (rules from XDS-CHECKLIST.md):

- **Nonces** are fresh and unique on the stream. A request whose ``response_nonce`` is not the
  latest one sent *for its type* is stale: SotW ignores it whole; delta still applies its
  subscription changes (xDS protocol, "Delta: ... resource_names_subscribe on stale nonce").
- **One response in flight per type**: the next one waits for the ACK or NACK of the previous.
  Changes meanwhile are merged into the next response.
- **Versions are content hashes** (``content_version``) of exactly what a response carries, so
  they never repeat across restarts for other content, and equal content gets equal versions on
  every replica. For wildcard CDS this is the server's type version; a gateway's wildcard LDS
  carries its own listener, and its version names that.
- **NACK** (``error_detail`` set): recorded (log with node, type, version, message; metric;
  :class:`~aviator.xds.nacks.NackJournal`) and that exact version is not sent again to that
  node, on this stream or a later one (:class:`~aviator.xds.nacks.RejectedVersions`, per node
  id); the next push waits for the desired state to change (go-control-plane #962 resends
  forever). A proxy that comes back with
  nothing of a type (SotW: no ``version_info``; delta: no ``initial_resource_versions``: a
  restarted Envoy) is sent the current state even if that node rejected it before: it holds
  nothing, and Envoy applies the valid clusters and listeners of a response it rejects.
- **Warming**: after a CDS response that adds or changes EDS clusters, the next EDS request is
  answered even if it looks like an ACK (Envoy re-requests endpoints for a changed cluster with
  a request identical to its last ACK; silence leaves the cluster warming until
  ``initial_fetch_timeout``). Delta: Envoy sends no request at all for an EDS name it already
  subscribes to, so the endpoints of a changed cluster follow the CDS response unasked.
- **Make before break**: a RouteConfiguration is held back until the proxy has ACKed every
  cluster it names; a Cluster stays (SotW) or is not removed (delta) while a route the proxy
  holds still names it; a CLA is not removed while a held cluster uses it, nor a route while a
  held listener uses it.
- **Nothing before the first snapshot**: until the cache is ready no request is answered (an
  empty answer would make Envoy drop everything it holds); owed answers go out on the first
  publish.
- **A gateway's listener is its own**: a wildcard LDS subscription resolves to the one listener
  built for the node (its metadata, read by :func:`~aviator.xds.resources.read_node_listener`,
  and the server's :class:`~aviator.xds.resources.GatewayConfig` for what it leaves out),
  never to another gateway's (Envoy binds every listener it holds); a sidecar's to none. Until
  that listener is in the cache the subscription is not answered (an answer without it would
  make Envoy drop the listener it holds), and a listener the node holds is never removed.
- **Wildcard**: an empty first CDS/LDS request (legacy) or ``*``. Names requested but unknown
  are remembered (watched in the cache) and sent when they appear; delta reports them once in
  ``removed_resources`` so the client need not wait for its fetch timeout.
- **Delta** ``initial_resource_versions`` seed what the proxy holds: nothing it holds at the
  current version is resent. A re-subscribe resends (go-control-plane #583).
"""

from __future__ import annotations

import enum
import itertools
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Set
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviator.xds.bodies import Outgoing, ResponseBodies
from aviator.xds.cache import Cache
from aviator.xds.limits import DEFAULT_LIMITS, StreamLimits, StreamRefusedError, shown
from aviator.xds.metrics import XdsMetrics
from aviator.xds.nacks import MAX_NACKED_VERSIONS, NackJournal, NackRecord, RejectedVersions, capped
from aviator.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_ORDER,
    TYPE_SHORT,
    GatewayConfig,
    ListenSpec,
    read_node_listener,
)
from aviator.xds.snapshot import ResourceEntry

log = structlog.get_logger(__name__)

WILDCARD = "*"
DEFAULT_GATEWAY = GatewayConfig()
_MAX_CHANGE_SETS = 64  # publishes remembered while a response is in flight; then look at all
# What a resource of each type needs the proxy to hold *first*, and who refers to it.
# Removal of a key type waits while a held resource of the value type still names it.
_REFERRER = {CLUSTER_TYPE: ROUTE_TYPE, ROUTE_TYPE: LISTENER_TYPE, ENDPOINT_TYPE: CLUSTER_TYPE}
# After an ACK/NACK of a key type, the value types may be unblocked: re-evaluate them.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    CLUSTER_TYPE: (ENDPOINT_TYPE, ROUTE_TYPE),
    ROUTE_TYPE: (CLUSTER_TYPE,),
    LISTENER_TYPE: (ROUTE_TYPE,),
    ENDPOINT_TYPE: (),
}


def nack_of(
    request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
) -> tuple[int, str] | None:
    """(code, message) of a NACK, None for an ACK or a plain request."""
    if not request.HasField("error_detail"):
        return None
    return int(request.error_detail.code), str(request.error_detail.message)


class StreamKind(enum.StrEnum):
    SOTW = "sotw"
    DELTA = "delta"


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """One type URL on one stream, for the connected-proxies view."""

    type_url: str
    wildcard: bool
    subscribed: tuple[str, ...]
    acked_version: str | None
    sent_version: str | None
    waiting_for_ack: bool
    held: int  # resources the proxy has ACKed (and so holds)
    last_nack: NackRecord | None

    @property
    def type(self) -> str:
        return TYPE_SHORT.get(self.type_url, self.type_url)


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    """One connected ADS stream."""

    node_id: str
    stream_id: int
    kind: StreamKind
    connected_at: float
    types: tuple[TypeStatus, ...]
    listener: str | None = None  # the gateway listener this node is given (None: none)
    problems: tuple[str, ...] = ()  # node metadata that was ignored, and why


@dataclass(frozen=True, slots=True)
class Held:
    """A resource the proxy says it holds at a version the cache does not have (delta
    ``initial_resource_versions``): its version and what it references, nothing to resend."""

    version: str
    refs: frozenset[str]


# What a proxy holds, per name: the entry we sent (shared by every stream that holds it:
# a wrapper per stream and resource cost 2 million objects, ~110 MB, for 1,000 streams of
# 1,000 clusters in ``aviator bench xds``), or a Held when we never sent it.
_Holding = ResourceEntry | Held


def held_entry(held: _Holding | None) -> ResourceEntry | None:
    """The entry behind what the proxy holds, if we sent it (SotW needs it to keep a cluster
    that a held route still uses)."""
    return held if isinstance(held, ResourceEntry) else None


@dataclass(slots=True)
class Sent:
    """The response in flight (awaiting ACK/NACK) for one type."""

    nonce: str
    version: str
    entries: dict[str, ResourceEntry]
    removed: frozenset[str] = frozenset()
    absent: frozenset[str] = frozenset()  # delta: names reported as not existing


@dataclass(slots=True)
class TypeState:
    requested: bool = False
    wildcard: bool = False
    legacy_wildcard: bool = False
    # SotW: shared by the streams listing the same names (never changed in place).
    names: Set[str] = field(default_factory=frozenset)
    held: dict[str, _Holding] = field(default_factory=dict)  # what the proxy has ACKed
    outstanding: Sent | None = None
    last_nonce: str = ""
    acked_version: str | None = None
    sent_version: str | None = None
    nacked: OrderedDict[str, None] = field(default_factory=OrderedDict)
    force: bool = False  # answer the next evaluation even if nothing changed
    force_names: set[str] = field(default_factory=set)  # delta: resend these names
    warming: set[str] = field(default_factory=set)  # EDS names of clusters changed since
    reported_absent: set[str] = field(default_factory=set)  # delta
    # LDS of a gateway: a wildcard means these names only (the node's own listener); None for
    # every other type (a wildcard is everything).
    only: frozenset[str] | None = None
    waiting: bool = False  # LDS: held back until the node's own listener is in the cache
    last_nack: NackRecord | None = None
    # Names the cache changed since this type was last evaluated (one set per publish), and
    # whether the next evaluation must look at every name instead (see ``_take_changes``).
    changed: list[frozenset[str]] = field(default_factory=list)
    recheck: bool = True
    request_names: tuple[str, ...] | None = None  # SotW: the name list of the last request
    # Names whose latest response was NACKed: name -> (the version rejected, Envoy's message).
    # Cleared by an ACK of a response carrying the name, a new version of it sent, or its
    # removal (see ``ProtocolStream.rejection``).
    rejected: dict[str, tuple[str, str]] = field(default_factory=dict)

    def in_scope(self, name: str) -> bool:
        if name in self.names:
            return True
        return self.wildcard and (self.only is None or name in self.only)

    def scope(self) -> Set[str] | None:
        """The names this subscription covers; None for everything of the type."""
        if not self.wildcard:
            return self.names
        if self.only is None:
            return None
        return self.names | self.only


Req = TypeVar("Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
Resp = TypeVar("Resp", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)

_stream_ids = itertools.count(1)


class ProtocolStream(ABC, Generic[Req, Resp]):
    """Shared machinery of one ADS stream. Not thread-safe: one event loop drives it."""

    kind: StreamKind

    def __init__(
        self,
        cache: Cache,
        *,
        identifier: str,
        metrics: XdsMetrics | None = None,
        journal: NackJournal | None = None,
        rejected: RejectedVersions | None = None,
        gateway: GatewayConfig | None = DEFAULT_GATEWAY,
        on_node: Callable[[ProtocolStream[Any, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        wake: Callable[[], None] | None = None,
        bodies: ResponseBodies | None = None,
        limits: StreamLimits = DEFAULT_LIMITS,
    ) -> None:
        """``gateway``: the defaults for what a gateway node's metadata leaves out (None: no
        gateway listeners at all). ``on_node`` is called once, when the first request has told
        who the proxy is (:attr:`node_id`, :attr:`listen_spec`)."""
        self.stream_id = next(_stream_ids)
        self._limits = limits
        self._unknown_types: set[int] = set()  # hashes of the unsupported type URLs asked for
        self._bodies = bodies if bodies is not None else ResponseBodies(size=2)
        self.node_id = ""
        self.listen_spec: ListenSpec | None = None  # the gateway listener this node gets
        self.node_problems: tuple[str, ...] = ()
        self._node_read = False
        self._gateway = gateway
        self._on_node = on_node
        self._rejected = rejected if rejected is not None else RejectedVersions()
        self.connected_at = clock()
        self._cache = cache
        self._identifier = identifier
        self._metrics = metrics if metrics is not None else XdsMetrics()
        self._journal = journal if journal is not None else NackJournal()
        self._clock = clock
        self._wake = wake or (lambda: None)
        self._types: dict[str, TypeState] = {}
        self._dirty: set[str] = set()
        self._follow_up: set[str] = set()  # types to evaluate later in the current pass
        self._nonces = itertools.count(1)
        self._closed = False
        # Requests taken so far: what a proxy holds changes only on a request (an ACK, a NACK,
        # a subscription), so a poller can skip a stream whose count did not move.
        self.requests_handled = 0
        self._log = log.bind(stream=self.stream_id, kind=str(self.kind))

    # -- interface used by the transport ----------------------------------------------------

    def set_waker(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def resources_changed(self, type_url: str) -> None:
        """Cache callback: a watched resource changed; :meth:`flush` will act on it."""
        if not self._closed:
            if (st := self._types.get(type_url)) is not None:
                names = self._cache.changed_names(type_url)
                if names is None or len(st.changed) >= _MAX_CHANGE_SETS:
                    # Not told which names (or a proxy that stopped ACKing): look at all.
                    st.changed.clear()
                    st.recheck = True
                else:
                    st.changed.append(names)
            self._dirty.add(type_url)
            self._wake()

    def flush(self) -> list[Resp]:
        """Responses owed because of cache changes since the last call (as messages:
        :meth:`flush_outgoing` is what the server sends)."""
        return [o.message() for o in self.flush_outgoing()]

    def handle(self, request: Req) -> list[Resp]:
        """Process one request; return the responses to send now, in order (as messages:
        :meth:`handle_outgoing` is what the server sends)."""
        return [o.message() for o in self.handle_outgoing(request)]

    def flush_outgoing(self) -> list[Outgoing[Resp]]:
        """Responses owed because of cache changes since the last call, each a shared body
        and this stream's nonce."""
        dirty, self._dirty = self._dirty, set()
        return self._evaluate_all(dict.fromkeys(dirty, False), scoped=dirty)

    def handle_outgoing(self, request: Req) -> list[Outgoing[Resp]]:
        """Process one request; return the responses to send now, in order, each a shared
        body and this stream's nonce."""
        self.requests_handled += 1
        if request.HasField("node") and request.node.id and not self.node_id:
            size = len(request.node.id.encode("utf-8", "replace"))
            if size > self._limits.max_node_id_bytes:
                raise StreamRefusedError(
                    "INVALID_ARGUMENT",
                    f"node.id is {size} bytes long; at most {self._limits.max_node_id_bytes} "
                    "are allowed",
                )
            self.node_id = request.node.id
            self._log = self._log.bind(node=self.shown_node)
        allowed = self._limits.allowed_nodes
        if not self._node_read and allowed is not None and self.node_id not in allowed:
            raise StreamRefusedError(
                "PERMISSION_DENIED",
                f"node.id {self.shown_node!r} is not allowed on this server"
                if self.node_id
                else "node.id: the first request must name the node; this server serves "
                "only the nodes it allows",
            )
        if not self._node_read:
            # Envoy sends its node on the first request only (set_node_on_first_message_only).
            self._read_node(request.node if request.HasField("node") else base_pb2.Node())
        type_url = request.type_url
        if type_url not in TYPE_SHORT:
            self._unknown_type(type_url)
            return []
        st = self._types.get(type_url)
        if st is None:
            st = self._types[type_url] = self._new_type(type_url, request)
        return self._handle(type_url, st, request)

    def _unknown_type(self, type_url: str) -> None:
        """A type this server does not serve (an Envoy asking for secrets over ADS, say):
        ignored, logged the first time; a stream asking for many is refused."""
        key = hash(type_url)
        if key in self._unknown_types:
            return
        self._unknown_types.add(key)
        if len(self._unknown_types) > self._limits.max_unknown_types:
            raise StreamRefusedError(
                "INVALID_ARGUMENT",
                f"type_url: {len(self._unknown_types)} different unsupported types requested; "
                f"at most {self._limits.max_unknown_types} are ignored, and this server serves "
                + ", ".join(TYPE_ORDER),
            )
        if len(self._unknown_types) == 1:
            self._log.warning("unsupported xDS type requested, ignored", type_url=shown(type_url))
        else:
            self._log.debug("unsupported xDS type requested, ignored", type_url=shown(type_url))

    def _check_names(self, type_url: str, count: int, names: Collection[str]) -> None:
        """Refuse a subscription of more than ``max_names`` names (``count``, after the
        request) or with a name longer than ``max_name_bytes`` (among ``names``)."""
        limits = self._limits
        short = TYPE_SHORT[type_url]
        if count > limits.max_names:
            raise StreamRefusedError(
                "RESOURCE_EXHAUSTED",
                f"resource_names: {count} {short} names subscribed; at most {limits.max_names} "
                "are allowed per type and stream",
            )
        for name in names:
            if (
                len(name) > limits.max_name_bytes
                and (size := len(name.encode("utf-8", "replace"))) > limits.max_name_bytes
            ):
                raise StreamRefusedError(
                    "INVALID_ARGUMENT",
                    f"resource_names: a {short} name of {size} bytes; at most "
                    f"{limits.max_name_bytes} are allowed",
                )

    def _read_node(self, node: base_pb2.Node) -> None:
        self._node_read = True
        info = read_node_listener(node.metadata)
        if info.gateway and self._gateway is not None:
            self.listen_spec = self._gateway.resolve(info.request)
        # A problem quotes the bad value: keep what is quoted short (it is logged and shown).
        self.node_problems = tuple(capped(p, 300) for p in info.problems)
        for problem in self.node_problems:
            self._log.warning("node metadata ignored", problem=problem)
        if self._on_node is not None:
            self._on_node(self)

    def _new_type(self, type_url: str, request: Req) -> TypeState:
        st = TypeState()
        if type_url == LISTENER_TYPE:
            spec = self.listen_spec
            st.only = frozenset({spec.listener_name}) if spec is not None else frozenset()
        if self._claims_state(request):
            # A proxy back with what it holds (a reconnect) rejected these versions on an
            # earlier stream: sent again, they would only be rejected again.
            st.nacked.update(dict.fromkeys(self._rejected.of(self._node_key, type_url)))
        return st

    @property
    def shown_node(self) -> str:
        """The node id for a log line (printable and within the limit, or its size)."""
        return shown(self.node_id, self._limits.max_node_id_bytes)

    @property
    def _node_key(self) -> str:
        """The key of this proxy's rejected versions: its node id (a stream without one
        shares them with nobody)."""
        return self.node_id or f"stream {self.stream_id}"

    def close(self) -> None:
        """Stop watching the cache. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for type_url, st in self._types.items():
            watched = self._watched_by_name(st)
            self._cache.unwatch(self, type_url, (watched | st.only) if st.only else watched)
            self._cache.unwatch_set(self, type_url, st.names)
            self._cache.unwatch_all(self, type_url)

    def status(self) -> ProxyStatus:
        return ProxyStatus(
            node_id=self.node_id,
            stream_id=self.stream_id,
            kind=self.kind,
            connected_at=self.connected_at,
            types=tuple(
                TypeStatus(
                    type_url=t,
                    wildcard=st.wildcard,
                    subscribed=tuple(sorted(st.names)),
                    acked_version=st.acked_version,
                    sent_version=st.sent_version,
                    waiting_for_ack=st.outstanding is not None,
                    held=len(st.held),
                    last_nack=st.last_nack,
                )
                for t in TYPE_ORDER
                if (st := self._types.get(t)) is not None and st.requested
            ),
            listener=self.listen_spec.listener_name if self.listen_spec is not None else None,
            problems=self.node_problems,
        )

    # -- what the proxy holds, per name (the operator's Programmed condition, issue 12) ------

    def subscribed(self, type_url: str, served: Set[str]) -> Set[str]:
        """The names of ``served`` that this stream subscribes to for ``type_url``: all of
        them for a wildcard subscription (a gateway's LDS wildcard: its own listener only),
        none once the stream is closed or before it asked for the type."""
        st = self._types.get(type_url)
        if self._closed or st is None or not st.requested:
            return frozenset()
        scope = st.scope()
        return served if scope is None else served & scope

    def held_version(self, type_url: str, name: str) -> str | None:
        """The version of ``name`` the proxy holds: the one it ACKed (or, delta, said it held
        at connect, in ``initial_resource_versions``); None if it holds none."""
        st = self._types.get(type_url)
        held = st.held.get(name) if st is not None else None
        return held.version if held is not None else None

    def rejection(self, type_url: str, name: str) -> str | None:
        """Envoy's message if the last response carrying ``name`` was NACKed and the proxy
        does not hold that version (it keeps an older one, or none); None otherwise, and as
        soon as a newer version of ``name`` is sent or one is ACKed.

        A NACK rejects a whole response: every name it carried is counted rejected, with the
        same message (Envoy's names the resource it choked on)."""
        st = self._types.get(type_url)
        rejected = st.rejected.get(name) if st is not None else None
        if st is None or rejected is None:
            return None
        held = st.held.get(name)
        if held is not None and held.version == rejected[0]:
            return None
        return rejected[1]

    # -- subclass hooks ---------------------------------------------------------------------

    @abstractmethod
    def _handle(self, type_url: str, st: TypeState, request: Req) -> list[Outgoing[Resp]]: ...

    @abstractmethod
    def _evaluate(
        self, type_url: str, st: TypeState, force: bool, scoped: bool
    ) -> Outgoing[Resp] | None:
        """The response owed for ``type_url`` now, if any. ``force``: answer even if nothing
        changed. ``scoped``: only the names the cache changed since the last evaluation can
        need an answer (the subscription and what the proxy holds did not change)."""

    @abstractmethod
    def _apply_ack(self, type_url: str, st: TypeState, sent: Sent) -> None: ...

    @staticmethod
    @abstractmethod
    def _claims_state(request: Req) -> bool:
        """True if the proxy says it already holds resources of the request's type."""

    # -- shared helpers ---------------------------------------------------------------------

    def _evaluate_all(
        self, todo: Mapping[str, bool], scoped: Collection[str] = ()
    ) -> list[Outgoing[Resp]]:
        if not self._cache.ready:
            # Nothing published yet (a restarted control plane still reading its source): an
            # answer now would tell the proxy that no cluster or listener exists, and Envoy
            # would drop all it holds and refuse connections. Owe the answer instead; the
            # first publish wakes every watcher.
            for type_url, force in todo.items():
                if (st := self._types.get(type_url)) is not None:
                    st.force = st.force or force
            return []
        pending = dict(todo)
        out: list[Outgoing[Resp]] = []
        for type_url in TYPE_ORDER:  # clusters first, then endpoints, listeners, routes
            # A response may call for a later type in the same pass (delta: a cluster change
            # needs its endpoints resent, right after the clusters).
            for follow_up in self._follow_up:
                pending.setdefault(follow_up, False)
            self._follow_up.clear()
            if type_url in pending and (st := self._types.get(type_url)) is not None:
                resp = self._evaluate(type_url, st, pending[type_url], type_url in scoped)
                if resp is not None:
                    out.append(resp)
        return out

    def _take_changes(self, st: TypeState, scoped: bool) -> frozenset[str] | None:
        """The names changed since the last evaluation, or None when this one must look at
        every name (not ``scoped``, or a full look is owed). Resets both.

        This is what makes a change to one workload cost O(1) per stream instead of O(names
        subscribed): with 1,000 clusters, every SotW ACK re-examined 1,000 CLAs
        (``aviator bench xds``).
        """
        changed, st.changed = st.changed, []
        recheck, st.recheck = st.recheck, False
        if not scoped or recheck:
            return None
        return changed[0] if len(changed) == 1 else frozenset().union(*changed)

    @staticmethod
    def _in_scope(st: TypeState, names: frozenset[str]) -> frozenset[str] | set[str]:
        """``names`` the stream subscribes to (a set intersection, not a call per name)."""
        scope = st.scope()
        return names if scope is None else names & scope

    def _waiting(self, type_url: str, st: TypeState, force: bool) -> bool:
        """True while the node's own listener is not in the cache (the producer adds it once
        told the node connected): the wildcard LDS subscription stays unanswered, and what
        was owed stays owed. An answer without it would remove the listener Envoy holds."""
        if not st.wildcard or not st.only:
            return False
        current = self._cache.resources(type_url)
        missing = sorted(st.only - current.keys())
        if not missing:
            st.waiting = False
            return False
        st.force = st.force or force
        if not st.waiting:
            st.waiting = True
            self._log.debug("waiting for this gateway's listener", listener=missing[0])
        return True

    def _defer(self, st: TypeState, force: bool, scoped: bool) -> None:
        """A response of this type is in flight: evaluate again once it is answered."""
        st.force = st.force or force
        st.recheck = st.recheck or not scoped

    def _next_nonce(self) -> str:
        return f"{self.stream_id}-{next(self._nonces)}"

    def _control_plane(self) -> base_pb2.ControlPlane:
        return base_pb2.ControlPlane(identifier=self._identifier)

    def _is_stale(self, st: TypeState, nonce: str) -> bool:
        # A nonce we never issued on a type we never answered is a client carrying state from
        # a previous stream: treat it as an initial request rather than ignore it forever.
        return bool(nonce) and bool(st.last_nonce) and nonce != st.last_nonce

    def _resolve(
        self, type_url: str, st: TypeState, nonce: str, error: tuple[int, str] | None, claimed: str
    ) -> bool:
        """ACK or NACK the response in flight if ``nonce`` names it; True if it did."""
        sent = st.outstanding
        if sent is None or not nonce or nonce != sent.nonce:
            return False
        st.outstanding = None
        labels = {"type": TYPE_SHORT[type_url], "kind": str(self.kind)}
        if error is None:
            self._metrics.acked(
                type_url, sent.entries, st.held, since=self.connected_at, now=self._clock()
            )
            self._apply_ack(type_url, st, sent)
            st.acked_version = sent.version
            if st.rejected:
                for name in sent.entries:
                    st.rejected.pop(name, None)
            self._metrics.acks.labels(**labels).inc()
            self._log.debug("xDS ACK", type=labels["type"], version=sent.version)
            return True
        st.nacked[sent.version] = None
        while len(st.nacked) > MAX_NACKED_VERSIONS:
            st.nacked.popitem(last=False)
        self._rejected.add(self._node_key, type_url, sent.version)
        record = NackRecord(
            node_id=self.node_id,
            stream_id=self.stream_id,
            kind=self.kind,
            type_url=type_url,
            rejected_version=sent.version,
            accepted_version=st.acked_version or shown(claimed),
            error_code=error[0],
            message=error[1],
            at=self._clock(),
        )
        st.last_nack = record
        self._remember_rejection(st, sent, record.message)
        self._journal.record(record)
        self._metrics.nacks.labels(**labels).inc()
        self._log.warning(
            "xDS update rejected by proxy",
            node=self.shown_node,
            type=labels["type"],
            version=sent.version,
            accepted_version=record.accepted_version,
            error=error[1],
        )
        return True

    def _remember_rejection(self, st: TypeState, sent: Sent, message: str) -> None:
        """Each name ``sent`` carried was rejected with ``message`` (bounded: the names in
        scope, at most ``max_names``; the message as the journal keeps it)."""
        message = capped(message)
        for name, entry in sent.entries.items():
            st.rejected[name] = (entry.version, message)
        if len(st.rejected) > self._limits.max_names:
            st.rejected = {n: r for n, r in st.rejected.items() if st.in_scope(n)}
            while len(st.rejected) > self._limits.max_names:
                del st.rejected[next(iter(st.rejected))]

    def _watched_by_name(self, st: TypeState) -> Set[str]:
        """The subscribed names this stream watches one by one (:meth:`_watch_diff`)."""
        return st.names

    def _watch_diff(self, type_url: str, st: TypeState, before: Set[str], after: Set[str]) -> None:
        self._cache.watch(self, type_url, after - before)
        kept = st.only if st.wildcard and st.only is not None else frozenset()
        self._cache.unwatch(self, type_url, before - after - kept)

    def _set_wildcard(self, type_url: str, st: TypeState, wildcard: bool) -> bool:
        """Switch wildcard on/off; True if it was just switched on."""
        if wildcard == st.wildcard:
            return False
        st.wildcard = wildcard
        if st.only is not None:
            # A node-scoped wildcard (a gateway's LDS) watches its own names only: another
            # gateway's listener changing wakes nobody else.
            if wildcard:
                self._cache.watch(self, type_url, st.only)
            else:
                self._cache.unwatch(self, type_url, st.only - self._watched_by_name(st))
        elif wildcard:
            self._cache.watch_all(self, type_url)
        else:
            self._cache.unwatch_all(self, type_url)
        if not wildcard:
            st.held = {n: h for n, h in st.held.items() if n in st.names}
        return wildcard

    def _targets(self, type_url: str, st: TypeState) -> tuple[dict[str, ResourceEntry], set[str]]:
        """What the proxy should hold now: (entries to have, names held back as they are).

        Routes naming a cluster the proxy has not ACKed yet are held back (make before break)
        if that cluster is on its way (in the cache); a held-back route keeps what the proxy
        holds.
        """
        current = self._cache.resources(type_url)
        scope = st.scope()
        out = dict(current) if scope is None else {n: current[n] for n in scope if n in current}
        kept: set[str] = set()
        cds = self._types.get(CLUSTER_TYPE)
        if type_url == ROUTE_TYPE and cds is not None and cds.requested:
            clusters = self._cache.resources(CLUSTER_TYPE)
            for name, entry in list(out.items()):
                if any(c not in cds.held and c in clusters for c in entry.refs):
                    del out[name]
                    if name in st.held:
                        kept.add(name)
        return out, kept

    def _protected(self, type_url: str) -> set[str]:
        """Names of ``type_url`` that a resource the proxy holds (or is being sent) uses."""
        referrer = _REFERRER.get(type_url)
        rs = self._types.get(referrer) if referrer else None
        if rs is None:
            return set()
        refs: set[str] = set()
        for held in rs.held.values():
            refs |= held.refs
        if rs.outstanding is not None:
            for entry in rs.outstanding.entries.values():
                refs |= entry.refs
        return refs

    def _suppressed(self, type_url: str, st: TypeState, version: str) -> bool:
        if version not in st.nacked:
            return False
        self._metrics.suppressed.labels(type=TYPE_SHORT[type_url], kind=str(self.kind)).inc()
        self._log.info(
            "not resending a version the proxy rejected",
            type=TYPE_SHORT[type_url],
            version=version,
        )
        return True

    def _after_send(self, type_url: str, st: TypeState, sent: Sent) -> None:
        if st.rejected:
            # A new version of a rejected name is on its way: its fate is that response's.
            for name, entry in sent.entries.items():
                if (r := st.rejected.get(name)) is not None and r[0] != entry.version:
                    del st.rejected[name]
            for name in sent.removed:
                st.rejected.pop(name, None)
        st.outstanding = sent
        st.last_nonce = sent.nonce
        st.sent_version = sent.version
        st.force = False
        labels = {"type": TYPE_SHORT[type_url], "kind": str(self.kind)}
        self._metrics.pushes.labels(**labels).inc()
        self._metrics.resources_sent.labels(**labels).inc(len(sent.entries))
        self._metrics.sent(
            type_url, sent.entries, st.held, since=self.connected_at, now=self._clock()
        )
        if type_url == CLUSTER_TYPE and (eds := self._types.get(ENDPOINT_TYPE)) is not None:
            # Warming: the next EDS request after a cluster change must be answered.
            for name, entry in sent.entries.items():
                held = st.held.get(name)
                if held is None or held.version != entry.version:
                    eds.warming |= entry.refs
        self._log.debug(
            "xDS push",
            type=labels["type"],
            version=sent.version,
            nonce=sent.nonce,
            resources=len(sent.entries),
            removed=len(sent.removed) + len(sent.absent),
        )

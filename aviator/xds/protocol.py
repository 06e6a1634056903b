"""The ADS protocol state machine of one stream, SotW and delta, without gRPC.

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
  :class:`NackJournal`) and that exact version is not sent again to that node, on this stream
  or a later one (:class:`RejectedVersions`, per node id); the next push waits for the desired
  state to change (go-control-plane #962 resends forever). A proxy that comes back with
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
import sys
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviator.xds.cache import Cache
from aviator.xds.metrics import XdsMetrics
from aviator.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    FULL_STATE_TYPES,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_ORDER,
    TYPE_SHORT,
    GatewayConfig,
    ListenSpec,
    read_node_listener,
)
from aviator.xds.snapshot import ResourceEntry, entries_version

log = structlog.get_logger(__name__)

WILDCARD = "*"
_MAX_NACKED_VERSIONS = 64  # per node and type; content versions, so old ones rarely matter
_MAX_NACKING_NODES = 4096  # nodes whose rejected versions are remembered (least recent go)
DEFAULT_GATEWAY = GatewayConfig()
_MAX_CHANGE_SETS = 64  # publishes remembered while a response is in flight; then look at all
_MAX_NACK_MESSAGE = 4096  # characters of a NACK's message kept and logged (Envoy's are short)
_MAX_SHOWN = 128  # a client-chosen string longer than this is logged as its length only

# What a resource of each type needs the proxy to hold *first*, and who refers to it.
# Removal of a key type waits while a held resource of the value type still names it.
_REFERRER = {CLUSTER_TYPE: ROUTE_TYPE, ROUTE_TYPE: LISTENER_TYPE, ENDPOINT_TYPE: CLUSTER_TYPE}
# After an ACK/NACK of a key type, the value types may be unblocked: re-evaluate them.
_DEPENDENTS: dict[str, tuple[str, ...]] = {
    CLUSTER_TYPE: (ENDPOINT_TYPE, ROUTE_TYPE),
    ROUTE_TYPE: (CLUSTER_TYPE,),
    LISTENER_TYPE: (ROUTE_TYPE,),
    ENDPOINT_TYPE: (),
}


def _error(
    request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
) -> tuple[int, str] | None:
    """(code, message) of a NACK, None for an ACK or a plain request."""
    if not request.HasField("error_detail"):
        return None
    return int(request.error_detail.code), str(request.error_detail.message)


def shown(text: str, limit: int = _MAX_SHOWN) -> str:
    """``text`` for a log line if it is short, printable ASCII; else only its size.

    What a client sends (type URLs, nonces, versions) goes into log lines through this, so a
    hostile stream cannot write its payload (or terminal escapes, or 100 KB) into the log.
    """
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return f"<{len(text.encode('utf-8', 'replace'))} bytes, not shown>"


def _capped(text: str, limit: int = _MAX_NACK_MESSAGE) -> str:
    """The first ``limit`` characters of a proxy's message (a NACK's error text)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters not kept)"


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What one ADS stream may ask of the server; beyond it the stream is refused
    (:class:`StreamRefusedError`) and every other stream carries on.

    The defaults are far above what a proxy sends and far below what hurts the server:
    ``max_names`` bounds the names one stream subscribes to per type (a sidecar subscribes
    to one EDS name per workload; 16,384 workloads is past any mesh Aviator serves, and a
    list of 100,000 names is refused); ``max_name_bytes`` a resource name (cluster names are
    ``<namespace>/<name>``, at most 317 bytes); ``max_node_id_bytes`` the node id (Envoy's
    are a pod name or a hostname); ``max_unknown_types`` the distinct type URLs this server
    does not serve that a stream may ask for (ignored, logged once) before it is refused.
    """

    max_node_id_bytes: int = 1024
    max_names: int = 16_384
    max_name_bytes: int = 1024
    max_unknown_types: int = 16
    # The node ids that may connect (aviator run --xds-allow-node); None: any. A stream whose
    # first request names another node, or none, is refused (PERMISSION_DENIED).
    allowed_nodes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.allowed_nodes is not None and not self.allowed_nodes:
            raise ValueError("StreamLimits.allowed_nodes must name a node, or be None (any)")
        for name in ("max_node_id_bytes", "max_names", "max_name_bytes", "max_unknown_types"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamLimits.{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = StreamLimits()


class StreamRefusedError(Exception):
    """A stream sent what no proxy sends, or more than the server gives one proxy: it ends
    with gRPC status ``code`` (a ``grpc.StatusCode`` name; this module imports no gRPC) and
    ``message``, which names the field and the limit and never repeats the request's
    content."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamKind(enum.StrEnum):
    SOTW = "sotw"
    DELTA = "delta"


@dataclass(frozen=True, slots=True)
class NackRecord:
    """A proxy rejected a response: what, when, and why (Envoy's message verbatim)."""

    node_id: str
    stream_id: int
    kind: StreamKind
    type_url: str
    rejected_version: str
    accepted_version: str  # what the proxy keeps using ("" when unknown)
    error_code: int
    message: str
    at: float  # wall-clock seconds

    @property
    def type(self) -> str:
        return TYPE_SHORT.get(self.type_url, self.type_url)


class NackJournal:
    """The last NACKs of each node, kept in memory for the status and debug views.

    Bounded: ``per_node`` records for each of at most ``max_nodes`` nodes (least recently
    rejected nodes are forgotten first). Survives stream restarts.
    """

    def __init__(self, *, per_node: int = 16, max_nodes: int = 1024) -> None:
        self._per_node = per_node
        self._max_nodes = max_nodes
        self._by_node: OrderedDict[str, deque[NackRecord]] = OrderedDict()

    def record(self, nack: NackRecord) -> None:
        records = self._by_node.pop(nack.node_id, None) or deque(maxlen=self._per_node)
        records.append(nack)
        self._by_node[nack.node_id] = records
        while len(self._by_node) > self._max_nodes:
            self._by_node.popitem(last=False)

    def for_node(self, node_id: str) -> tuple[NackRecord, ...]:
        return tuple(self._by_node.get(node_id, ()))

    def all(self) -> tuple[NackRecord, ...]:
        return tuple(sorted((n for rs in self._by_node.values() for n in rs), key=lambda n: n.at))


class RejectedVersions:
    """The versions each node rejected, per type: what must not be sent to it again.

    Kept by node id rather than by stream, so a proxy that reconnects is not sent again what
    it rejected on its previous stream. Bounded: at most ``per_type`` versions per node and
    type (the oldest rejection is forgotten first) for at most ``max_nodes`` nodes (the node
    that rejected least recently is forgotten first).
    """

    def __init__(
        self, *, per_type: int = _MAX_NACKED_VERSIONS, max_nodes: int = _MAX_NACKING_NODES
    ) -> None:
        if per_type < 1 or max_nodes < 1:
            raise ValueError(f"need per_type >= 1 and max_nodes >= 1, got {per_type}, {max_nodes}")
        self._per_type = per_type
        self._max_nodes = max_nodes
        self._by_node: OrderedDict[str, dict[str, OrderedDict[str, None]]] = OrderedDict()

    def add(self, node_id: str, type_url: str, version: str) -> None:
        types = self._by_node.pop(node_id, None) or {}
        self._by_node[node_id] = types
        versions = types.setdefault(type_url, OrderedDict())
        versions.pop(version, None)
        versions[version] = None
        while len(versions) > self._per_type:
            versions.popitem(last=False)
        while len(self._by_node) > self._max_nodes:
            self._by_node.popitem(last=False)

    def of(self, node_id: str, type_url: str) -> tuple[str, ...]:
        """The versions of ``type_url`` that ``node_id`` rejected, oldest first."""
        return tuple(self._by_node.get(node_id, {}).get(type_url, ()))

    def __len__(self) -> int:
        """Nodes remembered."""
        return len(self._by_node)


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
class _Held:
    """A resource the proxy says it holds at a version the cache does not have (delta
    ``initial_resource_versions``): its version and what it references, nothing to resend."""

    version: str
    refs: frozenset[str]


# What a proxy holds, per name: the entry we sent (shared by every stream that holds it:
# a wrapper per stream and resource cost 2 million objects, ~110 MB, for 1,000 streams of
# 1,000 clusters in ``aviator bench xds``), or a _Held when we never sent it.
_Holding = ResourceEntry | _Held


def _entry(held: _Holding | None) -> ResourceEntry | None:
    """The entry behind what the proxy holds, if we sent it (SotW needs it to keep a cluster
    that a held route still uses)."""
    return held if isinstance(held, ResourceEntry) else None


@dataclass(slots=True)
class _Sent:
    """The response in flight (awaiting ACK/NACK) for one type."""

    nonce: str
    version: str
    entries: dict[str, ResourceEntry]
    removed: frozenset[str] = frozenset()
    absent: frozenset[str] = frozenset()  # delta: names reported as not existing


@dataclass(slots=True)
class _TypeState:
    requested: bool = False
    wildcard: bool = False
    legacy_wildcard: bool = False
    names: set[str] = field(default_factory=set)
    held: dict[str, _Holding] = field(default_factory=dict)  # what the proxy has ACKed
    outstanding: _Sent | None = None
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
    request_names: list[str] | None = None  # SotW: the name list of the last request

    def in_scope(self, name: str) -> bool:
        if name in self.names:
            return True
        return self.wildcard and (self.only is None or name in self.only)

    def scope(self) -> set[str] | frozenset[str] | None:
        """The names this subscription covers; None for everything of the type."""
        if not self.wildcard:
            return self.names
        if self.only is None:
            return None
        return self.names | self.only


Req = TypeVar("Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
Resp = TypeVar("Resp", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)

_stream_ids = itertools.count(1)


class ResponseBodies:
    """Response bodies (all but the nonce) shared by the streams of one server.

    A body is named by its stream kind, type and content version (a hash of exactly what it
    carries), so every stream owing the same content copies one body instead of assembling
    it: after a change to every workload, the same 1,000 CLAs go to each of 1,000 streams,
    and copying a body (in C) costs a tenth of adding 1,000 resources to a new response
    (``aviator bench xds``). Keeps the ``size`` most recently used bodies.
    """

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._bodies: OrderedDict[tuple[str, str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str, str], build: Callable[[], Any]) -> Any:
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = build()
            if len(self._bodies) > self._size:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(key)
        return body


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
        self._types: dict[str, _TypeState] = {}
        self._dirty: set[str] = set()
        self._follow_up: set[str] = set()  # types to evaluate later in the current pass
        self._nonces = itertools.count(1)
        self._closed = False
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
        """Responses owed because of cache changes since the last call."""
        dirty, self._dirty = self._dirty, set()
        return self._evaluate_all(dict.fromkeys(dirty, False), scoped=dirty)

    def handle(self, request: Req) -> list[Resp]:
        """Process one request; return the responses to send now, in order."""
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
        self.node_problems = tuple(_capped(p, 300) for p in info.problems)
        for problem in self.node_problems:
            self._log.warning("node metadata ignored", problem=problem)
        if self._on_node is not None:
            self._on_node(self)

    def _new_type(self, type_url: str, request: Req) -> _TypeState:
        st = _TypeState()
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
            self._cache.unwatch(self, type_url, st.names | (st.only or frozenset()))
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

    # -- subclass hooks ---------------------------------------------------------------------

    @abstractmethod
    def _handle(self, type_url: str, st: _TypeState, request: Req) -> list[Resp]: ...

    @abstractmethod
    def _evaluate(self, type_url: str, st: _TypeState, force: bool, scoped: bool) -> Resp | None:
        """The response owed for ``type_url`` now, if any. ``force``: answer even if nothing
        changed. ``scoped``: only the names the cache changed since the last evaluation can
        need an answer (the subscription and what the proxy holds did not change)."""

    @abstractmethod
    def _apply_ack(self, type_url: str, st: _TypeState, sent: _Sent) -> None: ...

    @staticmethod
    @abstractmethod
    def _claims_state(request: Req) -> bool:
        """True if the proxy says it already holds resources of the request's type."""

    # -- shared helpers ---------------------------------------------------------------------

    def _evaluate_all(self, todo: Mapping[str, bool], scoped: Collection[str] = ()) -> list[Resp]:
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
        out: list[Resp] = []
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

    def _take_changes(self, st: _TypeState, scoped: bool) -> frozenset[str] | None:
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
    def _in_scope(st: _TypeState, names: frozenset[str]) -> frozenset[str] | set[str]:
        """``names`` the stream subscribes to (a set intersection, not a call per name)."""
        scope = st.scope()
        return names if scope is None else names & scope

    def _waiting(self, type_url: str, st: _TypeState, force: bool) -> bool:
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

    def _defer(self, st: _TypeState, force: bool, scoped: bool) -> None:
        """A response of this type is in flight: evaluate again once it is answered."""
        st.force = st.force or force
        st.recheck = st.recheck or not scoped

    def _next_nonce(self) -> str:
        return f"{self.stream_id}-{next(self._nonces)}"

    def _control_plane(self) -> base_pb2.ControlPlane:
        return base_pb2.ControlPlane(identifier=self._identifier)

    def _is_stale(self, st: _TypeState, nonce: str) -> bool:
        # A nonce we never issued on a type we never answered is a client carrying state from
        # a previous stream: treat it as an initial request rather than ignore it forever.
        return bool(nonce) and bool(st.last_nonce) and nonce != st.last_nonce

    def _resolve(
        self, type_url: str, st: _TypeState, nonce: str, error: tuple[int, str] | None, claimed: str
    ) -> bool:
        """ACK or NACK the response in flight if ``nonce`` names it; True if it did."""
        sent = st.outstanding
        if sent is None or not nonce or nonce != sent.nonce:
            return False
        st.outstanding = None
        labels = {"type": TYPE_SHORT[type_url], "kind": str(self.kind)}
        if error is None:
            self._apply_ack(type_url, st, sent)
            st.acked_version = sent.version
            self._metrics.acks.labels(**labels).inc()
            self._log.debug("xDS ACK", type=labels["type"], version=sent.version)
            return True
        st.nacked[sent.version] = None
        while len(st.nacked) > _MAX_NACKED_VERSIONS:
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

    def _watch_diff(self, type_url: str, st: _TypeState, before: set[str], after: set[str]) -> None:
        self._cache.watch(self, type_url, after - before)
        kept = st.only if st.wildcard and st.only is not None else frozenset()
        self._cache.unwatch(self, type_url, before - after - kept)

    def _set_wildcard(self, type_url: str, st: _TypeState, wildcard: bool) -> bool:
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
                self._cache.unwatch(self, type_url, st.only - st.names)
        elif wildcard:
            self._cache.watch_all(self, type_url)
        else:
            self._cache.unwatch_all(self, type_url)
        if not wildcard:
            st.held = {n: h for n, h in st.held.items() if n in st.names}
        return wildcard

    def _targets(self, type_url: str, st: _TypeState) -> tuple[dict[str, ResourceEntry], set[str]]:
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

    def _suppressed(self, type_url: str, st: _TypeState, version: str) -> bool:
        if version not in st.nacked:
            return False
        self._metrics.suppressed.labels(type=TYPE_SHORT[type_url], kind=str(self.kind)).inc()
        self._log.info(
            "not resending a version the proxy rejected",
            type=TYPE_SHORT[type_url],
            version=version,
        )
        return True

    def _after_send(self, type_url: str, st: _TypeState, sent: _Sent) -> None:
        st.outstanding = sent
        st.last_nonce = sent.nonce
        st.sent_version = sent.version
        st.force = False
        labels = {"type": TYPE_SHORT[type_url], "kind": str(self.kind)}
        self._metrics.pushes.labels(**labels).inc()
        self._metrics.resources_sent.labels(**labels).inc(len(sent.entries))
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


class SotwStream(ProtocolStream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]):
    """State-of-the-world ADS (``StreamAggregatedResources``)."""

    kind = StreamKind.SOTW

    def _handle(
        self, type_url: str, st: _TypeState, request: discovery_pb2.DiscoveryRequest
    ) -> list[discovery_pb2.DiscoveryResponse]:
        nonce = request.response_nonce
        if self._is_stale(st, nonce):
            # Superseded by a later response of the same type: its answer is already on the way.
            self._log.debug("stale request ignored", type=TYPE_SHORT[type_url], nonce=shown(nonce))
            return []
        error = _error(request)
        resolved = self._resolve(type_url, st, nonce, error, request.version_info)
        first = not st.requested
        st.requested = True
        force = self._subscribe(type_url, st, list(request.resource_names), first)
        if type_url == ENDPOINT_TYPE and any(st.in_scope(n) for n in st.warming):
            force = True
        todo = {type_url: force or first or st.force}
        # An ACK asking for nothing new: only what the cache changed meanwhile can be owed.
        scoped = () if todo[type_url] else (type_url,)
        if resolved:
            for dependent in _DEPENDENTS[type_url]:
                todo.setdefault(dependent, False)
        return self._evaluate_all(todo, scoped)

    def _subscribe(self, type_url: str, st: _TypeState, names: list[str], first: bool) -> bool:
        """Apply the request's full name list; True if it asks for something new."""
        if not first and names == st.request_names:
            # Every SotW ACK repeats the whole list (1,000 EDS names for 1,000 clusters): the
            # same list as last time changes nothing, skip the set arithmetic.
            return False
        self._check_names(type_url, len(names), names)
        # Interned: every stream subscribing to a name shares one string (1,000 streams of
        # 1,000 names made a million copies).
        names = [sys.intern(n) for n in names]
        st.request_names = names
        requested = set(names)
        explicit_wildcard = WILDCARD in requested
        requested.discard(WILDCARD)
        legacy = (
            type_url in FULL_STATE_TYPES
            and not requested
            and not explicit_wildcard
            and (first or st.legacy_wildcard)
        )
        st.legacy_wildcard = legacy
        newly_wildcard = self._set_wildcard(type_url, st, explicit_wildcard or legacy)
        added = requested - st.names
        self._watch_diff(type_url, st, st.names, requested)
        st.names = requested
        if not st.wildcard:
            # The proxy dropped these (SotW: the request lists everything it wants).
            st.held = {n: h for n, h in st.held.items() if n in requested}
        return bool(added) or newly_wildcard

    @staticmethod
    def _claims_state(request: discovery_pb2.DiscoveryRequest) -> bool:
        return bool(request.version_info)

    def _apply_ack(self, type_url: str, st: _TypeState, sent: _Sent) -> None:
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
        self, type_url: str, st: _TypeState, force: bool, scoped: bool
    ) -> discovery_pb2.DiscoveryResponse | None:
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
            if (entry := _entry(st.held[name])) is not None:
                out[name] = entry
        full_state = type_url in FULL_STATE_TYPES
        if full_state:
            # Make before break: keep a cluster that a route the proxy holds still names.
            for name in self._protected(type_url):
                held = _entry(st.held.get(name))
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
        resp = discovery_pb2.DiscoveryResponse()
        resp.CopyFrom(self._bodies.get((self.kind, type_url, version), body))
        resp.nonce = nonce
        self._after_send(type_url, st, _Sent(nonce, version, out))
        if type_url == ENDPOINT_TYPE:
            if force:
                st.warming.clear()  # a forced SotW EDS response carries all subscribed names
            else:
                st.warming -= out.keys()
        return resp


class DeltaStream(
    ProtocolStream[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse]
):
    """Incremental ADS (``DeltaAggregatedResources``)."""

    kind = StreamKind.DELTA

    def _handle(
        self, type_url: str, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
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
            error = _error(request)
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
            for dependent in _DEPENDENTS[type_url]:
                todo.setdefault(dependent, False)
        return self._evaluate_all(todo, scoped)

    def _subscribe(
        self,
        type_url: str,
        st: _TypeState,
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
        before = set(st.names)
        for name in unsubscribe:
            st.names.discard(name)
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
                    st.held[name] = _Held(version, refs)
        else:
            for name in subscribe:
                # A re-subscribe (e.g. a cluster re-created) expects the resource again.
                if name in st.held:
                    st.force_names.add(name)
                st.reported_absent.discard(name)
        st.names |= subscribe
        self._watch_diff(type_url, st, before, st.names)
        if wildcard and not st.wildcard:
            self._set_wildcard(type_url, st, True)
        elif not wildcard and st.wildcard:
            self._set_wildcard(type_url, st, False)

    def _after_send(self, type_url: str, st: _TypeState, sent: _Sent) -> None:
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

    def _apply_ack(self, type_url: str, st: _TypeState, sent: _Sent) -> None:
        for name, entry in sent.entries.items():
            if st.in_scope(name):
                st.held[name] = entry
        for name in sent.removed:
            st.held.pop(name, None)
        # A removal told the proxy the name is gone: a name it still subscribes to needs no
        # second "does not exist" after it.
        st.reported_absent |= {n for n in sent.absent | sent.removed if n in st.names}

    def _evaluate(
        self, type_url: str, st: _TypeState, force: bool, scoped: bool
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
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
        resp = discovery_pb2.DeltaDiscoveryResponse()
        resp.CopyFrom(self._bodies.get((self.kind, type_url, version), body))
        resp.nonce = nonce
        st.force_names -= upserts.keys()
        self._after_send(
            type_url, st, _Sent(nonce, version, upserts, frozenset(removed), frozenset(absent))
        )
        if type_url == ENDPOINT_TYPE:
            st.warming -= upserts.keys()
        return resp


def make_stream(
    kind: StreamKind,
    cache: Cache,
    *,
    identifier: str,
    metrics: XdsMetrics | None = None,
    journal: NackJournal | None = None,
    rejected: RejectedVersions | None = None,
    gateway: GatewayConfig | None = DEFAULT_GATEWAY,
    on_node: Callable[[ProtocolStream[Any, Any]], None] | None = None,
    clock: Callable[[], float] = time.time,
    bodies: ResponseBodies | None = None,
    limits: StreamLimits = DEFAULT_LIMITS,
) -> SotwStream | DeltaStream:
    cls: type[SotwStream] | type[DeltaStream] = (
        SotwStream if kind is StreamKind.SOTW else DeltaStream
    )
    return cls(
        cache,
        identifier=identifier,
        metrics=metrics,
        journal=journal,
        rejected=rejected,
        gateway=gateway,
        on_node=on_node,
        clock=clock,
        bodies=bodies,
        limits=limits,
    )

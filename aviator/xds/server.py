"""The gRPC (``grpc.aio``) ADS server: SotW and delta streams over one port.

This layer only moves messages between gRPC and a :class:`~aviator.xds.protocol.ProtocolStream`
(where every protocol rule lives), keeps the registry of open streams for the
connected-proxies view, the :class:`~aviator.xds.nacks.NackJournal` and the
:class:`~aviator.xds.nacks.RejectedVersions` of every node, and tells the producer of
snapshots which gateway listeners its connected nodes want (``on_listeners``): the snapshot
must hold a node's listener for that node to get one.

Each stream runs one loop: a reader task queues requests, the cache wakes the loop through the
stream's watches, and the loop yields the responses the state machine returns, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from aviator.xds.bodies import Outgoing, ResponseBodies
from aviator.xds.cache import Cache
from aviator.xds.csds import csds_handlers
from aviator.xds.delta import DeltaStream
from aviator.xds.limits import DEFAULT_LIMITS, StreamLimits, StreamRefusedError
from aviator.xds.metrics import XdsMetrics
from aviator.xds.nacks import NackJournal, NackRecord, RejectedVersions
from aviator.xds.protocol import DEFAULT_GATEWAY, ProtocolStream, ProxyStatus, StreamKind
from aviator.xds.resources import GatewayConfig, ListenSpec
from aviator.xds.sotw import SotwStream

log = structlog.get_logger(__name__)

Req = TypeVar("Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
Resp = TypeVar("Resp", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)

_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the ADS server gives one connection and one stream (issue 14: a hostile or broken
    client must cost the server and the other streams nothing). Every value has its reason:

    - ``max_request_bytes`` (4 MiB, gRPC's own default): the largest request a proxy sends is
      a SotW EDS ACK naming every subscribed cluster, 16,384 names (``stream.max_names``) of
      ~40 bytes is 650 KB; a NACK's message is Envoy's error text. Larger messages are
      refused by gRPC before they are parsed (RESOURCE_EXHAUSTED).
    - ``max_queued_requests``: requests read but not yet handled, per stream. When full the
      stream stops reading and HTTP/2 flow control holds the client back (Envoy has at most
      one request per type outstanding, so 16 is never reached by a proxy).
    - ``send_timeout_s``: a response that the proxy does not take within this time (it stopped
      reading, its window stays closed) ends the stream, so a stalled client cannot pin its
      stream's memory and a task forever. 30 s covers a full-state response of megabytes
      over a slow link.
    - ``keepalive_time_s`` / ``keepalive_timeout_s``: the server pings a connection after 60 s
      without traffic and drops it if there is no answer within 20 s. xDS streams are idle
      for as long as nothing changes; without pings a proxy whose node vanished (no FIN, no
      RST) would hold its stream, its watches and its gauge forever.
    - ``min_client_ping_interval_s``: the client pings gRPC accepts without data in between.
      ``aviator bootstrap`` has Envoy ping every 30 s (``connection_keepalive``); gRPC's
      default (5 min) would count those as abuse and send GOAWAY ("too_many_pings") after
      two minutes of quiet.
    - ``max_connection_age_s`` (30 min, gRPC adds ±10% jitter) and
      ``max_connection_age_grace_s`` (30 s): a connection is closed with GOAWAY after its age
      and its stream cut after the grace, so Envoys spread over the replicas behind one
      Service again after a scale-up or a rolling restart instead of staying on the old
      replicas forever. A cut stream costs nothing: Envoy keeps its configuration,
      reconnects, and is sent only what it lacks. None: no maximum age.
    - ``max_bytes_in_flight`` (16 MiB): response bytes being written, across all streams.
      A response waits its turn (first come, first served) until it fits; one larger than
      the whole budget goes alone. After a change to every workload at 1,000 streams x
      10,000 endpoints, 1,000 responses of 400 KB were written at once and each existed
      twice until its socket drained (our bytes, gRPC's copy): 1.2 GB. The budget does not
      slow the fan-out (the CPU is the limit: one core encodes and writes ~40 of those
      responses in the time the budget allows in flight).
    - ``slow_send_s`` (2 s): a response still being written after this gives its share of
      the budget back (it is still written, up to ``send_timeout_s``): proxies that stopped
      reading cost their own responses' memory, but cannot stall the others' turns.
    """

    stream: StreamLimits = DEFAULT_LIMITS
    max_request_bytes: int = 4 * _MiB
    max_queued_requests: int = 16
    send_timeout_s: float = 30.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    max_connection_age_s: float | None = 1800.0
    max_connection_age_grace_s: float = 30.0
    max_bytes_in_flight: int = 16 * _MiB
    slow_send_s: float = 2.0

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_queued_requests",
            "send_timeout_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "min_client_ping_interval_s",
            "max_connection_age_grace_s",
            "max_bytes_in_flight",
            "slow_send_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be > 0, got {getattr(self, name)}")
        if self.max_connection_age_s is not None and not self.max_connection_age_s > 0:
            raise ValueError(
                f"ServerLimits.max_connection_age_s must be > 0 or None, "
                f"got {self.max_connection_age_s}"
            )

    def grpc_options(self) -> list[tuple[str, int]]:
        """The grpc.aio server options these limits are."""

        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        options = [
            ("grpc.max_receive_message_length", self.max_request_bytes),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                ms(self.min_client_ping_interval_s),
            ),
            # gRPC sets SO_REUSEPORT by default: a second control plane on the same port
            # would silently share the traffic instead of failing to start.
            ("grpc.so_reuseport", 0),
        ]
        if self.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)),
            ]
        return options


DEFAULT_SERVER_LIMITS = ServerLimits()


@dataclass(frozen=True, slots=True)
class ServerTls:
    """xDS over TLS: the server's certificate chain and key, and for mutual TLS the CA that
    client certificates must chain to (a client without one is refused in the handshake).
    The files are read again when they change (:class:`CertificateReloader`)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class CertificateReloader:
    """Serves the current contents of a :class:`ServerTls`'s files to gRPC.

    gRPC asks (``fetch``, from its own threads) at every new TLS handshake; the files are
    re-read when their size, mtime or inode changed (cert-manager and kubelet replace them
    with a rename). A new set that does not load (a half-written file, a key that is not the
    certificate's) is logged and the previous one stays in use: a bad rotation never takes
    the xDS port down. Open connections keep the certificate they were made with.
    """

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()  # raises: a server must not start without its certificate
        self.reloads = 0

    def _files(self) -> list[str]:
        files = [self._tls.cert_file, self._tls.key_file]
        return files + ([self._tls.client_ca_file] if self._tls.client_ca_file else [])

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self._files():
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def _load(self) -> Any:
        tls = self._tls
        # Check what gRPC would only find out in a failing handshake: the key matches the
        # certificate, and the CA file holds certificates.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        ca = None
        if tls.client_ca_file:
            context.load_verify_locations(tls.client_ca_file)
            with open(tls.client_ca_file, "rb") as f:
                ca = f.read()
        with open(tls.cert_file, "rb") as f:
            chain = f.read()
        with open(tls.key_file, "rb") as f:
            key = f.read()
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def fetch(self) -> Any:
        """The configuration to use from now on, or None to keep the current one."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                config = self._load()
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("xDS TLS files not reloaded, the previous ones stay", error=str(exc))
                return None
            self._stamp = stamp
            self.reloads += 1
        log.info("xDS TLS certificate reloaded", cert=self._tls.cert_file)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,
            require_client_authentication=self._tls.client_ca_file is not None,
        )


class _Share:
    """Bytes of a :class:`SendBudget` held by one response being written; given back by
    :meth:`release` (idempotent), or when the write is slow."""

    __slots__ = ("_budget", "_size", "_timer")

    def __init__(self, budget: SendBudget, size: int, slow_after: float) -> None:
        self._budget: SendBudget | None = budget
        self._size = size
        self._timer = asyncio.get_running_loop().call_later(slow_after, self.release)

    def release(self) -> None:
        if self._budget is not None:
            self._timer.cancel()
            self._budget._give_back(self._size)
            self._budget = None


class SendBudget:
    """Response bytes being written, across the streams of one server, at most ``limit``.

    :meth:`acquire` waits, first come first served, until ``size`` bytes fit (a response
    larger than ``limit`` waits until nothing else is in flight, then goes alone); the
    returned share is given back when the write is done, or after ``slow_after`` seconds if
    it is not (a proxy that stopped reading must not hold the others' turns; the send
    timeout ends its stream). Not thread-safe: one event loop.
    """

    def __init__(self, limit: int, slow_after: float) -> None:
        if limit < 1 or not slow_after > 0:
            raise ValueError(f"need limit >= 1 and slow_after > 0, got {limit}, {slow_after}")
        self.limit = limit
        self._slow_after = slow_after
        self.in_flight = 0
        self.peak = 0  # the most bytes in flight at once (for benchmarks and tests)
        self.waited = 0  # responses that had to wait their turn
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> _Share:
        size = max(0, min(size, self.limit))
        if not self._waiters and self.in_flight + size <= self.limit:
            self._take(size)
        else:
            self.waited += 1
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((size, turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._give_back(size)  # granted, then cancelled: not ours to keep
                else:
                    with contextlib.suppress(ValueError):  # _grant may have dropped it
                        self._waiters.remove((size, turn))
                    self._grant()  # the head may have been what blocked the others
                raise
        return _Share(self, size, self._slow_after)

    def _take(self, size: int) -> None:
        self.in_flight += size
        self.peak = max(self.peak, self.in_flight)

    def _give_back(self, size: int) -> None:
        self.in_flight -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            size, turn = self._waiters[0]
            if turn.done():  # cancelled while queued; removed by its own task
                self._waiters.popleft()
                continue
            if self.in_flight + size > self.limit:
                return
            self._waiters.popleft()
            self._take(size)
            turn.set_result(None)


class _Undecodable:
    """What the request decoder returns for bytes that are not a request (see
    :func:`_decoder`): the stream is then refused with a one-line reason."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _decoder(cls: Any) -> Callable[[bytes], Any]:
    """``cls.FromString``, but garbage (or invalid UTF-8 in a string field) becomes an
    :class:`_Undecodable` instead of an exception: gRPC would log a traceback for it and end
    the call with INTERNAL, as if the server were broken."""

    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return _Undecodable(len(data))

    return decode


async def run_stream(
    stream: ProtocolStream[Req, Resp],
    requests: AsyncIterator[Req],
    *,
    max_queued: int = DEFAULT_SERVER_LIMITS.max_queued_requests,
) -> AsyncIterator[Outgoing[Resp]]:
    """Drive ``stream`` with ``requests`` and cache wake-ups; yield its responses in order.

    Ends when the client half-closes its side; an error reading requests (a
    :class:`StreamRefusedError` among them) is re-raised. At most ``max_queued`` requests wait to
    be handled: then reading stops until there is room (the client is held back by flow
    control). The stream stops watching the cache whatever way this ends.
    """
    inbox: deque[Req] = deque()
    wake = asyncio.Event()
    room = asyncio.Event()
    room.set()
    stream.set_waker(wake.set)
    ended = False

    async def read() -> None:
        nonlocal ended
        try:
            async for request in requests:
                inbox.append(request)
                wake.set()
                del request  # see _written: not kept while waiting for the next one
                if len(inbox) >= max_queued:
                    room.clear()
                    await room.wait()
        finally:
            ended = True
            wake.set()

    reader = asyncio.create_task(read(), name=f"ads-read-{stream.stream_id}")
    try:
        while True:
            await wake.wait()
            wake.clear()
            # ``del``: a response may be megabytes (every CLA, on connect); none is kept
            # alive while the stream waits for its next request or change.
            while inbox:
                request = inbox.popleft()
                room.set()
                responses = stream.handle_outgoing(request)
                del request
                for response in responses:
                    yield response
                    del response
                del responses
            for response in stream.flush_outgoing():
                yield response
                del response
            if ended and not inbox:
                if not reader.cancelled() and (error := reader.exception()) is not None:
                    raise error
                return
    finally:
        stream.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """``envoy.service.discovery.v3.AggregatedDiscoveryService`` over a :class:`Cache`."""

    def __init__(
        self,
        cache: Cache,
        *,
        identifier: str,
        metrics: XdsMetrics,
        journal: NackJournal,
        rejected: RejectedVersions | None = None,
        gateway: GatewayConfig | None = DEFAULT_GATEWAY,
        on_listeners: Callable[[frozenset[ListenSpec]], None] | None = None,
        clock: Callable[[], float] = time.time,
        limits: ServerLimits = DEFAULT_SERVER_LIMITS,
    ) -> None:
        self._cache = cache
        self.limits = limits
        self._identifier = identifier
        self._metrics = metrics
        self._journal = journal
        self._rejected = rejected if rejected is not None else RejectedVersions()
        self._gateway = gateway
        self._on_listeners = on_listeners
        self._clock = clock
        self._streams: dict[int, ProtocolStream[Any, Any]] = {}
        self._bodies = ResponseBodies()  # one body per content, shared by every stream
        self.budget = SendBudget(limits.max_bytes_in_flight, limits.slow_send_s)
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        # The gateway listener of each open stream whose node told it, and how many want each.
        self._listening: dict[int, ListenSpec] = {}
        self._wanted: Counter[ListenSpec] = Counter()

    def streams(self) -> list[ProtocolStream[Any, Any]]:
        """The open streams, in the order they opened."""
        return list(self._streams.values())

    def wanted_listeners(self) -> frozenset[ListenSpec]:
        """The gateway listeners the nodes of the open streams are given."""
        return frozenset(self._wanted)

    def _node_known(self, stream: ProtocolStream[Any, Any]) -> None:
        """A stream's first request said who the proxy is: count the listener it wants."""
        spec = stream.listen_spec
        if spec is None or stream.stream_id in self._listening:
            return
        self._listening[stream.stream_id] = spec
        self._wanted[spec] += 1
        if self._wanted[spec] == 1:
            self._listeners_changed()

    def _stream_gone(self, stream_id: int) -> None:
        spec = self._listening.pop(stream_id, None)
        if spec is None:
            return
        self._wanted[spec] -= 1
        if self._wanted[spec] <= 0:
            del self._wanted[spec]
            self._listeners_changed()

    def _listeners_changed(self) -> None:
        if self._on_listeners is None:
            return
        wanted = self.wanted_listeners()
        log.info("gateway listeners wanted", listeners=sorted(str(s) for s in wanted))
        try:
            self._on_listeners(wanted)
        except Exception:  # a broken producer must not end the stream that told it
            log.exception("the listener callback failed")

    def _new_stream(self, kind: StreamKind) -> ProtocolStream[Any, Any]:
        cls: type[SotwStream] | type[DeltaStream] = (
            SotwStream if kind is StreamKind.SOTW else DeltaStream
        )
        return cls(
            self._cache,
            identifier=self._identifier,
            metrics=self._metrics,
            journal=self._journal,
            rejected=self._rejected,
            gateway=self._gateway,
            on_node=self._node_known,
            clock=self._clock,
            bodies=self._bodies,
            limits=self.limits.stream,
        )

    async def drain(self, within: float) -> None:
        """Wait (at most ``within`` s) for the handlers of ended RPCs to finish their cleanup.

        grpc.aio cancels the handlers on stop but does not wait for them; after this, the
        connected-proxies view and the gauge are exact.
        """
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=within)
        for stream_id, stream in list(self._streams.items()):  # handlers that never cleaned up
            stream.close()
            self._streams.pop(stream_id, None)
            self._stream_gone(stream_id)

    async def _serve(
        self, stream: ProtocolStream[Req, Resp], requests: AsyncIterator[Req], peer: str
    ) -> AsyncGenerator[Outgoing[Resp], None]:
        gauge = self._metrics.connected.labels(kind=str(stream.kind))
        self._streams[stream.stream_id] = stream
        if (task := asyncio.current_task()) is not None:
            self._tasks[stream.stream_id] = task
        gauge.inc()
        log.info("ADS stream opened", stream=stream.stream_id, kind=str(stream.kind), peer=peer)
        try:
            async for response in run_stream(
                stream, requests, max_queued=self.limits.max_queued_requests
            ):
                yield response
                del response  # see run_stream
        except StreamRefusedError as exc:
            # One line, no traceback and nothing of the request: the reason names the field.
            log.warning(
                "ADS stream refused",
                stream=stream.stream_id,
                kind=str(stream.kind),
                node=stream.shown_node,
                peer=peer,
                code=exc.code,
                reason=exc.message,
            )
            self._metrics.refused.labels(kind=str(stream.kind), code=exc.code).inc()
            raise
        finally:
            gauge.dec()
            self._streams.pop(stream.stream_id, None)
            self._tasks.pop(stream.stream_id, None)
            self._stream_gone(stream.stream_id)
            log.info(
                "ADS stream closed",
                stream=stream.stream_id,
                kind=str(stream.kind),
                node=stream.shown_node,
            )

    def StreamAggregatedResources(  # noqa: N802 - name fixed by the gRPC service
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[Outgoing[discovery_pb2.DiscoveryResponse], None]:
        # The stream's own generator, not a wrapper: :func:`_written` throws a send timeout
        # into it, where the stream's log line and metric are.
        return self._serve(self._new_stream(StreamKind.SOTW), request_iterator, context.peer())

    def DeltaAggregatedResources(  # noqa: N802 - name fixed by the gRPC service
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[Outgoing[discovery_pb2.DeltaDiscoveryResponse], None]:
        # The stream's own generator, not a wrapper: :func:`_written` throws a send timeout
        # into it, where the stream's log line and metric are.
        return self._serve(self._new_stream(StreamKind.DELTA), request_iterator, context.peer())


def _written(
    method: Callable[[AsyncIterator[Req], Any], AsyncGenerator[Outgoing[Resp], None]],
    what: str,
    send_timeout: float,
    budget: SendBudget,
) -> Callable[[AsyncIterator[Req], Any], Awaitable[None]]:
    """A gRPC handler reading and writing the messages of the async generator ``method``
    through the context.

    grpc.aio keeps the last message an async-generator handler yielded alive until the next
    one, and its request iterator the last request until the next: its loop variables. After
    connect, that is every stream's first EDS response (all CLAs) until a CLA changes, and
    for SotW the last ACK (every subscribed name) — 450 MB and ~90 MB for 1,000 streams of
    10,000 endpoints in ``aviator bench xds``. Reading and writing through the context keeps
    neither.

    Here too the stream ends, with a status, when a request is not a ``what`` (garbage) or
    the protocol refuses the stream (:class:`StreamRefusedError`), and when a response is not
    taken within ``send_timeout`` seconds (a client that stopped reading). A response waits
    for its turn in ``budget`` before it is encoded and written (not counted in the send
    timeout: waiting for the others is not the proxy's fault).
    """

    async def read(context: Any) -> AsyncIterator[Req]:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            if isinstance(request, _Undecodable):
                raise StreamRefusedError(
                    "INVALID_ARGUMENT", f"a request of {request.size} bytes is not a {what}"
                )
            yield request
            del request

    async def handler(requests: AsyncIterator[Req], context: Any) -> None:
        responses = method(read(context), context)
        try:
            async for response in responses:
                share = await budget.acquire(len(response))
                try:
                    async with asyncio.timeout(send_timeout):
                        await context.write(response)
                except TimeoutError:
                    # Into the stream's generator, at its yield: it logs, counts and ends.
                    await responses.athrow(
                        StreamRefusedError(
                            "UNAVAILABLE",
                            f"the proxy took no response for {send_timeout:g} s "
                            "(it stopped reading); reconnect",
                        )
                    )
                finally:
                    share.release()
                del response
        except StreamRefusedError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        finally:
            await responses.aclose()

    return handler


def _ads_handlers(servicer: AdsServicer) -> grpc.GenericRpcHandler:
    """``AggregatedDiscoveryService`` over ``servicer``, as the generated
    ``add_AggregatedDiscoveryServiceServicer_to_server`` registers it but through
    :func:`_written`."""
    timeout, budget = servicer.limits.send_timeout_s, servicer.budget
    return grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                _written(servicer.StreamAggregatedResources, "DiscoveryRequest", timeout, budget),
                request_deserializer=_decoder(discovery_pb2.DiscoveryRequest),
                response_serializer=Outgoing.encode,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                _written(
                    servicer.DeltaAggregatedResources, "DeltaDiscoveryRequest", timeout, budget
                ),
                request_deserializer=_decoder(discovery_pb2.DeltaDiscoveryRequest),
                response_serializer=Outgoing.encode,
            ),
        },
    )


class AdsServer:
    """An ADS server on one address: ``await start("127.0.0.1:0")`` returns the bound port."""

    def __init__(
        self,
        cache: Cache,
        *,
        identifier: str,
        metrics_registry: CollectorRegistry | None = None,
        gateway: GatewayConfig | None = DEFAULT_GATEWAY,
        on_listeners: Callable[[frozenset[ListenSpec]], None] | None = None,
        clock: Callable[[], float] = time.time,
        limits: ServerLimits = DEFAULT_SERVER_LIMITS,
        tls: ServerTls | None = None,
    ) -> None:
        """``gateway``: the defaults of gateway listeners, as the snapshots are built with
        (None: no gateway listeners). ``on_listeners`` is called with every gateway listener
        the connected nodes want whenever that set changes (a gateway connects on a new
        address or port, or the last one on it leaves); its producer builds them into the
        snapshots (``SnapshotBuilder.build(listeners=...)``). ``limits``: what one connection
        and one stream may cost (:class:`ServerLimits`). ``tls``: serve over TLS (mutual TLS
        with a client CA) instead of plaintext."""
        if not identifier:
            raise ValueError("the control plane identifier must not be empty")
        self.cache = cache
        self.identifier = identifier
        self.limits = limits
        self.tls = tls
        self.certificates: CertificateReloader | None = None
        self.metrics = XdsMetrics(metrics_registry, cache=cache, clock=clock)
        self.journal = NackJournal()
        self.rejected = RejectedVersions()
        self.servicer = AdsServicer(
            cache,
            identifier=identifier,
            metrics=self.metrics,
            journal=self.journal,
            rejected=self.rejected,
            gateway=gateway,
            on_listeners=on_listeners,
            clock=clock,
            limits=limits,
        )
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the ADS server is not started")
        return self._port

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Listen on ``address`` (``host:port``, port 0 for any free one); return the port."""
        if self._server is not None:
            raise RuntimeError("the ADS server is already started")
        server = grpc.aio.server(options=self.limits.grpc_options())
        # CSDS on the same port: what each connected proxy holds, for xDS tooling.
        server.add_generic_rpc_handlers(
            (_ads_handlers(self.servicer), csds_handlers(self.servicer.streams))
        )
        try:
            if self.tls is None:
                port = int(server.add_insecure_port(address))
            else:
                try:
                    self.certificates = CertificateReloader(self.tls)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    raise OSError(f"cannot load the xDS TLS files: {exc}") from exc
                port = int(server.add_secure_port(address, self.certificates.credentials()))
        except (RuntimeError, OSError) as exc:
            await server.stop(None)
            if isinstance(exc, OSError):
                raise
            raise OSError(f"cannot listen for xDS on {address}: {exc}") from exc
        await server.start()
        self._server, self._port = server, port
        log.info(
            "ADS server listening",
            address=address,
            port=port,
            identifier=self.identifier,
            tls="mutual" if self.tls and self.tls.client_ca_file else "on" if self.tls else "off",
        )
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting streams; end open ones after ``grace`` seconds. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
            await self.servicer.drain(within=1.0)
            log.info("ADS server stopped")

    def streams(self) -> list[ProtocolStream[Any, Any]]:
        """The live streams (a copy: iterate freely). What each proxy holds, per name, is on
        the stream: :meth:`~aviator.xds.protocol.ProtocolStream.subscribed`,
        :meth:`~aviator.xds.protocol.ProtocolStream.held_version`,
        :meth:`~aviator.xds.protocol.ProtocolStream.rejection`; its
        ``requests_handled`` moves whenever that may have changed."""
        return self.servicer.streams()

    def proxies(self) -> tuple[ProxyStatus, ...]:
        """The open streams: node id, kind, per-type subscription, versions and last NACK."""
        return tuple(
            sorted((s.status() for s in self.servicer.streams()), key=lambda p: p.stream_id)
        )

    def wanted_listeners(self) -> frozenset[ListenSpec]:
        """The gateway listeners the connected nodes are given."""
        return self.servicer.wanted_listeners()

    def nacks(self, node_id: str | None = None) -> tuple[NackRecord, ...]:
        """Recorded NACKs (oldest first), of one node or of all."""
        return self.journal.all() if node_id is None else self.journal.for_node(node_id)


__all__ = [
    "AdsServer",
    "AdsServicer",
    "CertificateReloader",
    "SendBudget",
    "ServerLimits",
    "ServerTls",
    "StreamKind",
    "StreamLimits",
    "run_stream",
]

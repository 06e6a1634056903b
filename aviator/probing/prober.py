"""The prober: probe every target every ``interval_s`` (with jitter), off the request path.

One asyncio task per target, all inside one :class:`asyncio.TaskGroup` owned by
:meth:`Prober.run`. Each task owns its transport (by default one keep-alive HTTP/1.1
connection, :mod:`aviator.probing.transport`) and closes it in ``finally``, so removing a target, or
stopping the prober, leaves no task and no connection behind.

Guarantees:
- The first probe of a new target lands at a uniformly random point of its first interval,
  later ones every ``interval_s * (1 ± jitter)`` from the previous probe's start: no herd.
- At most ``max_in_flight`` probes are in flight at once (a semaphore); each probe has its
  target's timeout, measured after it got its slot, so a hanging endpoint holds one slot
  for at most its timeout and delays no other target.
- Every probe yields exactly one :class:`ProbeResult` to the sink, failures included
  (timeouts, refused connections, 5xx): the estimator turns them into penalised latency.
- An endpoint failing ``backoff_after`` (2) times in a row is probed less often: its period
  doubles up to a cap of ``backoff_max_intervals`` (3) of its own intervals, and at most
  ``backoff_max_s`` (10 s), never below one interval (:func:`backoff_period`). One success
  restores the interval. So a pod that comes back is probed again within 3 intervals
  (+ jitter) and counts as recovered one interval later (the estimator waits for a second
  answer): at most ~4.4 s at 1 s probes (2.4-2.7 s measured on fake time), where a 10 s cap
  alone made it ~15 s (issue 9). The cap
  stays below the estimator's staleness (5 intervals, at least 30 s), so a failing endpoint's
  statistics never go stale between two probes.
- A probe is bounded in time and memory, whatever the pod does (issue 14): the timeout covers
  connect, headers and body (a pod that hangs or answers byte by byte is a timeout); the
  default transport reads at most :data:`MAX_RESPONSE_HEADERS` headers of at most 8,190 bytes
  each and discards the body as it reads it, failing the probe past
  :data:`MAX_RESPONSE_BODY` bytes (an endless body read 141 MB in one 1 s probe before);
  non-HTTP bytes fail the probe. The failure's detail is at most :data:`MAX_DETAIL` printable
  ASCII characters, so a pod's bytes never reach a log line raw or large.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Generic, TypeVar

import structlog
from aviator_agent.orca import OrcaParseError, report_from_headers

from aviator.probing.results import ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.transport import (
    ProbeConnectError,
    ProbeResponseError,
    ProbeTransport,
    TransportFactory,
    http_transport_factory,
)

__all__ = [
    "BACKOFF_MAX_INTERVALS",
    "DEFAULT_MAX_PROBE_RATE",
    "MAX_DETAIL",
    "AddressPolicy",
    "ProbeSink",
    "Prober",
    "backoff_period",
    "bounded_detail",
    "spread_probe_budget",
]

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
ProbeSink = Callable[[K, ProbeResult], None]

BACKOFF_MAX_INTERVALS = 3.0  # a failing endpoint is probed at least every 3 of its intervals

#: Characters of a failed probe's detail (it goes into log lines and views).
MAX_DETAIL = 240
#: Probes per second for every target together (``aviator run --max-probe-rate``). One core
#: sustains ~5,000 probes/s saturated, and 1,000 endpoints probed every second cost ~28 % of
#: it (docs/benchmarks/probe.md): the default keeps probing near a quarter of a core.
DEFAULT_MAX_PROBE_RATE = 1000.0


def spread_probe_budget(
    targets: Mapping[K, ProbeTarget], max_rate: float
) -> tuple[dict[K, ProbeTarget], float]:
    """``targets`` with their intervals stretched by one common factor so that together they
    ask for at most ``max_rate`` probes per second, and the factor (1.0: within budget).

    Every target keeps the same share of what its policy asked (a policy probing twice as
    often still gets twice the probes): the probe budget is spread evenly, as Prequal's probe
    pool samples servers at a bounded rate rather than probing all of them on every query.
    Periodic, not random: each endpoint keeps a regular probe and no endpoint goes unprobed.
    The estimator follows the stretched interval (staleness, half-lives), so a stretched
    endpoint never goes stale between two of its probes. Pure.
    """
    if not (math.isfinite(max_rate) and max_rate > 0):
        raise ValueError(f"max_rate must be finite and > 0, got {max_rate!r}")
    demand = math.fsum(1.0 / t.interval_s for t in targets.values())
    if demand <= max_rate:
        return dict(targets), 1.0
    stretch = demand / max_rate
    return {k: replace(t, interval_s=t.interval_s * stretch) for k, t in targets.items()}, stretch


def backoff_period(
    interval_s: float,
    failures: int,
    *,
    after: int = 2,
    max_s: float = 10.0,
    max_intervals: float = BACKOFF_MAX_INTERVALS,
) -> float:
    """The period (before jitter) of an endpoint that failed its last ``failures`` probes:
    its interval, doubled for each failure from the ``after``-th on, capped at
    ``min(max_intervals * interval, max_s)`` and never below the interval."""
    if failures < after:
        return interval_s
    cap = max(interval_s, min(max_intervals * interval_s, max_s))
    doublings = failures - after + 1
    return min(interval_s * 2.0 ** min(doublings, 64), cap)


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# 169.254.169.254 (and fd00:ec2::254) are the cloud metadata services: credentials.
_METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which pod addresses the prober may contact (issue 14).

    A pod's IP comes from its status, which whoever can create pods (or write the directory
    source) controls: without this, a pod "at" 169.254.169.254 turns the control plane into a
    client of the cloud's metadata service, and one at 127.0.0.1 into a client of the control
    plane's own host. Refused unless allowed: loopback (127.0.0.0/8, ::1, and the unspecified
    0.0.0.0 and ::, which reach this host), link-local (169.254.0.0/16, fe80::/10), the
    metadata addresses (always, even with link-local allowed: no pod is ever there), and
    multicast. An IPv4-mapped IPv6 address (``::ffff:169.254.169.254``) is judged as the IPv4
    address it maps, as Envoy and the kernel connect to it.
    """

    allow_loopback: bool = False
    allow_link_local: bool = False

    def refusal(self, ip: str) -> str | None:
        """Why ``ip`` must not be probed, or None if it may be."""
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return f"{ip!r} is not an IP address"
        shown = str(address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
            shown = f"{ip} (the IPv4 address {address})"
        if address in _METADATA:
            return f"{shown} is a cloud metadata service address; it is never probed"
        if address.is_unspecified or any(address in n for n in _LOOPBACK):
            if self.allow_loopback:
                return None
            return (
                f"{shown} is a loopback address (this host); it is probed only with "
                "aviator run --allow-probe-loopback"
            )
        if any(address in n for n in _LINK_LOCAL):
            if self.allow_link_local:
                return None
            return (
                f"{shown} is a link-local address; it is probed only with "
                "aviator run --allow-probe-link-local"
            )
        if address.is_multicast:
            return f"{shown} is a multicast address; a pod has none"
        return None

    def target_refusal(self, target: ProbeTarget) -> str | None:
        """Why ``target`` must not be probed: its address (:meth:`refusal`), or a URL whose
        host or port would not be the target's own (a path is only ever a path)."""
        if (why := self.refusal(target.ip)) is not None:
            return why
        return _url_refusal(target)


def _url_refusal(target: ProbeTarget) -> str | None:
    """The probe URL is ``http://<ip>:<port><path>``: refuse a path that is not plain printable
    ASCII (CR/LF would split the request) or one after which the URL's host or port is not the
    target's (checked on the parsed URL, so no spelling of a path can move the host)."""
    import yarl

    path = target.path
    if not path.startswith("/") or not all("!" <= c <= "~" for c in path) or "#" in path:
        return (
            f"probe path {path[:64]!r} must start with '/' and hold printable ASCII only, "
            "no space and no '#'"
        )
    try:
        url = yarl.URL(target.url)
    except ValueError:
        return f"probe URL for path {path[:64]!r} does not parse"
    want = ipaddress.ip_address(target.ip.split("%", 1)[0])
    try:
        host = ipaddress.ip_address((url.host or "").split("%", 1)[0])
    except ValueError:
        host = None
    if host != want or url.port != target.port or url.scheme != "http" or url.user is not None:
        return f"probe path {path[:64]!r} would change the probed host or port"
    return None


def bounded_detail(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` as at most ``limit`` printable ASCII characters: anything else escaped
    (``\\x1b``), a longer text cut, ending with its full length. Error messages of HTTP
    libraries quote what the peer sent; a hostile pod must not write into the log."""
    # Each character escapes to at least one: the first ``limit`` are all that can show.
    escaped = "".join(
        c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text[:limit]
    )
    if len(text) <= limit and len(escaped) <= limit:
        return escaped
    note = f"... ({len(text)} characters)"
    return escaped[: max(0, limit - len(note))] + note


class _Slot:
    """Mutable per-target state, touched only by the target's own task and set_targets."""

    __slots__ = ("failures", "orca_warned", "target", "task")

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self.task: asyncio.Task[None] | None = None
        self.failures = 0
        self.orca_warned = False


class Prober(Generic[K]):
    """Probes every target of :meth:`set_targets` and hands each result to ``sink``.

    ``sink`` is called on the event loop, once per probe, and must not block; an exception
    from it is logged and probing goes on. ``clock`` times the probes (default: the running
    loop's ``time``, so fake loop time works in tests).
    """

    def __init__(
        self,
        sink: Callable[[K, ProbeResult], None],
        *,
        max_in_flight: int = 256,
        clock: Callable[[], float] | None = None,
        transport_factory: TransportFactory | None = None,
        jitter: float = 0.1,
        backoff_after: int = 2,
        backoff_max_s: float = 10.0,
        backoff_max_intervals: float = BACKOFF_MAX_INTERVALS,
        rng: random.Random | None = None,
        addresses: AddressPolicy | None = None,
        log_fields: Callable[[K], Mapping[str, object]] | None = None,
    ) -> None:
        """``addresses``: which addresses may be probed (:class:`AddressPolicy`); a target it
        refuses is never contacted and is listed in :attr:`refused`. None: every address (the
        benchmark probes its loopback backends); the control plane always passes one, and
        its default refuses loopback and link-local. ``log_fields(key)``: the keys a log line
        about a target carries (the control plane's: ``policy``, ``endpoint``, ``pod``);
        by default ``key=str(key)``."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if backoff_after < 1 or not backoff_max_s > 0 or not backoff_max_intervals >= 1:
            raise ValueError(
                "backoff_after must be >= 1, backoff_max_s > 0 and backoff_max_intervals >= 1"
            )
        self._sink = sink
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._transport_factory = transport_factory or http_transport_factory()
        self._jitter = jitter
        self._backoff_after = backoff_after
        self._backoff_max_s = backoff_max_s
        self._backoff_max_intervals = backoff_max_intervals
        self._rng = rng or random.Random()
        self._addresses = addresses
        self._log_fields = log_fields or (lambda key: {"key": str(key)})
        self._slots: dict[K, _Slot] = {}
        self._refused: dict[K, str] = {}
        self._group: asyncio.TaskGroup | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._stop: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._closed = False
        self._in_flight = 0

    # -- introspection -------------------------------------------------------------------

    @property
    def targets(self) -> Mapping[K, ProbeTarget]:
        return MappingProxyType({k: s.target for k, s in self._slots.items()})

    @property
    def refused(self) -> Mapping[K, str]:
        """The targets of the last :meth:`set_targets` that are not probed, and why."""
        return MappingProxyType(self._refused)

    def log_fields(self, key: K) -> Mapping[str, object]:
        """The keys a log line about target ``key`` carries (``log_fields`` of the constructor)."""
        return self._log_fields(key)

    @property
    def in_flight(self) -> int:
        """Probes holding a slot right now (at most ``max_in_flight``)."""
        return self._in_flight

    @property
    def running_tasks(self) -> int:
        """Per-target tasks alive right now (including ones still closing)."""
        return sum(1 for s in self._slots.values() if s.task is not None and not s.task.done())

    # -- control -------------------------------------------------------------------------

    def set_targets(self, targets: Mapping[K, ProbeTarget]) -> None:
        """Make ``targets`` the set probed: start new ones, stop removed ones (closing their
        connections), apply changed settings from the next probe on. Idempotent.

        A target the address policy refuses is not probed (:attr:`refused` says why; logged
        once, when it is first refused)."""
        self.apply_targets(self.screen_targets(targets))

    def screen_targets(self, targets: Mapping[K, ProbeTarget]) -> Mapping[K, ProbeTarget]:
        """``targets`` without those the address policy refuses, which become :attr:`refused`
        (a refusal logged once, when it is first made). Touches no task: any thread may call
        it (:class:`~aviator.probing.thread.ProberThread` does, on the control plane's)."""
        if self._closed:
            raise RuntimeError("prober is closed")
        refused: dict[K, str] = {}
        for key, target in targets.items():
            if self._addresses is None:
                break
            if (why := self._addresses.target_refusal(target)) is not None:
                refused[key] = why
                if self._refused.get(key) != why:
                    log.warning("probe target refused", **self._log_fields(key), reason=why)
        self._refused = refused
        if refused:
            targets = {k: t for k, t in targets.items() if k not in refused}
        return targets

    def apply_targets(self, targets: Mapping[K, ProbeTarget]) -> None:
        """Make ``targets`` (screened) the set probed; on the prober's own loop."""
        if self._closed:
            return
        for key in [k for k in self._slots if k not in targets]:
            self._stop_slot(self._slots.pop(key))
        for key, target in targets.items():
            slot = self._slots.get(key)
            if slot is None:
                self._slots[key] = slot = _Slot(target)
            elif slot.target != target:
                if (slot.target.ip, slot.target.port) != (target.ip, target.port):
                    # Another endpoint: fresh task, fresh connection, fresh back-off.
                    self._stop_slot(slot)
                    self._slots[key] = slot = _Slot(target)
                else:
                    slot.target = target  # read by the task at its next probe
            self._start_slot(key, slot)

    async def run(self) -> None:
        """Probe until :meth:`close` (or cancellation). Raises if a target task fails."""
        if self._closed:
            raise RuntimeError("prober is closed")
        if self._group is not None:
            raise RuntimeError("prober is already running")
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._semaphore = asyncio.Semaphore(self._max_in_flight)
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for key, slot in self._slots.items():
                    self._start_slot(key, slot)
                log.debug("prober started", targets=len(self._slots))
                await self._stop.wait()
                for slot in self._slots.values():
                    self._stop_slot(slot)
        finally:
            self._group = None
            for slot in self._slots.values():
                slot.task = None
            self._stopped.set()
            log.debug("prober stopped")

    async def close(self) -> None:
        """Stop probing, close every connection, and wait until that is done."""
        self._closed = True
        if self._stop is not None and self._stopped is not None:
            self._stop.set()
            await self._stopped.wait()

    # -- internals -----------------------------------------------------------------------

    def _start_slot(self, key: K, slot: _Slot) -> None:
        if self._group is None or slot.task is not None:
            return
        slot.task = self._group.create_task(self._probe_loop(key, slot), name=f"probe {key}")

    @staticmethod
    def _stop_slot(slot: _Slot) -> None:
        if slot.task is not None:
            slot.task.cancel()

    async def _probe_loop(self, key: K, slot: _Slot) -> None:
        assert self._clock is not None
        clock = self._clock
        transport = self._transport_factory(slot.target)
        try:
            # First probe somewhere in the first interval: targets added together spread out.
            next_at = clock() + self._rng.uniform(0.0, slot.target.interval_s)
            while True:
                delay = next_at - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                woke_at = clock()
                result = await self._probe_once(transport, slot)
                if result.ok:
                    if slot.failures:
                        log.info(
                            "probe target recovered", **self._log_fields(key), after=slot.failures
                        )
                    slot.failures = 0
                else:
                    if not slot.failures:  # log transitions, not every failed probe
                        log.info(
                            "probe target failing",
                            **self._log_fields(key),
                            url=slot.target.url,
                            outcome=result.outcome.value,
                            status=result.status,
                            detail=result.detail,
                        )
                    slot.failures += 1
                self._deliver(key, result)
                next_at = woke_at + self._next_period(slot)
        finally:
            await transport.aclose()

    def _next_period(self, slot: _Slot) -> float:
        period = backoff_period(
            slot.target.interval_s,
            slot.failures,
            after=self._backoff_after,
            max_s=self._backoff_max_s,
            max_intervals=self._backoff_max_intervals,
        )
        return period * (1.0 + self._rng.uniform(-self._jitter, self._jitter))

    async def _probe_once(self, transport: ProbeTransport, slot: _Slot) -> ProbeResult:
        assert self._semaphore is not None
        assert self._clock is not None
        clock = self._clock
        target = slot.target
        async with self._semaphore:
            self._in_flight += 1
            started = clock()
            try:
                async with asyncio.timeout(target.timeout_s):
                    response = await transport.get(target)
            except TimeoutError:
                return self._failure(ProbeOutcome.TIMEOUT, started, target, "timed out")
            except ProbeConnectError as exc:
                return self._failure(ProbeOutcome.CONNECT_ERROR, started, target, str(exc))
            except ProbeResponseError as exc:
                return self._failure(ProbeOutcome.ERROR, started, target, str(exc))
            except Exception as exc:  # any other transport failure is a failed probe, not a crash
                detail = f"{type(exc).__name__}: {exc}"
                return self._failure(ProbeOutcome.ERROR, started, target, detail)
            finally:
                self._in_flight -= 1
            finished = clock()
        status = response.status
        if status >= 500 or status == 429:
            return ProbeResult(
                ProbeOutcome.HTTP_ERROR, started, finished, target.timeout_s, status=status
            )
        try:
            load = report_from_headers(response.headers)
        except OrcaParseError as exc:
            load = None
            if not slot.orca_warned:  # once per target: a bad header repeats on every probe
                slot.orca_warned = True
                log.warning("ignoring malformed ORCA header", url=target.url, error=str(exc))
        return ProbeResult(
            ProbeOutcome.OK, started, finished, target.timeout_s, status=status, load=load
        )

    def _failure(
        self, outcome: ProbeOutcome, started: float, target: ProbeTarget, detail: str
    ) -> ProbeResult:
        assert self._clock is not None
        finished = max(self._clock(), started)
        return ProbeResult(
            outcome, started, finished, target.timeout_s, detail=bounded_detail(detail)
        )

    def _deliver(self, key: K, result: ProbeResult) -> None:
        try:
            self._sink(key, result)
        except Exception:
            log.exception("probe sink failed", **self._log_fields(key))

"""The prober in a process of its own (issue 13, item 6).

:class:`~aviator.probing.thread.ProberThread` took probes off the loop that serves xDS, but
not off its interpreter: while an all-workload change at 1,000 streams x 10,000 endpoints
runs Python on the serving thread, the probe thread waits for the GIL before it reads an
answer, and its round trips were inflated by 8-15 ms at p99 (the bound is 5 ms).
:class:`ProberProcess` runs the :class:`~aviator.probing.prober.Prober` in a child Python
process (``python -m aviator.probing.process``): a probe is timed and read there, and waits
for nothing of the control plane's. Times agree across the two: both loops read
``time.monotonic()``, the system's monotonic clock.

It has the prober's interface (``set_targets``, ``run``, ``close``, ``targets``, ``refused``,
``in_flight``, ``running_tasks``, ``log_fields``) and is a drop-in for it. The child is built
from a :class:`ProberSpec` (plain values: it crosses a pipe, a closure would not). The two
talk over the child's stdin and stdout in length-prefixed pickle frames: targets go down
(with the log fields of each, so that the child's log lines name the pod), results come up
in batches (one frame per 5 ms at most, not per probe) and reach the sink on the
loop that runs :meth:`run`, in the order they were made. Targets are screened where
:meth:`set_targets` is called, as the thread does, so :attr:`refused` and :attr:`targets` say
what was asked at once. The child exits when told to close or when its stdin ends (its
parent is gone). A child that dies otherwise (killed, out of memory) or whose prober fails is
logged and started again with the current targets, after a delay that backs off while it
keeps dying young: a crash of the child once stopped the whole control plane (every task of
``aviator run`` is supervised), and its restart lost every endpoint's statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import random
import struct
import sys
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import structlog

from aviator.probing.prober import AddressPolicy, Prober
from aviator.probing.results import ProbeResult, ProbeTarget
from aviator.probing.transport import TransportFactory

__all__ = ["RESTART_FIRST_S", "RESTART_MAX_S", "ProberProcess", "ProberSpec"]

K = TypeVar("K", bound=Hashable)

log = structlog.get_logger(__name__)

_HEADER = struct.Struct(">I")
_STOP_S = 5.0  # a child asked to close has this long before it is killed
#: A child that died is started again after this long, then after twice as long each time it
#: dies young (it lived less than _LIVED_S), up to RESTART_MAX_S.
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 10.0
_LIVED_S = 30.0
# Results wait at most this long in the child for others to share their frame. A probe is
# timed when it ends, so this delays only its delivery (the weigher passes every 100 ms). One
# frame per turn of the loop instead cost 365 us of CPU per probe at 1,000 probes/s
# (`aviator bench probe`), 1.8x a bare aiohttp GET loop's: a frame, two system calls and a
# wake-up of each side per probe, results seldom finishing in the same turn at that rate.
_FLUSH_S = 0.005


@dataclass(frozen=True, slots=True)
class ProberSpec:
    """What the child builds its :class:`Prober` from. ``addresses`` False: no address
    policy (every address; the benchmarks probe loopback backends). ``seed``: the jitter's
    random seed (None: unseeded). ``log_level``/``log_json``: the child's log setup."""

    max_in_flight: int = 256
    addresses: bool = True
    allow_loopback: bool = False
    allow_link_local: bool = False
    seed: int | None = None
    log_level: str = "info"
    log_json: bool = False

    def build(
        self,
        sink: Callable[[K, ProbeResult], None],
        log_fields: Callable[[K], Mapping[str, object]] | None = None,
        *,
        rng: random.Random | None = None,
        transport_factory: TransportFactory | None = None,
    ) -> Prober[K]:
        """The prober this spec describes. ``rng`` (default: one seeded with ``seed``) and
        ``transport_factory`` only where it runs in this process: they do not cross a pipe."""
        addresses = (
            AddressPolicy(
                allow_loopback=self.allow_loopback, allow_link_local=self.allow_link_local
            )
            if self.addresses
            else None
        )
        return Prober(
            sink,
            max_in_flight=self.max_in_flight,
            rng=rng or (random.Random(self.seed) if self.seed is not None else None),
            addresses=addresses,
            log_fields=log_fields,
            transport_factory=transport_factory,
        )


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


class ProberProcess(Generic[K]):
    """A :class:`Prober` built from ``spec`` and run in a child process; ``sink`` is called on
    the loop that runs :meth:`run`. ``log_fields(key)``: the keys a log line about a target
    carries, in this process and (sent with the targets) in the child."""

    def __init__(
        self,
        sink: Callable[[K, ProbeResult], None],
        spec: ProberSpec,
        *,
        log_fields: Callable[[K], Mapping[str, object]] | None = None,
    ) -> None:
        self._sink = sink
        self._spec = spec
        self._fields = log_fields
        # Screens targets here (the address policy, the refusals and their log lines); it
        # never runs.
        self._screen: Prober[K] = spec.build(_ignore, log_fields)
        self._wanted: Mapping[K, ProbeTarget] = {}
        self._child: asyncio.subprocess.Process | None = None
        self._in_flight = 0
        self._running_tasks = 0
        self._running = False
        self._closed = False
        self._done: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        #: How many times a child that died or failed was started again.
        self.restarts = 0

    # -- the prober's interface --------------------------------------------------------------

    @property
    def targets(self) -> Mapping[K, ProbeTarget]:
        """What the last :meth:`set_targets` asked to probe (refused ones left out)."""
        return MappingProxyType(self._wanted)

    @property
    def refused(self) -> Mapping[K, str]:
        return self._screen.refused

    def log_fields(self, key: K) -> Mapping[str, object]:
        return self._screen.log_fields(key)

    @property
    def in_flight(self) -> int:
        """As the child last reported it (with its last batch of results)."""
        return self._in_flight

    @property
    def running_tasks(self) -> int:
        return self._running_tasks

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (None before and after)."""
        return None if self._child is None else self._child.pid

    def set_targets(self, targets: Mapping[K, ProbeTarget]) -> None:
        if self._closed:
            raise RuntimeError("prober is closed")
        self._wanted = dict(self._screen.screen_targets(targets))
        self._send(("targets", self._wanted, self._fields_of(self._wanted)))

    async def run(self) -> None:
        """Probe in the child until :meth:`close` (or cancellation); results reach the sink
        on this loop. A child that dies or fails is logged and started again, after a delay
        that doubles from :data:`RESTART_FIRST_S` to :data:`RESTART_MAX_S` while it keeps
        dying young: the control plane keeps serving, its statistics age as they would
        without probes, and probing resumes where it stopped."""
        if self._closed:
            raise RuntimeError("prober is closed")
        if self._running:
            raise RuntimeError("prober is already running")
        self._running = True
        self._done = asyncio.Event()
        self._closing = asyncio.Event()
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST_S
        try:
            while not self._closed:
                started = loop.time()
                reason = await self._run_child()
                if reason is None or self._closed:
                    break
                if loop.time() - started >= _LIVED_S:
                    delay = RESTART_FIRST_S
                self.restarts += 1
                log.error(
                    "the prober process ended; starting it again",
                    reason=reason,
                    restart_in_s=delay,
                    restarts=self.restarts,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(2 * delay, RESTART_MAX_S)
        finally:
            self._running = False
            self._done.set()

    async def _run_child(self) -> str | None:
        """One child, from its start to its end: None if it ended as asked, else why not."""
        child: asyncio.subprocess.Process | None = None
        error: str | None = None
        try:
            # Cancelled while the child starts (a SIGTERM right after start-up): asyncio kills
            # it, and run()'s finally still marks the run done (close() waits for that).
            child = self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aviator.probing.process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert child.stdout is not None
            self._send(("start", self._spec, self._wanted, self._fields_of(self._wanted)))
            while (message := await _read_frame(child.stdout)) is not None:
                if message[0] == "results":
                    _, batch, self._in_flight, self._running_tasks = message
                    self._deliver(batch)
                elif message[0] == "error":
                    error = message[1]
            code = await child.wait()
            if error is not None:
                return f"the prober failed: {error}"
            if code != 0 and not self._closed:
                return f"the prober process exited with code {code}"
            return None
        finally:
            if child is not None:
                await asyncio.shield(self._stop_child(child))
            self._child = None
            self._in_flight = self._running_tasks = 0

    async def close(self) -> None:
        """Stop probing, let the child close its connections and exit, and wait for that."""
        self._closed = True
        self._send(("close",))
        if self._closing is not None:
            self._closing.set()  # a restart's delay ends at once
        if self._done is not None:
            await self._done.wait()

    # -- internals -------------------------------------------------------------------------

    def _fields_of(self, targets: Mapping[K, ProbeTarget]) -> dict[K, dict[str, object]]:
        fields = self._fields
        return {} if fields is None else {k: dict(fields(k)) for k in targets}

    def _send(self, message: object) -> None:
        child = self._child
        if child is None or child.stdin is None or child.stdin.is_closing():
            return  # not started (run() sends the targets) or already gone
        child.stdin.write(_frame(message))

    def _deliver(self, batch: list[tuple[K, ProbeResult]]) -> None:
        sink = self._sink
        for key, result in batch:
            try:
                sink(key, result)
            except Exception:  # as the prober does with its own sink: log, go on probing
                log.exception("probe sink failed", **self.log_fields(key))

    async def _stop_child(self, child: asyncio.subprocess.Process) -> None:
        if child.returncode is None:
            if child.stdin is not None and not child.stdin.is_closing():
                child.stdin.write(_frame(("close",)))
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), _STOP_S)
            except TimeoutError:
                log.warning("the prober process did not stop; killing it", pid=child.pid)
                child.kill()
                await child.wait()
        # Whatever the child sent before it exited (a last batch) is read by run(); the
        # stdout pipe closes with it.


def _ignore(key: object, result: ProbeResult) -> None:
    """The screening prober's sink: it never probes."""


# -- the child -------------------------------------------------------------------------------


async def _child_main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout.buffer)
    start = await _read_frame(reader)
    if start is None or start[0] != "start":
        return 0  # the parent went away before it said anything
    _, spec, targets, fields = start
    from aviator.log import configure

    configure(spec.log_level, json=spec.log_json)
    batch: list[tuple[Any, ProbeResult]] = []
    failed: list[str] = []
    closing: list[asyncio.Task[None]] = []

    def flush() -> None:
        if not batch:
            return  # flushed already (at the end)
        results = list(batch)
        batch.clear()
        try:
            frame = _frame(("results", results, prober.in_flight, prober.running_tasks))
        except Exception as exc:  # loud: a stalled pipe would starve the weigher silently
            log.exception("prober process: results do not cross the pipe")
            failed.append(f"{type(exc).__name__}: {exc}")
            closing.append(loop.create_task(prober.close()))
            return
        transport.write(frame)

    def sink(key: Any, result: ProbeResult) -> None:
        if not batch:
            loop.call_later(_FLUSH_S, flush)  # one frame per 5 ms at most
        batch.append((key, result))

    def log_fields(key: Any) -> Mapping[str, object]:
        return fields.get(key) or {"key": str(key)}

    prober: Prober[Any] = spec.build(sink, log_fields)
    log.debug("prober process: started", targets=len(targets))
    prober.apply_targets(targets)

    async def control() -> None:
        nonlocal fields
        while (message := await _read_frame(reader)) is not None:
            if message[0] == "targets":
                _, wanted, fields = message
                log.debug("prober process: targets", targets=len(wanted))
                prober.apply_targets(wanted)
            elif message[0] == "close":
                break
        await prober.close()  # asked to, or the parent is gone (stdin ended)

    controller = asyncio.create_task(control())
    try:
        await prober.run()
    except Exception as exc:  # told to the parent, which raises it from run()
        failed.append(f"{type(exc).__name__}: {exc}")
    finally:
        if batch:
            flush()
        if failed:
            transport.write(_frame(("error", failed[0])))
            controller.cancel()
        await _drained(transport)
    if failed:
        return 1
    with contextlib.suppress(asyncio.CancelledError):
        await controller
    return 0


async def _drained(transport: asyncio.WriteTransport) -> None:
    """Until what was written has reached the pipe (the loop's end would drop it), 1 s at most."""
    for _ in range(100):
        if not transport.get_write_buffer_size():
            return
        await asyncio.sleep(0.01)


def main() -> None:
    sys.exit(asyncio.run(_child_main()))


if __name__ == "__main__":
    main()

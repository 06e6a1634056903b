"""The prober on a thread and event loop of its own (issue 13, item 6).

``aviator run`` serves xDS, the admin endpoint and the weighing pass on one event loop, and
an all-workload change at 1,000 streams x 10,000 endpoints keeps that loop busy for seconds
(the snapshot build, then one step per stream). A probe whose answer arrives meanwhile waits
as long before it is read, and its round trip, the weigher's signal, carries the control
plane's lag rather than the pod's. :class:`ProberThread` runs the :class:`Prober` on its own
loop in its own thread, so a probe is timed and read there: its round trip waits only for the
interpreter (at most ``sys.getswitchinterval()`` while the other thread runs Python, 1 ms
under ``aviator run``), not for the other loop's queue.

It has the prober's interface (``set_targets``, ``run``, ``close``, ``targets``, ``refused``,
``in_flight``, ``running_tasks``) and is a drop-in for it. Results cross back to the loop that
called :meth:`run` in batches (one ``call_soon_threadsafe`` per batch, not per probe) and reach
the sink there, in the order they were made: the estimator and the metrics stay on the one
loop and need no lock. Targets go the other way: :meth:`set_targets` screens them where it is
called (so :attr:`refused` and :attr:`targets` say what was asked at once) and hands the rest
to the probe loop. A failure on the probe thread ends :meth:`run` with that exception, as the
prober's own would; cancelling :meth:`run` stops the thread and waits for its connections to
close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Hashable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

import structlog

from aviator.probing.prober import Prober
from aviator.probing.results import ProbeResult, ProbeTarget

__all__ = ["ProberThread"]

K = TypeVar("K", bound=Hashable)

log = structlog.get_logger(__name__)


class ProberThread(Generic[K]):
    """A :class:`Prober` built by ``make_prober(sink)`` and run on its own thread and loop;
    ``sink`` is called on the loop that runs :meth:`run`."""

    def __init__(
        self,
        sink: Callable[[K, ProbeResult], None],
        make_prober: Callable[[Callable[[K, ProbeResult], None]], Prober[K]],
        *,
        name: str = "prober",
    ) -> None:
        self._sink = sink
        self._prober = make_prober(self._collect)
        self._name = name
        self._wanted: Mapping[K, ProbeTarget] = {}
        self._lock = threading.Lock()  # _wanted and _loop, between the two threads
        self._loop: asyncio.AbstractEventLoop | None = None  # the probe thread's, while it runs
        self._home: asyncio.AbstractEventLoop | None = None  # the loop of run(): the sink's
        self._results: collections.deque[tuple[K, ProbeResult]] = collections.deque()
        self._drain_scheduled = False
        self._running = False
        self._closed = False
        self._done: asyncio.Future[None] | None = None

    # -- the prober's interface --------------------------------------------------------------

    @property
    def targets(self) -> Mapping[K, ProbeTarget]:
        """What the last :meth:`set_targets` asked to probe (refused ones left out)."""
        return MappingProxyType(self._wanted)  # replaced by set_targets, never changed

    @property
    def refused(self) -> Mapping[K, str]:
        return self._prober.refused

    @property
    def in_flight(self) -> int:
        return self._prober.in_flight

    @property
    def running_tasks(self) -> int:
        return self._prober.running_tasks

    def set_targets(self, targets: Mapping[K, ProbeTarget]) -> None:
        if self._closed:
            raise RuntimeError("prober is closed")
        wanted = dict(self._prober.screen_targets(targets))
        with self._lock:
            self._wanted = wanted
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._prober.apply_targets, wanted)

    async def run(self) -> None:
        """Probe on the thread until :meth:`close` (or cancellation); results reach the sink
        on this loop. Raises what the prober raised on its thread."""
        if self._closed:
            raise RuntimeError("prober is closed")
        if self._running:
            raise RuntimeError("prober is already running")
        self._running = True
        home = self._home = asyncio.get_running_loop()
        done = self._done = home.create_future()

        def finish(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def thread_main() -> None:
            error: BaseException | None = None
            try:
                asyncio.run(self._thread_main())
            except BaseException as exc:  # handed to run(), which raises it on its own loop
                error = exc
            with contextlib.suppress(RuntimeError):  # the home loop is closed: nobody waits
                home.call_soon_threadsafe(finish, error)

        thread = threading.Thread(target=thread_main, name=self._name, daemon=True)
        thread.start()
        try:
            await asyncio.shield(done)
        finally:
            self._stop_thread()
            if not done.done():
                # Cancelled: wait for the prober's tasks and connections to close.
                await asyncio.shield(done)
            thread.join(timeout=1.0)  # it returns right after handing over its outcome
            self._drain()
            self._running = False

    async def close(self) -> None:
        """Stop probing, close every connection and the thread, and wait until that is done."""
        self._closed = True
        self._stop_thread()
        if self._done is not None:
            await asyncio.shield(self._done)

    # -- internals -------------------------------------------------------------------------

    async def _thread_main(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._prober.apply_targets(self._wanted)
            stop_now = self._closed
        try:
            if not stop_now:
                await self._prober.run()
        finally:
            with self._lock:
                self._loop = None

    def _stop_thread(self) -> None:
        with self._lock:
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(_spawn_close, self._prober)

    def _collect(self, key: K, result: ProbeResult) -> None:
        """On the probe thread: queue the result, and wake the home loop once per batch."""
        self._results.append((key, result))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            home = self._home
            if home is not None:
                with contextlib.suppress(RuntimeError):  # the home loop is closed
                    home.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """On the home loop: the results queued when it started to the sink, in order. Not
        more: a slow sink must not hold the loop while the probe thread keeps adding (what
        comes meanwhile has scheduled the next drain)."""
        self._drain_scheduled = False
        results = self._results
        for _ in range(len(results)):
            key, result = results.popleft()
            try:
                self._sink(key, result)
            except Exception:  # as the prober does with its own sink: log, go on probing
                log.exception("probe sink failed", **self._prober.log_fields(key))


def _spawn_close(prober: Prober[K]) -> None:
    """On the probe loop: close the prober (its run() then returns)."""
    asyncio.get_running_loop().create_task(prober.close())

"""A testbed backend: an aiohttp server with private capacity that follows a profile.

A :class:`Backend` is an aiohttp server that serves at most ``capacity`` requests at once (a
FIFO :class:`~aviator.testbed.gate.CapacityGate`; the others queue inside the application)
and holds each one for a service time drawn with sd = mean. It sleeps, never burns CPU: the
backends of a one-machine benchmark must not compete for the cores, or no balancer can help.
What it does (service time, capacity, fast-fail rate, hidden load) follows a
:class:`~aviator.testbed.profile.Profile`.

Every response carries ``x-testbed-backend: <name>`` so the load generator can tell which
backend served it. Load reporting (ORCA header, probe path) comes from middlewares passed in
(the probing agent): they wrap the handler, so the RIF they count runs from receipt to response
and includes the requests queued at the gate.

Without the agent, a backend may have a health path (``health_path``), as most apps do: a
request to it queues at the gate like any other and is answered as soon as it gets a slot,
with no service time. Its round trip is the queueing delay, the only signal a prober has from
such an app, and it costs the backend no capacity. (Served as a full request, each probe took
a slot for a whole service time: ~10 points of extra load at the benchmark's 100 ms ping
interval on a few slots, which only the runs that probe paid.)

Many of them run in one process (:mod:`aviator.testbed.fleetserver`), which
:mod:`aviator.testbed.fleet` starts and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from aviator_agent import LoadTracker, aiohttp_middleware

from aviator.probing.results import DEFAULT_PROBE_PATH
from aviator.testbed.gate import CapacityGate
from aviator.testbed.profile import (
    Distribution,
    Phase,
    Profile,
    backend_rng,
    sample_service_time,
)

log = structlog.get_logger(__name__)

BACKEND_HEADER = "x-testbed-backend"
# Hidden jobs beyond this many per capacity slot are dropped: hidden load above 100% would
# otherwise grow the queue without bound and never drain after the phase ends.
_HIDDEN_BACKLOG_PER_SLOT = 4


class JobTracker(Protocol):
    """Counts work that enters the application outside HTTP (hidden load) as in flight.

    The probing agent's load tracker fits this: a hidden job is another client's request.
    """

    def track(self) -> contextlib.AbstractContextManager[object]: ...


@dataclass(frozen=True, slots=True)
class BackendStats:
    """A backend's own counters (independent of the probing agent).

    ``in_app`` counts HTTP requests from receipt to response (queued + in service);
    ``in_service`` and ``max_in_service`` count capacity slots held, hidden jobs included.
    """

    name: str
    phase: Phase
    in_app: int
    in_service: int
    max_in_service: int
    queued: int
    received: int
    served: int
    failed_fast: int
    hidden_started: int
    hidden_served: int
    hidden_dropped: int
    health_checks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase.to_json(),
            "in_app": self.in_app,
            "in_service": self.in_service,
            "max_in_service": self.max_in_service,
            "queued": self.queued,
            "received": self.received,
            "served": self.served,
            "failed_fast": self.failed_fast,
            "hidden_started": self.hidden_started,
            "hidden_served": self.hidden_served,
            "hidden_dropped": self.hidden_dropped,
            "health_checks": self.health_checks,
        }


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend of a fleet, as JSON can carry it to the fleet process."""

    name: str
    profile: Profile = field(default_factory=Profile.constant)
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port (tests); the demo uses 8080 on 127.0.0.N
    seed: int | None = None
    distribution: Distribution = Distribution.EXPONENTIAL

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a backend needs a name")
        if not 0 <= self.port < 65536:
            raise ValueError(f"backend {self.name}: port must be in 0..65535, got {self.port}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "profile": self.profile.to_json(),
            "host": self.host,
            "port": self.port,
            "seed": self.seed,
            "distribution": self.distribution.value,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BackendSpec:
        known = {"name", "profile", "host", "port", "seed", "distribution"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown backend field(s): {', '.join(sorted(unknown))}")
        return cls(
            name=data["name"],
            profile=Profile.from_json(data["profile"]) if "profile" in data else Profile.constant(),
            host=data.get("host", "127.0.0.1"),
            port=int(data.get("port", 0)),
            seed=data.get("seed"),
            distribution=Distribution(data.get("distribution", Distribution.EXPONENTIAL)),
        )


class Backend:
    """One backend: capacity gate, profile schedule, hidden load, and its HTTP server.

    ``clock`` is the time source of the profile (default: the running loop's ``time()``, which
    ``looptime`` fakes in tests). :meth:`serve_one` is the whole request logic without HTTP.
    ``on_phase`` is called with each phase as it is applied (e.g. to tell the load tracker the
    new capacity). :func:`agent_backend` builds one with the probing agent plugged in.
    ``health_path`` (without the agent) is answered after queueing for a slot, with no service
    time (see the module's docstring); it is not counted in ``received``/``served``.
    """

    def __init__(
        self,
        spec: BackendSpec,
        *,
        middlewares: Sequence[Middleware] = (),
        job_tracker: JobTracker | None = None,
        on_phase: Callable[[Phase], None] | None = None,
        clock: Callable[[], float] | None = None,
        health_path: str | None = None,
    ) -> None:
        self.spec = spec
        self._health_path = health_path
        self._middlewares = tuple(middlewares)
        self._job_tracker = job_tracker
        self._on_phase = on_phase
        self._clock = clock
        self._rng = backend_rng(spec.seed, spec.name)
        self._hidden_rng = backend_rng(spec.seed, spec.name + "/hidden")
        self._profile = spec.profile
        self._t0: float | None = None
        self._phase = spec.profile.phase_at(0.0)
        self._gate = CapacityGate(self._phase.capacity)
        self._profile_changed = asyncio.Event()  # set_profile() -> schedule task
        self._phase_applied = asyncio.Event()  # schedule task -> hidden-load loop
        self._tasks: set[asyncio.Task[None]] = set()
        self._hidden_jobs: set[asyncio.Task[None]] = set()
        # The tasks serving HTTP requests, also those whose client went away: aiohttp's
        # shutdown cancels only the requests of connections still open.
        self._requests: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._in_app = 0
        self._received = 0
        self._served = 0
        self._failed_fast = 0
        self._hidden_started = 0
        self._hidden_served = 0
        self._hidden_dropped = 0
        self._health_checks = 0

    # -- state --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def phase(self) -> Phase:
        """The phase applied now (changes when the schedule task reaches a phase start)."""
        return self._phase

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"backend {self.name} is not listening")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    def stats(self) -> BackendStats:
        return BackendStats(
            name=self.name,
            phase=self._phase,
            in_app=self._in_app,
            in_service=self._gate.in_use,
            max_in_service=self._gate.max_in_use,
            queued=self._gate.waiting,
            received=self._received,
            served=self._served,
            failed_fast=self._failed_fast,
            hidden_started=self._hidden_started,
            hidden_served=self._hidden_served,
            hidden_dropped=self._hidden_dropped,
            health_checks=self._health_checks,
        )

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def set_profile(self, profile: Profile, *, t0: float | None = None) -> None:
        """Follow ``profile`` from ``t0`` (clock time; default now). Applies at once if running."""
        self._profile = profile
        if self._t0 is not None or t0 is not None:
            self._t0 = self._now() if t0 is None else t0
        self._profile_changed.set()

    # -- request logic ------------------------------------------------------------------

    def restart_profile(self) -> None:
        """Follow the current profile again from its first phase, starting now."""
        self.set_profile(self._profile)

    async def serve_one(self) -> bool:
        """Serve one request: False if it fails fast, else True after queueing and service."""
        phase = self._phase
        if phase.error_rate > 0 and self._rng.random() < phase.error_rate:
            self._failed_fast += 1
            return False
        await self._gate.acquire()
        try:
            # Read the phase again: it may have changed while this request queued.
            await asyncio.sleep(
                sample_service_time(self._rng, self._phase.mean_service_s, self.spec.distribution)
            )
        finally:
            self._gate.release()
        self._served += 1
        return True

    async def check_health(self) -> None:
        """Answer a health check: queue for a slot like a request, hold it for no time."""
        await self._gate.acquire()
        self._gate.release()
        self._health_checks += 1

    async def _handle(self, request: web.Request) -> web.Response:
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        headers = {BACKEND_HEADER: self.name}
        if request.path == self._health_path:
            try:
                await self.check_health()
            finally:
                self._requests.discard(task)
            return web.Response(text="ok\n", headers=headers)
        self._received += 1
        self._in_app += 1
        try:
            ok = await self.serve_one()
        finally:
            self._in_app -= 1
            self._requests.discard(task)
        if not ok:
            return web.Response(status=503, text="fast-fail\n", headers=headers)
        return web.Response(text=f"{self.name}\n", headers=headers)

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=self._middlewares)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, *, t0: float | None = None, listen: bool = True) -> None:
        """Start the schedule and hidden load (origin ``t0``, default now), then listen.

        ``listen=False`` runs the request logic without a socket (unit tests).
        """
        if self._tasks:
            raise RuntimeError(f"backend {self.name} already started")
        self._t0 = self._now() if t0 is None else t0
        self._apply_schedule()
        self._tasks.add(asyncio.create_task(self._run_schedule(), name=f"{self.name}:schedule"))
        self._tasks.add(asyncio.create_task(self._run_hidden(), name=f"{self.name}:hidden"))
        if not listen:
            return
        try:
            # shutdown_timeout: stop() must not wait for slow requests; they are cancelled.
            runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(runner, self.spec.host, self.spec.port, backlog=1024)
            await site.start()
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await self.stop()
            raise
        log.debug("backend listening", backend=self.name, url=self.url)

    async def stop(self) -> None:
        """Stop listening, end every request still inside (also those whose client went
        away), the schedule and the hidden load; return once all of them have ended."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = self._tasks | self._hidden_jobs | self._requests
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._hidden_jobs.clear()
        self._requests.clear()

    def _apply_schedule(self) -> float | None:
        """Apply the phase in force now; return seconds until the next phase, or None."""
        assert self._t0 is not None
        elapsed = self._now() - self._t0
        phase = self._profile.phase_at(elapsed)
        if phase != self._phase:
            log.info("backend phase", backend=self.name, elapsed_s=round(elapsed, 3), phase=phase)
        self._phase = phase
        self._gate.resize(phase.capacity)
        if self._on_phase is not None:
            self._on_phase(phase)
        self._phase_applied.set()
        nxt = self._profile.next_change_after(elapsed)
        return None if nxt is None else nxt - elapsed

    async def _run_schedule(self) -> None:
        while True:
            self._profile_changed.clear()
            wait = self._apply_schedule()
            # Wake at the next phase start, or earlier if set_profile() replaced the profile.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._profile_changed.wait()

    async def _run_hidden(self) -> None:
        """Poisson hidden jobs using on average ``hidden_load * capacity`` slots."""
        while True:
            phase = self._phase
            if phase.hidden_load <= 0:
                # No await between reading the phase and clearing: no change can be missed.
                self._phase_applied.clear()
                await self._phase_applied.wait()
                continue
            rate = phase.hidden_load * phase.capacity / phase.mean_service_s
            await asyncio.sleep(self._hidden_rng.expovariate(rate))
            if len(self._hidden_jobs) >= _HIDDEN_BACKLOG_PER_SLOT * self._phase.capacity:
                self._hidden_dropped += 1
                continue
            self._hidden_started += 1
            job = asyncio.create_task(self._hidden_job(), name=f"{self.name}:hidden-job")
            self._hidden_jobs.add(job)
            job.add_done_callback(self._hidden_jobs.discard)

    async def _hidden_job(self) -> None:
        tracked = (
            self._job_tracker.track() if self._job_tracker is not None else contextlib.nullcontext()
        )
        with tracked:
            await self._gate.acquire()
            try:
                mean = self._phase.mean_service_s
                await asyncio.sleep(
                    sample_service_time(self._hidden_rng, mean, self.spec.distribution)
                )
            finally:
                self._gate.release()
        self._hidden_served += 1


def agent_backend(
    spec: BackendSpec,
    *,
    probe_path: str = DEFAULT_PROBE_PATH,
    clock: Callable[[], float] | None = None,
) -> Backend:
    """A backend that reports its load with the probing agent.

    The agent's middleware is the outermost one, so its RIF runs from receipt to response and
    includes requests queued at the capacity gate (Prequal's definition); hidden jobs count as
    requests of other clients; the tracker's capacity follows the phases, so the ORCA
    ``application_utilization`` is RIF / current capacity. ``clock`` (default: the monotonic
    clock for the tracker, the loop's for the profile) drives both when given.
    """
    tracker = LoadTracker(
        capacity=spec.profile.phase_at(0.0).capacity, clock=clock or time.monotonic
    )

    def on_phase(phase: Phase) -> None:
        tracker.capacity = phase.capacity

    return Backend(
        spec,
        # web.middleware marks it new-style; without the mark aiohttp warns (deprecated form).
        middlewares=[web.middleware(aiohttp_middleware(tracker, probe_path=probe_path))],
        job_tracker=tracker,
        on_phase=on_phase,
        clock=clock,
    )

"""A backend with private capacity, and the fleet process that runs many of them.

A :class:`Backend` is an aiohttp server that serves at most ``capacity`` requests at once (a
FIFO :class:`CapacityGate`; the others queue inside the application) and holds each one for a
service time drawn with sd = mean. It sleeps, never burns CPU: the backends of a one-machine
benchmark must not compete for the cores, or no balancer can help. What it does (service time,
capacity, fast-fail rate, hidden load) follows a :class:`~aviator.testbed.profile.Profile`.

Every response carries ``x-testbed-backend: <name>`` so the load generator can tell which
backend served it. Load reporting (ORCA header, probe path) comes from middlewares passed in
(the probing agent): they wrap the handler, so the RIF they count runs from receipt to response
and includes the requests queued at the gate.

``python -m aviator.testbed.backend --spec JSON|@FILE`` runs a whole fleet in one process (see
:func:`serve_fleet`); :mod:`aviator.testbed.fleet` starts and stops that process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from aviator_agent import LoadTracker, aiohttp_middleware

from aviator.probing.results import DEFAULT_PROBE_PATH
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


class CapacityGate:
    """A FIFO semaphore whose capacity can change while it is in use.

    Invariants: ``in_use`` never exceeds ``capacity`` except right after a shrink (the holders
    finish, and nobody is admitted until ``in_use < capacity``); waiters are admitted in arrival
    order; a waiter cancelled before or after being granted never leaks a slot.
    (``asyncio.Semaphore`` cannot be resized, and capacity phases need that.)
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._in_use = 0
        self._max_in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def max_in_use(self) -> int:
        """Highest ``in_use`` seen since construction (or the last :meth:`reset_max`)."""
        return self._max_in_use

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def reset_max(self) -> None:
        self._max_in_use = self._in_use

    async def acquire(self) -> None:
        if self._in_use < self._capacity and not self._waiters:
            self._take()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted, then cancelled before the holder ran: hand the slot back.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("CapacityGate.release() called more times than acquire()")
        self._in_use -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._wake()

    def _take(self) -> None:
        self._in_use += 1
        self._max_in_use = max(self._max_in_use, self._in_use)

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._capacity:
            fut = self._waiters.popleft()
            if fut.done():  # cancelled while waiting
                continue
            self._take()
            fut.set_result(None)


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
    """

    def __init__(
        self,
        spec: BackendSpec,
        *,
        middlewares: Sequence[Middleware] = (),
        job_tracker: JobTracker | None = None,
        on_phase: Callable[[Phase], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.spec = spec
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
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._in_app = 0
        self._received = 0
        self._served = 0
        self._failed_fast = 0
        self._hidden_started = 0
        self._hidden_served = 0
        self._hidden_dropped = 0

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

    async def _handle(self, request: web.Request) -> web.Response:
        self._received += 1
        self._in_app += 1
        try:
            ok = await self.serve_one()
        finally:
            self._in_app -= 1
        headers = {BACKEND_HEADER: self.name}
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = self._tasks | self._hidden_jobs
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._hidden_jobs.clear()

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


# -- the fleet process --------------------------------------------------------------------

BackendFactory = Callable[[BackendSpec], Backend]


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """Backends to run in one process, and where its control server listens.

    ``t0_wall``: the profiles' origin as a wall-clock (``time.time()``) instant, so another
    process (the load generator) can line up with it; None = when the fleet starts.
    ``agent``: plug the probing agent (ORCA header + probe path) into every backend.
    """

    backends: tuple[BackendSpec, ...]
    control_host: str = "127.0.0.1"
    control_port: int = 0
    t0_wall: float | None = None
    agent: bool = True
    probe_path: str = DEFAULT_PROBE_PATH

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("a fleet needs at least one backend")
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique, repeated: {', '.join(dupes)}")
        bound = [(b.host, b.port) for b in self.backends if b.port != 0]
        if len(bound) != len(set(bound)):
            raise ValueError(f"two backends share an address: {sorted(bound)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "backends": [b.to_json() for b in self.backends],
            "control_host": self.control_host,
            "control_port": self.control_port,
            "t0_wall": self.t0_wall,
            "agent": self.agent,
            "probe_path": self.probe_path,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FleetSpec:
        return cls(
            backends=tuple(BackendSpec.from_json(b) for b in data["backends"]),
            control_host=data.get("control_host", "127.0.0.1"),
            control_port=int(data.get("control_port", 0)),
            t0_wall=data.get("t0_wall"),
            agent=bool(data.get("agent", True)),
            probe_path=data.get("probe_path", DEFAULT_PROBE_PATH),
        )


def _control_app(backends: Mapping[str, Backend]) -> web.Application:
    """The fleet's control API (on its own port, so it never counts as a backend's load).

    - ``GET /testbed/stats`` → ``{name: BackendStats JSON}``
    - ``POST /testbed/phase`` ``{"backend": NAME, "phases": [Phase JSON...]}`` → that backend
      follows the new profile from now (omit ``backend`` to change every backend).
    - ``POST /testbed/clock`` → every backend restarts its current profile from now.
    """

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({n: b.stats().to_json() for n, b in backends.items()})

    async def phase(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            profile = Profile.from_json(body["phases"])
            name = body.get("backend")
            if name is not None and name not in backends:
                raise KeyError(f"no backend named {name!r}")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        targets = backends.values() if name is None else [backends[name]]
        for backend in targets:
            backend.set_profile(profile)
        return web.json_response({"changed": [b.name for b in targets]})

    async def clock(request: web.Request) -> web.Response:
        for backend in backends.values():
            backend.restart_profile()
        return web.json_response({"restarted": list(backends)})

    app = web.Application()
    app.router.add_get("/testbed/stats", stats)
    app.router.add_post("/testbed/phase", phase)
    app.router.add_post("/testbed/clock", clock)
    return app


async def serve_fleet(
    spec: FleetSpec,
    *,
    ready: Callable[[Mapping[str, Any]], None],
    stop: asyncio.Event,
    backend_factory: BackendFactory | None = None,
) -> None:
    """Run every backend of ``spec`` and the control server until ``stop`` is set.

    ``ready`` gets ``{"control": URL, "backends": {name: URL}}`` once all listen. Whatever
    happens, every backend that started is stopped before this returns. ``backend_factory``
    defaults to :func:`agent_backend` (``spec.agent``) or a plain :class:`Backend`.
    """
    if backend_factory is not None:
        factory = backend_factory
    elif spec.agent:
        probe_path = spec.probe_path

        def factory(b: BackendSpec) -> Backend:
            return agent_backend(b, probe_path=probe_path)
    else:
        factory = Backend
    loop = asyncio.get_running_loop()
    t0 = None if spec.t0_wall is None else loop.time() - (time.time() - spec.t0_wall)
    backends: dict[str, Backend] = {}
    control = web.AppRunner(_control_app(backends), access_log=None, shutdown_timeout=0.5)
    try:
        origin = loop.time() if t0 is None else t0
        for bspec in spec.backends:
            backend = factory(bspec)
            backends[bspec.name] = backend
            await backend.start(t0=origin)
        await control.setup()
        await web.TCPSite(control, spec.control_host, spec.control_port).start()
        host, port = control.addresses[0][:2]
        ready(
            {
                "control": f"http://{host}:{port}",
                "backends": {n: b.url for n, b in backends.items()},
            }
        )
        await stop.wait()
    finally:
        await control.cleanup()
        await asyncio.gather(*(b.stop() for b in backends.values()), return_exceptions=True)


def _load_spec(text: str) -> FleetSpec:
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    return FleetSpec.from_json(json.loads(text))


@contextlib.contextmanager
def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class _SetOnClose(asyncio.Protocol):
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def connection_lost(self, exc: Exception | None) -> None:
        self._event.set()


async def _fleet_main(spec: FleetSpec, *, exit_on_stdin_eof: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def ready(info: Mapping[str, Any]) -> None:
        sys.stdout.write(json.dumps({"event": "ready", **info}) + "\n")
        sys.stdout.flush()

    transport: asyncio.BaseTransport | None = None
    if exit_on_stdin_eof:
        # The parent holds our stdin pipe open; EOF means it is gone (even after SIGKILL), so
        # the fleet never outlives the process that started it.
        transport, _ = await loop.connect_read_pipe(lambda: _SetOnClose(stop), sys.stdin)
    try:
        with _stop_on_signals(loop, stop):
            await serve_fleet(spec, ready=ready, stop=stop)
    finally:
        if transport is not None:
            transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aviator.testbed.backend", description="Run a fleet of testbed backends."
    )
    parser.add_argument("--spec", required=True, help="FleetSpec as JSON, or @FILE")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when standard input closes (how a parent process ties the fleet to itself)",
    )
    args = parser.parse_args(argv)
    from aviator import log as aviator_log

    aviator_log.configure("warning")
    asyncio.run(_fleet_main(_load_spec(args.spec), exit_on_stdin_eof=args.exit_on_stdin_eof))
    return 0


if __name__ == "__main__":
    sys.exit(main())

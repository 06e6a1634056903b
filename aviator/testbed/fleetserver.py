"""The fleet process: many testbed backends in one process, and its control API.

``python -m aviator.testbed.fleetserver --spec JSON|@FILE [--exit-on-stdin-eof]`` runs every
backend of a :class:`FleetSpec` (:func:`serve_fleet`), prints one JSON ``ready`` line with their
URLs, and serves until SIGTERM/SIGINT or (with ``--exit-on-stdin-eof``) until its stdin closes.
:class:`~aviator.testbed.fleet.Fleet` starts and stops this process from the parent's side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from aviator.probing.results import DEFAULT_PROBE_PATH
from aviator.testbed.backend import Backend, BackendSpec, agent_backend
from aviator.testbed.profile import Profile

__all__ = ["BackendFactory", "FleetSpec", "main", "serve_fleet"]

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
    defaults to :func:`agent_backend` (``spec.agent``) or a plain :class:`Backend` whose
    health path is the probe path.
    """
    probe_path = spec.probe_path
    if backend_factory is not None:
        factory = backend_factory
    elif spec.agent:

        def factory(b: BackendSpec) -> Backend:
            return agent_backend(b, probe_path=probe_path)
    else:

        def factory(b: BackendSpec) -> Backend:
            return Backend(b, health_path=probe_path)

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
        prog="python -m aviator.testbed.fleetserver", description="Run a fleet of testbed backends."
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

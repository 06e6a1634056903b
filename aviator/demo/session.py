"""``aviator demo``: the whole system on one machine, with a real Envoy and a live table.

What runs, in start order (stopped in reverse order on every way out: the end of the run,
an error, Ctrl-C or SIGTERM):

1. three backends (:mod:`aviator.testbed`, one child process) at 127.0.0.2, .3, .4 port 8080
   (a busy address is skipped for the next one), with different service times; one of them
   serves ``SLOW_FACTOR`` times slower during the middle third of the run;
2. their Deployment, Pods and AviatorPolicy as YAML in a directory (``--workdir`` or a temporary
   one), read by the control plane's directory source;
3. the control plane, in this process (:class:`~aviator.controlplane.ControlPlane`);
4. an Envoy gateway bootstrapped by ``aviator bootstrap``'s renderer, which gets its listener,
   routes, cluster and weighted endpoints over ADS;
5. open-loop Poisson load through Envoy with ``Host: web.shop``, in this process, by the
   testbed's open loop (:mod:`aviator.testbed.openloop`): every request is recorded (intended
   send time, end, the pod that answered), and once per interval the table is drawn from those
   records, Aviator's endpoint view and Envoy's ``/clusters``.

The summary compares each pod's share of traffic before, during and after the slowdown
(:mod:`aviator.demo.view`). ``--json-summary FILE`` writes it as JSON, with the per-interval
frames and the process ids the demo started (all stopped by the time the file is written).

What runs is in :mod:`aviator.demo.scenario`, how it starts and stops in
:mod:`aviator.demo.stack`; this module drives the load, the live view and the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from aviator.demo.scenario import (
    DEFAULT_BACKEND_PORT,
    HOST_HEADER,
    SLOW_FACTOR,
    SLOWED_POD,
    WORKLOAD,
    demo_backends,
    write_objects,
)
from aviator.demo.stack import DemoError, DemoStack
from aviator.demo.view import (
    Completion,
    DemoPod,
    Frame,
    Slowdown,
    build_frame,
    render_frame,
    render_summary,
    summarize,
)
from aviator.envoy.errors import EnvoyAdminError
from aviator.envoy.process import EnvoyProcess
from aviator.testbed.loadspec import LoadSpec
from aviator.testbed.openloop import offer

log = structlog.get_logger(__name__)

DEFAULT_DURATION_S = 40.0
DEFAULT_RATE = 200.0
DEFAULT_INTERVAL_S = 2.0
DEFAULT_GATEWAY_PORT = 10000
REQUEST_DEADLINE_S = 5.0
CONNECTION_LIMIT = 800  # connections to the gateway at most (requests beyond wait for one)


# -- load ------------------------------------------------------------------------------------


class DemoLoad:
    """The demo's load: the testbed's open loop (:func:`~aviator.testbed.openloop.offer`:
    Poisson arrivals at ``rate`` per second for ``duration_s``, each sent at its intended time
    whatever is still outstanding, latency from that time) through the gateway.

    ``completions`` grows in the order requests end (the live table reads it as it grows);
    ``sent`` counts the requests sent. A request not answered ``deadline_s`` after its
    intended time is a ``timeout``.
    """

    def __init__(
        self,
        url: str,
        *,
        host: str,
        rate: float,
        duration_s: float,
        seed: int = 0,
        deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        self.spec = LoadSpec(
            targets=(url,),
            duration_s=duration_s,
            rate=rate,
            host=host,
            seed=seed,
            deadline_s=deadline_s,
            connection_limit=CONNECTION_LIMIT,
        )
        self.completions: list[Completion] = []
        self.sent = 0

    def on_sent(self, offset: float, lag: float, actual: float) -> None:
        self.sent += 1

    def on_done(
        self, offset: float, latency: float, error: str | None, backend: str | None
    ) -> None:
        self.completions.append(Completion(offset, offset + latency, backend, error))

    async def run(self, t0: float, stop: asyncio.Event) -> float:
        """Offer the load from loop time ``t0`` until it ends or ``stop`` is set; return the
        seconds of load offered. On ``stop``, requests still outstanding are abandoned."""
        loop = asyncio.get_running_loop()
        load = asyncio.create_task(offer(self.spec, self, t0=t0), name="demo:offer")
        stopped = asyncio.create_task(stop.wait(), name="demo:stop-wait")
        try:
            await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
            if load.done():
                load.result()  # a failure of the load generator itself
                return self.spec.duration_s
            return min(loop.time() - t0, self.spec.duration_s)
        finally:
            for task in (load, stopped):
                task.cancel()
            await asyncio.gather(load, stopped, return_exceptions=True)


# -- the live view -----------------------------------------------------------------------------

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


class Screen:
    """Where frames go: redrawn in place (under the banner) on a terminal, appended otherwise."""

    def __init__(self, out: TextIO, banner: str) -> None:
        self._out = out
        self._banner = banner
        self.tty = out.isatty()

    def line(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def frame(self, text: str) -> None:
        if self.tty:
            self._out.write(f"{_CLEAR}{self._banner}\n\n{text}\n")
        else:
            self._out.write(text + "\n\n")
        self._out.flush()


async def _envoy_hosts(envoy: EnvoyProcess) -> dict[str, dict[str, Any]]:
    """Envoy's hosts of the demo cluster by address; empty if the admin endpoint fails (the
    table shows '-' for one interval rather than stopping the demo)."""
    try:
        hosts = await envoy.admin.hosts(WORKLOAD.cluster_name)
    except EnvoyAdminError as exc:
        log.warning("cannot read Envoy's clusters", error=str(exc))
        return {}
    return {h.address: {"weight": h.weight, "rq_active": h.rq_active} for h in hosts}


async def _watch(
    stack: DemoStack,
    load: DemoLoad,
    load_task: asyncio.Task[float],
    *,
    t0: float,
    options: DemoOptions,
    pods: Sequence[DemoPod],
    slowdown: Slowdown,
    screen: Screen,
) -> list[Frame]:
    """Draw a frame every ``interval_s`` until the load ends; raise :class:`DemoError` (after
    cancelling the load) if a component stops on its own."""
    loop = asyncio.get_running_loop()
    frames: list[Frame] = []
    cursor = 0
    tick = 1
    try:
        while not load_task.done():
            next_at = t0 + tick * options.interval_s
            await asyncio.wait([load_task], timeout=max(next_at - loop.time(), 0.0))
            if load_task.done():
                break
            stack.check_running()
            ended = load.completions[cursor:]
            cursor += len(ended)
            frame = build_frame(
                t_s=loop.time() - t0,
                duration_s=options.duration_s,
                interval_s=options.interval_s,
                rate=options.rate,
                slowdown=slowdown,
                pods=pods,
                ended=ended,
                aviator=stack.control_plane.endpoints_view(),
                envoy=await _envoy_hosts(stack.envoy),
            )
            frames.append(frame)
            screen.frame(render_frame(frame))
            tick += 1
    finally:
        if not load_task.done():
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
    return frames


# -- the command -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's settings, checked once. ``hosts`` are the backends' loopback IPs."""

    duration_s: float = DEFAULT_DURATION_S
    rate: float = DEFAULT_RATE
    interval_s: float = DEFAULT_INTERVAL_S
    hosts: tuple[str, ...] = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    backend_port: int = DEFAULT_BACKEND_PORT
    gateway_port: int = DEFAULT_GATEWAY_PORT
    workdir: Path | None = None
    json_summary: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 6 <= self.duration_s <= 3600:
            raise ValueError(f"--duration must be in 6..3600 seconds, got {self.duration_s:g}")
        if not 0 < self.rate <= 2000:
            raise ValueError(f"--rate must be in (0, 2000] requests/s, got {self.rate:g}")
        if not 0.2 <= self.interval_s <= self.duration_s:
            raise ValueError(
                f"--interval must be in 0.2..duration seconds, got {self.interval_s:g}"
            )

    @property
    def slowdown(self) -> Slowdown:
        """The middle third of the run."""
        third = round(self.duration_s / 3, 1)
        return Slowdown(SLOWED_POD, third, round(self.duration_s - third, 1), SLOW_FACTOR)


class _Control:
    """What the signal handler and the run share (one event loop: no locking)."""

    def __init__(self, main_task: asyncio.Task[Any]) -> None:
        self.stage = "starting"  # then "loading", then "stopping"
        self.interrupted = False
        self.stop = asyncio.Event()
        self._main_task = main_task

    def on_signal(self) -> None:
        self.interrupted = True
        if self.stage == "starting":
            self._main_task.cancel()
        elif self.stage == "loading":
            self.stop.set()


async def run_demo(options: DemoOptions, *, out: TextIO) -> int:
    """Run the whole demo; 0 when it ran to the end, 130 when interrupted (SIGINT/SIGTERM).

    A signal during the load ends it early (the summary still prints); during start-up it
    cancels the start; during shutdown it is ignored (shutdown is bounded by timeouts).
    Raises :class:`DemoError` when a component fails to start or stops on its own.
    """
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    control = _Control(main_task)
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, control.on_signal)
    try:
        with contextlib.ExitStack() as dirs:
            if options.workdir is not None:
                workdir = options.workdir
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                workdir = Path(
                    dirs.enter_context(tempfile.TemporaryDirectory(prefix="aviator-demo-"))
                )
            return await _run_in(workdir, options, out, control)
    except asyncio.CancelledError:
        if not control.interrupted:
            raise
        print("aviator demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _banner(stack: DemoStack, options: DemoOptions) -> str:
    s = options.slowdown
    return "\n".join(
        [
            f"aviator demo: Deployment {WORKLOAD} ({len(stack.backends)} pods) behind a real "
            f"Envoy; {s.pod} serves {s.factor:g}x slower from t={s.start_s:g}s to "
            f"t={s.end_s:g}s",
            f"  try:     curl -H 'Host: {HOST_HEADER}' {stack.gateway_url}/",
            f"  inspect: aviator inspect --envoy-admin {stack.envoy.admin_url} "
            f"--aviator-admin {stack.aviator_admin_url}",
            f"  objects: {stack.source_dir}",
        ]
    )


async def _run_in(workdir: Path, options: DemoOptions, out: TextIO, control: _Control) -> int:
    loop = asyncio.get_running_loop()
    slowdown = options.slowdown
    backends = demo_backends(
        options.hosts,
        port=options.backend_port,
        slowdown=(slowdown.start_s, slowdown.end_s),
        seed=options.seed,
    )
    pods = [
        DemoPod(b.name, f"{b.host}:{b.port}", b.profile.phases[0].mean_service_s * 1000)
        for b in backends
    ]
    source_dir = workdir / "source"
    write_objects(source_dir, backends)
    envoy_dir = workdir / "envoy" if options.workdir is not None else None
    screen = Screen(out, "")
    screen.line(
        "aviator demo: starting "
        + ", ".join(f"{p.name} at {p.address} ({p.service_ms:g} ms)" for p in pods)
        + ", the control plane and Envoy"
    )
    async with DemoStack(
        backends, source_dir=source_dir, gateway_port=options.gateway_port, envoy_dir=envoy_dir
    ) as stack:
        banner = _banner(stack, options)
        screen = Screen(out, banner)
        screen.line(banner)
        screen.line("waiting until Envoy serves the pods with Aviator's weights...")
        await stack.wait_serving()
        await stack.fleet.restart_clock()  # the slowdown's clock starts with the load
        control.stage = "loading"
        t0 = loop.time()
        load = DemoLoad(
            stack.gateway_url,
            host=HOST_HEADER,
            rate=options.rate,
            duration_s=options.duration_s,
            seed=options.seed,
        )
        load_task = asyncio.create_task(load.run(t0, control.stop), name="demo:load")
        frames = await _watch(
            stack,
            load,
            load_task,
            t0=t0,
            options=options,
            pods=pods,
            slowdown=slowdown,
            screen=screen,
        )
        ran_s = load_task.result()
        control.stage = "stopping"
        pids = dict(stack.pids)
        gateway_url = stack.gateway_url
    summary = summarize(
        load.completions,
        pods=pods,
        slowdown=slowdown,
        duration_s=options.duration_s,
        ran_s=ran_s,
        rate=options.rate,
        interrupted=control.interrupted,
    )
    screen.line("")
    screen.line(render_summary(summary))
    if options.json_summary is not None:
        doc = {
            **summary.to_json(),
            "backends": [
                {"pod": p.name, "address": p.address, "service_ms": p.service_ms} for p in pods
            ],
            "gateway": gateway_url,
            "host": HOST_HEADER,
            "sent": load.sent,
            "processes": pids,  # all stopped before this file is written
            "frames": [f.to_json() for f in frames],
        }
        try:
            options.json_summary.write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as exc:
            raise DemoError(f"cannot write --json-summary {options.json_summary}: {exc}") from exc
    return 130 if control.interrupted else 0

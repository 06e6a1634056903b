"""Open-loop load: Poisson arrivals on a fixed timeline, latency from the intended send time.

Closed-loop tools (``wrk``, ``hey``) send the next request when one returns, so a slow server
slows the load down and hides the tail (coordinated omission). Here the arrival times are
computed up front from a seeded RNG (:func:`~aviator.testbed.loadspec.plan`), every request
starts at its time whatever is still outstanding, and its latency runs from that *intended*
time, so any lag of the generator itself counts against the result instead of vanishing. The
result says whether the generator kept up (``LoadResult.keeping_up``): achieved send rate
against offered rate, and the send lag.

Run in-process with :func:`run_load`, or in its own process with
``python -m aviator.testbed.loadgen --spec JSON|@FILE [--out FILE]`` (JSON result on stdout or
in FILE); :func:`run_load_process` does the latter from asyncio code. What to offer is in
:mod:`aviator.testbed.loadspec`, what was measured in :mod:`aviator.testbed.loadresult`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence

import structlog

from aviator.testbed.loadresult import LoadResult, Recorder
from aviator.testbed.loadspec import LoadSpec
from aviator.testbed.openloop import offer, raise_fd_limit

log = structlog.get_logger(__name__)


# -- the runner -------------------------------------------------------------------------------


async def run_load(spec: LoadSpec, *, start_wall: float | None = None) -> LoadResult:
    """Offer ``spec``'s load (:func:`~aviator.testbed.openloop.offer`) and measure it; returns
    when every request has ended.

    ``start_wall``: a ``time.time()`` instant to start at (to line up with another process);
    None starts at once. Each request ends by its deadline, so this returns at most
    ``deadline_s`` after the last arrival.
    """
    loop = asyncio.get_running_loop()
    recorder = Recorder(spec)
    if start_wall is not None:
        await asyncio.sleep(max(start_wall - time.time(), 0.0))
    t0 = loop.time()
    max_outstanding = await offer(spec, recorder, t0=t0)
    # Every planned request was sent: the run finished.
    result = recorder.result(recorder.sent, t0 + spec.warmup_s, max_outstanding)
    log.info(
        "load done",
        offered_rate=round(result.offered_rate, 1),
        achieved_rate=round(result.achieved_rate, 1),
        measured=result.measured,
        errors=sum(result.errors.values()),
        p99_ms=result.latency_all.p99_ms,
        keeping_up=result.keeping_up,
    )
    return result


# -- own process ------------------------------------------------------------------------------


class LoadProcessError(Exception):
    """The load generator process failed or wrote no result."""


async def run_load_process(
    spec: LoadSpec, *, start_wall: float | None = None, python: str = sys.executable
) -> LoadResult:
    """Run :func:`run_load` in a child process (its own event loop and core) and parse its
    JSON result. The child is killed and reaped if this coroutine is cancelled."""
    args = [python, "-m", "aviator.testbed.loadgen", "--spec", json.dumps(spec.to_json())]
    if start_wall is not None:
        args += ["--start-at", repr(start_wall)]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise LoadProcessError(f"load generator exited with code {proc.returncode}")
    try:
        return LoadResult.from_json(json.loads(out))
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadProcessError(f"load generator wrote an unreadable result: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aviator.testbed.loadgen", description="Open-loop Poisson load."
    )
    parser.add_argument("--spec", required=True, help="LoadSpec as JSON, or @FILE")
    parser.add_argument("--out", help="write the JSON result here instead of stdout")
    parser.add_argument("--start-at", type=float, help="wall-clock time.time() to start at")
    args = parser.parse_args(argv)
    from aviator import log as aviator_log

    aviator_log.configure("warning")
    text = args.spec
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    spec = LoadSpec.from_json(json.loads(text))
    raise_fd_limit()
    result = asyncio.run(run_load(spec, start_wall=args.start_at))
    payload = json.dumps(result.to_json())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(payload + "\n")
    else:
        sys.stdout.write(payload + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

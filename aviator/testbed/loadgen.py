"""Open-loop load: Poisson arrivals on a fixed timeline, latency from the intended send time.

Closed-loop tools (``wrk``, ``hey``) send the next request when one returns, so a slow server
slows the load down and hides the tail (coordinated omission). Here the arrival times are
computed up front from a seeded RNG (:func:`arrival_times`), every request starts at its time
whatever is still outstanding, and its latency runs from that *intended* time, so any lag of
the generator itself counts against the result instead of vanishing. The result says whether
the generator kept up (:attr:`LoadResult.keeping_up`): achieved send rate against offered rate,
and the send lag.

Run in-process with :func:`run_load`, or in its own process with
``python -m aviator.testbed.loadgen --spec JSON|@FILE [--out FILE]`` (JSON result on stdout or
in FILE); :func:`run_load_process` does the latter from asyncio code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from hdrh.histogram import HdrHistogram

from aviator.testbed.backend import BACKEND_HEADER

log = structlog.get_logger(__name__)

# Latencies are recorded in microseconds from 1 µs to one hour (values above are clamped).
_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000
_SIG_FIGS = 3
_SECOND_SIG_FIGS = 2  # per-second histograms: 1% precision is plenty, and they stay small
# Keeping-up thresholds: an open-loop generator that sends late is measuring itself.
KEEPING_UP_RATE_RATIO = 0.97
KEEPING_UP_LAG_P99_MS = 20.0
# Responses without the backend header (Envoy's own 503, timeouts, connection errors).
NO_BACKEND = "-"


class Split(enum.StrEnum):
    """How requests are spread over the targets (e.g. several Envoy sidecars)."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class RateStep:
    """From ``start_s`` on, arrivals come at ``rate`` per second (until the next step)."""

    start_s: float
    rate: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"rate step start_s must be >= 0, got {self.start_s}")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {self.rate}")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What load to offer.

    ``targets`` are base URLs (``http://127.0.0.1:10000``); ``path`` is appended.
    ``rate`` is the constant offered rate unless ``steps`` gives a schedule (a ramp is a
    series of steps). Requests whose intended time is before ``warmup_s`` are sent but not
    measured. ``deadline_s`` runs from the intended send time; a request past it is a
    ``timeout`` error, recorded in the all-requests histogram at its elapsed time.
    """

    targets: tuple[str, ...]
    duration_s: float
    rate: float = 100.0
    steps: tuple[RateStep, ...] = ()
    host: str | None = None
    path: str = "/"
    seed: int = 0
    deadline_s: float = 5.0
    split: Split = Split.ROUND_ROBIN
    connection_limit: int = 1000
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("load needs at least one target URL")
        for target in self.targets:
            if not target.startswith(("http://", "https://")):
                raise ValueError(f"target must be an http(s) URL, got {target!r}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be >= 0, got {self.rate}")
        if self.steps and self.steps[0].start_s != 0:
            raise ValueError(f"the first rate step must start at 0, got {self.steps[0].start_s}")
        starts = [s.start_s for s in self.steps]
        if starts != sorted(set(starts)):
            raise ValueError(f"rate step start times must increase strictly, got {starts}")
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.connection_limit < 1:
            raise ValueError(f"connection_limit must be >= 1, got {self.connection_limit}")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(
                f"warmup_s must be in [0, duration_s={self.duration_s}), got {self.warmup_s}"
            )

    def schedule(self) -> tuple[RateStep, ...]:
        return self.steps or (RateStep(0.0, self.rate),)

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "duration_s": self.duration_s,
            "rate": self.rate,
            "steps": [[s.start_s, s.rate] for s in self.steps],
            "host": self.host,
            "path": self.path,
            "seed": self.seed,
            "deadline_s": self.deadline_s,
            "split": self.split.value,
            "connection_limit": self.connection_limit,
            "warmup_s": self.warmup_s,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown load spec field(s): {', '.join(sorted(unknown))}")
        fields = dict(data)
        fields["targets"] = tuple(fields["targets"])
        fields["steps"] = tuple(RateStep(float(a), float(r)) for a, r in fields.get("steps", ()))
        if "split" in fields:
            fields["split"] = Split(fields["split"])
        return cls(**fields)


# -- the timeline (pure) ----------------------------------------------------------------------


def arrival_times(steps: Sequence[RateStep], duration_s: float, rng: random.Random) -> list[float]:
    """Poisson arrival offsets in [0, duration_s), piecewise-constant rate, sorted.

    Exponential gaps are memoryless, so restarting the draw at each step boundary is exact.
    """
    times: list[float] = []
    bounds = [s.start_s for s in steps[1:]] + [duration_s]
    for step, end in zip(steps, bounds, strict=True):
        end = min(end, duration_s)
        if step.rate <= 0:
            continue
        t = step.start_s
        while True:
            t += rng.expovariate(step.rate)
            if t >= end:
                break
            times.append(t)
    return times


def assign_targets(count: int, n_targets: int, split: Split, rng: random.Random) -> list[int]:
    """The target index of each of ``count`` requests."""
    if split is Split.ROUND_ROBIN:
        return [i % n_targets for i in range(count)]
    return [rng.randrange(n_targets) for _ in range(count)]


def plan(spec: LoadSpec) -> tuple[list[float], list[int]]:
    """The whole timeline of ``spec``: arrival offsets and target indices (deterministic)."""
    times = arrival_times(spec.schedule(), spec.duration_s, random.Random(f"arrivals:{spec.seed}"))
    targets = assign_targets(
        len(times), len(spec.targets), spec.split, random.Random(f"split:{spec.seed}")
    )
    return times, targets


# -- results ----------------------------------------------------------------------------------


def new_histogram(sig_figs: int = _SIG_FIGS) -> HdrHistogram:
    """A latency histogram in microseconds, 1 µs to 1 h."""
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, sig_figs)


def _record(hist: HdrHistogram, seconds: float) -> None:
    hist.record_value(min(max(round(seconds * 1e6), 0), _HIGHEST_US))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of a histogram, in milliseconds (all 0 when ``count`` is 0)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, hist: HdrHistogram) -> LatencySummary:
        count = int(hist.get_total_count())
        if count == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

        def ms(percentile: float) -> float:
            return float(hist.get_value_at_percentile(percentile)) / 1000.0

        return cls(
            count=count,
            mean_ms=float(hist.get_mean_value()) / 1000.0,
            p50_ms=ms(50),
            p90_ms=ms(90),
            p99_ms=ms(99),
            p999_ms=ms(99.9),
            max_ms=float(hist.get_max_value()) / 1000.0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencySummary:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class SecondBucket:
    """Measured requests whose intended send time falls in second ``t`` of the run.

    Invariant: ``sum(by_backend.values()) == sent == ok + errors``.
    """

    t: int
    sent: int
    ok: int
    errors: int
    by_backend: Mapping[str, int]
    p50_ms: float
    p99_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "by_backend": dict(self.by_backend),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecondBucket:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one run measured. Counts exclude warm-up except ``scheduled`` and ``warmup``.

    Invariants: ``scheduled == warmup + measured`` for a run that finished;
    ``measured == ok + sum(errors.values()) == latency_all.count``;
    ``sum(by_backend.values()) == measured``.
    ``offered_rate`` is the measured arrivals over the measured window; ``achieved_rate`` the
    same requests over the time the generator actually took to send them.
    """

    spec: LoadSpec
    scheduled: int
    warmup: int
    measured: int
    ok: int
    errors: Mapping[str, int]
    offered_rate: float
    achieved_rate: float
    throughput: float  # successful responses per second of the measured window
    send_lag: LatencySummary  # actual minus intended send time
    latency_all: LatencySummary  # every measured request, errors and timeouts included
    latency_ok: LatencySummary  # 2xx responses only
    by_backend: Mapping[str, int]
    latency_ok_by_backend: Mapping[str, LatencySummary]
    per_second: tuple[SecondBucket, ...]
    max_outstanding: int
    histogram_all: str = field(repr=False)  # HdrHistogram.encode(), for merging across runs
    histogram_ok: str = field(repr=False)

    @property
    def keeping_up(self) -> bool:
        """Did the generator send on time? (achieved ≥ 97% of offered, p99 lag ≤ 20 ms)."""
        rate_ok = self.offered_rate == 0 or (
            self.achieved_rate >= KEEPING_UP_RATE_RATIO * self.offered_rate
        )
        return rate_ok and self.send_lag.p99_ms <= KEEPING_UP_LAG_P99_MS

    @property
    def error_rate(self) -> float:
        return 0.0 if self.measured == 0 else sum(self.errors.values()) / self.measured

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "scheduled": self.scheduled,
            "warmup": self.warmup,
            "measured": self.measured,
            "ok": self.ok,
            "errors": dict(self.errors),
            "offered_rate": self.offered_rate,
            "achieved_rate": self.achieved_rate,
            "throughput": self.throughput,
            "keeping_up": self.keeping_up,
            "send_lag": self.send_lag.to_json(),
            "latency_all": self.latency_all.to_json(),
            "latency_ok": self.latency_ok.to_json(),
            "by_backend": dict(self.by_backend),
            "latency_ok_by_backend": {
                k: v.to_json() for k, v in self.latency_ok_by_backend.items()
            },
            "per_second": [b.to_json() for b in self.per_second],
            "max_outstanding": self.max_outstanding,
            "histogram_all": self.histogram_all,
            "histogram_ok": self.histogram_ok,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadResult:
        return cls(
            spec=LoadSpec.from_json(data["spec"]),
            scheduled=data["scheduled"],
            warmup=data["warmup"],
            measured=data["measured"],
            ok=data["ok"],
            errors=dict(data["errors"]),
            offered_rate=data["offered_rate"],
            achieved_rate=data["achieved_rate"],
            throughput=data["throughput"],
            send_lag=LatencySummary.from_json(data["send_lag"]),
            latency_all=LatencySummary.from_json(data["latency_all"]),
            latency_ok=LatencySummary.from_json(data["latency_ok"]),
            by_backend=dict(data["by_backend"]),
            latency_ok_by_backend={
                k: LatencySummary.from_json(v) for k, v in data["latency_ok_by_backend"].items()
            },
            per_second=tuple(SecondBucket.from_json(b) for b in data["per_second"]),
            max_outstanding=data["max_outstanding"],
            histogram_all=data["histogram_all"],
            histogram_ok=data["histogram_ok"],
        )

    def decode_histogram(self, which: str = "all") -> HdrHistogram:
        """The full latency histogram (µs), e.g. to merge repeats with ``HdrHistogram.add``."""
        encoded = self.histogram_all if which == "all" else self.histogram_ok
        return HdrHistogram.decode(encoded.encode("ascii"))


# -- the runner -------------------------------------------------------------------------------


class _Recorder:
    """Accumulates one run's measurements (single-threaded: only the loop's tasks touch it)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.all = new_histogram()
        self.ok_hist = new_histogram()
        self.lag = new_histogram()
        self.ok_by_backend: dict[str, HdrHistogram] = {}
        self.seconds: dict[int, tuple[Counter[str], HdrHistogram]] = {}
        self.errors: Counter[str] = Counter()
        self.by_backend: Counter[str] = Counter()
        self.ok = 0
        self.measured = 0
        self.warmup = 0
        self.sent = 0
        self.first_measured_send: float | None = None
        self.last_measured_send: float | None = None

    def sent_at(self, offset: float, lag: float, actual: float) -> None:
        self.sent += 1
        if offset < self.spec.warmup_s:
            return
        _record(self.lag, max(lag, 0.0))
        if self.first_measured_send is None:
            self.first_measured_send = actual
        self.last_measured_send = actual

    def done(self, offset: float, latency: float, error: str | None, backend: str | None) -> None:
        if offset < self.spec.warmup_s:
            self.warmup += 1
            return
        self.measured += 1
        who = backend or NO_BACKEND
        self.by_backend[who] += 1
        _record(self.all, latency)
        second = int(offset)
        counts, hist = self.seconds.get(second) or (Counter(), new_histogram(_SECOND_SIG_FIGS))
        self.seconds[second] = (counts, hist)
        counts["@sent"] += 1
        counts[who] += 1
        _record(hist, latency)
        if error is None:
            self.ok += 1
            counts["@ok"] += 1
            _record(self.ok_hist, latency)
            if who not in self.ok_by_backend:
                self.ok_by_backend[who] = new_histogram()
            _record(self.ok_by_backend[who], latency)
        else:
            self.errors[error] += 1
            counts["@errors"] += 1

    def result(self, scheduled: int, window_start: float, max_outstanding: int) -> LoadResult:
        spec = self.spec
        window = spec.duration_s - spec.warmup_s
        measured_scheduled = self.measured  # every measured arrival was sent and completed
        offered = measured_scheduled / window
        if self.last_measured_send is None or measured_scheduled == 0:
            achieved = 0.0
        else:
            # The generator "took" from the window start until it sent the last request plus
            # the expected gap after it; on time, that is the window itself.
            took = max(self.last_measured_send - window_start, 0.0) + window / measured_scheduled
            achieved = measured_scheduled / max(took, window)
        per_second = []
        for t in sorted(self.seconds):
            counts, hist = self.seconds[t]
            by_backend = {k: v for k, v in counts.items() if not k.startswith("@")}
            per_second.append(
                SecondBucket(
                    t=t,
                    sent=counts["@sent"],
                    ok=counts["@ok"],
                    errors=counts["@errors"],
                    by_backend=by_backend,
                    p50_ms=float(hist.get_value_at_percentile(50)) / 1000.0,
                    p99_ms=float(hist.get_value_at_percentile(99)) / 1000.0,
                )
            )
        return LoadResult(
            spec=spec,
            scheduled=scheduled,
            warmup=self.warmup,
            measured=self.measured,
            ok=self.ok,
            errors=dict(sorted(self.errors.items())),
            offered_rate=offered,
            achieved_rate=achieved,
            throughput=self.ok / window,
            send_lag=LatencySummary.of(self.lag),
            latency_all=LatencySummary.of(self.all),
            latency_ok=LatencySummary.of(self.ok_hist),
            by_backend=dict(sorted(self.by_backend.items())),
            latency_ok_by_backend={
                k: LatencySummary.of(h) for k, h in sorted(self.ok_by_backend.items())
            },
            per_second=tuple(per_second),
            max_outstanding=max_outstanding,
            histogram_all=self.all.encode().decode("ascii"),
            histogram_ok=self.ok_hist.encode().decode("ascii"),
        )


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientError):
        return "client_" + type(exc).__name__
    return "other_" + type(exc).__name__


async def run_load(spec: LoadSpec, *, start_wall: float | None = None) -> LoadResult:
    """Offer ``spec``'s load and measure it; returns when every request has ended.

    ``start_wall``: a ``time.time()`` instant to start at (to line up with another process);
    None starts at once. Each request ends by its deadline, so this returns at most
    ``deadline_s`` after the last arrival.
    """
    loop = asyncio.get_running_loop()
    times, target_idx = plan(spec)
    urls = [t.rstrip("/") + spec.path for t in spec.targets]
    headers = {"Host": spec.host} if spec.host else {}
    recorder = _Recorder(spec)
    outstanding: set[asyncio.Task[None]] = set()
    max_outstanding = 0

    connector = aiohttp.TCPConnector(
        limit=spec.connection_limit, limit_per_host=0, keepalive_timeout=60
    )
    # No aiohttp timeout: the deadline (from the intended time) is enforced around each request.
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
    )

    async def one(offset: float, intended: float, url: str) -> None:
        sent = loop.time()
        recorder.sent_at(offset, sent - intended, sent)
        error: str | None = None
        backend: str | None = None
        try:
            async with (
                asyncio.timeout_at(intended + spec.deadline_s),
                session.get(url, headers=headers) as resp,
            ):
                await resp.read()
                backend = resp.headers.get(BACKEND_HEADER)
                if not 200 <= resp.status < 300:
                    error = f"http_{resp.status}"
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = _error_kind(exc)
        recorder.done(offset, loop.time() - intended, error, backend)

    try:
        if start_wall is not None:
            await asyncio.sleep(max(start_wall - time.time(), 0.0))
        t0 = loop.time()
        for i, offset in enumerate(times):
            intended = t0 + offset
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 0:
                await asyncio.sleep(0)  # behind schedule: still let responses be read
            task = asyncio.create_task(one(offset, intended, urls[target_idx[i]]))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            max_outstanding = max(max_outstanding, len(outstanding))
        if outstanding:
            await asyncio.gather(*outstanding)
    finally:
        for task in outstanding:
            task.cancel()
        await asyncio.gather(*outstanding, return_exceptions=True)
        await session.close()
    result = recorder.result(len(times), t0 + spec.warmup_s, max_outstanding)
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


def _raise_fd_limit() -> None:
    # Each outstanding request holds a socket; the default soft limit (often 1024) is too low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    _raise_fd_limit()
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

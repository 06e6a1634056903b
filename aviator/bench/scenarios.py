"""The latency benchmark's scenarios, as data, and the capacity arithmetic (pure).

A :class:`Scenario` is a list of :class:`Disturbance` values (backend *i* is slower, has less
capacity, fails fast, or carries hidden load, for some part of the run) and optionally a load
ramp. :func:`plan` turns a scenario, the fleet's shape, the load and the timeline into a
:class:`RunPlan`: one :class:`~aviator.testbed.profile.Profile` per backend and the rate steps
of the open-loop load.

Capacity (requests per second the fleet can complete) follows the issue's arithmetic:
``Σ capacity_i / mean_service_i``, with each backend's share scaled down by the hidden load it
carries (those slots are taken by traffic Envoy never sees) and by its fast-fail rate (a failed
request is not served). A scenario's capacity is the *lowest* fleet capacity over the measured
window, so "70% load" is at most 70% at every moment. The offered rate is ``load * capacity``.

Times: the load runs for ``duration_s`` seconds, of which the first ``warmup_s`` are not
measured. A disturbance's ``start``/``end`` are fractions of the measured window
(``0`` = end of warm-up, ``1`` = end of the run); ``start=None`` means from the very beginning
(warm-up included), ``end=None`` until the end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aviator.testbed.loadspec import RateStep
from aviator.testbed.profile import Phase, Profile

__all__ = [
    "QUICK_SHAPE",
    "SCENARIOS",
    "Disturbance",
    "FleetShape",
    "RunPlan",
    "Scenario",
    "fleet_capacity",
    "parse_scenarios",
    "phase_capacity",
    "plan",
    "shift_profile",
]


@dataclass(frozen=True, slots=True)
class FleetShape:
    """Identical backends before any disturbance: ``backends`` of ``capacity`` slots each,
    ``mean_service_s`` per request (exponential: sd = mean)."""

    backends: int = 6
    capacity: int = 4
    mean_service_s: float = 0.020

    def __post_init__(self) -> None:
        if self.backends < 2:
            raise ValueError(f"a fleet to balance needs >= 2 backends, got {self.backends}")
        if self.capacity < 1:
            raise ValueError(f"backend capacity must be >= 1, got {self.capacity}")
        if not (math.isfinite(self.mean_service_s) and self.mean_service_s > 0):
            raise ValueError(f"mean_service_s must be > 0, got {self.mean_service_s}")

    @property
    def base_phase(self) -> Phase:
        return Phase(0.0, mean_service_s=self.mean_service_s, capacity=self.capacity)

    @property
    def nominal_capacity(self) -> float:
        """Requests per second of the undisturbed fleet."""
        return self.backends * self.capacity / self.mean_service_s

    def to_json(self) -> dict[str, Any]:
        return {
            "backends": self.backends,
            "capacity": self.capacity,
            "mean_service_s": self.mean_service_s,
            "nominal_capacity": self.nominal_capacity,
        }


QUICK_SHAPE: Final = FleetShape(backends=4, capacity=2, mean_service_s=0.020)
"""A small fleet for ``--quick`` (400 req/s nominal), so a test run stays light."""


@dataclass(frozen=True, slots=True)
class Disturbance:
    """Backend ``backend`` deviates from the base phase between ``start`` and ``end``.

    ``slowdown`` multiplies the mean service time; ``capacity`` replaces the slot count
    (None keeps it); ``error_rate`` and ``hidden_load`` are :class:`Phase` fields.
    Invariants: ``slowdown > 0``; ``0 <= start < end <= 1`` where given.
    """

    backend: int
    start: float | None = None
    end: float | None = None
    slowdown: float = 1.0
    capacity: int | None = None
    error_rate: float = 0.0
    hidden_load: float = 0.0

    def __post_init__(self) -> None:
        if self.backend < 0:
            raise ValueError(f"backend index must be >= 0, got {self.backend}")
        if not (math.isfinite(self.slowdown) and self.slowdown > 0):
            raise ValueError(f"slowdown must be > 0, got {self.slowdown}")
        lo = 0.0 if self.start is None else self.start
        hi = 1.0 if self.end is None else self.end
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"disturbance needs 0 <= start < end <= 1, got {self.start}, {self.end}"
            )

    def phase_fields(self, base: Phase) -> dict[str, Any]:
        return {
            "mean_service_s": base.mean_service_s * self.slowdown,
            "capacity": base.capacity if self.capacity is None else self.capacity,
            "error_rate": self.error_rate,
            "hidden_load": self.hidden_load,
        }


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named situation. ``ramp`` = (first load, last load): the offered load climbs
    linearly over the measured window (the warm-up runs at the first value) and the
    benchmark's ``--load`` does not apply.

    ``agent``: the backends carry the probing agent (ORCA load reports, RIF); without it the
    probe is a plain request that queues with the others (most users' apps). ``slots``
    replaces the fleet's slots per backend (few slots: heavy queueing). ``threshold_x``:
    Aviator's ``latencyThreshold`` as a multiple of the mean service time (None: the
    benchmark's ``--latency-threshold-ms``).

    Invariant: the disturbances of one backend do not overlap.
    """

    name: str
    title: str
    description: str
    disturbances: tuple[Disturbance, ...] = ()
    ramp: tuple[float, float] | None = None
    agent: bool = True
    slots: int | None = None
    threshold_x: float | None = None

    def __post_init__(self) -> None:
        by_backend: dict[int, list[Disturbance]] = {}
        for d in self.disturbances:
            by_backend.setdefault(d.backend, []).append(d)
        for ds in by_backend.values():
            spans = sorted((_lo(d), _hi(d)) for d in ds)
            if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
                raise ValueError(f"scenario {self.name}: overlapping disturbances on one backend")
        if self.ramp is not None and not 0 < self.ramp[0] <= self.ramp[1]:
            raise ValueError(f"scenario {self.name}: ramp must be 0 < first <= last")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"scenario {self.name}: slots must be >= 1, got {self.slots}")
        if self.threshold_x is not None and not self.threshold_x > 0:
            raise ValueError(f"scenario {self.name}: threshold_x must be > 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "disturbances": [
                {
                    "backend": d.backend,
                    "start": d.start,
                    "end": d.end,
                    "slowdown": d.slowdown,
                    "capacity": d.capacity,
                    "error_rate": d.error_rate,
                    "hidden_load": d.hidden_load,
                }
                for d in self.disturbances
            ],
            "ramp": list(self.ramp) if self.ramp else None,
            "agent": self.agent,
            "slots": self.slots,
            "threshold_x": self.threshold_x,
        }


def _lo(d: Disturbance) -> float:
    return 0.0 if d.start is None else d.start


def _hi(d: Disturbance) -> float:
    return 1.0 if d.end is None else d.end


# The moving antagonist: one backend at a time becomes 10x slower, for a quarter of the
# measured window each (Prequal's antagonists are CPU hogs that move between machines).
_ANTAGONIST_SLOWDOWN: Final = 10.0


def _antagonist(moves: int) -> tuple[Disturbance, ...]:
    """Backend 0, 1, 2, 3, 0, ... in turn ``_ANTAGONIST_SLOWDOWN`` slower, ``moves`` equal
    windows over the measured window."""
    return tuple(
        Disturbance(j % 4, start=j / moves, end=(j + 1) / moves, slowdown=_ANTAGONIST_SLOWDOWN)
        for j in range(moves)
    )


# Issue 13, item 2: plain HTTP apps (no agent), few slots, thresholds from just above to
# several times the normal latency, slow- and fast-moving antagonists.
_PLAIN_SLOTS: Final = 2
_FAST_MOVES: Final = 12

SCENARIOS: Final[Mapping[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario(
            "static",
            "static heterogeneity",
            "backend 0 is 16x slower and backend 1 2x slower than the others, all run long",
            (Disturbance(0, slowdown=16.0), Disturbance(1, slowdown=2.0)),
        ),
        Scenario(
            "antagonist",
            "moving antagonist",
            f"one backend at a time is {_ANTAGONIST_SLOWDOWN:g}x slower: backend 0, 1, 2, 3 "
            "in turn, a quarter of the measured window each",
            tuple(
                Disturbance(i, start=i / 4, end=(i + 1) / 4, slowdown=_ANTAGONIST_SLOWDOWN)
                for i in range(4)
            ),
        ),
        Scenario(
            "antagonist-fast",
            "fast-moving antagonist",
            f"one backend at a time is {_ANTAGONIST_SLOWDOWN:g}x slower, moving every "
            f"1/{_FAST_MOVES} of the measured window (0, 1, 2, 3, 0, ...)",
            _antagonist(_FAST_MOVES),
        ),
        Scenario(
            "plain-tight",
            "plain apps, tight threshold",
            f"no agent (probe round trips only), {_PLAIN_SLOTS} slots per backend, moving "
            "antagonist (4 moves), latencyThreshold 1.25x the mean service time",
            _antagonist(4),
            agent=False,
            slots=_PLAIN_SLOTS,
            threshold_x=1.25,
        ),
        Scenario(
            "plain-tight-fast",
            "plain apps, tight threshold, fast antagonist",
            f"no agent, {_PLAIN_SLOTS} slots per backend, antagonist moving every "
            f"1/{_FAST_MOVES} of the window, latencyThreshold 1.25x the mean service time",
            _antagonist(_FAST_MOVES),
            agent=False,
            slots=_PLAIN_SLOTS,
            threshold_x=1.25,
        ),
        Scenario(
            "plain-loose",
            "plain apps, loose threshold",
            f"no agent, {_PLAIN_SLOTS} slots per backend, moving antagonist (4 moves), "
            "latencyThreshold 5x the mean service time",
            _antagonist(4),
            agent=False,
            slots=_PLAIN_SLOTS,
            threshold_x=5.0,
        ),
        Scenario(
            "hidden",
            "hidden load",
            "load that bypasses Envoy (jobs from inside the backend) takes 75% of backend 0's "
            "slots and 50% of backend 1's, all run long",
            (Disturbance(0, hidden_load=0.75), Disturbance(1, hidden_load=0.5)),
        ),
        Scenario(
            "fastfail",
            "fast-failing backend",
            "after the warm-up, backend 0 answers half of its requests with an immediate 503",
            (Disturbance(0, start=0.0, error_rate=0.5),),
        ),
        Scenario(
            "ramp",
            "load ramp",
            "identical backends; the offered load climbs from 50% to 110% of capacity",
            ramp=(0.5, 1.1),
        ),
    )
}


def parse_scenarios(text: str) -> tuple[Scenario, ...]:
    """``"all"`` or a comma list of scenario names, in the order given."""
    if text.strip() == "all":
        return tuple(SCENARIOS.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ValueError(
            f"unknown scenario {', '.join(unknown) or repr(text)}; "
            f"known: {', '.join(SCENARIOS)} or all"
        )
    return tuple(dict.fromkeys(SCENARIOS[n] for n in names))


def phase_capacity(phase: Phase) -> float:
    """Requests per second one backend completes in ``phase`` (hidden load and fast
    failures taken out)."""
    return phase.service_rate * max(1.0 - phase.hidden_load, 0.0) * (1.0 - phase.error_rate)


def fleet_capacity(phases: Sequence[Phase]) -> float:
    return sum(phase_capacity(p) for p in phases)


def shift_profile(profile: Profile, lead_s: float) -> Profile:
    """``profile`` delayed by ``lead_s``: every phase after the first starts ``lead_s`` later
    (the first one covers the lead too). Lines a profile whose clock starts ``lead_s`` before
    the load up with the load's own time."""
    if lead_s < 0:
        raise ValueError(f"lead_s must be >= 0, got {lead_s}")
    first, *rest = profile.phases
    return Profile((first, *(_with_start(p, p.start_s + lead_s) for p in rest)))


def _with_start(phase: Phase, start_s: float) -> Phase:
    return Phase(**{**phase.to_json(), "start_s": start_s})


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What one run of one scenario does, in the load's time (seconds from its start).

    ``capacity`` is the scenario's capacity (lowest over the measured window); ``load`` the
    offered fraction of it (for a ramp, its mean). ``steps`` is the rate schedule.
    """

    scenario: Scenario
    shape: FleetShape
    load: float
    duration_s: float
    warmup_s: float
    profiles: tuple[Profile, ...]
    capacity: float
    steps: tuple[RateStep, ...] = field(repr=False)

    @property
    def mean_rate(self) -> float:
        """Mean offered rate over the measured window."""
        window = self.duration_s - self.warmup_s
        total = 0.0
        bounds = [s.start_s for s in self.steps[1:]] + [self.duration_s]
        for step, end in zip(self.steps, bounds, strict=True):
            lo, hi = max(step.start_s, self.warmup_s), min(end, self.duration_s)
            if hi > lo:
                total += step.rate * (hi - lo)
        return total / window

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "shape": self.shape.to_json(),
            "load": self.load,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "capacity": self.capacity,
            "mean_rate": self.mean_rate,
            "steps": [[s.start_s, s.rate] for s in self.steps],
            "profiles": [p.to_json() for p in self.profiles],
        }


def _profile(base: Phase, ds: Sequence[Disturbance], warmup_s: float, window_s: float) -> Profile:
    """``base``, changed during each of ``ds`` (which do not overlap), in the load's time."""
    phases: dict[float, Phase] = {0.0: base}
    for d in sorted(ds, key=_lo):
        changed = d.phase_fields(base)
        start = 0.0 if d.start is None else max(warmup_s + d.start * window_s, 0.0)
        phases[start] = Phase(start, **changed)
        if d.end is not None and d.end < 1.0:
            end = warmup_s + d.end * window_s
            phases.setdefault(end, _with_start(base, end))
    return Profile.of(list(phases.values()))


def _ramp_steps(
    lo: float, hi: float, capacity: float, warmup_s: float, duration_s: float
) -> tuple[RateStep, ...]:
    # One step per second of the measured window (at least 4): smooth enough for a ramp,
    # few enough to keep the schedule short.
    window = duration_s - warmup_s
    n = max(4, round(window))
    steps = [RateStep(0.0, lo * capacity)]
    for i in range(n):
        start = warmup_s + i * window / n
        load = lo + (hi - lo) * (i + 0.5) / n
        if start <= 0:
            steps[0] = RateStep(0.0, load * capacity)
        else:
            steps.append(RateStep(start, load * capacity))
    return tuple(steps)


def plan(
    scenario: Scenario,
    shape: FleetShape,
    *,
    load: float,
    duration_s: float,
    warmup_s: float,
) -> RunPlan:
    """The profiles and rate schedule of one run. Raises ValueError for a disturbance on a
    backend the fleet does not have, a load <= 0, or a warm-up not shorter than the run."""
    if not (math.isfinite(load) and load > 0):
        raise ValueError(f"load must be > 0, got {load}")
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"need 0 <= warmup_s < duration_s, got {warmup_s}, {duration_s}")
    if scenario.slots is not None:
        shape = FleetShape(shape.backends, scenario.slots, shape.mean_service_s)
    by_backend: dict[int, list[Disturbance]] = {}
    for d in scenario.disturbances:
        by_backend.setdefault(d.backend, []).append(d)
    missing = [i for i in by_backend if i >= shape.backends]
    if missing:
        raise ValueError(
            f"scenario {scenario.name} disturbs backend(s) {missing}, "
            f"but the fleet has {shape.backends}"
        )
    base = shape.base_phase
    window = duration_s - warmup_s
    profiles = tuple(
        _profile(base, by_backend.get(i, ()), warmup_s, window) for i in range(shape.backends)
    )
    # Lowest capacity over the measured window: check at its start and at every phase start
    # inside it (capacity is constant between phase starts).
    instants = {warmup_s} | {
        p.start_s for prof in profiles for p in prof.phases if warmup_s < p.start_s < duration_s
    }
    capacity = min(fleet_capacity([prof.phase_at(t) for prof in profiles]) for t in instants)
    if capacity <= 0:
        raise ValueError(f"scenario {scenario.name} leaves the fleet no capacity")
    if scenario.ramp is not None:
        lo, hi = scenario.ramp
        steps = _ramp_steps(lo, hi, capacity, warmup_s, duration_s)
        effective_load = (lo + hi) / 2
    else:
        steps = (RateStep(0.0, load * capacity),)
        effective_load = load
    return RunPlan(
        scenario=scenario,
        shape=shape,
        load=effective_load,
        duration_s=duration_s,
        warmup_s=warmup_s,
        profiles=profiles,
        capacity=capacity,
        steps=steps,
    )

"""What load to offer, and its timeline: Poisson arrivals at a piecewise-constant rate.

:class:`LoadSpec` says what to offer (targets, rate or rate steps, duration, deadline, seed);
:func:`plan` turns it into the whole timeline up front, deterministically from the seed, so an
open-loop run (:mod:`aviator.testbed.openloop`) sends each request at a time fixed before the
run started. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


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

"""A backend's behaviour over time, as data (pure: no clock, no I/O).

A :class:`Profile` is a schedule of :class:`Phase` values, each in force from its ``start_s``
(seconds after the profile's origin) until the next one starts. "One backend slows down in the
middle of the run" is a profile with two phases; a moving antagonist is a set of profiles whose
slow phases do not overlap.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


class Distribution(enum.StrEnum):
    """Service-time distribution. Both have the configured mean."""

    # sd = mean, as in Prequal's testbed (gamma with shape 1 is the same distribution).
    EXPONENTIAL = "exponential"
    # sd = 0: for tests and for calibrating the load generator.
    CONSTANT = "constant"


@dataclass(frozen=True, slots=True)
class Phase:
    """What a backend does from ``start_s`` on.

    Invariants (checked at construction): ``start_s >= 0``, ``mean_service_s > 0``,
    ``capacity >= 1``, ``0 <= error_rate <= 1``, ``0 <= hidden_load``.
    """

    start_s: float = 0.0
    # Mean time one request holds a capacity slot (the sleep, excluding queueing).
    mean_service_s: float = 0.010
    # Requests served at once; the others queue in arrival order.
    capacity: int = 4
    # Probability that a request fails fast with 503, without queueing or holding a slot.
    error_rate: float = 0.0
    # Load that bypasses Envoy: Poisson jobs from inside the backend process that use on
    # average ``hidden_load * capacity`` slots (0.5 = half the capacity). They queue like
    # requests and count in the agent's RIF (other clients' traffic would).
    hidden_load: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"phase start_s must be a finite number >= 0, got {self.start_s}")
        if not (math.isfinite(self.mean_service_s) and self.mean_service_s > 0):
            raise ValueError(f"phase mean_service_s must be > 0, got {self.mean_service_s}")
        if self.capacity < 1:
            raise ValueError(f"phase capacity must be >= 1, got {self.capacity}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"phase error_rate must be in [0, 1], got {self.error_rate}")
        if not (math.isfinite(self.hidden_load) and self.hidden_load >= 0):
            raise ValueError(f"phase hidden_load must be >= 0, got {self.hidden_load}")

    @property
    def service_rate(self) -> float:
        """Requests per second this phase serves at full use: ``capacity / mean_service_s``."""
        return self.capacity / self.mean_service_s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Phase:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown phase field(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Profile:
    """Phases ordered by ``start_s``; the first starts at 0 and start times are distinct."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a profile needs at least one phase")
        if self.phases[0].start_s != 0:
            raise ValueError(f"the first phase must start at 0, got {self.phases[0].start_s}")
        starts = [p.start_s for p in self.phases]
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"phase start times must increase strictly, got {starts}")

    @classmethod
    def constant(
        cls,
        mean_service_s: float = 0.010,
        capacity: int = 4,
        *,
        error_rate: float = 0.0,
        hidden_load: float = 0.0,
    ) -> Profile:
        """One phase for the whole run."""
        return cls(
            (
                Phase(
                    0.0,
                    mean_service_s=mean_service_s,
                    capacity=capacity,
                    error_rate=error_rate,
                    hidden_load=hidden_load,
                ),
            )
        )

    @classmethod
    def of(cls, phases: Sequence[Phase]) -> Profile:
        """A profile from phases in any order (sorted by start time)."""
        return cls(tuple(sorted(phases, key=lambda p: p.start_s)))

    @classmethod
    def window(cls, base: Phase, start_s: float, end_s: float, **changes: Any) -> Profile:
        """``base`` all along, except ``changes`` (Phase fields) from ``start_s`` to ``end_s``.

        E.g. ``Profile.window(Phase(), 20, 40, mean_service_s=0.16)`` slows a backend 16x for
        20 s; a moving antagonist is one window per backend at successive times.
        """
        if not 0 < start_s < end_s:
            raise ValueError(f"window needs 0 < start_s < end_s, got {start_s}, {end_s}")
        if "start_s" in changes:
            raise ValueError("a window's changes cannot move its start (use start_s)")
        fields = base.to_json()
        return cls(
            (
                Phase(**{**fields, "start_s": 0.0}),
                Phase(**{**fields, **changes, "start_s": start_s}),
                Phase(**{**fields, "start_s": end_s}),
            )
        )

    def phase_at(self, elapsed_s: float) -> Phase:
        """The phase in force ``elapsed_s`` after the origin (the first one before 0)."""
        starts = [p.start_s for p in self.phases]
        index = bisect.bisect_right(starts, elapsed_s) - 1
        return self.phases[max(index, 0)]

    def next_change_after(self, elapsed_s: float) -> float | None:
        """Start time of the first phase after ``elapsed_s``, or None if none follows."""
        for phase in self.phases:
            if phase.start_s > elapsed_s:
                return phase.start_s
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.phases]

    @classmethod
    def from_json(cls, data: Sequence[Mapping[str, Any]]) -> Profile:
        return cls.of([Phase.from_json(p) for p in data])


def sample_service_time(rng: random.Random, mean_s: float, distribution: Distribution) -> float:
    """One service time with mean ``mean_s`` (sd = mean for exponential, sd = 0 for constant)."""
    if distribution is Distribution.CONSTANT:
        return mean_s
    return rng.expovariate(1.0 / mean_s)


def backend_rng(seed: int | None, name: str) -> random.Random:
    """The RNG of backend ``name``: deterministic for a given seed, independent per backend.

    String seeds are hashed with SHA-512 by :mod:`random`, so the stream does not depend on
    ``PYTHONHASHSEED``; ``seed=None`` seeds from the OS.
    """
    return random.Random(None if seed is None else f"aviator-testbed:{seed}:{name}")

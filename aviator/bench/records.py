"""What one benchmark run measured, as values (pure; JSON in and out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aviator.testbed.loadresult import LoadResult

__all__ = ["RunRecord", "WeightSample"]


@dataclass(frozen=True, slots=True)
class WeightSample:
    """The first sidecar's view of each backend at ``t`` seconds of load time."""

    t: float
    weight: Mapping[str, int]
    health: Mapping[str, str]
    active: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "weight": dict(self.weight),
            "health": dict(self.health),
            "active": dict(self.active),
        }


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Everything one run measured. ``error`` is set (and ``load`` None) when the run failed
    before the load finished; such a run is reported, never silently dropped."""

    scenario: str
    load_fraction: float
    policy: str
    repeat: int
    seed: int
    sidecars: int
    offered_rate: float
    load: LoadResult | None
    weights: tuple[WeightSample, ...]
    backend_stats: Mapping[str, Mapping[str, Any]]
    sidecar_stats: Mapping[str, int]
    wall_s: float
    error: str | None = None
    #: The generator's own account of the run (k6: VUs, dropped iterations, send-lag bound,
    #: clock lead; :class:`aviator.testbed.k6plan.K6RunInfo`), None if it never finished.
    generator: Mapping[str, Any] | None = None
    #: Aviator runs: each slowdown's stages (:class:`aviator.bench.reaction.Reaction` JSON).
    reaction: tuple[Mapping[str, Any], ...] = ()
    #: Aviator runs with ``--traces``: every 50 ms poll on load time
    #: (:class:`aviator.bench.reaction.Trace` JSON); written beside the report, not in it.
    traces: tuple[Mapping[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None and self.load is not None

    def to_json(self, *, histograms: bool = False) -> dict[str, Any]:
        load = None
        if self.load is not None:
            load = self.load.to_json()
            if not histograms:
                load.pop("histogram_all")
                load.pop("histogram_ok")
        return {
            "scenario": self.scenario,
            "load_fraction": self.load_fraction,
            "policy": self.policy,
            "repeat": self.repeat,
            "seed": self.seed,
            "sidecars": self.sidecars,
            "offered_rate": self.offered_rate,
            "load": load,
            "weights": [w.to_json() for w in self.weights],
            "backend_stats": {k: dict(v) for k, v in self.backend_stats.items()},
            "sidecar_stats": dict(self.sidecar_stats),
            "wall_s": self.wall_s,
            "error": self.error,
            "generator": dict(self.generator) if self.generator is not None else None,
            "reaction": [dict(r) for r in self.reaction],
        }

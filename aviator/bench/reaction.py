"""How fast Aviator reacts to a backend that slows down, stage by stage (pure: no I/O, no clock).

During an Aviator run the runner polls, every ``TRACE_EVERY_S``, the control plane's
``/debug/endpoints`` (what the estimator holds for each endpoint and the weight the weigher
decided) and the first sidecar's ``/clusters`` (the weight Envoy holds), each poll stamped with
the load's time. :func:`reactions` finds, for each slowdown of the plan (a disturbance that
starts inside the run), when each stage first shows:

- ``signal``: the endpoint's estimate moved (probe latency or RIF at least 1.5x its value at
  the slowdown, or the probe sample count grew and the latency rose at all): the first probe
  that saw it, to the poll's resolution;
- ``crossed``: the estimate crossed (latency above ``latencyThreshold``, or the endpoint hot);
- ``floored``: the weigher put it at (or within 1.5x of) the lowest weight it gave, or hot. The
  control plane publishes in the same reweigh step, so from outside ``published`` is this
  stage too (the snapshot and the push follow within that step);
- ``envoy``: the sidecar holds a weight at most 1.5x the lowest of its hosts for it.

Every delay is from the slowdown's start, in ms; ``None`` when the stage never showed before the
next move (or the end). The resolution is the poll interval (50 ms): a figure is an upper bound
of the true delay plus at most one poll.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["STAGES", "TRACE_EVERY_S", "Reaction", "Trace", "reactions", "summarize_reactions"]

TRACE_EVERY_S: Final = 0.05
STAGES: Final = ("signal", "crossed", "floored", "envoy")
_MOVED: Final = 1.5
_NEAR_FLOOR: Final = 1.5


@dataclass(frozen=True, slots=True)
class Trace:
    """One poll at load time ``t``: per backend name, the control plane's view
    (``latency_ms``, ``rif``, ``samples``, ``weight``, ``hot``) or Envoy's weight."""

    t: float
    control: Mapping[str, Mapping[str, Any]]
    envoy: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "control": dict(self.control), "envoy": dict(self.envoy)}


@dataclass(frozen=True, slots=True)
class Reaction:
    """The stages of one slowdown: backend, start (load time, s), delay per stage (ms)."""

    backend: str
    start_s: float
    delays_ms: Mapping[str, float | None]

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "start_s": self.start_s, "delays_ms": dict(self.delays_ms)}


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def _signal(before: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    lat0, lat = _float(before.get("latency_ms")), _float(now.get("latency_ms"))
    rif0, rif = _float(before.get("rif")), _float(now.get("rif"))
    if lat0 is not None and lat is not None and lat >= _MOVED * lat0:
        return True
    if rif is not None and rif >= max(_MOVED * (rif0 or 0.0), 1.0) and rif > (rif0 or 0.0):
        return True
    grew = (now.get("samples") or 0) > (before.get("samples") or 0)
    return grew and lat0 is not None and lat is not None and lat > lat0


def reactions(
    traces: Sequence[Trace],
    slowdowns: Sequence[tuple[str, float, float]],
    threshold_ms: float,
) -> list[Reaction]:
    """The stages of each ``(backend, start_s, end_s)`` slowdown in ``traces`` (sorted by t)."""
    out: list[Reaction] = []
    for backend, start, end in slowdowns:
        window = [tr for tr in traces if start <= tr.t < end and backend in tr.control]
        before = next(
            (
                tr.control[backend]
                for tr in reversed(traces)
                if tr.t < start and backend in tr.control
            ),
            None,
        )
        delays: dict[str, float | None] = dict.fromkeys(STAGES)
        if before is None or not window:
            out.append(Reaction(backend, start, delays))
            continue
        for tr in window:
            c = tr.control[backend]
            ms = (tr.t - start) * 1000.0
            lat = _float(c.get("latency_ms"))
            if delays["signal"] is None and _signal(before, c):
                delays["signal"] = ms
            if delays["crossed"] is None and (
                bool(c.get("hot")) or (lat is not None and lat > threshold_ms)
            ):
                delays["crossed"] = ms
            weights = [w for v in tr.control.values() if (w := _float(v.get("weight")))]
            weight = _float(c.get("weight"))
            if (
                delays["floored"] is None
                and weight is not None
                and weights
                and (bool(c.get("hot")) or weight <= _NEAR_FLOOR * min(weights) < max(weights))
            ):
                delays["floored"] = ms
            held = tr.envoy.get(backend)
            if (
                delays["envoy"] is None
                and held is not None
                and tr.envoy
                and held <= _NEAR_FLOOR * min(tr.envoy.values()) < max(tr.envoy.values())
            ):
                delays["envoy"] = ms
        out.append(Reaction(backend, start, delays))
    return out


def summarize_reactions(all_reactions: Sequence[Reaction]) -> dict[str, dict[str, Any]]:
    """Per stage: median, min, max of the delays that showed, and how many showed of all."""
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        seen = sorted(d for r in all_reactions if (d := r.delays_ms.get(stage)) is not None)
        out[stage] = {
            "median_ms": statistics.median(seen) if seen else None,
            "min_ms": seen[0] if seen else None,
            "max_ms": seen[-1] if seen else None,
            "seen": len(seen),
            "of": len(all_reactions),
        }
    return out

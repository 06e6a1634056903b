"""Figures of ``aviator bench xds`` (pure): summaries, goals, the printed table, Markdown.

A *run* is one server process with one fleet and one set of streams; it measures one or two
*scenarios*: ``one`` (each change touches one workload, the common case) and ``all`` (every
workload changes at once). For each change the clients report when each stream received it;
"held" is the moment the last stream did, measured from the server reading the change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, max and mean of ``values`` (None when empty)."""
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One change as measured: server-side timestamps and CPU, and each stream's receipt."""

    seq: int
    which: str
    t_change: float  # server's time.time() when it read the change
    build_s: float
    publish_s: float
    cpu_s: float | None  # server CPU from reading the change to every push answered
    times: tuple[float | None, ...]  # per simulated stream: time.time() of receipt
    responses: int
    bytes: int
    envoy_s: tuple[float | None, ...] = ()  # per real Envoy: seconds to holding it
    # How late the server's event loop ran a 1 ms timer while it served the change (every
    # sample, seconds): what a probe's round trip on that loop would include.
    loop_lag_s: tuple[float, ...] = ()
    # --probe-timing: round trips of the probes started during the change, per prober kind
    # ("process": ProberProcess, aviator run's default; "thread": ProberThread; "loop": on
    # the serving loop).
    probe_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def held_s(self) -> float | None:
        """Seconds until every simulated stream received the change; None if one did not."""
        if not self.times or any(t is None for t in self.times):
            return None
        return max(t for t in self.times if t is not None) - self.t_change

    def stream_s(self) -> list[float]:
        return [t - self.t_change for t in self.times if t is not None]

    @property
    def missed(self) -> int:
        return sum(t is None for t in self.times)

    @property
    def complete(self) -> bool:
        """Every simulated stream and every real Envoy received the change."""
        return self.missed == 0 and all(e is not None for e in self.envoy_s)


def summarize_changes(records: Sequence[ChangeRecord]) -> dict[str, Any]:
    """The figures of one scenario: all-held latency, per-stream latency, CPU, build, bytes."""
    held = [h for r in records if (h := r.held_s) is not None]
    streams = [s for r in records for s in r.stream_s()]
    cpu = [r.cpu_s for r in records if r.cpu_s is not None]
    out: dict[str, Any] = {
        "changes": len(records),
        "complete": sum(r.complete for r in records),
        "missed_receipts": sum(r.missed for r in records),
        "held_ms": _ms(spread(held)),
        "stream_ms": _ms(spread(streams)),
        "cpu_ms_per_update": _ms(spread(cpu)),
        "build_ms": _ms(spread([r.build_s for r in records])),
        "publish_ms": _ms(spread([r.publish_s for r in records])),
        "responses_per_change": _mean([r.responses for r in records]),
        "bytes_per_change": _mean([r.bytes for r in records]),
        "loop_lag_ms": _ms(spread([x for r in records for x in r.loop_lag_s])),
    }
    kinds = sorted({k for r in records for k in r.probe_s})
    if kinds:
        out["probe_rtt_ms"] = {
            k: _ms(spread([x for r in records for x in r.probe_s.get(k, ())])) for k in kinds
        }
    envoys = max((len(r.envoy_s) for r in records), default=0)
    if envoys:
        per_envoy = [
            [r.envoy_s[i] for r in records if r.envoy_s[i] is not None] for i in range(envoys)
        ]
        all_envoys = [
            max(e for e in r.envoy_s if e is not None)
            for r in records
            if r.envoy_s and all(e is not None for e in r.envoy_s)
        ]
        out["envoy_ms"] = [_ms(spread([v for v in vs if v is not None])) for vs in per_envoy]
        out["all_envoys_ms"] = _ms(spread(all_envoys))
        out["envoy_missed"] = sum(e is None for r in records for e in r.envoy_s)
    return out


def _ms(s: Mapping[str, float | None]) -> dict[str, float | None]:
    return {k: (None if v is None else v * 1000) for k, v in s.items()}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- goals ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Goal:
    text: str
    met: bool | None  # None: not measured in this run
    detail: str


def _find(
    runs: Iterable[Mapping[str, Any]], streams: int, endpoints: int
) -> list[Mapping[str, Any]]:
    return [
        r
        for r in runs
        if r["streams"] == streams and r["endpoints"] == endpoints and not r.get("envoys")
    ]


def evaluate_goals(runs: Sequence[Mapping[str, Any]]) -> list[Goal]:
    """The issue's goals: p99 change-to-all-held at two sizes, and the server's memory."""
    goals: list[Goal] = []
    for streams, endpoints, bound_ms in ((100, 1_000, 100.0), (1_000, 10_000, 1_000.0)):
        text = (
            f"{streams:,} streams × {endpoints:,} endpoints: one-workload change held by every "
            f"stream, p99 ≤ {bound_ms:,.0f} ms"
        )
        found = _find(runs, streams, endpoints)
        values = [
            (r["kind"], s["held_ms"]["p99"], s["complete"] == s["changes"])
            for r in found
            if (s := r["scenarios"].get("one")) is not None
        ]
        if not values:
            goals.append(Goal(text, None, "not measured"))
            continue
        met = all(p is not None and p <= bound_ms and complete for _, p, complete in values)
        detail = ", ".join(f"{k} {_fmt_ms(p)}" for k, p, _ in values)
        goals.append(Goal(text, met, detail))
    # Steady state: once every stream holds everything, and after the changes. The peak
    # includes every stream fetching everything at once (a fleet reconnecting together).
    for text, keys in (
        ("server resident memory ≤ 300 MB, steady state", ("rss_mb", "rss_mb_end")),
        ("server resident memory ≤ 300 MB, peak", ("peak_rss_mb",)),
    ):
        memory = [(str(r["label"]), max(float(r["server"][k]) for k in keys)) for r in runs]
        if not memory:
            goals.append(Goal(text, None, "not measured"))
            continue
        label, worst = max(memory, key=lambda x: x[1])
        goals.append(Goal(text, worst <= 300, f"largest {worst:.0f} MB ({label})"))
    return goals


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def _met(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


# -- text and Markdown ---------------------------------------------------------------------------

_COLUMNS = (
    "kind",
    "streams",
    "endpoints",
    "change",
    "n",
    "held p50",
    "held p99",
    "held max",
    "stream p50",
    "CPU/update",
    "build",
    "publish",
    "MB/change",
    "RSS",
    "peak RSS",
)


def _rows(runs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for r in runs:
        for which, s in r["scenarios"].items():
            held, cpu = s["held_ms"], s["cpu_ms_per_update"]
            missed = (
                f" ({s['changes'] - s['complete']} incomplete)"
                if s["complete"] < s["changes"]
                else ""
            )
            rows.append(
                [
                    r["kind"] + (f"+{len(r['envoys'])} envoy" if r.get("envoys") else ""),
                    f"{r['streams']:,}",
                    f"{r['endpoints']:,}",
                    which,
                    f"{s['changes']}{missed}",
                    _fmt_ms(held["p50"]),
                    _fmt_ms(held["p99"]),
                    _fmt_ms(held["max"]),
                    _fmt_ms(s["stream_ms"]["p50"]),
                    _fmt_ms(cpu["mean"]),
                    _fmt_ms(s["build_ms"]["mean"]),
                    _fmt_ms(s["publish_ms"]["mean"]),
                    f"{(s['bytes_per_change'] or 0) / 1e6:.2f}",
                    f"{r['server']['rss_mb']:.0f} MB",
                    f"{r['server']['peak_rss_mb']:.0f} MB",
                ]
            )
    return rows


def envoy_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for r in runs:
        if not r.get("envoys"):
            continue
        s = r["scenarios"]["one"]
        beside = f"beside {r['streams']:,} simulated streams" if r["streams"] else "alone"
        for i, kind in enumerate(r["envoys"]):
            e = s["envoy_ms"][i]
            lines.append(
                f"real Envoy {i + 1} ({kind}, {beside}, {r['endpoints']:,} endpoints): "
                f"change to held p50 {_fmt_ms(e['p50'])}, "
                f"p99 {_fmt_ms(e['p99'])}, max {_fmt_ms(e['max'])} over {s['changes']} changes"
            )
        a = s["all_envoys_ms"]
        lines.append(
            f"all {len(r['envoys'])} Envoys: p50 {_fmt_ms(a['p50'])}, p99 {_fmt_ms(a['p99'])}; "
            f"missed {s['envoy_missed']}; weights verified after "
            f"{r['envoy_verified']} changes, {r['envoy_mismatches']} mismatches "
            f"(polled every {r['envoy_poll_ms']:g} ms)"
        )
    return lines


def text_table(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = [list(_COLUMNS), *_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def markdown_table(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = _rows(runs)
    head = "| " + " | ".join(_COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(_COLUMNS))) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(r) + " |" for r in rows)])


def goal_lines(goals: Sequence[Goal]) -> list[str]:
    return [f"{_met(g.met):>12}  {g.text}: {g.detail}" for g in goals]


def markdown(doc: Mapping[str, Any]) -> str:
    """The figures as Markdown: machine, settings, table, real Envoys, goals."""
    m = doc["machine"]
    out = [
        "## Figures",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; Python {m['python']}, "
        f"grpcio {m['grpcio']}, protobuf {m['protobuf']}, Envoy {m['envoy']}.",
        "",
        markdown_table(doc["runs"]),
        "",
    ]
    envoy = envoy_lines(doc["runs"])
    if envoy:
        out += [*(f"- {line}" for line in envoy), ""]
    out += ["### Goals", ""]
    out += [f"- **{_met(Goal(**g).met)}**: {g['text']}: {g['detail']}" for g in doc["goals"]]
    return "\n".join(out) + "\n"

"""Summaries, goals and the Markdown table of the latency benchmark (pure: no I/O, no clock).

Runs are grouped by *case* (a scenario at one load); within a case, by policy. Every figure is
the median over the repetitions with the spread (min to max) beside it. Latency percentiles are
over every measured request, errors and timeouts included (a timeout counts at the deadline);
the error rate is reported beside them, because a fast 503 is fast.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aviator.bench.records import RunRecord

__all__ = [
    "GOAL_SIDECARS",
    "Goal",
    "PolicySummary",
    "Spread",
    "case_key",
    "do_no_harm",
    "evaluate_goals",
    "markdown",
    "summarize",
]

GOAL_SIDECARS: Final = 3
#: A goal is judged (met or not) only on at least this many repetitions of every policy in it,
#: each of which kept up (issue 13: "five repetitions at least").
MIN_REPEATS: Final = 5
PERCENTILES: Final = ("p50_ms", "p90_ms", "p99_ms", "p999_ms")
PERCENTILE_LABELS: Final = {"p50_ms": "p50", "p90_ms": "p90", "p99_ms": "p99", "p999_ms": "p99.9"}


def case_key(scenario: str, load_fraction: float, ramp: bool = False) -> str:
    """``antagonist@70`` (scenario at 70% load), or ``ramp`` (a ramp has its own loads)."""
    return scenario if ramp else f"{scenario}@{round(load_fraction * 100)}"


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and range of one figure over the repetitions (all 0 with no values)."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        vs = sorted(values)
        if not vs:
            return cls(0.0, 0.0, 0.0, 0)
        return cls(statistics.median(vs), vs[0], vs[-1], len(vs))

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}

    def text(self, digits: int = 1) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1 or self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


@dataclass(frozen=True, slots=True)
class PolicySummary:
    """One policy in one case, over its repetitions."""

    policy: str
    runs: int
    failed: int
    percentiles: Mapping[str, Spread]  # PERCENTILES → ms
    error_pct: Spread
    errors_total: int
    timeouts_total: int
    offered_rate: Spread
    achieved_ratio: Spread  # achieved / offered send rate of the generator
    keeping_up: bool  # every run's generator sent on time
    max_send_lag_p99_ms: float
    failures: tuple[str, ...]
    dropped_total: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "runs": self.runs,
            "failed": self.failed,
            "percentiles": {k: v.to_json() for k, v in self.percentiles.items()},
            "error_pct": self.error_pct.to_json(),
            "errors_total": self.errors_total,
            "timeouts_total": self.timeouts_total,
            "offered_rate": self.offered_rate.to_json(),
            "achieved_ratio": self.achieved_ratio.to_json(),
            "keeping_up": self.keeping_up,
            "max_send_lag_p99_ms": self.max_send_lag_p99_ms,
            "failures": list(self.failures),
            "dropped_total": self.dropped_total,
        }


def _summary(policy: str, records: Sequence[RunRecord]) -> PolicySummary:
    done = [r for r in records if r.ok and r.load is not None]
    loads = [r.load for r in done if r.load is not None]
    return PolicySummary(
        policy=policy,
        runs=len(records),
        failed=len(records) - len(done),
        percentiles={p: Spread.of(getattr(lr.latency_all, p) for lr in loads) for p in PERCENTILES},
        error_pct=Spread.of(100.0 * lr.error_rate for lr in loads),
        errors_total=sum(sum(lr.errors.values()) for lr in loads),
        timeouts_total=sum(lr.errors.get("timeout", 0) for lr in loads),
        offered_rate=Spread.of(lr.offered_rate for lr in loads),
        achieved_ratio=Spread.of(
            lr.achieved_rate / lr.offered_rate if lr.offered_rate else 1.0 for lr in loads
        ),
        keeping_up=bool(loads) and all(lr.keeping_up for lr in loads),
        max_send_lag_p99_ms=max((lr.send_lag.p99_ms for lr in loads), default=0.0),
        failures=tuple(r.error for r in records if r.error is not None),
        dropped_total=sum(lr.dropped or 0 for lr in loads),
    )


def summarize(
    records: Iterable[RunRecord], ramps: Iterable[str] = ()
) -> dict[str, dict[str, PolicySummary]]:
    """``{case: {policy: summary}}``, cases and policies in the order first seen."""
    ramp_names = set(ramps)
    grouped: dict[str, dict[str, list[RunRecord]]] = {}
    for r in records:
        key = case_key(r.scenario, r.load_fraction, r.scenario in ramp_names)
        grouped.setdefault(key, {}).setdefault(r.policy, []).append(r)
    return {
        case: {policy: _summary(policy, rs) for policy, rs in by_policy.items()}
        for case, by_policy in grouped.items()
    }


@dataclass(frozen=True, slots=True)
class Goal:
    """One target of the issue. ``met`` is None when the run did not measure it."""

    case: str
    text: str
    measured: str
    met: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "goal": self.text, "measured": self.measured, "met": self.met}


def _p(s: PolicySummary, name: str) -> float:
    return s.percentiles[name].median


def _judged(goal: Goal, sides: Sequence[PolicySummary]) -> Goal:
    """``goal`` as measured, or not judged (``met`` None, the reason appended) when a side has
    fewer than ``MIN_REPEATS`` completed runs or its generator fell behind in one of them."""
    if goal.met is None:
        return goal
    lagged = [s.policy for s in sides if not s.keeping_up]
    few = [s.policy for s in sides if s.runs - s.failed < MIN_REPEATS]
    why = []
    if lagged:
        why.append(f"generator fell behind for {', '.join(lagged)}")
    if few:
        why.append(f"fewer than {MIN_REPEATS} runs of {', '.join(few)}")
    if not why:
        return goal
    return Goal(goal.case, goal.text, f"{goal.measured}; not judged: {'; '.join(why)}", None)


def do_no_harm(summary: Mapping[str, Mapping[str, PolicySummary]]) -> list[Goal]:
    """Issue 13, item 3, in every case: Aviator's p99 ≤ 1.0x and p50 ≤ 1.05x least request's,
    and no more errors."""
    goals: list[Goal] = []
    for case, cs in summary.items():
        a, lr = cs.get("aviator"), cs.get("lr")
        if a is None or lr is None or a.runs == a.failed or lr.runs == lr.failed:
            continue
        for name, bound in (("p99_ms", 1.0), ("p50_ms", 1.05)):
            av, ov = _p(a, name), _p(lr, name)
            ratio = av / ov if ov > 0 else float("inf")
            label = PERCENTILE_LABELS[name]
            goals.append(
                _judged(
                    Goal(
                        case,
                        f"do no harm: Aviator {label} ≤ {bound:g}× lr {label}",
                        f"{av:.1f} ms vs {ov:.1f} ms (×{ratio:.2f})",
                        av <= bound * ov,
                    ),
                    (a, lr),
                )
            )
        goals.append(
            _judged(
                Goal(
                    case,
                    "do no harm: Aviator errors ≤ lr errors",
                    f"{a.errors_total} vs {lr.errors_total}",
                    a.errors_total <= lr.errors_total,
                ),
                (a, lr),
            )
        )
    return goals


def evaluate_goals(summary: Mapping[str, Mapping[str, PolicySummary]], sidecars: int) -> list[Goal]:
    """The issue's goals on the moving antagonist (≥ 3 sidecars): at 70% load Aviator's p99
    ≤ 0.5x least request's and ≤ 0.8x CSWRR's, p50 within 10% of the best, zero errors; at
    90% load p99 ≤ 0.3x least request's. Medians over the repetitions."""
    goals: list[Goal] = []

    def unmeasured(case: str, text: str, why: str) -> None:
        goals.append(Goal(case, text, why, None))

    def ratio_goal(case: str, cs: Mapping[str, PolicySummary], other: str, bound: float) -> None:
        text = f"Aviator p99 ≤ {bound:g}× {other} p99"
        if other not in cs or "aviator" not in cs:
            unmeasured(case, text, "not run")
            return
        a, o = _p(cs["aviator"], "p99_ms"), _p(cs[other], "p99_ms")
        if cs["aviator"].runs == cs["aviator"].failed or cs[other].runs == cs[other].failed:
            unmeasured(case, text, "runs failed")
            return
        ratio = a / o if o > 0 else float("inf")
        goal = Goal(case, text, f"{a:.1f} ms vs {o:.1f} ms (×{ratio:.2f})", a <= bound * o)
        goals.append(_judged(goal, (cs["aviator"], cs[other])))

    few = sidecars < GOAL_SIDECARS
    for load, bounds in (("70", {"lr": 0.5, "cswrr": 0.8}), ("90", {"lr": 0.3})):
        case = f"antagonist@{load}"
        cs = summary.get(case)
        texts = [f"Aviator p99 ≤ {b:g}× {o} p99" for o, b in bounds.items()]
        if load == "70":
            texts += ["Aviator p50 within 10% of the best p50", "zero errors with Aviator"]
        if cs is None or few:
            why = f"fewer than {GOAL_SIDECARS} sidecars" if few and cs else "not run"
            for text in texts:
                unmeasured(case, text, why)
            continue
        for other, bound in bounds.items():
            ratio_goal(case, cs, other, bound)
        if load != "70":
            continue
        ok = {k: v for k, v in cs.items() if v.runs > v.failed}
        if "aviator" not in ok:
            unmeasured(case, texts[-2], "not run")
            unmeasured(case, texts[-1], "not run")
            continue
        best_name = min(ok, key=lambda k: _p(ok[k], "p50_ms"))
        a50, best = _p(ok["aviator"], "p50_ms"), _p(ok[best_name], "p50_ms")
        goals.append(
            _judged(
                Goal(
                    case,
                    texts[-2],
                    f"{a50:.1f} ms vs best {best:.1f} ms ({best_name})",
                    a50 <= 1.1 * best,
                ),
                tuple(ok.values()),
            )
        )
        av = ok["aviator"]
        goals.append(
            _judged(
                Goal(
                    case,
                    texts[-1],
                    f"{av.errors_total} errors in {av.runs - av.failed} runs",
                    av.errors_total == 0,
                ),
                (av,),
            )
        )
    return goals + do_no_harm(summary)


def _met(m: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not judged"}[m]


def markdown(
    summary: Mapping[str, Mapping[str, PolicySummary]],
    goals: Sequence[Goal],
    *,
    title: str,
    setup: Sequence[str],
    case_notes: Mapping[str, str],
    plots: Mapping[str, Sequence[str]],
    labels: Mapping[str, str],
) -> str:
    """The report page: setup, one table per case, the goals. ``plots`` maps a case to
    image file names (relative to the page)."""
    out = [f"# {title}", ""]
    out += [f"- {line}" for line in setup]
    out.append("")
    out.append(
        "Latency in ms from the intended send time, over every measured request (errors and "
        "time-outs included), median over the repetitions with the range in brackets. "
        "*kept up*: in every run k6 dropped no iteration (no VU free at the intended time), "
        "its send lag (start of the iteration after its intended time) had p99 ≤ 20 ms and "
        "the achieved rate was ≥ 0.97 of the offered one; when it did not, the figures partly "
        "measure the generator. A goal is judged only when every policy in it kept up in at "
        f"least {MIN_REPEATS} repetitions; otherwise it reads *not judged*."
    )
    out.append("")
    for case, by_policy in summary.items():
        out.append(f"## {case}")
        out.append("")
        if case in case_notes:
            out += [case_notes[case], ""]
        out.append(
            "| policy | p50 | p90 | p99 | p99.9 | errors % | offered req/s | achieved/offered "
            "| dropped | lag p99 ms (max) | kept up | runs |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|")
        for name, s in by_policy.items():
            cells = [labels.get(name, name)]
            cells += [s.percentiles[p].text() for p in PERCENTILES]
            cells.append(s.error_pct.text(2))
            cells.append(s.offered_rate.text(0))
            cells.append(s.achieved_ratio.text(3))
            cells.append(str(s.dropped_total))
            cells.append(f"{s.max_send_lag_p99_ms:.1f}")
            cells.append("yes" if s.keeping_up else "**no**")
            cells.append(f"{s.runs - s.failed}/{s.runs}")
            out.append("| " + " | ".join(cells) + " |")
        failures = [f for s in by_policy.values() for f in s.failures]
        if failures:
            out.append("")
            out += [f"- failed run: `{f}`" for f in failures]
        out.append("")
        for image in plots.get(case, ()):
            out.append(f"![{case}]({image})")
        out.append("")
    out.append("## Goals")
    out.append("")
    out.append("| case | goal | measured | result |")
    out.append("|---|---|---|---|")
    for g in goals:
        out.append(f"| {g.case} | {g.text} | {g.measured} | {_met(g.met)} |")
    out.append("")
    return "\n".join(out)

"""Summaries, goals and the Markdown page, on made-up run records (pure)."""

from __future__ import annotations

import pytest

from aviator.bench.records import RunRecord
from aviator.bench.report import (
    Spread,
    case_key,
    do_no_harm,
    evaluate_goals,
    markdown,
    summarize,
)
from aviator.testbed.loadresult import LatencySummary, LoadResult
from aviator.testbed.loadspec import LoadSpec


def _load(p50: float, p99: float, *, errors: int = 0, achieved: float = 100.0) -> LoadResult:
    lat = LatencySummary(1000, p50, p50, p50 * 2, p99, p99 * 1.5, p99 * 2)
    return LoadResult(
        spec=LoadSpec(targets=("http://127.0.0.1:1",), duration_s=10.0),
        scheduled=1000,
        warmup=0,
        measured=1000,
        ok=1000 - errors,
        errors={"timeout": errors} if errors else {},
        offered_rate=100.0,
        achieved_rate=achieved,
        throughput=100.0,
        send_lag=LatencySummary(1000, 1, 1, 1, 2, 3, 4),
        latency_all=lat,
        latency_ok=lat,
        by_backend={"b0": 1000},
        latency_ok_by_backend={},
        per_second=(),
        max_outstanding=10,
        histogram_all="",
        histogram_ok="",
    )


def _record(
    policy: str,
    p50: float,
    p99: float,
    *,
    scenario: str = "antagonist",
    load: float = 0.7,
    repeat: int = 0,
    errors: int = 0,
    achieved: float = 100.0,
    failed: bool = False,
) -> RunRecord:
    return RunRecord(
        scenario=scenario,
        load_fraction=load,
        policy=policy,
        repeat=repeat,
        seed=repeat,
        sidecars=3,
        offered_rate=100.0,
        load=None if failed else _load(p50, p99, errors=errors, achieved=achieved),
        weights=(),
        backend_stats={},
        sidecar_stats={},
        wall_s=1.0,
        error="ControlPlaneError: not there" if failed else None,
    )


def test_spread_is_median_and_range() -> None:
    s = Spread.of([5.0, 1.0, 3.0, 100.0])
    assert (s.median, s.low, s.high, s.n) == (4.0, 1.0, 100.0, 4)
    assert s.text() == "4.0 (1.0–100.0)"
    assert Spread.of([]).text() == "–"
    assert Spread.of([2.0]).text() == "2.0"


def test_summary_takes_medians_over_repetitions_and_counts_failures() -> None:
    records = [
        _record("lr", 20, 300, repeat=0),
        _record("lr", 22, 500, repeat=1, errors=10),
        _record("lr", 30, 400, repeat=2, achieved=90.0),
        _record("aviator", 0, 0, failed=True),
    ]
    summary = summarize(records)
    assert list(summary) == ["antagonist@70"]
    lr = summary["antagonist@70"]["lr"]
    assert lr.percentiles["p99_ms"].median == 400
    assert (lr.percentiles["p99_ms"].low, lr.percentiles["p99_ms"].high) == (300, 500)
    assert lr.errors_total == 10
    assert lr.timeouts_total == 10
    assert lr.error_pct.high == pytest.approx(1.0)
    # One run sent at 90% of the offered rate: the case did not keep up.
    assert lr.achieved_ratio.low == pytest.approx(0.9)
    assert not lr.keeping_up
    av = summary["antagonist@70"]["aviator"]
    assert (av.runs, av.failed, av.failures) == (1, 1, ("ControlPlaneError: not there",))
    assert av.percentiles["p99_ms"].n == 0


def test_ramp_cases_ignore_the_load() -> None:
    assert case_key("ramp", 0.8, ramp=True) == "ramp"
    assert case_key("static", 0.7) == "static@70"
    summary = summarize([_record("rr", 1, 2, scenario="ramp", load=0.8)], ramps=["ramp"])
    assert list(summary) == ["ramp"]


def _five(policy: str, p50: float, p99: float, **kw: object) -> list[RunRecord]:
    """Five repetitions alike: the fewest on which a goal is judged."""
    return [_record(policy, p50, p99, repeat=i, **kw) for i in range(5)]  # type: ignore[arg-type]


def test_goals_met_and_missed() -> None:
    records = [
        *_five("lr", 20, 400),
        *_five("cswrr", 21, 110),
        *_five("aviator", 21.5, 100),
        *_five("lr", 25, 1000, load=0.9),
        *_five("aviator", 25, 400, load=0.9, errors=3),
    ]
    goals = {(g.case, g.text): g for g in evaluate_goals(summarize(records), sidecars=3)}
    assert goals[("antagonist@70", "Aviator p99 ≤ 0.5× lr p99")].met is True
    # 100 > 0.8 * 110
    assert goals[("antagonist@70", "Aviator p99 ≤ 0.8× cswrr p99")].met is False
    assert goals[("antagonist@70", "Aviator p50 within 10% of the best p50")].met is True
    assert goals[("antagonist@70", "zero errors with Aviator")].met is True
    assert goals[("antagonist@90", "Aviator p99 ≤ 0.3× lr p99")].met is False
    assert "×0.40" in goals[("antagonist@90", "Aviator p99 ≤ 0.3× lr p99")].measured


def test_goals_not_measured_without_the_case_or_enough_sidecars() -> None:
    records = [*_five("lr", 20, 400), *_five("aviator", 30, 100, errors=1)]
    goals = evaluate_goals(summarize(records), sidecars=3)
    by_text = {(g.case, g.text): g for g in goals}
    assert by_text[("antagonist@70", "Aviator p99 ≤ 0.8× cswrr p99")].met is None
    assert by_text[("antagonist@70", "Aviator p50 within 10% of the best p50")].met is False
    assert by_text[("antagonist@70", "zero errors with Aviator")].met is False
    assert by_text[("antagonist@90", "Aviator p99 ≤ 0.3× lr p99")].met is None
    few = evaluate_goals(summarize(records), sidecars=2)
    # The goals need 3 sidecars; do no harm holds in any setup.
    assert {g.met for g in few if not g.text.startswith("do no harm")} == {None}
    assert {
        g.measured for g in few if g.case == "antagonist@70" and not g.text.startswith("do no")
    } == {"fewer than 3 sidecars"}


def test_a_goal_is_not_judged_unless_every_side_kept_up_on_five_runs() -> None:
    # Aviator far better, but one of least request's runs lagged (90% of the offered rate).
    lagged = [
        *_five("lr", 20, 400)[:4],
        _record("lr", 20, 400, repeat=4, achieved=90.0),
        *_five("aviator", 20, 100),
    ]
    goals = {(g.case, g.text): g for g in evaluate_goals(summarize(lagged), sidecars=3)}
    g = goals[("antagonist@70", "Aviator p99 ≤ 0.5× lr p99")]
    assert g.met is None
    assert "generator fell behind for lr" in g.measured
    three = [*_five("lr", 20, 400)[:3], *_five("aviator", 20, 100)[:3]]
    goals = {(g.case, g.text): g for g in evaluate_goals(summarize(three), sidecars=3)}
    g = goals[("antagonist@70", "Aviator p99 ≤ 0.5× lr p99")]
    assert g.met is None
    assert "fewer than 5 runs" in g.measured


def test_do_no_harm_is_judged_in_every_case() -> None:
    records = [
        *_five("lr", 20, 400, scenario="plain-tight"),
        *_five("aviator", 20.5, 390, scenario="plain-tight"),
        *_five("lr", 20, 400, scenario="static"),
        *_five("aviator", 22, 300, scenario="static", errors=1),
    ]
    goals = {(g.case, g.text): g.met for g in do_no_harm(summarize(records))}
    assert goals == {
        ("plain-tight@70", "do no harm: Aviator p99 ≤ 1× lr p99"): True,
        ("plain-tight@70", "do no harm: Aviator p50 ≤ 1.05× lr p50"): True,
        ("plain-tight@70", "do no harm: Aviator errors ≤ lr errors"): True,
        ("static@70", "do no harm: Aviator p99 ≤ 1× lr p99"): True,
        ("static@70", "do no harm: Aviator p50 ≤ 1.05× lr p50"): False,  # 22 > 21
        ("static@70", "do no harm: Aviator errors ≤ lr errors"): False,
    }


def test_markdown_has_a_row_per_policy_and_the_goals() -> None:
    records = [_record("lr", 20, 400), _record("aviator", 0, 0, failed=True)]
    summary = summarize(records)
    page = markdown(
        summary,
        evaluate_goals(summary, sidecars=3),
        title="T",
        setup=["one line"],
        case_notes={"antagonist@70": "note"},
        plots={"antagonist@70": ["a.png"]},
        labels={"lr": "least request"},
    )
    assert page.startswith("# T\n\n- one line\n")
    assert (
        "| least request | 20.0 | 40.0 | 400.0 | 600.0 | 0.00 | 100 | 1.000 | 0 | 2.0 | yes | 1/1 |"
        in page
    )
    assert "| aviator | – | – | – | – | – | – | – | 0 | 0.0 | **no** | 0/1 |" in page
    assert "- failed run: `ControlPlaneError: not there`" in page
    assert "![antagonist@70](a.png)" in page
    assert "| antagonist@90 | Aviator p99 ≤ 0.3× lr p99 | not run | not judged |" in page

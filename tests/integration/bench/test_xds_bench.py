"""`aviator bench xds`: options, the fleet both sides replay, the figures, and a short real run.

The short run starts the real server and client processes (and one real Envoy), makes a few
changes, and checks that the output is complete and consistent: every simulated stream and the
Envoy received every change, latencies are positive and ordered, CPU and memory were measured,
and Envoy's weights matched each change. It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from aviator.bench import xds
from aviator.bench.xds_report import ChangeRecord, evaluate_goals, percentile, summarize_changes
from aviator.bench.xds_server import MAX_SEQ, Fleet, FleetShape, cla_bytes, weight
from aviator.xds import resources as r
from aviator.xds.snapshot import build_snapshot


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    xds.configure(parser)
    return parser.parse_args(list(argv))


def test_options_and_quick_defaults() -> None:
    s = xds.settings_from_args(_args())
    assert (s.streams, s.endpoints, s.kinds) == (
        (10, 100, 1000),
        (100, 1000, 10000),
        ("sotw", "delta"),
    )
    quick = xds.settings_from_args(_args("--quick", "--envoys", "0"))
    assert quick.streams == (10, 100)
    assert quick.envoys == 0  # an explicit option wins over --quick
    custom = xds.settings_from_args(_args("--streams", "5,5,50", "--envoy-poll-ms", "4"))
    assert custom.streams == (5, 50)
    assert custom.envoy_poll_s == pytest.approx(0.004)
    with pytest.raises(ValueError, match="unknown --kinds"):
        xds.settings_from_args(_args("--kinds", "sotw,xml"))
    with pytest.raises(ValueError, match="at most 999 changes"):
        xds.settings_from_args(_args("--changes", "990", "--all-changes", "10"))
    with pytest.raises(SystemExit):
        _args("--streams", "ten")
    assert xds.run(_args("--per-workload", "0")) == 2


def test_plan_runs_the_grid_then_the_envoys() -> None:
    s = xds.Settings(streams=(100, 10), endpoints=(1000, 100), envoys=3, envoy_streams=(7, 0))
    runs = xds.plan_runs(s)
    grid = [(p.endpoints, p.streams, p.kind) for p in runs[:-2]]
    assert grid == [(e, n, k) for e in (100, 1000) for n in (10, 100) for k in ("sotw", "delta")]
    for last, streams in zip(runs[-2:], (7, 0), strict=True):
        assert last.envoys == ("sotw", "delta", "sotw")
        assert (last.streams, last.all_changes) == (streams, 0)
    only = xds.settings_from_args(_args("--no-grid", "--envoy-streams", "5"))
    assert [(p.streams, len(p.envoys)) for p in xds.plan_runs(only)] == [(5, 2)]


def test_fleet_shapes_and_changes() -> None:
    assert FleetShape.for_endpoints(10_000, 10) == FleetShape(1000, 10)
    assert FleetShape.for_endpoints(95, 10) == FleetShape(10, 10)  # whole workloads
    assert FleetShape.for_endpoints(5, 10) == FleetShape(1, 5)
    fleet = Fleet(FleetShape(7, 3))
    before = {w.key: w for w in fleet.workloads()}
    (one,) = fleet.change(1, "one")
    assert one != before[one.key]
    assert [e.weight for e in one.endpoints] == [weight(1, fleet.target(1), j) for j in range(3)]
    changed = fleet.change(2, "all")
    assert [w.key for w in changed] == sorted(before)
    assert all(w != before[w.key] for w in changed)
    addresses = {e.address for w in fleet.workloads() for e in w.endpoints}
    assert len(addresses) == 21
    with pytest.raises(ValueError, match="from 1 to"):
        fleet.change(MAX_SEQ + 1, "one")


def test_every_change_is_material_for_its_workload() -> None:
    # Weights of one workload repeat only after 1,000 changes: every change below is new.
    patterns = {tuple(weight(seq, 3, j) for j in range(10)) for seq in range(MAX_SEQ + 1)}
    assert len(patterns) == MAX_SEQ + 1


def test_needles_are_the_bytes_the_server_sends() -> None:
    fleet = Fleet(FleetShape(4, 2))
    (changed,) = fleet.change(5, "one")
    snapshot = build_snapshot(fleet.workloads())
    entry = snapshot.of_type(r.ENDPOINT_TYPE)[changed.key.cluster_name]
    assert cla_bytes(changed) == entry.any.value


def test_summaries_and_goals() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(range(1, 101)), 0.99) == 99
    records = [
        ChangeRecord(1, "one", 100.0, 0.001, 0.002, 0.01, (100.02, 100.05), 2, 800, (0.03,)),
        ChangeRecord(2, "one", 200.0, 0.001, 0.002, None, (200.01, None), 1, 400, (None,)),
    ]
    s = summarize_changes(records)
    assert (s["changes"], s["complete"], s["missed_receipts"], s["envoy_missed"]) == (2, 1, 1, 1)
    assert s["held_ms"]["p99"] == pytest.approx(50.0)
    assert s["stream_ms"]["max"] == pytest.approx(50.0)
    assert s["cpu_ms_per_update"]["mean"] == pytest.approx(10.0)
    assert s["envoy_ms"][0]["p50"] == pytest.approx(30.0)
    assert s["loop_lag_ms"]["max"] is None  # no samples
    lagged = ChangeRecord(3, "all", 0.0, 0.0, 0.0, 0.01, (0.1,), 1, 1, loop_lag_s=(0.002, 0.009))
    assert summarize_changes([lagged])["loop_lag_ms"]["max"] == pytest.approx(9.0)

    def run(streams: int, endpoints: int, p99: float, peak: float) -> dict[str, Any]:
        one = {"held_ms": {"p99": p99}, "complete": 3, "changes": 3}
        return {
            "label": f"{streams}x{endpoints}",
            "kind": "sotw",
            "streams": streams,
            "endpoints": endpoints,
            "envoys": [],
            "scenarios": {"one": one},
            "server": {"rss_mb": peak / 2, "rss_mb_end": peak / 3, "peak_rss_mb": peak},
        }

    goals = evaluate_goals([run(100, 1000, 80.0, 120.0), run(1000, 10_000, 1500.0, 400.0)])
    assert [g.met for g in goals] == [True, False, True, False]
    assert "largest 200 MB (1000x10000)" in goals[2].detail
    assert "largest 400 MB (1000x10000)" in goals[3].detail
    assert [g.met for g in evaluate_goals([])] == [None, None, None, None]


@pytest.mark.envoy
def test_short_run_writes_consistent_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, md = tmp_path / "xds.json", tmp_path / "xds.md"
    args = _args(
        "--streams", "3",
        "--endpoints", "20",
        "--per-workload", "5",
        "--changes", "4",
        "--all-changes", "2",
        "--envoys", "1",
        "--envoy-endpoints", "20",
        "--envoy-streams", "2,0",
        "--envoy-changes", "4",
        "--gap-ms", "5",
        "--json", str(out),
        "--markdown", str(md),
    )  # fmt: skip
    assert xds.run(args) == 0
    printed = capsys.readouterr().out
    assert "held p99" in printed
    assert "real Envoy 1 (sotw, beside 2 simulated streams, 20 endpoints)" in printed
    assert "real Envoy 1 (sotw, alone, 20 endpoints)" in printed

    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    assert doc["errors"] == []
    runs = doc["runs"]
    assert [(r["kind"], r["streams"], r["envoys"]) for r in runs] == [
        ("sotw", 3, []),
        ("delta", 3, []),
        ("sotw", 2, ["sotw"]),
        ("sotw", 0, ["sotw"]),  # the Envoy alone
    ]
    for run in runs:
        assert (run["endpoints"], run["workloads"], run["per_workload"]) == (20, 4, 5)
        server = run["server"]
        assert 0 < server["rss_mb_before_streams"] <= server["peak_rss_mb"] < 2048
        assert server["rss_mb"] <= server["peak_rss_mb_sync"] <= server["peak_rss_mb"]
        assert server["cpu_s_changes"] > 0
        expected = {"one": 4} if run["envoys"] else {"one": 4, "all": 2}
        assert {k: s["changes"] for k, s in run["scenarios"].items()} == expected
        for s in run["scenarios"].values():
            assert s["complete"] == s["changes"]
            assert s["missed_receipts"] == 0
            assert s["cpu_ms_per_update"]["mean"] > 0
            assert 0 < s["server_rss_mb_after"] <= s["server_peak_rss_mb_after"]
            if not run["streams"]:
                assert s["held_ms"]["p50"] is None  # nothing simulated to measure
                continue
            held, stream = s["held_ms"], s["stream_ms"]
            assert 0 < stream["p50"] <= held["p50"] <= held["p99"] <= held["max"]
            assert stream["max"] <= held["max"]
            # One response per stream per change (the needles were all found in it).
            assert s["responses_per_change"] == run["streams"]
            assert s["bytes_per_change"] > 0
            for rec in s["records"]:
                assert rec["missed"] == 0
                assert rec["held_ms"] > 0
                assert rec["loop_lag_ms_max"] >= 0
            # The server's loop was sampled while it served the changes.
            assert 0 <= s["loop_lag_ms"]["p50"] <= s["loop_lag_ms"]["max"]
        one = run["scenarios"]["one"]
        if "all" in run["scenarios"]:
            # Every workload changes at once: four CLAs per response instead of one.
            assert run["scenarios"]["all"]["bytes_per_change"] > 3 * one["bytes_per_change"]
    for envoy_run in runs[-2:]:
        one = envoy_run["scenarios"]["one"]
        assert one["envoy_missed"] == 0
        assert envoy_run["envoy_verified"] == 4
        assert envoy_run["envoy_mismatches"] == 0
        (envoy,) = one["envoy_ms"]
        assert 0 < envoy["p50"] <= envoy["p99"] <= envoy["max"]
        assert all(len(r["envoy_ms"]) == 1 and r["envoy_ms"][0] > 0 for r in one["records"])
    assert [g["met"] for g in doc["goals"]] == [None, None, True, True]

    page = md.read_text()
    assert "| kind | streams | endpoints |" in page
    assert "real Envoy 1 (sotw, alone" in page
    assert "### Goals" in page


def test_probe_timing_runs_the_three_probers_side_by_side(tmp_path: Path) -> None:
    """--probe-timing (issue 13, item 6): the server probes a backend from a child process, a
    thread and its serving loop; each one's round trips at rest are reported."""
    out = tmp_path / "xds.json"
    args = _args(
        "--streams", "3",
        "--endpoints", "20",
        "--per-workload", "5",
        "--changes", "2",
        "--all-changes", "1",
        "--envoys", "0",
        "--kinds", "sotw",
        "--probe-timing",
        "--json", str(out),
    )  # fmt: skip
    assert xds.run(args) == 0
    (run,) = json.loads(out.read_text())["runs"]
    quiet = run["probe_quiet_rtt_ms"]
    assert set(quiet) == {"process", "thread", "loop"}
    for figures in quiet.values():
        assert 0 < figures["p50"] <= figures["p99"] <= figures["max"]

"""A short real run of `aviator bench latency`: fleet, three Envoy sidecars, open-loop load.

It checks that the output is complete and consistent and that the figures are sane (counts
add up, percentiles are ordered, the fast-failing backend is the one failing, CSWRR's weights
come from the ORCA reports while round robin's stay equal). It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from aviator.bench import latency

PNG = b"\x89PNG\r\n\x1a\n"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    latency.configure(parser)
    return parser.parse_args(list(argv))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        latency.settings_from_args(_args("--policies", "rr,nope"))
    with pytest.raises(ValueError, match="--repeat must be >= 1"):
        latency.settings_from_args(_args("--repeat", "0"))
    with pytest.raises(SystemExit):
        _args("--load", "0.7,x")
    s = latency.settings_from_args(_args("--scenario", "static,ramp", "--load", "0.7,0.9"))
    # A ramp brings its own loads: it runs once.
    assert [c.key for c in s.cases] == ["static@70", "static@90", "ramp"]
    assert (s.repeat, s.sidecars, s.deadline_s) == (5, 3, 5.0)
    assert s.cases[0].plan.duration_s == 30.0
    assert s.cases[0].plan.warmup_s == 5.0
    quick = latency.settings_from_args(_args("--quick"))
    assert (quick.repeat, quick.shape.backends) == (1, 4)
    assert [c.key for c in quick.cases] == [
        "static@70",
        "antagonist@70",
        "antagonist-fast@70",
        "plain-tight@70",
        "plain-tight-fast@70",
        "plain-loose@70",
        "hidden@70",
        "fastfail@70",
        "ramp",
    ]
    # A scenario's threshold is a multiple of the mean service time (20 ms).
    plain = next(c for c in quick.cases if c.key == "plain-tight@70")
    assert latency.case_control_plane(quick, plain).latency_threshold_ms == 25
    with pytest.raises(ValueError, match="--thinning"):
        latency.settings_from_args(_args("--thinning", "0"))


def _sane(lat: dict[str, Any]) -> None:
    values = [lat[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")]
    assert values[0] > 0
    assert values == sorted(values)


@pytest.mark.envoy
def test_quick_run_writes_consistent_results(tmp_path: Path) -> None:
    args = _args(
        "--quick",
        "--scenario",
        "fastfail",
        "--policies",
        "rr,cswrr,aviator",
        "--load",
        "0.5",
        "--duration",
        "4",
        "--out",
        str(tmp_path),
        "--traces",
    )
    assert latency.run(args) == 0

    doc = json.loads((tmp_path / "latency.json").read_text())
    assert doc["complete"] is True
    assert doc["settings"]["sidecars"] == 3
    case = doc["cases"]["fastfail@50"]
    runs = {r["policy"]: r for r in doc["runs"]}
    assert set(runs) == {"rr", "cswrr", "aviator"}
    for name, r in runs.items():
        assert r["error"] is None, r["error"]
        load = r["load"]
        assert load["measured"] > 0
        assert load["measured"] == load["ok"] + sum(load["errors"].values())
        assert sum(load["by_backend"].values()) == load["measured"]
        # k6's uniform lattice at the planned mean rate (the rate is rounded to 0.1/s).
        assert load["offered_rate"] == pytest.approx(case["mean_rate"], rel=0.02)
        assert load["generator"] == "k6"
        assert load["dropped"] is not None
        assert r["generator"]["vus"] >= 1
        assert load["achieved_rate"] > 0
        _sane(load["latency_all"])
        # Only backend 0 fails.
        stats = r["backend_stats"]
        assert [stats[b]["failed_fast"] for b in ("b1", "b2", "b3")] == [0, 0, 0]
        assert r["sidecar_stats"]["upstream_rq_total"] >= load["measured"]
        assert r["weights"], name
    # Round robin: every backend gets traffic, the weights stay as configured (1).
    assert set(runs["rr"]["load"]["by_backend"]) >= {"b0", "b1", "b2", "b3"}
    assert {w for s in runs["rr"]["weights"] for w in s["weight"].values()} == {1}
    assert runs["rr"]["backend_stats"]["b0"]["failed_fast"] > 0
    assert runs["rr"]["load"]["errors"].get("http_503", 0) > 0
    # CSWRR computes its own weights from the backends' ORCA header.
    assert {w for s in runs["cswrr"]["weights"] for w in s["weight"].values()} - {1}
    # Aviator's sidecars hold the EDS weights `aviator run` pushed for every backend.
    aviator = runs["aviator"]["weights"]
    assert {w for s in aviator for w in s["weight"].values()} - {1}
    assert all(set(s["weight"]) == {"b0", "b1", "b2", "b3"} for s in aviator)

    # --traces: the Aviator run's polls of the control plane and the first sidecar, on load
    # time; the other policies have no control plane to poll.
    traced = json.loads((tmp_path / "latency-traces.json").read_text())["runs"]
    assert [(t["case"], t["policy"]) for t in traced] == [("fastfail@50", "aviator")]
    polls = traced[0]["traces"]
    assert len(polls) > 10
    assert all(0.0 <= p["t"] <= 4.0 for p in polls)
    assert [p["t"] for p in polls] == sorted(p["t"] for p in polls)
    assert set(polls[-1]["control"]) == set(polls[-1]["envoy"]) == {"b0", "b1", "b2", "b3"}
    assert {"latency_ms", "rif", "weight", "hot"} <= set(polls[-1]["control"]["b0"])
    assert "traces" not in runs["aviator"]

    assert set(doc["summary"]["fastfail@50"]) == {"rr", "cswrr", "aviator"}
    page = (tmp_path / "latency.md").read_text()
    assert "## fastfail@50" in page
    assert "| round robin |" in page
    assert "| client-side WRR (ORCA) |" in page
    assert "| Aviator |" in page
    assert "## Goals" in page
    for suffix in ("percentiles", "share", "p99", "weights"):
        png = tmp_path / f"latency-fastfail-50-{suffix}.png"
        assert png.read_bytes()[:8] == PNG
        assert f"]({png.name})" in page

"""A short run of ``aviator bench probe``: the figures are sane (no timing assertion)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from aviator.bench import probe


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    probe.configure(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("rate", ["0", "400"], ids=["saturating", "paced"])
def test_short_run_prints_and_writes_sane_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rate: str
) -> None:
    out = tmp_path / "probe.json"
    args = _args(
        "--endpoints", "20", "--ports", "4", "--duration", "1", "--warmup", "0.3",
        "--offered-rate", rate, "--repeat", "2", "--json", str(out),
    )  # fmt: skip
    assert probe.run(args) == 0
    printed = capsys.readouterr().out
    assert "probes/s" in printed
    assert "CPU µs / probe" in printed
    figures = json.loads(out.read_text())
    assert figures["endpoints"] == 20
    assert figures["mode"] == ("saturating" if rate == "0" else "paced")
    assert figures["probes"] > 0
    assert figures["outcomes"].get("ok", 0) == figures["probes"]  # the backends never fail
    assert math.isclose(figures["probes_per_s"], figures["probes"] / figures["duration_s"])
    assert 0 < figures["cpu_s_per_probe"] < 1
    assert figures["cpu_s"] == pytest.approx(figures["cpu_s_per_probe"] * figures["probes"])
    assert figures["probes_per_cpu_s"] == pytest.approx(1 / figures["cpu_s_per_probe"])
    assert 0 < figures["rtt_ms_p50"] <= figures["rtt_ms_p99"]
    # The bare aiohttp loop on the same backends, in the same run, and the ratio.
    assert "bare aiohttp" in printed
    assert "prober CPU per probe / bare loop's" in printed
    bare = figures["bare"]
    assert bare["probes"] > 0
    assert bare["outcomes"] == {"ok": bare["probes"]}
    assert 0 < bare["cpu_s_per_probe"] < 1
    assert figures["overhead"] == pytest.approx(
        figures["cpu_s_per_probe"] / bare["cpu_s_per_probe"]
    )
    assert len(figures["overhead_per_repeat"]) == 2
    assert figures["repeat"] == 2
    assert figures["child_cpu_s"] == 0  # the prober ran here
    # The prober in a process of its own, in the same run: the child's CPU counted too.
    assert "prober in a process CPU per probe / bare loop's" in printed
    process = figures["process"]
    assert process["probes"] > 0
    assert process["outcomes"] == {"ok": process["probes"]}
    assert 0 < process["child_cpu_s"] < process["cpu_s"]  # it probed; this process unpickled
    assert process["overhead"] == pytest.approx(
        process["cpu_s_per_probe"] / bare["cpu_s_per_probe"]
    )
    assert len(process["overhead_per_repeat"]) == 2


def test_rejects_nonsense_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.run(_args("--endpoints", "0")) == 2
    assert "--endpoints" in capsys.readouterr().out
    assert probe.run(_args("--repeat", "0")) == 2
    assert "--repeat" in capsys.readouterr().out

"""``aviator bench k8s`` in a tiny configuration, so that it cannot rot: the real API server,
``aviator run --source kubernetes`` and a real Envoy, one repetition, 20 pods.

It asserts that every figure was measured and is consistent (Envoy held what was applied,
latencies are positive and ordered, the served pods were probed and answered, memory and CPU
were read), never how fast anything was. The option checks and the figures' arithmetic run
without the API server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aviator.bench import k8s
from aviator.testbed.kubeapi import ROOT


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    k8s.configure(parser)
    return parser.parse_args(list(argv))


def test_options() -> None:
    s = k8s.settings_from_args(_args())
    assert (s.repetitions, s.pods, s.variants, s.rest_s) == (
        5,
        (1_000, 10_000),
        ("idle", "served"),
        30.0,
    )
    custom = k8s.settings_from_args(_args("--pods", "10_000,20,20", "--poll-ms", "2"))
    assert custom.pods == (20, 10_000)
    assert custom.poll_s == pytest.approx(0.002)
    assert not k8s.settings_from_args(_args("--no-listeners")).listeners
    with pytest.raises(ValueError, match="unknown --variants"):
        k8s.settings_from_args(_args("--variants", "idle,busy"))
    with pytest.raises(SystemExit):
        _args("--pods", "many")
    assert k8s.run(_args("--repetitions", "0")) == 2


def test_summaries_and_addresses() -> None:
    assert k8s.summarize([3.0, 1.0, 2.0]) == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0}
    assert k8s.summarize([1.0, 4.0])["median"] == 2.5
    assert k8s.summarize([]) == {"n": 0, "median": None, "min": None, "max": None}
    addresses = {k8s.pod_ip(i) for i in range(60_000)}
    assert len(addresses) == 60_000
    assert k8s.pod_ip(0) == "127.10.0.1"
    assert all(a.startswith("127.") and not a.endswith(".0") for a in addresses)
    text = (
        "ns/web::observability_name::ns/web\n"
        "ns/web::127.0.1.1:8080::cx_active::0\n"
        "ns/web::127.0.1.1:8080::health_flags::healthy\n"
        "ns/web::127.0.1.2:8080::health_flags::/failed_active_hc\n"
        "other::127.0.9.9:80::health_flags::healthy\n"
    )
    assert k8s.parse_clusters_text(text) == {
        "ns/web": {"127.0.1.1:8080", "127.0.1.2:8080"},
        "other": {"127.0.9.9:80"},
    }


def _bench(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aviator", "bench", "k8s", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_missing_binaries_say_how_to_build_them(tmp_path: Path) -> None:
    env = {**os.environ, "KUBE_APISERVER": str(tmp_path / "no-such-apiserver")}
    proc = _bench("--repetitions", "1", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "make kube-testenv" in proc.stdout
    assert "no-such-apiserver" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.envoy
def test_a_tiny_run_measures_everything(tmp_path: Path) -> None:
    out, md = tmp_path / "k8s.json", tmp_path / "k8s.md"
    proc = _bench(
        "--repetitions", "1", "--pods", "20", "--rest", "2", "--settle", "1.5",
        "--ping-interval", "500ms", "--workdir", str(tmp_path / "work"),
        "--json", str(out), "--markdown", str(md),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = json.loads(out.read_text())

    for part in ("latency", "latency_with_pods"):
        lat = results[part]
        assert lat["policy_from_start_s"]["n"] == 1
        start, after_exit = (
            lat["samples"]["policy_from_start_s"][0],
            lat["samples"]["policy_from_exit_s"][0],
        )
        kubectl = lat["samples"]["kubectl_s"][0]
        assert 0 < after_exit < start
        assert start == pytest.approx(after_exit + kubectl)
        assert 0 < lat["samples"]["patch_s"][0] < lat["samples"]["pod_ready_s"][0]
        assert 0 < lat["poll_resolution_s"]["median"] < 1.0
    assert results["latency_with_pods"]["pods"] == 20

    assert set(results["rest"]) == {"20 pods, idle", "20 pods, served"}
    idle, served = results["rest"]["20 pods, idle"], results["rest"]["20 pods, served"]
    for rest in (idle, served):
        assert rest["pods"] == 20
        assert rest["rss_mb"]["median"] > 20
        assert rest["peak_rss_mb"]["median"] >= rest["rss_mb"]["median"]
        assert rest["cpu_pct"]["median"] >= 0
        assert rest["sync_s"]["median"] > 0
    assert idle["probed_share"]["n"] == 0  # no policy: nothing probed
    # Every served pod was probed (every 500 ms for 1.5 s + 2 s) and answered by a listener.
    assert served["probed_share"]["median"] == 1.0
    assert served["probe_error_rate"]["median"] < 0.5  # --no-listeners: 1.0
    assert served["listeners_cpu_pct"]["n"] == 1

    assert "policy applied → Envoy holds it" in proc.stdout
    table = md.read_text()
    assert "| 20 pods, served: RSS at rest |" in table
    assert "load average" in table.lower()

"""The directory source the benchmark writes for `aviator run` resolves to its backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from aviator.bench.controlplane import ControlPlaneSettings, manifests, write_manifests
from aviator.bench.policies import WORKLOAD
from aviator.k8s.resolve import resolve_state
from aviator.model import EndpointAddress
from aviator.source.directory import load_directory


def test_manifests_resolve_to_one_endpoint_per_backend(tmp_path: Path) -> None:
    ports = {"b0": 31000, "b1": 31001, "b2": 31002}
    settings = ControlPlaneSettings(
        ping_interval_ms=50, latency_threshold_ms=80, probe_timeout_ms=40
    )
    write_manifests(tmp_path, manifests(ports, settings))
    state = load_directory(tmp_path)
    (resolution,) = resolve_state(state)
    assert resolution.serving, resolution.conditions
    assert resolution.key == WORKLOAD
    assert [e.address for e in resolution.endpoints] == [
        EndpointAddress("127.0.0.1", p) for p in sorted(ports.values())
    ]
    assert [e.probe_port for e in resolution.endpoints] == sorted(ports.values())
    policy = resolution.policy
    assert policy is not None
    assert policy.ping_interval.seconds == pytest.approx(0.05)
    assert policy.latency_threshold.seconds == pytest.approx(0.08)
    assert policy.probe.timeout.seconds == pytest.approx(0.04)
    assert policy.probe.path == "/aviator/probe"


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="ping interval must be >= 10 ms"):
        ControlPlaneSettings(ping_interval_ms=5, probe_timeout_ms=5)
    with pytest.raises(ValueError, match="probe timeout"):
        ControlPlaneSettings(ping_interval_ms=50, probe_timeout_ms=60)
    with pytest.raises(ValueError, match="at least one pod"):
        manifests({})

"""Probe targets and results validate at construction."""

from __future__ import annotations

import math

import pytest

from aviator.model import EndpointAddress, WorkloadKey
from aviator.probing.results import ProbeKey, ProbeOutcome, ProbeResult, ProbeTarget


def test_target_defaults_and_url() -> None:
    target = ProbeTarget("10.1.2.3", 8080)
    assert target.path == "/aviator/probe"
    assert target.url == "http://10.1.2.3:8080/aviator/probe"
    assert ProbeTarget("fd00::1", 80, path="/p").url == "http://[fd00::1]:80/p"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ip": "pod-a"}, "does not appear to be an IPv4 or IPv6 address"),
        ({"port": 0}, "probe port"),
        ({"path": "probe"}, "must start with '/'"),
        ({"interval_s": 0.0}, "interval_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
    ],
)
def test_target_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"ip": "10.0.0.1", "port": 80, **kwargs}
    with pytest.raises(ValueError, match=message):
        ProbeTarget(**args)  # type: ignore[arg-type]


def test_result_validation_and_rtt() -> None:
    result = ProbeResult(ProbeOutcome.OK, 1.0, 1.25, timeout_s=1.0, status=200)
    assert result.ok
    assert result.rtt_s == 0.25
    assert not ProbeResult(ProbeOutcome.TIMEOUT, 1.0, 2.0, timeout_s=1.0).ok
    with pytest.raises(ValueError, match="before it started"):
        ProbeResult(ProbeOutcome.OK, 2.0, 1.0, timeout_s=1.0)
    with pytest.raises(ValueError, match="finite"):
        ProbeResult(ProbeOutcome.OK, math.nan, 1.0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        ProbeResult(ProbeOutcome.OK, 1.0, 1.0, timeout_s=0.0)


def test_probe_key_orders_and_prints() -> None:
    a = ProbeKey(WorkloadKey("ns", "web"), EndpointAddress("10.0.0.2", 80))
    b = ProbeKey(WorkloadKey("ns", "web"), EndpointAddress("10.0.0.10", 80))
    assert str(a) == "ns/web@10.0.0.2:80"
    # Addresses order as text (then port): deterministic, not numeric.
    assert sorted([a, b]) == [b, a]
    assert len({a, b, ProbeKey(WorkloadKey("ns", "web"), EndpointAddress("10.0.0.2", 80))}) == 2

"""Builders shared by the probing unit tests."""

from __future__ import annotations

from aviator.model import EndpointAddress
from aviator.probing.estimator import EndpointStats


def addr(i: int, port: int = 8080) -> EndpointAddress:
    return EndpointAddress(f"10.0.{i // 250}.{i % 250 + 1}", port)


def stats(
    latency_ms: float,
    rif: float | None = None,
    *,
    error_rate: float = 0.0,
    samples: int = 10,
) -> EndpointStats:
    latency = latency_ms / 1000.0
    return EndpointStats(
        latency_s=latency,
        probe_latency_s=latency,
        reported_latency_s=None,
        rif=rif,
        error_rate=error_rate,
        samples=samples,
        age_s=0.0,
        consecutive_failures=0,
    )

"""What the prober probes and what a probe yields: plain values shared by prober and estimator.

Pure: no I/O, no clock. Times are in seconds on whatever clock the prober was given
(the event loop's by default); only differences between them mean anything.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass

from aviator_agent.orca import OrcaLoadReport

from aviator.model import EndpointAddress, WorkloadKey

__all__ = ["DEFAULT_PROBE_PATH", "ProbeKey", "ProbeOutcome", "ProbeResult", "ProbeTarget"]

DEFAULT_PROBE_PATH = "/aviator/probe"


@dataclass(frozen=True, slots=True, order=True)
class ProbeKey:
    """The usual key of a probe target: one endpoint of one policy's workload.

    The prober accepts any hashable key; this is the one the composition root uses, so that
    the same pod probed for two workloads (different ports or paths) is two targets.
    """

    workload: WorkloadKey
    address: EndpointAddress

    def __str__(self) -> str:
        return f"{self.workload}@{self.address}"


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Where and how often to probe: ``GET http://ip:port/path`` every ``interval_s``.

    Invariants: ``ip`` is an IP literal, ``0 < port < 65536``, ``path`` starts with ``/``,
    ``interval_s`` and ``timeout_s`` are finite and > 0.
    """

    ip: str
    port: int
    path: str = DEFAULT_PROBE_PATH
    interval_s: float = 1.0
    timeout_s: float = 1.0

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.ip)  # raises ValueError naming the bad text
        if not 0 < self.port < 65536:
            raise ValueError(f"probe port must be in 1..65535, got {self.port}")
        if not self.path.startswith("/"):
            raise ValueError(f"probe path must start with '/', got {self.path!r}")
        for name in ("interval_s", "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}{self.path}"


class ProbeOutcome(enum.StrEnum):
    """How a probe ended. Everything but ``OK`` is a failure: penalised latency downstream."""

    OK = "ok"  # any response below 500 except 429: the server answered
    HTTP_ERROR = "http_error"  # 5xx or 429: the server answered that it cannot serve
    TIMEOUT = "timeout"  # no complete response within the target's timeout
    CONNECT_ERROR = "connect_error"  # refused, reset or unreachable
    ERROR = "error"  # anything else (protocol error, bad response)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome, timed on the prober's clock.

    Invariants: times finite, ``finished_at >= started_at``, ``timeout_s > 0``;
    ``load`` is the parsed ORCA report if the response carried a valid one.
    """

    outcome: ProbeOutcome
    started_at: float
    finished_at: float
    timeout_s: float
    status: int | None = None
    load: OrcaLoadReport | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.started_at) and math.isfinite(self.finished_at)):
            raise ValueError(
                f"probe times must be finite, got {self.started_at}, {self.finished_at}"
            )
        if self.finished_at < self.started_at:
            raise ValueError(
                f"probe finished ({self.finished_at}) before it started ({self.started_at})"
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")

    @property
    def ok(self) -> bool:
        return self.outcome is ProbeOutcome.OK

    @property
    def rtt_s(self) -> float:
        """Round-trip time: request sent to response body read (or failure noticed)."""
        return self.finished_at - self.started_at

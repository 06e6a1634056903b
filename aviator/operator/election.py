"""Leader election's decisions, after client-go's ``tools/leaderelection`` (pure).

One ``coordination.k8s.io/v1`` Lease names the replica that writes. Each candidate, every
``retry_period``, reads the Lease and decides (:func:`decide`):

- no Lease → create it, holding it;
- held by another candidate whose record this candidate has seen *change* within the last
  ``leaseDurationSeconds`` (measured on this candidate's own clock) → wait;
- otherwise (held by us, unheld, or not renewed for a whole lease duration) → write it,
  holding it: renewTime now; acquireTime kept when renewing, set when taking over;
  leaseTransitions + 1 on a takeover.

The clock-skew reasoning is client-go's: the timestamps in the record come from another
machine's clock and are never compared with ours. A candidate only notes *when it saw the
record change* (resourceVersion or content) and lets a full lease duration pass on its own
monotonic clock. That tolerates any clock offset between replicas; it does not tolerate
clocks that run at very different *rates*, which is what the margin between the renew
deadline and the lease duration is for.

The leader's side (in :mod:`aviator.operator.elector`): it counts itself leader only until
``renew_deadline`` after the *start* of its last successful renewal request. The write may
have reached the API server at any moment of that request, and another candidate starts its
lease-duration wait no earlier than when it reads that write, so a leader that stops at
``start + renew_deadline`` has stopped ``lease_duration - renew_deadline`` (5 s with the
defaults) before anyone else can take over.

Pure: no I/O, no clock (``now`` is monotonic seconds, ``wall`` a UTC datetime).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "DEFAULT_LEASE_DURATION",
    "DEFAULT_RENEW_DEADLINE",
    "DEFAULT_RETRY_PERIOD",
    "Action",
    "Decision",
    "ElectionTiming",
    "LeaseRecord",
    "Observation",
    "decide",
    "micro_time",
    "released",
]

DEFAULT_LEASE_DURATION: Final = 15.0
DEFAULT_RENEW_DEADLINE: Final = 10.0
DEFAULT_RETRY_PERIOD: Final = 2.0
# client-go's JitterFactor: the renew deadline must exceed retry_period by this factor.
JITTER_FACTOR: Final = 1.2


@dataclass(frozen=True, slots=True)
class ElectionTiming:
    """The three knobs, validated as client-go validates them (NewLeaderElector)."""

    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_deadline: float = DEFAULT_RENEW_DEADLINE
    retry_period: float = DEFAULT_RETRY_PERIOD

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline:
            raise ValueError(
                f"lease_duration ({self.lease_duration}s) must be greater than renew_deadline "
                f"({self.renew_deadline}s): the gap is the safety margin between the old "
                "leader stopping and a new one starting"
            )
        if not self.renew_deadline > JITTER_FACTOR * self.retry_period:
            raise ValueError(
                f"renew_deadline ({self.renew_deadline}s) must be greater than "
                f"{JITTER_FACTOR} x retry_period ({self.retry_period}s)"
            )
        if not self.retry_period > 0:
            raise ValueError(f"retry_period must be > 0, got {self.retry_period}")

    @property
    def lease_seconds(self) -> int:
        """``leaseDurationSeconds`` as written (whole seconds, at least 1, rounded up so
        the Lease never promises less than the leader assumes)."""
        return max(1, int(-(-self.lease_duration // 1)))


def micro_time(at: datetime) -> str:
    """``metav1.MicroTime`` text (RFC 3339, microseconds, UTC)."""
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The election fields of a Lease's spec."""

    holder: str = ""
    lease_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_lease(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}

        def number(key: str) -> int:
            v = spec.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else 0

        def text(key: str) -> str | None:
            v = spec.get(key)
            return v if isinstance(v, str) else None

        return cls(
            holder=text("holderIdentity") or "",
            lease_seconds=number("leaseDurationSeconds"),
            acquire_time=text("acquireTime"),
            renew_time=text("renewTime"),
            transitions=number("leaseTransitions"),
        )

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.lease_seconds,
            "leaseTransitions": self.transitions,
        }
        if self.acquire_time is not None:
            out["acquireTime"] = self.acquire_time
        if self.renew_time is not None:
            out["renewTime"] = self.renew_time
        return out


@dataclass(frozen=True, slots=True)
class Observation:
    """The record a candidate last saw change, and when (its own monotonic clock)."""

    record: LeaseRecord
    resource_version: str
    seen_at: float


class Action(enum.Enum):
    CREATE = "create"  # no Lease: create it, holding it
    UPDATE = "update"  # write ``record`` over the Lease read (optimistic concurrency)
    WAIT = "wait"  # another candidate holds a live lease


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    record: LeaseRecord | None  # what to write (CREATE/UPDATE)
    observation: Observation | None  # the candidate's observation after this read


def decide(
    identity: str,
    lease: Mapping[str, Any] | None,
    previous: Observation | None,
    timing: ElectionTiming,
    *,
    now: float,
    wall: datetime,
) -> Decision:
    """What candidate ``identity`` does after reading ``lease`` (None: it does not exist).

    ``previous`` is the candidate's last observation (None at first); the returned one
    replaces it. client-go's ``tryAcquireOrRenew`` step by step.
    """
    stamp = micro_time(wall)
    if lease is None:
        record = LeaseRecord(identity, timing.lease_seconds, stamp, stamp, 0)
        return Decision(Action.CREATE, record, None)
    current = LeaseRecord.from_lease(lease)
    rv = str((lease.get("metadata") or {}).get("resourceVersion", ""))
    if previous is None or previous.record != current or previous.resource_version != rv:
        observation = Observation(current, rv, now)
    else:
        observation = previous
    held_by_other = bool(current.holder) and current.holder != identity
    if held_by_other and observation.seen_at + current.lease_seconds > now:
        return Decision(Action.WAIT, None, observation)
    if current.holder == identity:
        record = LeaseRecord(
            identity,
            timing.lease_seconds,
            current.acquire_time or stamp,
            stamp,
            current.transitions,
        )
    else:
        record = LeaseRecord(identity, timing.lease_seconds, stamp, stamp, current.transitions + 1)
    return Decision(Action.UPDATE, record, observation)


def released(record: LeaseRecord, wall: datetime) -> LeaseRecord:
    """What a leader writes when it steps down (client-go's ReleaseOnCancel): no holder, a
    one-second lease, so another candidate takes over at its next try."""
    stamp = micro_time(wall)
    return LeaseRecord("", 1, stamp, stamp, record.transitions)

"""An AviatorPolicy's status, decided (pure): conditions after GEP-713, endpoints, Events.

:func:`desired_status` turns a policy's resolution (:mod:`aviator.k8s.resolve`) and what the
proxies hold of its cluster (:class:`~aviator.operator.acks.ClusterAcks`, every replica's
counts merged) into a :class:`PolicyStatus`: a value without timestamps, so two equal
desires compare equal however often they are recomputed. :func:`merge_status` applies one
to the status the API server holds, the way Gateway API's policy attachment (GEP-713,
``apis/v1/policy_types.go``) says conditions are written:

- merged by type: conditions of other types (another controller's) are kept as they are,
  in their place; Aviator owns :data:`OWNED_TYPES` only and never removes a condition;
- ``lastTransitionTime`` moves only when a condition's status changes (reason and message
  updates keep it), as ``meta.SetStatusCondition`` does;
- every owned condition carries ``observedGeneration``; a condition on the server whose
  ``observedGeneration`` is *greater* than Aviator's is left alone (Aviator's view is stale;
  the newer state will come through the watch), and so is the whole status when the
  object's ``metadata.generation`` is ahead of the generation Aviator resolved.

The conditions:

- ``Accepted``: True/``Accepted``; False with ``Invalid`` (validation errors; when the
  last valid spec keeps serving, the resolver's message says so), ``Conflicted`` (an older
  policy targets the same workload) or ``TargetNotFound`` (GEP-713 puts a missing target on
  Accepted; the resolver reports it on ResolvedRefs, where it stays too).
- ``ResolvedRefs``: the resolver's (target found, ports resolved, how many pods).
- ``Programmed``: True once every connected proxy subscribed to the policy's cluster holds
  its current endpoints; False/``Rejected`` with Envoy's message when a proxy NACKed them;
  False/``Pending`` while some proxy has not ACKed yet; Unknown/``NoProxies`` with no
  proxy connected; False/``NotServing`` when the policy serves nothing.

``status.endpoints`` (the ``Endpoints`` printer column) counts the ready endpoints served;
``status.observedGeneration`` is the generation the conditions were computed from.

Pure: no I/O, no clock (times come in as arguments).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aviator.k8s.fields import ObjectRef
from aviator.k8s.resolve import (
    ACCEPTED,
    RESOLVED_REFS,
    Condition,
    ConditionStatus,
    PolicyResolution,
    Reason,
)
from aviator.operator.acks import ClusterAcks

__all__ = [
    "ACCEPTED",
    "MAX_MESSAGE_LENGTH",
    "OWNED_TYPES",
    "PROGRAMMED",
    "RESOLVED_REFS",
    "MergedStatus",
    "PolicyStatus",
    "ProgrammedReason",
    "StatusCondition",
    "Transition",
    "desired_status",
    "event_body",
    "merge_status",
    "rfc3339",
]

PROGRAMMED: Final = "Programmed"
OWNED_TYPES: Final = (ACCEPTED, RESOLVED_REFS, PROGRAMMED)
MAX_MESSAGE_LENGTH: Final = 32768  # metav1.Condition's limit (the CRD's maxLength)
EVENT_MESSAGE_LENGTH: Final = 1024  # events.k8s.io's note limit; core/v1 has none, be kind


class ProgrammedReason(enum.StrEnum):
    PROGRAMMED = "Programmed"
    PENDING = "Pending"
    REJECTED = "Rejected"
    NO_PROXIES = "NoProxies"
    NOT_SERVING = "NotServing"


@dataclass(frozen=True, slots=True)
class StatusCondition:
    """One owned condition as it should be (``lastTransitionTime`` is the merge's job)."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    observed_generation: int

    def __post_init__(self) -> None:
        if self.status not in ("True", "False", "Unknown"):
            raise ValueError(f"condition {self.type}: bad status {self.status!r}")
        if not self.reason:
            raise ValueError(f"condition {self.type}: a reason is required")
        if len(self.message) > MAX_MESSAGE_LENGTH:
            cut = self.message[: MAX_MESSAGE_LENGTH - 1] + "…"
            object.__setattr__(self, "message", cut)

    @classmethod
    def of(cls, c: Condition) -> StatusCondition:
        return cls(c.type, c.status.value, c.reason.value, c.message, c.observed_generation)


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """The status Aviator wants for one policy. ``uid`` is the policy's, when known (an
    object deleted and created again under the same name must not get its predecessor's)."""

    ref: ObjectRef
    observed_generation: int
    conditions: tuple[StatusCondition, ...]
    endpoints: int
    uid: str = ""

    def condition(self, type_: str) -> StatusCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def _programmed(r: PolicyResolution, acks: ClusterAcks | None, generation: int) -> StatusCondition:
    key = r.key
    if not r.serving or key is None:
        accepted = r.condition(ACCEPTED)
        refs = r.condition(RESOLVED_REFS)
        why = next(
            (
                f"{c.type} is {c.status.value} ({c.reason.value})"
                for c in (accepted, refs)
                if c is not None and c.status is not ConditionStatus.TRUE
            ),
            "it is not served",
        )
        return StatusCondition(
            PROGRAMMED,
            "False",
            ProgrammedReason.NOT_SERVING,
            f"no proxy is given this policy's endpoints: {why}",
            generation,
        )
    cluster = key.cluster_name
    if acks is None or acks.proxies == 0:
        return StatusCondition(
            PROGRAMMED,
            "Unknown",
            ProgrammedReason.NO_PROXIES,
            f"no connected proxy subscribes to cluster {cluster}",
            generation,
        )
    if acks.rejected:
        said = "; ".join(acks.messages) or "no message"
        return StatusCondition(
            PROGRAMMED,
            "False",
            ProgrammedReason.REJECTED,
            f"{acks.rejected} of {acks.proxies} proxies rejected the endpoints of cluster "
            f"{cluster}: {said}",
            generation,
        )
    if acks.current < acks.proxies:
        return StatusCondition(
            PROGRAMMED,
            "False",
            ProgrammedReason.PENDING,
            f"{acks.current} of {acks.proxies} proxies hold the current endpoints of cluster "
            f"{cluster}; waiting for the others to ACK",
            generation,
        )
    # No proxy count here: a message that changed with every proxy (re)connecting would be
    # a status write each time.
    return StatusCondition(
        PROGRAMMED,
        "True",
        ProgrammedReason.PROGRAMMED,
        f"every connected proxy subscribed to cluster {cluster} holds its current endpoints",
        generation,
    )


def desired_status(resolution: PolicyResolution, acks: ClusterAcks | None) -> PolicyStatus:
    """The status one policy should have, given every replica's ACK counts for its cluster."""
    accepted = resolution.condition(ACCEPTED)
    refs = resolution.condition(RESOLVED_REFS)
    if accepted is None or refs is None:
        raise ValueError(f"{resolution.ref}: a resolution carries Accepted and ResolvedRefs")
    # The current generation: Accepted is always about the object as it is now (ResolvedRefs
    # may be about the last valid spec, which keeps serving while the current one is invalid).
    generation = accepted.observed_generation
    owned_accepted = StatusCondition.of(accepted)
    if (
        accepted.status is ConditionStatus.TRUE
        and refs.status is ConditionStatus.FALSE
        and refs.reason is Reason.TARGET_NOT_FOUND
    ):
        owned_accepted = StatusCondition(
            ACCEPTED, "False", Reason.TARGET_NOT_FOUND.value, refs.message, generation
        )
    policy = resolution.policy
    return PolicyStatus(
        ref=resolution.ref,
        observed_generation=generation,
        conditions=(
            owned_accepted,
            StatusCondition.of(refs),
            _programmed(resolution, acks, refs.observed_generation),
        ),
        endpoints=len(resolution.endpoints) if resolution.serving else 0,
        uid=policy.meta.uid if policy is not None else "",
    )


def rfc3339(at: datetime) -> str:
    """``metav1.Time`` text: UTC, whole seconds."""
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Transition:
    """An owned condition whose status or reason changed (or that appeared): one Event."""

    condition: StatusCondition
    previous_status: str | None
    previous_reason: str | None

    @property
    def event_type(self) -> str:
        """``Normal`` when the condition is True, ``Warning`` otherwise (Programmed
        Unknown/NoProxies and Pending are ``Normal``: nothing is wrong yet)."""
        c = self.condition
        if c.status == "True" or c.reason in (
            ProgrammedReason.NO_PROXIES,
            ProgrammedReason.PENDING,
        ):
            return "Normal"
        return "Warning"


@dataclass(frozen=True, slots=True)
class MergedStatus:
    """The status to write, whether it differs from the server's, and the transitions."""

    status: dict[str, Any]
    changed: bool
    transitions: tuple[Transition, ...]
    stale: bool = False  # the server knows a newer generation: nothing was merged


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def merge_status(obj: Mapping[str, Any], desired: PolicyStatus, now: datetime) -> MergedStatus:
    """``desired`` merged into the status of ``obj`` (the policy as just read from the API
    server), following the rules in the module docstring. ``now`` stamps conditions whose
    status changes. Never mutates ``obj``."""
    meta = obj.get("metadata") or {}
    current: dict[str, Any] = dict(obj.get("status") or {})
    if (
        _int(meta.get("generation")) > desired.observed_generation
        or _int(current.get("observedGeneration")) > desired.observed_generation
        or (desired.uid and meta.get("uid") and meta.get("uid") != desired.uid)
    ):
        return MergedStatus(current, changed=False, transitions=(), stale=True)

    stamp = rfc3339(now)
    existing = [c for c in current.get("conditions") or () if isinstance(c, Mapping)]
    by_type = {c.get("type"): i for i, c in enumerate(existing)}
    merged: list[dict[str, Any]] = [dict(c) for c in existing]
    transitions: list[Transition] = []
    for want in desired.conditions:
        index = by_type.get(want.type)
        old = existing[index] if index is not None else None
        if old is not None and _int(old.get("observedGeneration")) > want.observed_generation:
            continue  # written from a newer view than ours: leave it
        same_status = old is not None and old.get("status") == want.status
        condition = {
            "type": want.type,
            "status": want.status,
            "reason": want.reason,
            "message": want.message,
            "observedGeneration": want.observed_generation,
            "lastTransitionTime": stamp,
        }
        if old is not None and same_status and old.get("lastTransitionTime"):
            condition["lastTransitionTime"] = old["lastTransitionTime"]
        if old is None or not same_status or old.get("reason") != want.reason:
            transitions.append(
                Transition(
                    want,
                    old.get("status") if old is not None else None,
                    old.get("reason") if old is not None else None,
                )
            )
        if index is None:
            merged.append(condition)
        else:
            merged[index] = condition
    status = dict(current)
    status["conditions"] = merged
    status["observedGeneration"] = desired.observed_generation
    status["endpoints"] = desired.endpoints
    return MergedStatus(status, changed=status != current, transitions=tuple(transitions))


def event_body(
    obj: Mapping[str, Any],
    transition: Transition,
    now: datetime,
    *,
    instance: str,
    sequence: int = 0,
) -> dict[str, Any]:
    """A core/v1 Event about ``obj`` (the policy as read) for one transition.

    ``kubectl describe avp`` lists it (it matches on the involved object's uid);
    ``instance`` is the replica that wrote it; ``sequence`` tells apart the events of one
    write (several conditions can change at once).
    """
    meta = obj.get("metadata") or {}
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    c = transition.condition
    stamp = rfc3339(now)
    nanos = int(now.timestamp() * 1e9) + sequence
    message = f"{c.type}={c.status}: {c.message}"
    if len(message) > EVENT_MESSAGE_LENGTH:
        message = message[: EVENT_MESSAGE_LENGTH - 1] + "…"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{nanos:x}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": str(obj.get("apiVersion", "")),
            "kind": str(obj.get("kind", "")),
            "name": name,
            "namespace": namespace,
            "uid": str(meta.get("uid", "")),
            "resourceVersion": str(meta.get("resourceVersion", "")),
        },
        "reason": c.reason,
        "message": message,
        "type": transition.event_type,
        "source": {"component": "aviator"},
        "reportingComponent": "aviator.io/operator",
        "reportingInstance": instance[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }

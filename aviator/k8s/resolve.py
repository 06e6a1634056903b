"""Resolve (pure): policies + workloads + pods → each policy's endpoints and conditions.

For each AviatorPolicy this finds its target workload (same namespace, kind and name), the
pods the workload's selector picks, the ready ones among them, and their traffic and probe
ports (named ports looked up in each pod's own container ports, as a Service's named
``targetPort`` is). It also decides the status conditions:

* ``Accepted``: True, or False with reason ``Invalid`` (validation errors) or ``Conflicted``
  (another policy already balances the same workload: the older one wins, by
  creationTimestamp, then namespace/name; policies without a timestamp sort last).
* ``ResolvedRefs``: True, or False with reason ``TargetNotFound`` (no such workload; the
  message points out a workload of the other kind with that name) or ``PortNotFound`` (a
  named port that neither the pod template nor any selected pod declares). Unknown with
  reason ``Invalid`` for an invalid policy.

Conflicts are decided per *workload name* (namespace/name), not per kind: Envoy clusters
and gateway hosts are named ``namespace/name`` and ``name.namespace``, so a Deployment and
a StatefulSet of one name cannot both be balanced.

Pure: no I/O, no clock; the result depends only on the arguments.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from aviator.k8s.fields import ObjectRef
from aviator.k8s.objects import Pod, Workload
from aviator.k8s.policy import DEFAULT_PORT, AviatorPolicy, InvalidPolicy, PolicyEntry
from aviator.k8s.state import ClusterState
from aviator.model import EndpointAddress, WorkloadKey

__all__ = [
    "ACCEPTED",
    "RESOLVED_REFS",
    "Condition",
    "ConditionStatus",
    "PolicyResolution",
    "Reason",
    "ResolvedEndpoint",
    "resolve",
    "resolve_state",
    "serving",
]

ACCEPTED: Final = "Accepted"
RESOLVED_REFS: Final = "ResolvedRefs"


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Reason(enum.StrEnum):
    ACCEPTED = "Accepted"
    INVALID = "Invalid"
    CONFLICTED = "Conflicted"
    RESOLVED_REFS = "ResolvedRefs"
    TARGET_NOT_FOUND = "TargetNotFound"
    PORT_NOT_FOUND = "PortNotFound"


@dataclass(frozen=True, slots=True)
class Condition:
    """A status condition as ``metav1.Condition`` has it (the writer adds the time)."""

    type: str
    status: ConditionStatus
    reason: Reason
    message: str
    observed_generation: int = 0


@dataclass(frozen=True, slots=True, order=True)
class ResolvedEndpoint:
    """A ready pod of a policy's target: where traffic and probes go."""

    address: EndpointAddress  # pod IP and traffic port
    probe_port: int
    pod: str  # pod name (same namespace as the policy)
    zone: str | None = None
    node: str | None = None

    @property
    def probe_address(self) -> EndpointAddress:
        return EndpointAddress(self.address.ip, self.probe_port)


@dataclass(frozen=True, slots=True)
class PolicyResolution:
    """What one policy resolved to.

    Invariants: ``endpoints`` is sorted, has unique addresses, and is empty unless
    ``serving``; ``serving`` ⇔ Accepted=True and ResolvedRefs=True (and then ``policy`` and
    ``target`` are set). ``pods`` counts every pod the target selects; ``not_ready`` and
    ``without_port`` name those left out, for views and status messages.
    """

    ref: ObjectRef
    conditions: tuple[Condition, ...]
    policy: AviatorPolicy | None = None
    target: Workload | None = None
    port: int | str | None = None  # effective traffic port: a number, or a port name
    endpoints: tuple[ResolvedEndpoint, ...] = ()
    pods: int = 0
    not_ready: tuple[str, ...] = ()
    without_port: tuple[str, ...] = ()
    conflicts_with: ObjectRef | None = None  # the winning policy, when Conflicted

    def __post_init__(self) -> None:
        if self.endpoints and not self.serving:
            raise ValueError(f"{self.ref}: endpoints are only resolved for a serving policy")
        if len({e.address for e in self.endpoints}) != len(self.endpoints):
            raise ValueError(f"{self.ref}: duplicate endpoint addresses")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def serving(self) -> bool:
        """Whether this policy's workload should be an Envoy cluster now."""
        return all(
            (c := self.condition(t)) is not None and c.status is ConditionStatus.TRUE
            for t in (ACCEPTED, RESOLVED_REFS)
        )

    @property
    def key(self) -> WorkloadKey | None:
        return self.policy.key if self.policy is not None else None


def _sort_age(policies: list[AviatorPolicy]) -> list[AviatorPolicy]:
    # Oldest first, then namespace/name; policies without a timestamp after all others.
    # A total order, so exactly one policy wins whatever order the inputs come in.
    with_ts = sorted(
        (p for p in policies if p.meta.creation_timestamp),
        key=lambda p: (p.meta.creation_timestamp, p.meta.namespace, p.meta.name),
    )
    without = sorted(
        (p for p in policies if not p.meta.creation_timestamp),
        key=lambda p: (p.meta.namespace, p.meta.name),
    )
    return with_ts + without


def _pod_port(pod: Pod, port: int | str) -> int | None:
    return port if isinstance(port, int) else pod.port_named(port)


def _ports_text(target: Workload) -> str:
    named = [f"{p.name}({p.number})" for p in target.ports if p.name and p.protocol == "TCP"]
    return ", ".join(named) if named else "none"


def resolve(
    policies: Iterable[PolicyEntry],
    workloads: Iterable[Workload],
    pods: Iterable[Pod],
) -> tuple[PolicyResolution, ...]:
    """Resolve every policy; the result is sorted by policy reference."""
    by_name: dict[tuple[str, str], list[Workload]] = {}
    for w in workloads:
        by_name.setdefault((w.meta.namespace, w.meta.name), []).append(w)
    pods_by_ns: dict[str, list[Pod]] = {}
    for pod in pods:
        pods_by_ns.setdefault(pod.meta.namespace, []).append(pod)
    for group in pods_by_ns.values():
        group.sort(key=lambda p: p.meta.name)

    entries = sorted(policies, key=lambda e: e.ref)
    # Winner per workload name: the oldest valid policy.
    claims: dict[WorkloadKey, list[AviatorPolicy]] = {}
    for e in entries:
        if isinstance(e, AviatorPolicy):
            claims.setdefault(e.key, []).append(e)
    winners = {key: _sort_age(group)[0] for key, group in claims.items()}

    out: list[PolicyResolution] = []
    for e in entries:
        if isinstance(e, InvalidPolicy):
            out.append(_invalid(e))
        else:
            out.append(_resolve_one(e, winners[e.key], by_name, pods_by_ns))
    return tuple(out)


def resolve_state(state: ClusterState) -> tuple[PolicyResolution, ...]:
    """:func:`resolve` on a :class:`ClusterState`."""
    return resolve(state.policies, state.workloads, state.pods)


def serving(resolutions: Iterable[PolicyResolution]) -> dict[WorkloadKey, PolicyResolution]:
    """The serving resolutions by workload (at most one per workload, by construction)."""
    out: dict[WorkloadKey, PolicyResolution] = {}
    for r in resolutions:
        if r.serving and r.policy is not None:
            out[r.policy.key] = r
    return out


def _invalid(e: InvalidPolicy) -> PolicyResolution:
    gen = e.meta.generation
    first = "; ".join(str(err) for err in e.errors[:3])
    more = f" (and {len(e.errors) - 3} more)" if len(e.errors) > 3 else ""
    noun = "error" if len(e.errors) == 1 else "errors"
    return PolicyResolution(
        ref=e.ref,
        conditions=(
            Condition(
                ACCEPTED,
                ConditionStatus.FALSE,
                Reason.INVALID,
                f"{len(e.errors)} validation {noun}: {first}{more}",
                gen,
            ),
            Condition(
                RESOLVED_REFS,
                ConditionStatus.UNKNOWN,
                Reason.INVALID,
                "not resolved: the policy is invalid (see Accepted)",
                gen,
            ),
        ),
    )


def _resolve_one(
    p: AviatorPolicy,
    winner: AviatorPolicy,
    by_name: Mapping[tuple[str, str], list[Workload]],
    pods_by_ns: Mapping[str, list[Pod]],
) -> PolicyResolution:
    gen = p.meta.generation
    ns = p.meta.namespace
    if winner is p:
        accepted = Condition(ACCEPTED, ConditionStatus.TRUE, Reason.ACCEPTED, "accepted", gen)
        conflicts_with = None
    else:
        created = winner.meta.creation_timestamp
        since = f"created {created.isoformat()}" if created else "first by name"
        accepted = Condition(
            ACCEPTED,
            ConditionStatus.FALSE,
            Reason.CONFLICTED,
            f"workload {winner.key} is already balanced by {winner.ref} (targeting "
            f"{winner.target}), which is older ({since}); only one policy may target a "
            "workload name: delete or retarget one of them",
            gen,
        )
        conflicts_with = winner.ref

    candidates = by_name.get((ns, p.target_ref.name), [])
    target = next((w for w in candidates if w.kind == p.target_ref.kind), None)
    if target is None:
        hint = ""
        if candidates:
            other = candidates[0].kind.value
            hint = f"; a {other} with that name exists: set spec.targetRef.kind: {other}"
        refs = Condition(
            RESOLVED_REFS,
            ConditionStatus.FALSE,
            Reason.TARGET_NOT_FOUND,
            f"{p.target} not found{hint}",
            gen,
        )
        return PolicyResolution(
            p.ref, (accepted, refs), p, None, p.port, conflicts_with=conflicts_with
        )

    port: int | str = p.port if p.port is not None else (target.first_port or DEFAULT_PORT)
    probe_port: int | str = p.probe.port if p.probe.port is not None else port
    selected = [pod for pod in pods_by_ns.get(ns, ()) if target.selects(pod)]

    missing: list[str] = []
    checks: list[tuple[str, int | str]] = [("spec.port", port)]
    if p.probe.port is not None:  # else it is the traffic port, checked already
        checks.append(("spec.probe.port", p.probe.port))
    for field, value in checks:
        if (
            isinstance(value, str)
            and target.port_named(value) is None
            and not any(pod.port_named(value) is not None for pod in selected)
        ):
            missing.append(
                f"{field}: no TCP container port named {value!r} in the pod template of "
                f"{target.ref} or its pods (named ports: {_ports_text(target)})"
            )

    endpoints: dict[EndpointAddress, ResolvedEndpoint] = {}
    not_ready: list[str] = []
    without_port: list[str] = []
    for pod in selected:
        if not pod.ready or pod.pod_ip is None:
            not_ready.append(pod.meta.name)
            continue
        traffic, probe = _pod_port(pod, port), _pod_port(pod, probe_port)
        if traffic is None or probe is None:
            without_port.append(pod.meta.name)
            continue
        address = EndpointAddress(pod.pod_ip, traffic)
        # Two ready pods on one IP:port (hostNetwork) are one endpoint to Envoy; the first
        # by name is kept.
        endpoints.setdefault(
            address, ResolvedEndpoint(address, probe, pod.meta.name, pod.zone, pod.node_name)
        )

    if missing:
        refs = Condition(
            RESOLVED_REFS, ConditionStatus.FALSE, Reason.PORT_NOT_FOUND, "; ".join(missing), gen
        )
    else:
        left_out = ""
        if not_ready:
            left_out += f", {len(not_ready)} not ready"
        if without_port:
            left_out += f", {len(without_port)} without the port"
        refs = Condition(
            RESOLVED_REFS,
            ConditionStatus.TRUE,
            Reason.RESOLVED_REFS,
            f"{target.ref} selects {len(selected)} pod(s): {len(endpoints)} endpoint(s){left_out}",
            gen,
        )
    is_serving = accepted.status is ConditionStatus.TRUE and refs.status is ConditionStatus.TRUE
    return PolicyResolution(
        ref=p.ref,
        conditions=(accepted, refs),
        policy=p,
        target=target,
        port=port,
        endpoints=tuple(sorted(endpoints.values())) if is_serving else (),
        pods=len(selected),
        not_ready=tuple(not_ready),
        without_port=tuple(without_port),
        conflicts_with=conflicts_with,
    )

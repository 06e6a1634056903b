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
  reason ``Invalid`` for an invalid policy that has no last valid spec.

An invalid policy that had a valid spec before (``last_valid``, a
:class:`~aviator.k8s.lastvalid.LastValid`) is resolved from that spec and keeps serving it, as
Kubernetes controllers keep acting on the last spec they accepted: Accepted=False, reason
``Invalid``, whose message gives the validation errors and which spec (resourceVersion,
generation) keeps being served; ResolvedRefs is that spec's, with its generation as
observedGeneration. Such a policy takes part in conflicts with its last valid spec, so the
older policy keeps winning whichever of the two is being edited.

Conflicts are decided per *workload name* (namespace/name), not per kind: Envoy clusters
and gateway hosts are named ``namespace/name`` and ``name.namespace``, so a Deployment and
a StatefulSet of one name cannot both be balanced.

Pure: no I/O, no clock; the result depends only on the arguments.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from aviator.k8s.fields import ObjectRef
from aviator.k8s.lastvalid import LastValid
from aviator.k8s.objects import ObjectMeta, Pod, Workload
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
    ``serving``; ``serving`` ⇔ ResolvedRefs=True and either Accepted=True or ``last_valid``
    without a conflict (and then ``policy`` and ``target`` are set). ``last_valid``: the
    policy's current spec is invalid and ``policy`` is its last valid one, the spec resolved
    and (when serving) served. ``pods`` counts every pod the target selects; ``not_ready``
    and ``without_port`` name those left out, for views and status messages.
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
    last_valid: bool = False  # resolved from the last valid spec: the current one is invalid

    def __post_init__(self) -> None:
        if self.last_valid and self.policy is None:
            raise ValueError(f"{self.ref}: a last valid resolution needs the spec it resolved")
        if self.endpoints and not self.serving:
            raise ValueError(f"{self.ref}: endpoints are only resolved for a serving policy")
        if len({e.address for e in self.endpoints}) != len(self.endpoints):
            raise ValueError(f"{self.ref}: duplicate endpoint addresses")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def traffic_port(self) -> int:
        """The workload's one numeric traffic port (the route's and the cluster's): ``port`` if
        it is a number; for a port name, the port it resolved to on the first endpoint (each
        endpoint carries its own); :data:`~aviator.k8s.policy.DEFAULT_PORT` when nothing
        resolved it. The only place a port name becomes a number for the whole workload."""
        if isinstance(self.port, int):
            return self.port
        return self.endpoints[0].address.port if self.endpoints else DEFAULT_PORT

    @property
    def serving(self) -> bool:
        """Whether this policy's workload should be an Envoy cluster now."""
        refs, accepted = self.condition(RESOLVED_REFS), self.condition(ACCEPTED)
        if refs is None or refs.status is not ConditionStatus.TRUE or accepted is None:
            return False
        if accepted.status is ConditionStatus.TRUE:
            return True
        return self.last_valid and self.conflicts_with is None

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


class _Pods:
    """The pods of each namespace, sorted by name, and indexed by label on first use.

    :meth:`selected` matches a workload's selector only against the pods that carry the
    rarest of its ``matchLabels`` pairs, not against the whole namespace: with 1,000
    policies and 10,000 pods in one namespace a full scan per policy was 10 million
    selector matches per resolve, minutes on one core (issue 14's churn). The order of the
    namespace's pods is kept (the first pod by name wins an address two pods share).
    """

    def __init__(self, pods: Iterable[Pod]) -> None:
        self._by_ns: dict[str, list[Pod]] = {}
        for pod in pods:
            self._by_ns.setdefault(pod.meta.namespace, []).append(pod)
        for group in self._by_ns.values():
            group.sort(key=lambda p: p.meta.name)
        self._index: dict[str, dict[tuple[str, str], list[Pod]]] = {}

    def selected(self, target: Workload) -> list[Pod]:
        """The pods ``target`` selects, in name order."""
        namespace = target.meta.namespace
        pods = self._by_ns.get(namespace)
        if not pods:
            return []
        candidates = pods
        if target.selector.match_labels:
            index = self._index.get(namespace)
            if index is None:
                index = self._index[namespace] = {}
                for pod in pods:
                    for item in pod.meta.labels.items():
                        index.setdefault(item, []).append(pod)
            candidates = min(
                (index.get(item, []) for item in target.selector.match_labels.items()), key=len
            )
        return [pod for pod in candidates if target.selects(pod)]


def resolve(
    policies: Iterable[PolicyEntry],
    workloads: Iterable[Workload],
    pods: Iterable[Pod],
    *,
    last_valid: LastValid | None = None,
) -> tuple[PolicyResolution, ...]:
    """Resolve every policy; the result is sorted by policy reference.

    ``last_valid`` gives the spec an invalid policy keeps serving (pass the memory updated
    with these ``policies``: :meth:`LastValid.update`); without it an invalid policy serves
    nothing.
    """
    by_name: dict[tuple[str, str], list[Workload]] = {}
    for w in workloads:
        by_name.setdefault((w.meta.namespace, w.meta.name), []).append(w)
    pods_by_ns = _Pods(pods)

    entries = sorted(policies, key=lambda e: e.ref)
    # The spec each policy is resolved with: its own, or an invalid one's last valid spec.
    specs: dict[ObjectRef, AviatorPolicy] = {}
    for e in entries:
        if isinstance(e, AviatorPolicy):
            specs[e.ref] = e
        elif last_valid is not None and (spec := last_valid.fallback(e)) is not None:
            specs[e.ref] = spec
    # Winner per workload name: the oldest policy that has a spec to serve.
    claims: dict[WorkloadKey, list[AviatorPolicy]] = {}
    for spec in specs.values():
        claims.setdefault(spec.key, []).append(spec)
    winners = {key: _sort_age(group)[0] for key, group in claims.items()}

    out: list[PolicyResolution] = []
    for e in entries:
        spec_or_none = specs.get(e.ref)
        if spec_or_none is None:
            assert isinstance(e, InvalidPolicy)  # every valid policy is its own spec
            out.append(_invalid(e))
            continue
        r = _resolve_one(spec_or_none, winners[spec_or_none.key], by_name, pods_by_ns)
        out.append(_on_last_valid(e, r) if isinstance(e, InvalidPolicy) else r)
    return tuple(out)


def resolve_state(
    state: ClusterState, *, last_valid: LastValid | None = None
) -> tuple[PolicyResolution, ...]:
    """:func:`resolve` on a :class:`ClusterState`."""
    return resolve(state.policies, state.workloads, state.pods, last_valid=last_valid)


def serving(resolutions: Iterable[PolicyResolution]) -> dict[WorkloadKey, PolicyResolution]:
    """The serving resolutions by workload (at most one per workload, by construction)."""
    out: dict[WorkloadKey, PolicyResolution] = {}
    for r in resolutions:
        if r.serving and r.policy is not None:
            out[r.policy.key] = r
    return out


def _errors_text(e: InvalidPolicy) -> str:
    first = "; ".join(str(err) for err in e.errors[:3])
    more = f" (and {len(e.errors) - 3} more)" if len(e.errors) > 3 else ""
    noun = "error" if len(e.errors) == 1 else "errors"
    return f"{len(e.errors)} validation {noun}: {first}{more}"


def _version_text(meta: ObjectMeta) -> str:
    parts = []
    if meta.resource_version:
        parts.append(f"resourceVersion {meta.resource_version}")
    if meta.generation:
        parts.append(f"generation {meta.generation}")
    return ", ".join(parts) or "no resourceVersion"


def _invalid(e: InvalidPolicy) -> PolicyResolution:
    gen = e.meta.generation
    return PolicyResolution(
        ref=e.ref,
        conditions=(
            Condition(
                ACCEPTED,
                ConditionStatus.FALSE,
                Reason.INVALID,
                f"{_errors_text(e)}; nothing is served: there is no last valid spec to fall "
                "back on",
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


def _on_last_valid(e: InvalidPolicy, r: PolicyResolution) -> PolicyResolution:
    """``r``, resolved from the last valid spec of ``e``, with the conditions of ``e``."""
    assert r.policy is not None
    version = _version_text(r.policy.meta)
    accepted, refs = r.condition(ACCEPTED), r.condition(RESOLVED_REFS)
    assert accepted is not None
    assert refs is not None
    if accepted.status is not ConditionStatus.TRUE:  # the last valid spec lost a conflict
        outcome = f"its last valid spec ({version}) is not served either: {accepted.message}"
    elif refs.status is not ConditionStatus.TRUE:
        outcome = f"its last valid spec ({version}) is not served either: see ResolvedRefs"
    else:
        outcome = (
            f"the last valid spec ({version}) keeps being served until the policy is fixed "
            "or deleted"
        )
    invalid = Condition(
        ACCEPTED,
        ConditionStatus.FALSE,
        Reason.INVALID,
        f"{_errors_text(e)}; {outcome}",
        e.meta.generation,
    )
    resolved = dataclasses.replace(refs, message=f"{refs.message} (last valid spec)")
    return dataclasses.replace(r, ref=e.ref, conditions=(invalid, resolved), last_valid=True)


def _resolve_one(
    p: AviatorPolicy,
    winner: AviatorPolicy,
    by_name: Mapping[tuple[str, str], list[Workload]],
    pods_by_ns: _Pods,
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
    selected = pods_by_ns.selected(target)

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

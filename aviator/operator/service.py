"""A Service that avoids hot pods: which pods it lists, and the objects (pure).

For a policy with ``spec.publishService: true``, Aviator keeps a selector-less Service
``<target>-aviator`` with the target's container ports, and its Endpoints object listing the
target's ready pods *that are not hot*. kube-proxy, ingress controllers and meshes that route
to that Service then avoid slow pods without Aviator's Envoy. The rules
(:class:`HotSetHysteresis`):

- the hot set is the weigher's (:class:`~aviator.probing.weigher.WeighResult` ``.hot``),
  which is already capped at ``max(1, ceil((1 - hotQuantile) · n))`` and empty when the
  whole fleet is overloaded; this module checks the cap again and lists every pod when the
  hot set is over it or covers every pod: never fewer pods than the cap leaves, never none;
- hysteresis: a pod that left stays out until it has been cold for ``rejoin_after``
  seconds (a pod at the edge of the threshold does not flap in and out of kube-proxy's
  rules every probe); a pod leaves as soon as it is hot;
- the writer also writes each Service at most once per its rate limit.

Endpoints (core/v1), not EndpointSlices: Kubernetes 1.20 serves discovery.k8s.io/v1beta1
only (v1 from 1.21), and its EndpointSliceMirroring controller (on by default since 1.19)
mirrors a selector-less Service's Endpoints into EndpointSlices for the consumers that read
slices. Writing discovery.k8s.io/v1 slices directly where the server has them is a later
step (Endpoints are deprecated from 1.33, still served).

Both objects carry an ownerReference to the policy (the garbage collector deletes them with
it, even when Aviator is down) and ``app.kubernetes.io/managed-by: aviator``; Aviator never
touches a Service of that name that it does not own.

Pure: no I/O, no clock (``now`` is an argument).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aviator.k8s.fields import ObjectRef
from aviator.k8s.policy import API_VERSION, KIND
from aviator.k8s.resolve import PolicyResolution
from aviator.model import EndpointAddress

__all__ = [
    "MANAGED_BY",
    "POLICY_LABEL",
    "SERVICE_SUFFIX",
    "DesiredService",
    "HotSetHysteresis",
    "ServiceKey",
    "ServicePort",
    "desired_service",
    "endpoint_ip_allowed",
    "hot_cap",
    "owned_by",
    "service_name",
]

SERVICE_SUFFIX: Final = "-aviator"
MANAGED_BY: Final = ("app.kubernetes.io/managed-by", "aviator")
POLICY_LABEL: Final = "aviator.io/policy"
DEFAULT_SERVICE_PORT: Final = 8080


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def service_name(target: str) -> str:
    """``<target>-aviator`` as a valid Service name (a DNS-1035 label: at most 63 lowercase
    letters, digits and '-', starting with a letter): dots become '-', a leading digit gets
    an ``s-`` prefix, and a name too long is cut and made unique with a hash of ``target``."""
    base = target.lower().replace(".", "-")
    if not base[:1].isalpha():
        base = "s-" + base
    name = base + SERVICE_SUFFIX
    if len(name) <= 63:
        return name
    keep = 63 - len(SERVICE_SUFFIX) - 9
    return f"{base[:keep].rstrip('-')}-{_short_hash(target)}{SERVICE_SUFFIX}"


def _label_value(text: str) -> str:
    return text if len(text) <= 63 else f"{text[:54]}-{_short_hash(text)}"


def hot_cap(n: int, hot_quantile: float) -> int:
    """The weigher's bound on how many of ``n`` endpoints may be hot at once."""
    return max(1, math.ceil((1.0 - hot_quantile) * n - 1e-9))


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class ListedEndpoint:
    ip: str
    pod: str
    ports: tuple[tuple[str, int], ...]  # (service port name, number on this pod)


@dataclass(frozen=True, slots=True)
class DesiredService:
    """One Service and its Endpoints as they should be."""

    key: ServiceKey
    policy: ObjectRef
    policy_uid: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[ListedEndpoint, ...]  # sorted by ip
    left_out: tuple[str, ...] = ()  # pods not listed: hot, or an address Endpoints refuse

    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.key.name,
            "namespace": self.key.namespace,
            "labels": {MANAGED_BY[0]: MANAGED_BY[1], POLICY_LABEL: _label_value(self.policy.name)},
            "annotations": {POLICY_LABEL: self.policy.name},
        }
        if self.policy_uid:
            meta["ownerReferences"] = [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": self.policy.name,
                    "uid": self.policy_uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ]
        return meta

    def service_body(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self._meta(),
            "spec": {
                "ports": [
                    {"name": p.name, "port": p.port, "targetPort": p.port, "protocol": p.protocol}
                    for p in self.ports
                ],
            },
        }

    def endpoints_body(self) -> dict[str, Any]:
        groups: dict[tuple[tuple[str, int], ...], list[ListedEndpoint]] = {}
        for e in self.endpoints:
            groups.setdefault(e.ports, []).append(e)
        protocols = {p.name: p.protocol for p in self.ports}
        subsets = [
            {
                "addresses": [
                    {
                        "ip": e.ip,
                        "targetRef": {
                            "kind": "Pod",
                            "namespace": self.key.namespace,
                            "name": e.pod,
                        },
                    }
                    for e in members
                ],
                "ports": [
                    {"name": name, "port": number, "protocol": protocols.get(name, "TCP")}
                    for name, number in ports
                ],
            }
            for ports, members in sorted(groups.items())
        ]
        return {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": self._meta(),
            "subsets": subsets,
        }


def owned_by(obj: Mapping[str, Any], policy_uid: str | None = None) -> bool:
    """Whether ``obj`` (a Service or Endpoints as read) is Aviator's: labelled managed-by
    aviator and, when ``policy_uid`` is given, owned by that policy (or by none)."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY[0]) != MANAGED_BY[1]:
        return False
    if policy_uid is None:
        return True
    owners = [o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("kind") == KIND]
    return not owners or policy_uid in owners


class HotSetHysteresis:
    """Which endpoints each Service lists, with a rejoin delay (state kept per Service).

    :meth:`listed` with the candidates (ready endpoints), the weigher's hot set, ``now`` and
    the rejoin delay returns the listed endpoints and the time of the next change that no
    new input would announce (an excluded endpoint's rejoin), or None.
    """

    def __init__(self) -> None:
        self._cold_since: dict[ServiceKey, dict[EndpointAddress, float | None]] = {}

    def listed(
        self,
        key: ServiceKey,
        candidates: Iterable[EndpointAddress],
        hot: frozenset[EndpointAddress],
        *,
        hot_quantile: float,
        now: float,
        rejoin_after: float,
    ) -> tuple[frozenset[EndpointAddress], float | None]:
        everyone = frozenset(candidates)
        n = len(everyone)
        cap = hot_cap(n, hot_quantile)
        hot_now = hot & everyone
        if len(hot_now) > cap or (n and hot_now == everyone):
            hot_now = frozenset()  # overloaded as a whole: list every pod
        previous = self._cold_since.get(key, {})
        out: set[EndpointAddress] = set(hot_now)
        state: dict[EndpointAddress, float | None] = dict.fromkeys(hot_now)
        wakeup: float | None = None
        for address, cold_since in previous.items():
            if address in hot_now or address not in everyone:
                continue
            since = now if cold_since is None else cold_since
            if now - since < rejoin_after:
                out.add(address)
                state[address] = since
                at = since + rejoin_after
                wakeup = at if wakeup is None else min(wakeup, at)
        if len(out) > cap or (n and out == everyone):
            # Holding recovered pods out would go below what the cap leaves: let them in.
            out = set(hot_now)
            state = dict.fromkeys(hot_now)
            wakeup = None
        if state:
            self._cold_since[key] = state
        else:
            self._cold_since.pop(key, None)
        return everyone - out, wakeup

    def forget(self, keep: Iterable[ServiceKey]) -> None:
        wanted = set(keep)
        for key in [k for k in self._cold_since if k not in wanted]:
            del self._cold_since[key]


def endpoint_ip_allowed(ip: str) -> bool:
    """Whether the API server accepts ``ip`` in an Endpoints address (its validation refuses
    unspecified, loopback, link-local and multicast addresses: a hostNetwork pod on
    127.0.0.1 can be an Envoy endpoint, never a Service's)."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not (a.is_unspecified or a.is_loopback or a.is_link_local or a.is_multicast)


def _ports(resolution: PolicyResolution) -> tuple[ServicePort, ...]:
    target = resolution.target
    seen: dict[int, ServicePort] = {}
    if target is not None:
        for p in target.ports:
            if p.protocol == "TCP" and p.number not in seen:
                seen[p.number] = ServicePort(p.name or f"tcp-{p.number}", p.number)
    # The traffic port is always one of the Service's, even when the template does not
    # declare it (a policy's port number, or a name only the pods declare).
    traffic = resolution.port
    names = {p.name for p in seen.values()}
    if (isinstance(traffic, int) and traffic not in seen) or (
        isinstance(traffic, str) and traffic not in names
    ):
        number = traffic if isinstance(traffic, int) else None
        if number is None and resolution.endpoints:
            number = resolution.endpoints[0].address.port
        number = number or DEFAULT_SERVICE_PORT
        name = traffic if isinstance(traffic, str) else "traffic"
        if number not in seen:
            seen[number] = ServicePort(name, number)
    if not seen:
        seen[DEFAULT_SERVICE_PORT] = ServicePort("traffic", DEFAULT_SERVICE_PORT)
    return tuple(seen.values())


def desired_service(
    resolution: PolicyResolution, listed: frozenset[EndpointAddress]
) -> DesiredService | None:
    """The Service of one policy listing ``listed`` (None unless it serves and opted in)."""
    policy = resolution.policy
    if policy is None or not policy.publish_service or not resolution.serving:
        return None
    ports = _ports(resolution)
    traffic = resolution.port
    endpoints = []
    for e in resolution.endpoints:
        if e.address not in listed or not endpoint_ip_allowed(e.address.ip):
            continue
        numbers = []
        for p in ports:
            is_traffic = p.name == traffic if isinstance(traffic, str) else p.port == traffic
            numbers.append((p.name, e.address.port if is_traffic else p.port))
        endpoints.append(ListedEndpoint(e.address.ip, e.pod, tuple(numbers)))
    key = ServiceKey(resolution.ref.namespace, service_name(policy.target_ref.name))
    left_out = tuple(
        sorted(
            e.pod
            for e in resolution.endpoints
            if e.address not in listed or not endpoint_ip_allowed(e.address.ip)
        )
    )
    return DesiredService(
        key=key,
        policy=resolution.ref,
        policy_uid=policy.meta.uid,
        ports=ports,
        endpoints=tuple(sorted(endpoints, key=lambda e: (e.ip, e.pod))),
        left_out=left_out,
    )

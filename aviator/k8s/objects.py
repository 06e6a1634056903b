"""Typed, frozen Kubernetes objects: ObjectMeta, label selectors, workloads and pods.

Parsed from the dicts the Kubernetes API returns (or ``yaml.safe_load`` of a manifest).
Only the fields Aviator reads are kept; everything else in the dict is ignored, because
the API server already validated the whole object, and manifests in a directory carry
fields (``status``, ``managedFields``...) that are none of Aviator's business.

Parsing collects *every* error of an object (field path + what was wrong + what is allowed)
and raises one :class:`~aviator.k8s.fields.ObjectError`, in the vocabulary of
:mod:`aviator.k8s.fields`; a value that exists was validated at construction.
This module is pure: no I/O, no clock, no Kubernetes client.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aviator.k8s.fields import (
    Fields,
    ObjectError,
    ObjectRef,
    dns_label_error,
    dns_subdomain_error,
    label_key_error,
    label_value_error,
    port_name_error,
    ref_of,
    type_name,
)
from aviator.model import WorkloadKey

__all__ = [
    "ZONE_LABELS",
    "ContainerPort",
    "LabelSelector",
    "Labels",
    "ObjectMeta",
    "Operator",
    "Pod",
    "Requirement",
    "Workload",
    "WorkloadKind",
    "parse_labels",
    "parse_meta",
    "parse_pod",
    "parse_workload",
]

# The well-known zone label, then its deprecated predecessor (still set by older clusters).
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")


class WorkloadKind(enum.StrEnum):
    """The workload kinds a policy may target (both ``apps/v1``)."""

    DEPLOYMENT = "Deployment"
    STATEFUL_SET = "StatefulSet"


# --- labels ---------------------------------------------------------------------------------


class Labels(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping (labels, matchLabels)."""

    __slots__ = ("_items",)
    _items: dict[str, str]

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Labels is immutable")

    def __reduce__(self) -> tuple[type[Labels], tuple[dict[str, str]]]:
        # Pickled from the directory source's parse worker (the default protocol would set
        # the slot through __setattr__, which refuses).
        return (Labels, (self._items,))

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"


def parse_labels(f: Fields, obj: Mapping[str, Any], key: str, path: str) -> Labels:
    """A ``str -> str`` map with valid label keys and values (a bad entry is skipped)."""
    raw = f.mapping(obj, key, path)
    if raw is None:
        return Labels()
    good: dict[str, str] = {}
    # Typed as objects: YAML keys can be numbers or booleans (``1: a``, ``on: x``).
    entries: Iterable[tuple[object, object]] = raw.items()
    for k, v in entries:
        if not isinstance(k, str):
            f.error(path, f"keys must be strings, got {type_name(k)}")
            continue
        if not isinstance(v, str):
            f.error(
                f"{path}.{k}",
                f"label values must be strings, got {type_name(v)} "
                "(quote numbers and booleans in YAML)",
            )
            continue
        why = label_key_error(k) or label_value_error(v)
        if why is not None:
            f.error(f"{path}.{k}", why)
            continue
        good[k] = v
    return Labels(good)


# --- ObjectMeta -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """The parts of ``metadata`` Aviator uses.

    ``creation_timestamp`` is always timezone-aware when set; ``generation`` counts spec
    changes (0 when the source does not track it).
    """

    name: str
    namespace: str = "default"
    uid: str = ""
    labels: Labels = field(default_factory=Labels)
    resource_version: str = ""
    creation_timestamp: datetime | None = None
    generation: int = 0
    deletion_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.namespace:
            raise ValueError(f"metadata needs a name and a namespace, got {self!r}")
        for ts in (self.creation_timestamp, self.deletion_timestamp):
            if ts is not None and ts.tzinfo is None:
                raise ValueError("metadata timestamps must be timezone-aware")


def parse_meta(f: Fields, doc: Mapping[str, Any]) -> ObjectMeta | None:
    """Read ``metadata`` of ``doc``; None (with errors in ``f``) if it has no valid name."""
    meta = f.mapping(doc, "metadata", "metadata", "the object's name and namespace")
    if meta is None:
        return None
    name = f.string(meta, "name", "metadata.name", "the object's name")
    if name is not None and (why := dns_subdomain_error(name)) is not None:
        f.error("metadata.name", why)
        name = None
    namespace = f.string(meta, "namespace", "metadata.namespace") or "default"
    if (why := dns_label_error(namespace)) is not None:
        f.error("metadata.namespace", why)
    uid = f.string(meta, "uid", "metadata.uid") or ""
    labels = parse_labels(f, meta, "labels", "metadata.labels")
    rv = f.string(meta, "resourceVersion", "metadata.resourceVersion") or ""
    created = f.timestamp(meta, "creationTimestamp", "metadata.creationTimestamp")
    deleted = f.timestamp(meta, "deletionTimestamp", "metadata.deletionTimestamp")
    generation = f.integer(meta, "generation", "metadata.generation") or 0
    if name is None:
        return None
    return ObjectMeta(
        name=name,
        namespace=namespace,
        uid=uid,
        labels=labels,
        resource_version=rv,
        creation_timestamp=created,
        generation=generation,
        deletion_timestamp=deleted,
    )


# --- label selectors --------------------------------------------------------------------------


class Operator(enum.StrEnum):
    """Label selector operators (case-sensitive, as the API spells them)."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ``matchExpressions`` entry.

    Invariant (as apimachinery validates it): ``In``/``NotIn`` have at least one value,
    ``Exists``/``DoesNotExist`` have none.
    """

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        has_values = self.operator in (Operator.IN, Operator.NOT_IN)
        if has_values and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if not has_values and self.values:
            raise ValueError(f"operator {self.operator} takes no values")

    def matches(self, labels: Mapping[str, str]) -> bool:
        # Semantics of k8s.io/apimachinery/pkg/labels.Requirement.Matches: NotIn also
        # matches objects that do not have the key at all.
        match self.operator:
            case Operator.IN:
                return labels.get(self.key) in self.values
            case Operator.NOT_IN:
                return self.key not in labels or labels[self.key] not in self.values
            case Operator.EXISTS:
                return self.key in labels
            case Operator.DOES_NOT_EXIST:
                return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """``matchLabels`` AND every ``matchExpressions`` entry.

    An empty selector matches every object (apimachinery's ``LabelSelectorAsSelector``);
    workloads reject empty selectors at parse time, as the apps/v1 API does.
    """

    match_labels: Labels = field(default_factory=Labels)
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for r in self.match_expressions:
            vals = ",".join(sorted(r.values))
            parts.append(
                {
                    Operator.IN: f"{r.key} in ({vals})",
                    Operator.NOT_IN: f"{r.key} notin ({vals})",
                    Operator.EXISTS: r.key,
                    Operator.DOES_NOT_EXIST: f"!{r.key}",
                }[r.operator]
            )
        return ",".join(parts)


def parse_selector(f: Fields, obj: Mapping[str, Any], path: str) -> LabelSelector | None:
    """Read a ``metav1.LabelSelector`` at ``path``; None if absent or invalid."""
    raw = f.mapping(obj, "selector", path, "a label selector (matchLabels / matchExpressions)")
    if raw is None:
        return None
    before = len(f.errors)
    match_labels = parse_labels(f, raw, "matchLabels", f"{path}.matchLabels")
    exprs: list[Requirement] = []
    for i, item in enumerate(f.list(raw, "matchExpressions", f"{path}.matchExpressions") or []):
        p = f"{path}.matchExpressions[{i}]"
        if not isinstance(item, Mapping):
            f.error(p, f"must be an object, got {type_name(item)}")
            continue
        key = f.string(item, "key", f"{p}.key", "the label key")
        if key is not None and (why := label_key_error(key)) is not None:
            f.error(f"{p}.key", why)
            key = None
        op_text = f.string(item, "operator", f"{p}.operator", "In, NotIn, Exists or DoesNotExist")
        op: Operator | None = None
        if op_text is not None:
            try:
                op = Operator(op_text)
            except ValueError:
                f.error(
                    f"{p}.operator",
                    f'unsupported value "{op_text}"; allowed: "In", '
                    '"NotIn", "Exists", "DoesNotExist" (case-sensitive)',
                )
        values_raw = f.list(item, "values", f"{p}.values") or []
        values: set[str] = set()
        for j, v in enumerate(values_raw):
            if not isinstance(v, str):
                f.error(f"{p}.values[{j}]", f"must be a string, got {type_name(v)}")
            elif (why := label_value_error(v)) is not None:
                f.error(f"{p}.values[{j}]", why)
            else:
                values.add(v)
        if op in (Operator.IN, Operator.NOT_IN) and not values_raw:
            f.error(f"{p}.values", f"must have at least one value for operator {op}")
            continue
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values_raw:
            f.error(f"{p}.values", f"must be empty for operator {op}")
            continue
        if key is not None and op is not None:
            exprs.append(Requirement(key, op, frozenset(values)))
    if len(f.errors) > before:
        return None
    return LabelSelector(match_labels, tuple(exprs))


# --- container ports, workloads, pods ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A ``containers[].ports[]`` entry; ``name`` is an IANA service name when set."""

    container: str
    number: int
    name: str | None = None
    protocol: str = "TCP"

    def __post_init__(self) -> None:
        if not 0 < self.number < 65536:
            raise ValueError(f"containerPort must be in 1..65535, got {self.number}")


def _parse_containers(
    f: Fields, pod_spec: Mapping[str, Any], path: str
) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    containers = f.list(pod_spec, "containers", f"{path}.containers") or []
    for i, c in enumerate(containers):
        cp = f"{path}.containers[{i}]"
        if not isinstance(c, Mapping):
            f.error(cp, f"must be an object, got {type_name(c)}")
            continue
        cname = f.string(c, "name", f"{cp}.name") or f"container-{i}"
        for j, p in enumerate(f.list(c, "ports", f"{cp}.ports") or []):
            pp = f"{cp}.ports[{j}]"
            if not isinstance(p, Mapping):
                f.error(pp, f"must be an object, got {type_name(p)}")
                continue
            number = f.integer(p, "containerPort", f"{pp}.containerPort", "a port number 1-65535")
            if number is not None and not 0 < number < 65536:
                f.error(f"{pp}.containerPort", f"must be in 1..65535, got {number}")
                number = None
            name = f.string(p, "name", f"{pp}.name")
            if name is not None and (why := port_name_error(name)) is not None:
                f.error(f"{pp}.name", why)
                name = None
            protocol = f.string(p, "protocol", f"{pp}.protocol") or "TCP"
            if protocol not in ("TCP", "UDP", "SCTP"):
                f.error(
                    f"{pp}.protocol",
                    f'unsupported value "{protocol}"; allowed: "TCP", "UDP", "SCTP"',
                )
                continue
            if number is not None:
                ports.append(ContainerPort(cname, number, name, protocol))
    return tuple(ports)


def _tcp_port_named(ports: tuple[ContainerPort, ...], name: str) -> int | None:
    # Like a Service's named targetPort: the first TCP port of that name, in container order.
    for p in ports:
        if p.name == name and p.protocol == "TCP":
            return p.number
    return None


@dataclass(frozen=True, slots=True)
class Workload:
    """A Deployment or StatefulSet: which pods are its own, and which ports they declare.

    Invariant: ``selector`` is non-empty and matches ``template_labels`` (the apps/v1 API
    rejects objects that break either rule, and so does :func:`parse_workload`).
    """

    kind: WorkloadKind
    meta: ObjectMeta
    selector: LabelSelector
    template_labels: Labels = field(default_factory=Labels)
    ports: tuple[ContainerPort, ...] = ()
    replicas: int | None = None

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.kind.value, self.meta.namespace, self.meta.name)

    @property
    def key(self) -> WorkloadKey:
        return WorkloadKey(self.meta.namespace, self.meta.name)

    def port_named(self, name: str) -> int | None:
        """The number of the template's TCP container port called ``name``, if any."""
        return _tcp_port_named(self.ports, name)

    @property
    def first_port(self) -> int | None:
        """The template's first TCP container port (the default traffic port), if any."""
        return next((p.number for p in self.ports if p.protocol == "TCP"), None)

    def selects(self, pod: Pod) -> bool:
        """Whether ``pod`` is one of this workload's pods (same namespace, selector match)."""
        return pod.meta.namespace == self.meta.namespace and self.selector.matches(pod.meta.labels)


def parse_workload(doc: Mapping[str, Any]) -> Workload:
    """Parse an apps/v1 Deployment or StatefulSet dict; raises :class:`ObjectError`."""
    kind_text = doc.get("kind")
    ref = ref_of(doc, str(kind_text))
    f = Fields()
    try:
        kind = WorkloadKind(str(kind_text))
    except ValueError:
        f.error("kind", f'unsupported value {kind_text!r}; allowed: "Deployment", "StatefulSet"')
        raise ObjectError(ref, tuple(f.errors)) from None
    if doc.get("apiVersion") != "apps/v1":
        f.error("apiVersion", f'must be "apps/v1" for a {kind}, got {doc.get("apiVersion")!r}')
    meta = parse_meta(f, doc)
    spec = f.mapping(doc, "spec", "spec", "the workload's selector and pod template") or {}
    selector = parse_selector(f, spec, "spec.selector")
    if selector is not None and selector.empty:
        f.error(
            "spec.selector",
            f"empty selector is invalid for a {kind}: it would select every pod of the namespace",
        )
        selector = None
    replicas = f.integer(spec, "replicas", "spec.replicas")
    template = f.mapping(spec, "template", "spec.template", "the pod template") or {}
    tmeta = f.mapping(template, "metadata", "spec.template.metadata") or {}
    template_labels = parse_labels(f, tmeta, "labels", "spec.template.metadata.labels")
    tspec = f.mapping(template, "spec", "spec.template.spec") or {}
    ports = _parse_containers(f, tspec, "spec.template.spec")
    if selector is not None and not selector.matches(template_labels):
        f.error(
            "spec.template.metadata.labels",
            f"do not match spec.selector ({selector}): "
            "the workload would not own the pods it creates",
        )
    if f.errors or meta is None or selector is None:
        raise ObjectError(ref, tuple(f.errors))
    return Workload(kind, meta, selector, template_labels, ports, replicas)


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as Aviator sees it: where it is, whether it may take traffic, its ports."""

    meta: ObjectMeta
    phase: str = "Pending"
    pod_ip: str | None = None
    ready_condition: bool = False
    node_name: str | None = None
    ports: tuple[ContainerPort, ...] = ()

    def __post_init__(self) -> None:
        if self.pod_ip is not None:
            ipaddress.ip_address(self.pod_ip)  # raises ValueError naming the bad text

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Pod", self.meta.namespace, self.meta.name)

    @property
    def ready(self) -> bool:
        """May take traffic: Running, condition Ready=True, not terminating, has an IP.

        The same rule EndpointSlices use for ``ready``, plus the phase check.
        """
        return (
            self.phase == "Running"
            and self.ready_condition
            and self.meta.deletion_timestamp is None
            and self.pod_ip is not None
        )

    @property
    def zone(self) -> str | None:
        for label in ZONE_LABELS:
            if zone := self.meta.labels.get(label):
                return zone
        return None

    def port_named(self, name: str) -> int | None:
        """The number of this pod's TCP container port called ``name``, if any."""
        return _tcp_port_named(self.ports, name)


def parse_pod(doc: Mapping[str, Any]) -> Pod:
    """Parse a v1 Pod dict; raises :class:`ObjectError`."""
    ref = ref_of(doc, "Pod")
    f = Fields()
    if doc.get("apiVersion") != "v1" or doc.get("kind") != "Pod":
        f.error(
            "apiVersion",
            f'a Pod must have apiVersion "v1" and kind "Pod", got '
            f"{doc.get('apiVersion')!r} / {doc.get('kind')!r}",
        )
    meta = parse_meta(f, doc)
    spec = f.mapping(doc, "spec", "spec") or {}
    node = f.string(spec, "nodeName", "spec.nodeName")
    ports = _parse_containers(f, spec, "spec")
    status = f.mapping(doc, "status", "status") or {}
    phase = f.string(status, "phase", "status.phase") or "Pending"
    ip = f.string(status, "podIP", "status.podIP")
    if ip is None:
        # Dual-stack clusters fill podIPs; podIP is podIPs[0].ip when both are set.
        ips = f.list(status, "podIPs", "status.podIPs") or []
        if ips and isinstance(ips[0], Mapping) and isinstance(ips[0].get("ip"), str):
            ip = ips[0]["ip"]
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            f.error("status.podIP", f"{ip!r} is not an IPv4 or IPv6 address")
            ip = None
    ready = False
    for i, cond in enumerate(f.list(status, "conditions", "status.conditions") or []):
        if not isinstance(cond, Mapping):
            f.error(f"status.conditions[{i}]", f"must be an object, got {type_name(cond)}")
        elif cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    if f.errors or meta is None:
        raise ObjectError(ref, tuple(f.errors))
    return Pod(meta, phase, ip, ready, node, ports)

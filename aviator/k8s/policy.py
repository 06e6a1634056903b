"""The ``AviatorPolicy`` resource (``aviator.io/v1alpha1``): model, defaults and validation.

A policy names one workload in its own namespace and says how its pods are probed and
weighted::

    apiVersion: aviator.io/v1alpha1
    kind: AviatorPolicy
    metadata: {name: web, namespace: shop}
    spec:
      targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
      latencyThreshold: 100ms      # above this an endpoint is "hot"
      pingInterval: 1s             # each pod is probed this often
      port: http                   # optional: traffic port, number or container port name
      probe: {path: /aviator/probe, port: http, timeout: 500ms}   # optional
      weigher: {maxWeightRatio: 10}                               # optional tuning knobs
      annotatePods: true           # optional: weight, latency and deletion cost on each pod
      publishService: true         # optional: Service <target>-aviator without the hot pods

Validation is strict, like ``kubectl apply --validate=strict``: unknown fields are errors,
and every error of the object is reported at once (:class:`PolicyError`), each with its
field path, what was wrong and what is allowed. The CRD in ``deploy/crd/`` encodes the same
rules as an OpenAPI schema; tests check that the two agree.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aviator.k8s.duration import Duration, DurationError, parse_duration
from aviator.k8s.fields import (
    FieldError,
    Fields,
    ObjectError,
    ObjectRef,
    dns_subdomain_error,
    port_name_error,
    ref_of,
    type_name,
)
from aviator.k8s.objects import ObjectMeta, WorkloadKind, parse_meta
from aviator.model import KnobError, WeigherKnobs, WorkloadKey

__all__ = [
    "API_VERSION",
    "DEFAULT_PORT",
    "DEFAULT_PROBE_PATH",
    "DEFAULT_PROBE_TIMEOUT",
    "DURATION_MAX_LENGTH",
    "KIND",
    "LATENCY_THRESHOLD_RANGE",
    "PING_INTERVAL_RANGE",
    "PROBE_FIELDS",
    "PROBE_PATH_MAX_LENGTH",
    "PROBE_PATH_PATTERN",
    "PROBE_TIMEOUT_MIN",
    "SPEC_FIELDS",
    "TARGET_API_VERSION",
    "TARGET_REF_FIELDS",
    "TOP_FIELDS",
    "AviatorPolicy",
    "InvalidPolicy",
    "PolicyEntry",
    "PolicyError",
    "ProbeSpec",
    "TargetRef",
    "parse_policy",
    "parse_policy_entry",
]

API_VERSION: Final = "aviator.io/v1alpha1"
KIND: Final = "AviatorPolicy"
TARGET_API_VERSION: Final = "apps/v1"
DEFAULT_PROBE_PATH: Final = "/aviator/probe"
DEFAULT_PORT: Final = 8080  # traffic port when neither the policy nor the template names one
DEFAULT_PROBE_TIMEOUT: Final = Duration.of(seconds=1)  # capped at pingInterval
PROBE_TIMEOUT_MIN: Final = Duration.of(milliseconds=1)
# Below 10ms probing costs more than it tells; above 5m the weights are stale long before
# the next probe (Prequal: load information older than ~1s already hurts).
PING_INTERVAL_RANGE: Final = (Duration.of(milliseconds=10), Duration.of(seconds=300))
LATENCY_THRESHOLD_RANGE: Final = (Duration.of(milliseconds=1), Duration.of(seconds=60))

# Every field the model accepts, by object; the CRD's schema must list exactly these.
TOP_FIELDS: Final = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
SPEC_FIELDS: Final = frozenset(
    {"targetRef", "latencyThreshold", "pingInterval", "port", "probe", "weigher"}
    | {"annotatePods", "publishService"}  # opt-in writes to the cluster (aviator.operator)
)
TARGET_REF_FIELDS: Final = frozenset({"apiVersion", "kind", "name"})
PROBE_FIELDS: Final = frozenset({"path", "port", "timeout"})

# Printable ASCII without spaces, starting with '/': a request path (query allowed).
PROBE_PATH_PATTERN: Final = r"^/[!-~]*$"
_PROBE_PATH = re.compile(PROBE_PATH_PATTERN)
PROBE_PATH_MAX_LENGTH: Final = 1024
# The CRD's maxLength for durations: bounds the cost of its CEL duration() rules.
DURATION_MAX_LENGTH: Final = 64

_KINDS = ", ".join(f'"{k.value}"' for k in WorkloadKind)


class PolicyError(ObjectError):
    """An invalid AviatorPolicy: ``ref`` names it, ``errors`` lists every bad field."""


@dataclass(frozen=True, slots=True)
class TargetRef:
    """The workload a policy applies to, in the policy's own namespace."""

    kind: WorkloadKind
    name: str
    api_version: str = TARGET_API_VERSION


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """How pods are probed. ``port`` None means "the traffic port"."""

    timeout: Duration
    path: str = DEFAULT_PROBE_PATH
    port: int | str | None = None


@dataclass(frozen=True, slots=True)
class AviatorPolicy:
    """A valid policy with every default filled in.

    Invariants (checked at construction, :class:`PolicyError` otherwise): pingInterval in
    ``PING_INTERVAL_RANGE``, latencyThreshold in ``LATENCY_THRESHOLD_RANGE``,
    ``PROBE_TIMEOUT_MIN <= probe.timeout <= pingInterval``.
    """

    meta: ObjectMeta
    target_ref: TargetRef
    latency_threshold: Duration
    ping_interval: Duration
    probe: ProbeSpec
    port: int | str | None = None  # None: the template's first TCP port, else DEFAULT_PORT
    weigher: WeigherKnobs = field(default_factory=WeigherKnobs)
    # Opt-in writes to the cluster, done by the leader (aviator.operator): each pod's weight,
    # latency and pod-deletion-cost as annotations; a Service <target>-aviator whose
    # Endpoints leave out the hot pods.
    annotate_pods: bool = False
    publish_service: bool = False

    def __post_init__(self) -> None:
        errors = _bounds_errors(self.latency_threshold, self.ping_interval, self.probe.timeout)
        if errors:
            raise PolicyError(self.ref, tuple(errors))

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(KIND, self.meta.namespace, self.meta.name)

    @property
    def target(self) -> ObjectRef:
        """The targeted workload (always in the policy's namespace)."""
        return ObjectRef(self.target_ref.kind.value, self.meta.namespace, self.target_ref.name)

    @property
    def key(self) -> WorkloadKey:
        return WorkloadKey(self.meta.namespace, self.target_ref.name)

    def spec_dict(self) -> dict[str, Any]:
        """The spec with every default written out (parses back to an equal policy)."""
        spec: dict[str, Any] = {
            "targetRef": {
                "apiVersion": self.target_ref.api_version,
                "kind": self.target_ref.kind.value,
                "name": self.target_ref.name,
            },
            "latencyThreshold": str(self.latency_threshold).replace("µs", "us"),
            "pingInterval": str(self.ping_interval).replace("µs", "us"),
            "probe": {
                "path": self.probe.path,
                "timeout": str(self.probe.timeout).replace("µs", "us"),
            },
            "weigher": self.weigher.to_spec(),
            "annotatePods": self.annotate_pods,
            "publishService": self.publish_service,
        }
        if self.port is not None:
            spec["port"] = self.port
        if self.probe.port is not None:
            spec["probe"]["port"] = self.probe.port
        return spec


@dataclass(frozen=True, slots=True)
class InvalidPolicy:
    """A policy that names itself but does not validate: kept so its status can say why."""

    meta: ObjectMeta
    errors: tuple[FieldError, ...]

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(KIND, self.meta.namespace, self.meta.name)


PolicyEntry = AviatorPolicy | InvalidPolicy


def parse_policy(doc: Mapping[str, Any]) -> AviatorPolicy:
    """Parse and validate an AviatorPolicy dict; raises :class:`PolicyError` with all errors."""
    entry = parse_policy_entry(doc)
    if isinstance(entry, InvalidPolicy):
        raise PolicyError(entry.ref, entry.errors)
    return entry


def parse_policy_entry(doc: Mapping[str, Any]) -> PolicyEntry:
    """Like :func:`parse_policy`, but an invalid policy that has a usable name comes back as
    an :class:`InvalidPolicy`; only a policy without one raises :class:`PolicyError`."""
    f = Fields()
    if doc.get("apiVersion") != API_VERSION:
        f.error(
            "apiVersion", f'unsupported value {doc.get("apiVersion")!r}; allowed: "{API_VERSION}"'
        )
    if doc.get("kind") != KIND:
        f.error("kind", f'must be "{KIND}", got {doc.get("kind")!r}')
    _unknown(f, doc, TOP_FIELDS, "")
    meta = parse_meta(f, doc)
    policy = _parse_spec(f, doc, meta)
    if meta is None:
        raise PolicyError(ref_of(doc, KIND), tuple(f.errors))
    if f.errors or policy is None:
        return InvalidPolicy(meta, tuple(f.errors))
    return policy


# --- internals ------------------------------------------------------------------------------


def _unknown(f: Fields, obj: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    for key in obj:
        if key not in known:
            # An empty key still needs a path that names it (found by tests/fuzz).
            path = f"{prefix}{key}" if key != "" else f'{prefix}""'
            hint = ""
            if path == "spec.targetRef.namespace":
                hint = " (a policy targets a workload in its own namespace)"
            f.error(
                path,
                f"unknown field{hint}: not in the AviatorPolicy schema (strict "
                "validation, as kubectl apply --validate=strict reports it); known fields: "
                + ", ".join(sorted(known)),
            )


def _duration(
    f: Fields,
    obj: Mapping[str, Any],
    key: str,
    path: str,
    what: str | None,
    bounds: tuple[Duration, Duration] | None = None,
) -> Duration | None:
    value = f.get(obj, key, path, what)
    if value is None:
        return None
    if not isinstance(value, str):
        f.error(
            path, f'must be a duration string such as "500ms" or "1m30s", got {type_name(value)}'
        )
        return None
    if len(value) > DURATION_MAX_LENGTH:
        f.error(path, f"must be at most {DURATION_MAX_LENGTH} characters, got {len(value)}")
        return None
    try:
        d = parse_duration(value)
    except DurationError as exc:
        f.error(path, str(exc))
        return None
    if d.nanoseconds == 0:
        f.error(path, f"{value!r} is zero; durations must be positive")
        return None
    if bounds is not None and (err := _range_error(path, d, bounds)) is not None:
        f.errors.append(err)
        return None
    return d


def _port(f: Fields, obj: Mapping[str, Any], key: str, path: str) -> int | str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        f.error(
            path, f"must be a port number 1-65535 or a container port name, got {type_name(value)}"
        )
        return None
    if isinstance(value, int):
        if not 0 < value < 65536:
            f.error(path, f"port number must be in 1..65535, got {value}")
            return None
        return value
    if value.isdigit():
        f.error(
            path,
            f"{value!r} is a string: write a port number without quotes, or a container port name",
        )
        return None
    if (why := port_name_error(value)) is not None:
        f.error(path, why)
        return None
    return value


def _range_error(
    path: str, value: Duration, bounds: tuple[Duration, Duration]
) -> FieldError | None:
    low, high = bounds
    if low <= value <= high:
        return None
    return FieldError(path, f"{value} is out of range; allowed: {low} to {high}")


def _timeout_error(timeout: Duration, interval: Duration | None) -> FieldError | None:
    if timeout < PROBE_TIMEOUT_MIN:
        return FieldError(
            "spec.probe.timeout",
            f"{timeout} is too short; allowed: {PROBE_TIMEOUT_MIN} up to spec.pingInterval",
        )
    if interval is not None and timeout > interval:
        return FieldError(
            "spec.probe.timeout",
            f"{timeout} is longer than spec.pingInterval ({interval}); a probe must end "
            "before the next one starts",
        )
    return None


def _bounds_errors(latency: Duration, interval: Duration, timeout: Duration) -> list[FieldError]:
    checks = (
        _range_error("spec.latencyThreshold", latency, LATENCY_THRESHOLD_RANGE),
        _range_error("spec.pingInterval", interval, PING_INTERVAL_RANGE),
        _timeout_error(timeout, interval),
    )
    return [e for e in checks if e is not None]


def _target_ref(f: Fields, spec: Mapping[str, Any]) -> TargetRef | None:
    what = "the workload to balance: {apiVersion: apps/v1, kind: Deployment|StatefulSet, name}"
    raw = f.mapping(spec, "targetRef", "spec.targetRef", what)
    if raw is None:
        return None
    _unknown(f, raw, TARGET_REF_FIELDS, "spec.targetRef.")
    api_version = f.string(raw, "apiVersion", "spec.targetRef.apiVersion")
    if api_version is not None and api_version != TARGET_API_VERSION:
        f.error(
            "spec.targetRef.apiVersion",
            f'unsupported value {api_version!r}; allowed: "{TARGET_API_VERSION}"',
        )
    kind_text = f.string(raw, "kind", "spec.targetRef.kind", _KINDS)
    kind: WorkloadKind | None = None
    if kind_text is not None:
        try:
            kind = WorkloadKind(kind_text)
        except ValueError:
            hint = ""
            if kind_text.lower() in {k.value.lower() for k in WorkloadKind}:
                hint = " (kinds are case-sensitive)"
            f.error(
                "spec.targetRef.kind", f"unsupported value {kind_text!r}{hint}; allowed: {_KINDS}"
            )
    name = f.string(raw, "name", "spec.targetRef.name", "the workload's name")
    if name is not None and (why := dns_subdomain_error(name)) is not None:
        f.error("spec.targetRef.name", why)
        name = None
    if kind is None or name is None:
        return None
    return TargetRef(kind, name, api_version or TARGET_API_VERSION)


def _probe(
    f: Fields, spec: Mapping[str, Any], interval: Duration | None
) -> tuple[str, int | str | None, Duration | None] | None:
    """(path, port, explicit timeout or None); None if invalid."""
    raw = f.mapping(spec, "probe", "spec.probe") or {}
    before = len(f.errors)
    _unknown(f, raw, PROBE_FIELDS, "spec.probe.")
    path = f.string(raw, "path", "spec.probe.path")
    if path is None:
        path = DEFAULT_PROBE_PATH
    elif len(path) > PROBE_PATH_MAX_LENGTH:
        f.error("spec.probe.path", f"must be at most {PROBE_PATH_MAX_LENGTH} characters")
    elif not _PROBE_PATH.fullmatch(path):
        f.error(
            "spec.probe.path",
            f"{path!r} must start with '/' and hold only printable "
            "ASCII without spaces (percent-encode the rest)",
        )
    elif "#" in path:
        # A fragment is never sent in a request, and the prober refuses such a path: the
        # policy would be Accepted and probe nothing (the CRD's pattern lets '#' through).
        f.error(
            "spec.probe.path",
            f"{path[:64]!r} must not hold '#': a fragment is not sent to the pod "
            "(percent-encode it as %23)",
        )
    port = _port(f, raw, "port", "spec.probe.port")
    timeout = _duration(f, raw, "timeout", "spec.probe.timeout", None)
    if timeout is not None and (err := _timeout_error(timeout, interval)) is not None:
        f.errors.append(err)
    if len(f.errors) > before:
        return None
    return path, port, timeout


def _weigher(f: Fields, spec: Mapping[str, Any]) -> WeigherKnobs | None:
    raw = f.mapping(spec, "weigher", "spec.weigher")
    if raw is None:
        return WeigherKnobs()
    # WeigherKnobs.from_spec stops at its first error; feeding it one knob at a time reports
    # every bad knob, then the whole mapping catches rules that involve several knobs.
    bad = False
    for key, value in raw.items():
        try:
            WeigherKnobs.from_spec({key: value})
        except KnobError as exc:
            f.error(f"spec.weigher.{exc.field}" if exc.field else "spec.weigher", exc.message)
            bad = True
    if bad:
        return None
    try:
        return WeigherKnobs.from_spec(raw)
    except KnobError as exc:
        f.error(f"spec.weigher.{exc.field}" if exc.field else "spec.weigher", exc.message)
        return None


def _flag(f: Fields, spec: Mapping[str, Any], key: str) -> bool:
    """An optional boolean field (default False); a string such as "true" is an error."""
    value = spec.get(key, False)
    if not isinstance(value, bool):
        f.error(f"spec.{key}", f"must be true or false, got {type_name(value)}")
        return False
    return value


def _parse_spec(
    f: Fields,
    doc: Mapping[str, Any],
    meta: ObjectMeta | None,
) -> AviatorPolicy | None:
    spec = f.mapping(doc, "spec", "spec", "targetRef, latencyThreshold and pingInterval")
    if spec is None:
        return None
    _unknown(f, spec, SPEC_FIELDS, "spec.")
    target = _target_ref(f, spec)
    latency = _duration(
        f,
        spec,
        "latencyThreshold",
        "spec.latencyThreshold",
        'a duration such as "100ms": endpoints slower than this are "hot"',
        LATENCY_THRESHOLD_RANGE,
    )
    interval = _duration(
        f,
        spec,
        "pingInterval",
        "spec.pingInterval",
        'a duration such as "1s": how often each pod is probed',
        PING_INTERVAL_RANGE,
    )
    port = _port(f, spec, "port", "spec.port")
    probe = _probe(f, spec, interval)
    knobs = _weigher(f, spec)
    annotate_pods = _flag(f, spec, "annotatePods")
    publish_service = _flag(f, spec, "publishService")
    timeout: Duration | None = None
    if probe is not None:
        timeout = probe[2]
        if timeout is None and interval is not None:
            timeout = min(DEFAULT_PROBE_TIMEOUT, interval)
    if (
        f.errors
        or meta is None
        or target is None
        or latency is None
        or interval is None
        or probe is None
        or timeout is None
        or knobs is None
    ):
        return None
    return AviatorPolicy(
        meta=meta,
        target_ref=target,
        latency_threshold=latency,
        ping_interval=interval,
        probe=ProbeSpec(timeout=timeout, path=probe[0], port=probe[1]),
        port=port,
        weigher=knobs,
        annotate_pods=annotate_pods,
        publish_service=publish_service,
    )

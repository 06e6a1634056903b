"""The CRD in deploy/crd/ and the model in aviator/k8s/policy.py accept the same policies.

The CRD ships in two forms: the base (deploy/crd/, in dist/crd.yaml), which must install on
Kubernetes 1.20, so it has no CEL rules; and the CEL overlay (deploy/overlays/cel, Kubernetes
>= 1.25), which adds the rules OpenAPI cannot say (duration bounds, probe.timeout <=
pingInterval). A small validator for the OpenAPI subset the CRD uses (types, required, enum,
pattern, lengths, ranges, allOf, int-or-string, strict unknown fields) plus the overlay's CEL
rules checks, on a battery of good and bad policies:

- with the overlay, the schema gives exactly the model's verdict;
- the base schema never rejects a policy the model accepts, and what it lets through that the
  model rejects is only what the CEL rules cover (Aviator reports it on the policy's status).

That the base really installs and rejects what it should is checked against a real API server
in tests/integration/kubeapi/test_manifests.py.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviator.k8s.duration import DURATION_PATTERN, DurationError, parse_duration
from aviator.k8s.fields import FieldError
from aviator.k8s.objects import WorkloadKind
from aviator.k8s.policy import (
    API_VERSION,
    DEFAULT_PROBE_PATH,
    KIND,
    PROBE_FIELDS,
    SPEC_FIELDS,
    TARGET_API_VERSION,
    TARGET_REF_FIELDS,
    TOP_FIELDS,
    PolicyError,
    parse_policy,
)
from aviator.probing.weigher import WeigherKnobs

from .builders import policy_doc

ROOT = Path(__file__).resolve().parents[3]
CRD_PATH = ROOT / "deploy" / "crd" / "aviatorpolicies.aviator.io.yaml"
CEL_OVERLAY = ROOT / "deploy" / "overlays" / "cel"
# The fields whose rules need CEL: the base schema lets their out-of-range values through.
CEL_FIELDS = frozenset({"spec.latencyThreshold", "spec.pingInterval", "spec.probe.timeout"})


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    doc = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(doc, dict)
    return doc


def _json_patch_add(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` operations (the only kind the overlay uses), on a copy."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "add", op
        *parents, leaf = op["path"].lstrip("/").split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert leaf not in node, f"{op['path']} already exists in the base"
        node[leaf] = op["value"]
    return doc


@pytest.fixture(scope="module")
def cel_crd(crd: dict[str, Any]) -> dict[str, Any]:
    """The base CRD with the CEL overlay's patch applied, as kustomize builds it."""
    kustomization = yaml.safe_load((CEL_OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../crd"]
    (patch,) = kustomization["patches"]
    assert patch["target"]["name"] == crd["metadata"]["name"]
    ops = yaml.safe_load((CEL_OVERLAY / patch["path"]).read_text())
    return _json_patch_add(crd, ops)


def version(crd: dict[str, Any]) -> dict[str, Any]:
    (v,) = crd["spec"]["versions"]
    assert isinstance(v, dict)
    return v


def schema(crd: dict[str, Any]) -> dict[str, Any]:
    s = version(crd)["schema"]["openAPIV3Schema"]
    assert isinstance(s, dict)
    return s


# --- a validator for the OpenAPI v3 subset the CRD uses ---------------------------------------

_CEL_RANGE = re.compile(
    r"^duration\(self\) >= duration\('([^']+)'\)(?: && duration\(self\) <= duration\('([^']+)'\))?$"
)
_CEL_TIMEOUT = (
    "!has(self.probe) || !has(self.probe.timeout) || "
    "duration(self.probe.timeout) <= duration(self.pingInterval)"
)


def _cel(rule: str, value: Any) -> bool:
    """The CRD's CEL rules, evaluated with Go duration semantics (CEL's duration())."""
    try:
        if rule == _CEL_TIMEOUT:
            probe = value.get("probe") or {}
            if "timeout" not in probe:
                return True
            return parse_duration(probe["timeout"]) <= parse_duration(value["pingInterval"])
        m = _CEL_RANGE.fullmatch(rule)
        assert m is not None, f"unknown CEL rule in the CRD: {rule}"
        d = parse_duration(value)
        low, high = m.group(1), m.group(2)
        return d >= parse_duration(low) and (high is None or d <= parse_duration(high))
    except (DurationError, KeyError, TypeError):
        return False  # CEL: an evaluation error rejects the object


def validate(s: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    errors: list[str] = []
    if s.get("x-kubernetes-int-or-string") and (
        isinstance(value, bool) or not isinstance(value, int | str)
    ):
        return [f"{path}: must be an integer or a string"]
    if "anyOf" in s and all(validate(branch, value, path) for branch in s["anyOf"]):
        return [f"{path}: matches none of anyOf"]
    t = s.get("type")
    checks = {
        "object": lambda v: isinstance(v, Mapping),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if t is not None and not checks[t](value):
        return [f"{path}: must be of type {t}"]
    for branch in s.get("allOf", []):
        errors.extend(validate(branch, value, path))
    if "enum" in s and value not in s["enum"]:
        errors.append(f"{path}: not in enum")
    if isinstance(value, str):
        if "maxLength" in s and len(value) > s["maxLength"]:
            errors.append(f"{path}: too long")
        if "minLength" in s and len(value) < s["minLength"]:
            errors.append(f"{path}: too short")
        if "pattern" in s and not re.search(s["pattern"], value):
            errors.append(f"{path}: does not match pattern")
    # Value validations apply to the values they are defined for: on a typeless int-or-string
    # node, ranges to numbers and patterns to strings (as the API server's validator does).
    if t in ("integer", "number") or (
        t is None and isinstance(value, int | float) and not isinstance(value, bool)
    ):
        v = float(value)
        if not math.isfinite(v):
            errors.append(f"{path}: not finite")
        if "minimum" in s and (
            v < s["minimum"] or (s.get("exclusiveMinimum") and v == s["minimum"])
        ):
            errors.append(f"{path}: below minimum")
        if "maximum" in s and (
            v > s["maximum"] or (s.get("exclusiveMaximum") and v == s["maximum"])
        ):
            errors.append(f"{path}: above maximum")
    if t == "object":
        props = s.get("properties")
        for req in s.get("required", []):
            if req not in value:
                errors.append(f"{path}.{req}: required")
        if props is not None:
            for k, v in value.items():
                if k not in props:
                    errors.append(f"{path}.{k}: unknown field")  # strict field validation
                else:
                    errors.extend(validate(props[k], v, f"{path}.{k}"))
    if t == "array" and "items" in s:
        for i, item in enumerate(value):
            errors.extend(validate(s["items"], item, f"{path}[{i}]"))
    if not errors:
        for rule in s.get("x-kubernetes-validations", []):
            if not _cel(rule["rule"], value):
                errors.append(f"{path}: {rule['message']}")
    return errors


# --- structure --------------------------------------------------------------------------------


def test_crd_names_and_version(crd: dict[str, Any]) -> None:
    group, _, ver = API_VERSION.partition("/")
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{group}"
    assert crd["spec"]["group"] == group
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == KIND
    v = version(crd)
    assert (v["name"], v["served"], v["storage"]) == (ver, True, True)
    assert v["subresources"] == {"status": {}}


def test_schema_fields_are_the_models_fields(crd: dict[str, Any]) -> None:
    s = schema(crd)
    spec = s["properties"]["spec"]
    assert set(s["properties"]) == TOP_FIELDS
    assert set(spec["properties"]) == SPEC_FIELDS
    assert set(spec["required"]) == {"targetRef", "latencyThreshold", "pingInterval"}
    target = spec["properties"]["targetRef"]
    assert set(target["properties"]) == TARGET_REF_FIELDS
    assert set(target["required"]) == {"kind", "name"}
    assert target["properties"]["kind"]["enum"] == [k.value for k in WorkloadKind]
    assert target["properties"]["apiVersion"]["enum"] == [TARGET_API_VERSION]
    assert target["properties"]["apiVersion"]["default"] == TARGET_API_VERSION
    probe = spec["properties"]["probe"]
    assert set(probe["properties"]) == PROBE_FIELDS
    assert probe["properties"]["path"]["default"] == DEFAULT_PROBE_PATH
    assert set(spec["properties"]["weigher"]["properties"]) == set(WeigherKnobs.SPEC_FIELDS)
    for field in (
        spec["properties"]["latencyThreshold"],
        spec["properties"]["pingInterval"],
        probe["properties"]["timeout"],
    ):
        assert field["pattern"] == DURATION_PATTERN


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node under ``node`` with its path (properties, items, junctors)."""
    found = [(path, node)]
    for key, child in node.get("properties", {}).items():
        found += _nodes(child, f"{path}.{key}")
    if "items" in node:
        found += _nodes(node["items"], f"{path}[]")
    for junctor in ("allOf", "anyOf", "oneOf"):
        for i, child in enumerate(node.get(junctor, [])):
            found += _nodes(child, f"{path}.{junctor}[{i}]")
    if "not" in node:
        found += _nodes(node["not"], f"{path}.not")
    return found


def test_base_schema_is_structural_and_has_no_cel(crd: dict[str, Any]) -> None:
    # Kubernetes 1.20 refuses the CRD otherwise (kubectl: unknown field
    # x-kubernetes-validations; the server: "not structural" for anyOf with types).
    assert "x-kubernetes-validations" not in CRD_PATH.read_text()
    for path, node in _nodes(schema(crd)):
        in_junctor = "allOf[" in path or "anyOf[" in path or "oneOf[" in path or ".not" in path
        if in_junctor:
            # No type, default, description, nullable or additionalProperties in a junctor.
            assert not {"type", "default", "description", "nullable"} & set(node), path
        elif node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert "anyOf" not in node, path
        else:
            assert "type" in node, f"{path}: every field needs a type"


def test_int_or_string_fields(crd: dict[str, Any]) -> None:
    spec = schema(crd)["properties"]["spec"]["properties"]
    for node in (spec["port"], spec["probe"]["properties"]["port"]):
        assert node["x-kubernetes-int-or-string"] is True
        assert (node["minimum"], node["maximum"], node["maxLength"]) == (1, 65535, 15)


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = version(crd)["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    assert default == [
        "Target", "Threshold", "Interval", "Accepted", "Programmed", "Endpoints", "Age"
    ]  # fmt: skip
    assert crd["spec"]["names"]["shortNames"] == ["avp"]


def test_printer_columns_point_at_real_fields(crd: dict[str, Any]) -> None:
    spec_props = schema(crd)["properties"]["spec"]["properties"]
    for col in version(crd)["additionalPrinterColumns"]:
        path = col["jsonPath"]
        if path.startswith(".spec."):
            head, _, rest = path.removeprefix(".spec.").partition(".")
            assert head in spec_props, path
            if rest:
                assert rest in spec_props[head]["properties"], path
        elif path.startswith(".status.conditions"):
            kind = re.search(r'@\.type=="(\w+)"', path)
            assert kind is not None
            assert kind.group(1) in {"Accepted", "ResolvedRefs", "Programmed"}
        else:
            assert path in {".metadata.creationTimestamp", ".status.endpoints"}, path


def test_example_policy_is_valid_for_the_schema(
    crd: dict[str, Any], cel_crd: dict[str, Any]
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "web" / "policy.yaml").read_text())
    assert validate(schema(crd), doc) == []
    assert validate(schema(cel_crd), doc) == []
    parse_policy(doc)


# --- same verdicts ----------------------------------------------------------------------------


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


_DELETE = object()
_DURATIONS = [
    "1ms",
    "100ms",
    "1m",
    "61s",
    "999us",
    "0",
    "0s",
    "5",
    "-1s",
    "+1s",
    "1.5ms",
    ".5s",
    "1m30s",
    "1h",
    "abc",
    "",
    "1S",
    "1µs",
    100,
    True,
    "1" + "0" * 64 + "ns",
]
_PORTS = [
    1,
    0,
    65535,
    65536,
    -1,
    "http",
    "HTTP",
    "8080",
    "a-b",
    "a--b",
    "-a",
    "a-",
    "h2c",
    "abcdefghijklmno",
    "abcdefghijklmnop",
    True,
    1.5,
]
CASES: list[tuple[str, Any]] = [
    *[("spec.latencyThreshold", d) for d in _DURATIONS],
    *[("spec.pingInterval", d) for d in [*_DURATIONS, "10ms", "9ms", "5m", "5m1s"]],
    *[("spec.port", p) for p in _PORTS],
    *[("spec.probe.port", p) for p in _PORTS],
    *[("spec.probe.timeout", d) for d in [*_DURATIONS, "1s", "1.001s", "1ms"]],
    *[
        ("spec.probe.path", v)
        for v in ["/x", "/a?b=c", "x", "/a b", "/é", "/" + "a" * 1023, "/" + "a" * 1024, "", 5]
    ],
    ("spec.probe.extra", 1),
    ("spec.probe", "yes"),
    *[
        ("spec.targetRef.kind", v)
        for v in ["Deployment", "StatefulSet", "ReplicaSet", "deployment", "", 3, _DELETE]
    ],
    *[("spec.targetRef.apiVersion", v) for v in ["apps/v1", "apps/v1beta1", _DELETE]],
    *[
        ("spec.targetRef.name", v)
        for v in ["web", "web.v2", "Web", "web_1", "-web", "", "a" * 253, "a" * 254, _DELETE]
    ],
    ("spec.targetRef.namespace", "other"),
    ("spec.targetRef", "web"),
    ("spec.retries", 3),
    ("spec.latencyThreshold", _DELETE),
    ("spec.pingInterval", _DELETE),
    ("spec.targetRef", _DELETE),
    ("spec.weigher", "fast"),
    ("spec.weigher.unknownKnob", 1),
    *[
        (f"spec.weigher.{k}", v)
        for k in WeigherKnobs.SPEC_FIELDS
        for v in [-1, 0, 0.5, 0.99, 1, 4, 4.5, 1000, 1001, True, "1"]
    ],
]


def _model_errors(doc: dict[str, Any]) -> list[FieldError]:
    try:
        parse_policy(doc)
    except PolicyError as exc:
        return list(exc.errors)
    return []


_IDS = [f"{p}={v!r}"[:60] for p, v in CASES]


@pytest.mark.parametrize(("path", "value"), CASES, ids=_IDS)
def test_cel_schema_and_model_agree(cel_crd: dict[str, Any], path: str, value: Any) -> None:
    doc = _set(policy_doc(pingInterval="1s"), path, value)
    schema_errors = validate(schema(cel_crd), doc)
    model_errors = _model_errors(doc)
    assert bool(schema_errors) == bool(model_errors), (schema_errors, model_errors)


@pytest.mark.parametrize(("path", "value"), CASES, ids=_IDS)
def test_base_schema_lets_through_only_what_cel_covers(
    crd: dict[str, Any], path: str, value: Any
) -> None:
    doc = _set(policy_doc(pingInterval="1s"), path, value)
    schema_errors = validate(schema(crd), doc)
    model_errors = _model_errors(doc)
    if schema_errors:  # never stricter than the model
        assert model_errors, schema_errors
    elif model_errors:  # let through: only what the CEL rules (or Aviator's status) catch
        assert {e.path for e in model_errors} <= CEL_FIELDS, model_errors


def test_the_battery_has_every_verdict(crd: dict[str, Any], cel_crd: dict[str, Any]) -> None:
    # A battery where everything passes (or fails), or where the base and the overlay never
    # differ, would prove nothing.
    verdicts = set()
    for path, value in CASES:
        doc = _set(policy_doc(pingInterval="1s"), path, value)
        verdicts.add((not validate(schema(crd), doc), not validate(schema(cel_crd), doc)))
    assert verdicts == {(True, True), (False, False), (True, False)}
